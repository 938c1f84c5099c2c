"""Loading GLM-Image's components from the published layout and from single files, and the errors for broken files.

Every broken case starts from a copy of the tiny published-layout folder (``tiny_model_dir``) damaged in one way;
each error message must name the file, say what was expected and what to do.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import glm_image_core.checkpoint
import glm_image_core.loading
from glm_image_core.components import infer_transformer_config, infer_vae_config
from glm_image_core.defaults import PUBLISHED_LATENTS_MEAN, PUBLISHED_LATENTS_STD
from glm_image_core.errors import InvalidInputError, ModelFilesError
from glm_image_core.loading import (
    COMPONENTS,
    check_files,
    load_ar_model,
    load_ar_processor,
    load_glyph_encoder,
    load_glyph_tokenizer,
    load_transformer,
    load_vae,
    read_state_dict,
    save_single_file,
)
from glm_image_core.tiny import PUBLISHED_CONFIGS

LOADERS = {
    "transformer": load_transformer,
    "vae": load_vae,
    "text_encoder": load_glyph_encoder,
    "vision_language_encoder": load_ar_model,
}
SHARDED = ["transformer", "vision_language_encoder"]
SINGLE_FILE = {
    "transformer": "diffusion_pytorch_model-00002-of-00003.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "vision_language_encoder": "model-00002-of-00003.safetensors",
}
WEIGHTS_NAME = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "vision_language_encoder": "model",
}


def load(component: str, path: Path, **kwargs):
    return LOADERS[component](path, dtype=torch.float32, **kwargs)


def copy_tiny(tiny_model_dir: Path, tmp_path: Path, *subfolders: str) -> Path:
    """A copy of the tiny GLM-Image root holding model_index.json and only ``subfolders``; returns the root."""
    root = tmp_path / "GLM-Image"
    root.mkdir()
    shutil.copy(tiny_model_dir / "model_index.json", root)
    for name in subfolders:
        shutil.copytree(tiny_model_dir / name, root / name)
    return root


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def shard_of(folder: Path, key: str) -> Path:
    index = next(folder.glob("*.safetensors.index.json"))
    return folder / json.loads(index.read_text())["weight_map"][key]


# --------------------------------------------------------------------------------------------------------------
# Happy paths


def test_transformer_from_sharded_folder_has_diffusers_weights(tiny_model_dir):
    from diffusers import GlmImageTransformer2DModel

    ours = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)
    reference = GlmImageTransformer2DModel.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.float32)
    assert state_dicts_equal(ours.state_dict(), reference.state_dict())
    assert all(p.dtype == torch.float32 for p in ours.parameters())


def test_vae_has_diffusers_weights_and_published_latent_statistics(tiny_model_dir):
    from diffusers import AutoencoderKL

    ours = load_vae(tiny_model_dir / "vae", dtype=torch.float32)
    reference = AutoencoderKL.from_pretrained(tiny_model_dir / "vae", torch_dtype=torch.float32)
    assert state_dicts_equal(ours.state_dict(), reference.state_dict())
    assert ours.latents_mean.flatten().tolist() == reference.config.latents_mean
    assert ours.latents_std.flatten().tolist() == reference.config.latents_std


def test_glyph_encoder_matches_transformers_from_pretrained(tiny_model_dir):
    from transformers import T5EncoderModel

    ours = load_glyph_encoder(tiny_model_dir, dtype=torch.float32)
    reference = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32).eval()
    ids = torch.tensor([[0, 75, 104, 111, 111, 114, 1]])
    with torch.no_grad():
        assert torch.equal(ours(ids).last_hidden_state, reference(ids).last_hidden_state)
    assert ours.encoder.embed_tokens.weight is ours.shared.weight


def test_ar_model_matches_transformers_from_pretrained(tiny_model_dir):
    from transformers import GlmImageForConditionalGeneration

    ours = load_ar_model(tiny_model_dir, dtype=torch.float32)
    reference = GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    )
    assert isinstance(ours, GlmImageForConditionalGeneration) and not ours.training
    assert state_dicts_equal(ours.state_dict(), reference.state_dict())


def test_ar_processor_and_glyph_tokenizer_load(tiny_model_dir):
    from transformers import ByT5Tokenizer, GlmImageProcessor

    assert isinstance(load_ar_processor(tiny_model_dir), GlmImageProcessor)
    assert isinstance(load_ar_processor(tiny_model_dir / "processor"), GlmImageProcessor)
    for path in (tiny_model_dir, tiny_model_dir / "tokenizer", None):
        tokenizer = load_glyph_tokenizer(path)
        assert isinstance(tokenizer, ByT5Tokenizer)
        assert tokenizer("ab").input_ids == [ord("a") + 3, ord("b") + 3, 1]


@pytest.mark.parametrize("component", list(LOADERS))
def test_root_and_component_folder_give_the_same_model(tiny_model_dir, component):
    from_root = load(component, tiny_model_dir).state_dict()
    from_folder = load(component, tiny_model_dir / component).state_dict()
    assert state_dicts_equal(from_root, from_folder)


def test_read_state_dict_merges_shards_and_casts(tiny_model_dir):
    folder = tiny_model_dir / "transformer"
    state_dict = read_state_dict(folder, dtype=torch.float32)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert state_dict.keys() == index["weight_map"].keys()
    assert {t.dtype for t in state_dict.values()} == {torch.float32}
    assert {t.dtype for t in read_state_dict(folder).values()} == {torch.bfloat16}  # as stored


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_single_file_with_config_metadata_loads_like_the_folder(tiny_model_dir, tmp_path, component):
    single = save_single_file(tiny_model_dir / component, tmp_path / f"glm_{component}.safetensors")
    with safe_open(single, framework="pt") as f:
        assert json.loads(f.metadata()["config"]) == json.loads(
            (tiny_model_dir / component / "config.json").read_text()
        )
    assert state_dicts_equal(load(component, single).state_dict(), load(component, tiny_model_dir).state_dict())


def test_single_dit_file_without_metadata_infers_the_config(tmp_path):
    from glm_image_core.dit import GlmImageTransformer2DModel

    config = dict(
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=3,
        attention_head_dim=128,  # the published head size: the one thing shapes cannot tell
        num_attention_heads=1,
        text_embed_dim=48,
        time_embed_dim=32,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=64,
    )
    model = GlmImageTransformer2DModel(**config)
    file = tmp_path / "dit_no_metadata.safetensors"
    save_file(model.state_dict(), file)
    assert infer_transformer_config({k: tuple(v.shape) for k, v in load_file(file).items()}) == {
        "_class_name": "GlmImageTransformer2DModel",
        **config,
    }
    assert state_dicts_equal(load_transformer(file, dtype=torch.float32).state_dict(), model.state_dict())


def test_single_vae_file_without_metadata_infers_the_config_and_published_statistics(tmp_path):
    from glm_image_core.vae import AutoencoderKL

    model = AutoencoderKL(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32).eval()
    file = tmp_path / "vae_no_metadata.safetensors"
    save_file(model.state_dict(), file)
    inferred = infer_vae_config({k: tuple(v.shape) for k, v in load_file(file).items()})
    assert inferred["block_out_channels"] == [32, 32, 64, 64] and inferred["layers_per_block"] == 1
    loaded = load_vae(file, dtype=torch.float32)
    assert loaded.latents_mean.flatten().tolist() == list(PUBLISHED_LATENTS_MEAN)
    assert loaded.latents_std.flatten().tolist() == list(PUBLISHED_LATENTS_STD)
    latent = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.decode(latent), model.decode(latent))


def test_vae_defaults_for_inference_are_the_published_values():
    published = json.loads((PUBLISHED_CONFIGS / "vae__config.json").read_text())
    assert list(PUBLISHED_LATENTS_MEAN) == published["latents_mean"]
    assert list(PUBLISHED_LATENTS_STD) == published["latents_std"]
    assert published["norm_num_groups"] == 32 and published["scaling_factor"] == 0.18215


def test_single_glyph_encoder_file_without_metadata_infers_the_config(tiny_model_dir):
    file = tiny_model_dir / "text_encoder" / "model.safetensors"  # published files carry no config metadata
    with safe_open(file, framework="pt") as f:
        assert "config" not in (f.metadata() or {})
    ids = torch.tensor([[0, 75, 104, 111, 1]])
    with torch.no_grad():
        from_file = load_glyph_encoder(file, dtype=torch.float32)(ids).last_hidden_state
        from_folder = load_glyph_encoder(tiny_model_dir, dtype=torch.float32)(ids).last_hidden_state
    assert torch.equal(from_file, from_folder)


# --------------------------------------------------------------------------------------------------------------
# Missing, truncated and corrupt files


@pytest.mark.parametrize("component", SHARDED)
def test_missing_shard_is_named_with_the_shard_count(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    shard = f"{WEIGHTS_NAME[component]}-00002-of-00003.safetensors"
    (root / component / shard).unlink()
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    assert f"{component}/{shard} is missing; the index" in str(error.value)
    assert "lists 3 shards" in str(error.value) and "Download the missing shard" in str(error.value)


@pytest.mark.parametrize("component", list(LOADERS))
def test_truncated_file_is_named_with_a_redownload_hint(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    file = root / component / SINGLE_FILE[component]
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])  # an interrupted download: header intact, data cut
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    message = str(error.value)
    assert f"{component}/{SINGLE_FILE[component]} is truncated or corrupt" in message
    assert "bytes of data, the file holds" in message and "re-download" in message


@pytest.mark.parametrize("component", list(LOADERS))
def test_corrupt_header_is_named_with_a_redownload_hint(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    file = root / component / SINGLE_FILE[component]
    data = bytearray(file.read_bytes())
    data[8:16] = b"#garbage"  # the JSON header starts at byte 8
    file.write_bytes(bytes(data))
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    assert f"{component}/{SINGLE_FILE[component]} is truncated or corrupt" in str(error.value)
    assert "its header is not a JSON object" in str(error.value) and "re-download" in str(error.value)


@pytest.mark.parametrize("component", SHARDED)
def test_index_listing_a_tensor_the_shard_lacks(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    index = next((root / component).glob("*.index.json"))
    data = json.loads(index.read_text())
    data["weight_map"]["extra.not_in_the_shard.weight"] = f"{WEIGHTS_NAME[component]}-00001-of-00003.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    message = str(error.value)
    assert f"{component}/{WEIGHTS_NAME[component]}-00001-of-00003.safetensors lacks 1 of the" in message
    assert "extra.not_in_the_shard.weight" in message and "different downloads" in message


def test_missing_component_folder_in_the_root(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "vae")
    with pytest.raises(ModelFilesError, match=r"GLM-Image/transformer/ is missing.*Download the transformer/ folder"):
        load_transformer(root)


# --------------------------------------------------------------------------------------------------------------
# Files of another component


@pytest.mark.parametrize(
    "component, wrong, wrong_label",
    [
        ("transformer", "vae", "the VAE"),
        ("vae", "transformer", "the DiT"),
        ("text_encoder", "vae", "the VAE"),
        ("transformer", "text_encoder", "the glyph encoder"),
        ("vae", "text_encoder", "the glyph encoder"),
    ],
)
def test_single_file_of_another_component_is_refused(tiny_model_dir, tmp_path, component, wrong, wrong_label):
    file = tmp_path / "model.safetensors"
    shutil.copy(tiny_model_dir / wrong / SINGLE_FILE[wrong], file)
    with pytest.raises(ModelFilesError) as error:
        load(component, file)
    message = str(error.value)
    assert message.startswith(f"{tmp_path.name}/model.safetensors holds the weights of {wrong_label}")
    assert f"Give this loader the {component} weights" in message


def test_vae_weights_inside_the_transformer_folder_are_refused(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "transformer")
    folder = root / "transformer"
    for file in folder.glob("diffusion_pytorch_model*"):
        file.unlink()
    shutil.copy(tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors", folder)
    with pytest.raises(
        ModelFilesError, match=r"^transformer/diffusion_pytorch_model.safetensors holds the weights of the VAE"
    ):
        load_transformer(root)


# --------------------------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize("component", list(LOADERS))
def test_missing_config_json(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    (root / component / "config.json").unlink()
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    assert f"{component}/config.json is missing" in str(error.value)
    assert f"Download {component}/config.json from zai-org/GLM-Image" in str(error.value)


@pytest.mark.parametrize(
    "component, field, wrong",
    [
        ("transformer", "_class_name", "AutoencoderKL"),
        ("vae", "_class_name", "AutoencoderKLWan"),
        ("text_encoder", "model_type", "umt5"),
        ("vision_language_encoder", "model_type", "glm4v"),
    ],
)
def test_config_of_another_class(tiny_model_dir, tmp_path, component, field, wrong):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    edit_json(root / component / "config.json", **{field: wrong})
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    message = str(error.value)
    assert f"{component}/config.json has {field} {wrong!r}; expected" in message
    assert f"Point this loader at the {component}/ folder, or download that config.json again" in message


def test_vae_config_in_the_transformer_folder_says_whose_config_it_is(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "transformer")
    shutil.copy(tiny_model_dir / "vae" / "config.json", root / "transformer" / "config.json")
    with pytest.raises(ModelFilesError, match="It is the config of the VAE"):
        load_transformer(root)


@pytest.mark.parametrize(
    "component, changes, expected",
    [
        ("transformer", {"num_layers": 30}, "the config says num_layers=30, the weights have 2 layers"),
        ("transformer", {"attention_head_dim": 16}, "image_projector.proj.weight is [64, 64] in transformer/"),
        ("vae", {"block_out_channels": [16, 32, 32, 64]}, "the config expects"),
        ("text_encoder", {"num_layers": 12}, "the config says num_layers=12, the weights have 2 layers"),
        ("text_encoder", {"d_model": 48}, "shared.weight is [384, 64] in text_encoder/model.safetensors"),
    ],
)
def test_config_and_weight_shapes_disagree(tiny_model_dir, tmp_path, component, changes, expected):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    edit_json(root / component / "config.json", **changes)
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    message = str(error.value)
    assert f"does not match {component}/config.json" in message
    assert expected in message and "different models or downloads" in message


@pytest.mark.parametrize(
    "section, changes, expected",
    [
        ("text_config", {"hidden_size": 128}, "embed_tokens.weight is [168064, 64] in vision_language_encoder/"),
        ("text_config", {"num_hidden_layers": 3}, "tensors are missing (e.g. model.language_model.layers.2."),
        ("vision_config", {"depth": 1}, "tensors are not in the model (e.g. model.visual.blocks.1."),
    ],
)
def test_ar_config_and_weight_shapes_disagree(tiny_model_dir, tmp_path, section, changes, expected):
    root = copy_tiny(tiny_model_dir, tmp_path, "vision_language_encoder")
    config_path = root / "vision_language_encoder" / "config.json"
    config = json.loads(config_path.read_text())
    config[section].update(changes)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFilesError) as error:
        load_ar_model(root, dtype=torch.float32)
    assert "does not match vision_language_encoder/config.json" in str(error.value)
    assert expected in str(error.value)


def test_single_file_metadata_config_is_checked_against_the_weights(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "vae" / "config.json").read_text())
    config["layers_per_block"] = 2  # the weights have 3
    file = tmp_path / "vae.safetensors"
    save_file(
        load_file(tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors"), file, {"config": json.dumps(config)}
    )
    with pytest.raises(ModelFilesError, match=r"does not match the config in the metadata of .*vae.safetensors"):
        load_vae(file)


def test_single_dit_file_with_an_uninferable_head_count(tiny_model_dir, tmp_path):
    file = tmp_path / "dit.safetensors"
    save_file(read_state_dict(tiny_model_dir / "transformer"), file)  # tiny DiT: 2 heads x 32, not a multiple of 128
    with pytest.raises(ModelFilesError, match=r"no config in its metadata.*not a multiple of the published head size"):
        load_transformer(file)


def test_quantised_transformer_config_is_refused(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "transformer")
    edit_json(root / "transformer" / "config.json", quantization_config={"quant_method": "auto-round", "bits": 8})
    with pytest.raises(ModelFilesError, match=r"a quantised re-upload this loader cannot read: 8 bits"):
        load_transformer(root)


# --------------------------------------------------------------------------------------------------------------
# Formats and dtypes


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_pickle_weights_are_refused_in_a_folder(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    folder = root / component
    for file in folder.glob("*.safetensors*"):
        file.unlink()
    torch.save({"w": torch.zeros(1)}, folder / f"{WEIGHTS_NAME[component]}.bin")
    with pytest.raises(ModelFilesError) as error:
        load(component, root)
    assert f"{component}/{WEIGHTS_NAME[component]}.bin is a pickle checkpoint (.bin)" in str(error.value)
    assert "only .safetensors weights are loaded" in str(error.value)


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_pickle_single_file_is_refused(tmp_path, component):
    file = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, file)
    with pytest.raises(ModelFilesError, match=r"model.pt is a pickle checkpoint \(.pt\); only .safetensors"):
        load(component, file)


def test_ar_model_from_a_single_file_is_refused(tiny_model_dir):
    file = tiny_model_dir / "vision_language_encoder" / "model-00001-of-00003.safetensors"
    with pytest.raises(ModelFilesError, match="loads from its folder"):
        load_ar_model(file)


def test_vae_in_float16_is_refused(tiny_model_dir):
    with pytest.raises(InvalidInputError, match="overflows in float16.*bfloat16 or torch.float32"):
        load_vae(tiny_model_dir, dtype=torch.float16)


def test_processor_without_tokenizer_json(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "processor")
    (root / "processor" / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"processor/tokenizer.json is missing.*Download the processor/ folder"):
        load_ar_processor(root)


# --------------------------------------------------------------------------------------------------------------
# The checks that read no weights (what a host runs when a job is queued)

COMPONENT = {c.subfolder: c for c in COMPONENTS}


@pytest.mark.parametrize("component", list(LOADERS))
def test_check_files_passes_a_complete_folder_from_the_root_or_the_component(tiny_model_dir, component):
    check_files(tiny_model_dir, COMPONENT[component])
    check_files(tiny_model_dir / component, COMPONENT[component])


@pytest.mark.parametrize("component", list(LOADERS))
def test_check_files_reads_no_tensor_data(tiny_model_dir, monkeypatch, component):
    def read_tensors(*args, **kwargs):
        raise AssertionError("check_files read tensor data")

    for module in (glm_image_core.checkpoint, glm_image_core.loading):  # where the name is looked up
        monkeypatch.setattr(module, "load_tensors", read_tensors)
        monkeypatch.setattr(module, "read_state_dict", read_tensors)
    check_files(tiny_model_dir, COMPONENT[component])


@pytest.mark.parametrize("component", SHARDED)
def test_check_files_names_a_missing_shard(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    shard = f"{WEIGHTS_NAME[component]}-00002-of-00003.safetensors"
    (root / component / shard).unlink()
    with pytest.raises(ModelFilesError, match=f"{component}/{shard} is missing; the index .* lists 3 shards"):
        check_files(root, COMPONENT[component])


@pytest.mark.parametrize("component", list(LOADERS))
def test_check_files_names_a_truncated_file(tiny_model_dir, tmp_path, component):
    root = copy_tiny(tiny_model_dir, tmp_path, component)
    file = root / component / SINGLE_FILE[component]
    with open(file, "r+b") as f:
        f.truncate(file.stat().st_size // 2)
    with pytest.raises(ModelFilesError, match=f"{component}/{SINGLE_FILE[component]} is truncated or corrupt"):
        check_files(root, COMPONENT[component])


def test_check_files_names_a_folder_that_does_not_exist(tmp_path):
    with pytest.raises(ModelFilesError, match="GLM-Image does not exist; expected the GLM-Image folder"):
        check_files(tmp_path / "GLM-Image", COMPONENT["transformer"])


def test_check_files_names_weights_of_another_component(tiny_model_dir):
    with pytest.raises(ModelFilesError, match=r"holds the weights of the VAE \(AutoencoderKL\), not of the DiT"):
        check_files(tiny_model_dir / "vae" / SINGLE_FILE["vae"], COMPONENT["transformer"])


def test_check_files_refuses_a_single_file_for_the_ar_model(tiny_model_dir):
    with pytest.raises(ModelFilesError, match="loads from its folder"):
        check_files(
            tiny_model_dir / "vision_language_encoder" / SINGLE_FILE["vision_language_encoder"],
            COMPONENT["vision_language_encoder"],
        )


def test_check_files_names_a_missing_processor_file_beside_the_ar_model(tiny_model_dir, tmp_path):
    root = copy_tiny(tiny_model_dir, tmp_path, "vision_language_encoder", "processor")
    (root / "processor" / "tokenizer.json").unlink()
    with pytest.raises(ModelFilesError, match=r"processor/tokenizer.json is missing"):
        check_files(root, COMPONENT["vision_language_encoder"])
