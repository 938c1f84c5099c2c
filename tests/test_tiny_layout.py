"""The tiny model folder is laid out like the published GLM-Image and loads with the reference loaders."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from glm_image_core.tiny import PUBLISHED_CONFIGS

PUBLISHED = PUBLISHED_CONFIGS

PUBLISHED_FILES = {
    "model_index.json",
    "scheduler/scheduler_config.json",
    "processor/chat_template.jinja",
    "processor/preprocessor_config.json",
    "processor/processor_config.json",
    "processor/tokenizer.json",
    "processor/tokenizer_config.json",
    "vision_language_encoder/config.json",
    "vision_language_encoder/generation_config.json",
    "vision_language_encoder/model.safetensors.index.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/added_tokens.json",
    "tokenizer/tokenizer_config.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
}


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _shards(folder: Path, stem: str) -> list[str]:
    index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_layout_has_the_published_files_and_sharded_weights(tiny_model_dir):
    files = _files(tiny_model_dir)
    ar_shards = _shards(tiny_model_dir / "vision_language_encoder", "model")
    dit_shards = _shards(tiny_model_dir / "transformer", "diffusion_pytorch_model")
    assert len(ar_shards) >= 2 and len(dit_shards) >= 2
    assert ar_shards == [f"model-{i:05d}-of-{len(ar_shards):05d}.safetensors" for i in range(1, len(ar_shards) + 1)]
    assert dit_shards == [
        f"diffusion_pytorch_model-{i:05d}-of-{len(dit_shards):05d}.safetensors" for i in range(1, len(dit_shards) + 1)
    ]
    expected = PUBLISHED_FILES | {f"vision_language_encoder/{s}" for s in ar_shards}
    expected |= {f"transformer/{s}" for s in dit_shards}
    assert files == expected


@pytest.mark.parametrize(
    "component,stem", [("vision_language_encoder", "model"), ("transformer", "diffusion_pytorch_model")]
)
def test_shard_index_lists_every_tensor_once_with_the_total_size(tiny_model_dir, component, stem):
    folder = tiny_model_dir / component
    index = json.loads((folder / f"{stem}.safetensors.index.json").read_text())
    stored, total = {}, 0
    for shard in set(index["weight_map"].values()):
        with safe_open(folder / shard, "pt") as f:
            for key in f.keys():
                stored[key] = shard
                tensor = f.get_tensor(key)
                total += tensor.numel() * tensor.element_size()
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == total


def test_folder_is_small(tiny_model_dir):
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 60 * 2**20


@pytest.mark.parametrize(
    "published,written",
    [
        ("model_index.json", "model_index.json"),
        ("scheduler__scheduler_config.json", "scheduler/scheduler_config.json"),
        ("processor__chat_template.jinja", "processor/chat_template.jinja"),
        ("processor__preprocessor_config.json", "processor/preprocessor_config.json"),
        ("variant-disty0-sdnq__processor__processor_config.json", "processor/processor_config.json"),
        ("variant-disty0-sdnq__processor__tokenizer_config.json", "processor/tokenizer_config.json"),
        (
            "variant-intel-int4-autoround__vision_language_encoder__generation_config.json",
            "vision_language_encoder/generation_config.json",
        ),
    ],
)
def test_unchanged_files_are_the_published_ones(tiny_model_dir, published, written):
    assert (tiny_model_dir / written).read_text().strip() == (PUBLISHED / published).read_text().strip()


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Only sizes may differ from the published configs.
SHRUNK = {
    "vision_language_encoder__config.RECONSTRUCTED.json": (
        "vision_language_encoder/config.json",
        {
            "text_config.hidden_size",
            "text_config.intermediate_size",
            "text_config.num_attention_heads",
            "text_config.num_hidden_layers",
            "text_config.num_key_value_heads",
            "text_config.rope_parameters.mrope_section",
            "vision_config.depth",
            "vision_config.hidden_size",
            "vision_config.intermediate_size",
            "vision_config.num_heads",
            "vq_config.embed_dim",
            "vq_config.latent_channels",
        },
    ),
    "transformer__config.json": (
        "transformer/config.json",
        {
            "attention_head_dim",
            "condition_dim",
            "num_attention_heads",
            "num_layers",
            "text_embed_dim",
            "time_embed_dim",
        },
    ),
    "vae__config.json": ("vae/config.json", {"block_out_channels", "norm_num_groups"}),
}


@pytest.mark.parametrize("published", sorted(SHRUNK))
def test_shrunk_configs_change_only_sizes(tiny_model_dir, published):
    written, sizes = SHRUNK[published]
    ours = _flatten(json.loads((tiny_model_dir / written).read_text()))
    theirs = _flatten(json.loads((PUBLISHED / published).read_text()))
    assert list(ours) == list(theirs)  # same keys, same order
    assert {key for key in ours if ours[key] != theirs[key]} == sizes


def test_tiny_mrope_sections_fill_the_rotary_half_of_each_head(tiny_model_dir):
    text = json.loads((tiny_model_dir / "vision_language_encoder" / "config.json").read_text())["text_config"]
    rope = text["rope_parameters"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert sum(rope["mrope_section"]) == int(head_dim * rope["partial_rotary_factor"]) // 2


def test_processor_loads_with_the_published_token_ids(tiny_model_dir):
    from transformers import GlmImageProcessor

    processor = GlmImageProcessor.from_pretrained(tiny_model_dir / "processor")
    tokenizer = processor.tokenizer
    assert len(tokenizer) == 168064
    assert processor.image_token_id == 167855
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (16384, 16385, 16385)
    ids = tokenizer.convert_tokens_to_ids(["<sop>", "<eop>", "<|endoftext|>", "<|image|>", "<|dit_token_0|>"])
    assert ids == [167845, 167846, 167841, 167855, 0]
    assert tokenizer.convert_tokens_to_ids("<|dit_token_16511|>") == 16511
    assert (processor.grid_bos_token, processor.grid_eos_token) == ("<sop>", "<eop>")
    text = tokenizer.decode(tokenizer("a cat, 16 16").input_ids)
    assert text == "a cat, 16 16"


def test_ar_model_and_glyph_encoder_load_without_missing_or_unexpected_keys(tiny_model_dir):
    from transformers import ByT5Tokenizer, GlmImageForConditionalGeneration, T5EncoderModel

    model, info = GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", output_loading_info=True
    )
    assert not any(info.values()), info
    assert model.dtype == torch.bfloat16
    assert model.lm_head.out_features == 16512
    assert model.model.language_model.embed_tokens.num_embeddings == 168064
    assert model.model.vqmodel.quantize.num_embeddings == 16384
    assert (model.generation_config.temperature, model.generation_config.top_p) == (0.9, 0.75)

    encoder, info = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", output_loading_info=True)
    assert not any(info.values()), info
    assert encoder.config.vocab_size == 384
    assert len(ByT5Tokenizer.from_pretrained(tiny_model_dir / "tokenizer")) == 384


def test_diffusers_loads_the_transformer_and_vae_with_nontrivial_outputs(tiny_model_dir):
    import diffusers

    dit, info = diffusers.GlmImageTransformer2DModel.from_pretrained(
        tiny_model_dir / "transformer", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    vae, info = diffusers.AutoencoderKL.from_pretrained(tiny_model_dir / "vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]

    g = torch.Generator().manual_seed(0)
    latent = torch.randn(1, 16, 32, 32, generator=g)
    prior = torch.randint(0, 16384, (1, 256), generator=g)
    with torch.no_grad():
        v = dit.float()(
            hidden_states=latent,
            encoder_hidden_states=torch.randn(1, 5, 64, generator=g),
            prior_token_id=prior,
            prior_token_drop=torch.zeros_like(prior, dtype=torch.bool),
            timestep=torch.tensor([500.0]),
            target_size=torch.tensor([[256.0, 256.0]]),
            crop_coords=torch.zeros(1, 2),
        ).sample
        image = vae.float().decode(latent).sample
    assert 0.3 < v.std() < 5 and 0.05 < image.std() < 5


def test_diffusers_pipeline_loads_the_folder(tiny_model_dir):
    import diffusers

    pipe = diffusers.GlmImagePipeline.from_pretrained(tiny_model_dir)
    assert type(pipe.processor).__name__ == "GlmImageProcessor"
    assert type(pipe.vision_language_encoder).__name__ == "GlmImageForConditionalGeneration"


def test_same_seed_writes_the_same_weights(tiny_model_dir, tmp_path):
    from glm_image_core.tiny import write_tiny_model

    again = write_tiny_model(tmp_path / "again", seed=0)
    for name in sorted(_files(tiny_model_dir)):
        if name.endswith(".safetensors"):
            assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
