"""The loader nodes refuse damaged model files as the core does (test_file_checks.py): when the prompt is queued
(validate_inputs: headers and configs) or when the node runs (values, a LoRA's fit to the model), never with a raw
exception from safetensors, torch or transformers; harmless changes load. Then, on a real server, a damaged LoRA, AR
adapter and DiT folder are refused in turn and the next prompt runs.

The corpus is test_file_checks.damaged_cases (seeded), written where the nodes list their files: GLM-Image folders
under a glm_image root, single files under diffusion_models and vae, LoRAs and adapters under loras.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

import folder_paths  # noqa: E402

from tests.comfy_glm import tiny_patcher  # noqa: E402
from tests.test_file_checks import (  # noqa: E402
    LOAD,
    LOADED,
    QUEUE,
    RAW,
    WHEN_LOADED,
    Case,
    Loader,
    copy_of,
    damaged_cases,
    dit_lora_tensors,
    loha_tensors,
    verdicts,
)

GlmImageError = comfy_host.import_pack_module("glm_image_core.errors").GlmImageError
loading = comfy_host.import_pack_module("glm_image_core.loading")
NODE_CASES = 150
NOT_LISTED = "is not one of the choices"  # a folder whose config is unreadable is not in the node's list


def made_adapter(tiny_model_dir, folder: Path) -> Path:
    """A PEFT adapter of the tiny AR (q_proj and down_proj, rank 4), made by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import GlmImageForConditionalGeneration

    model = GlmImageForConditionalGeneration.from_pretrained(tiny_model_dir / "vision_language_encoder")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def corpus_root(tmp_path_factory):
    """One folder registered as a glm_image, diffusion_models, vae and loras root (taken out afterwards)."""
    root = tmp_path_factory.mktemp("damaged")
    kinds = ("glm_image", "diffusion_models", "vae", "loras")
    for kind in kinds:
        folder_paths.add_model_folder_path(kind, str(root))
    yield root
    for kind in kinds:
        folder_paths.folder_names_and_paths[kind][0].remove(str(root))


@pytest.fixture(scope="module")
def node_loaders(tiny_model_dir, corpus_root, tmp_path_factory):
    glm = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    made = tmp_path_factory.mktemp("node_bases")
    (made / "dit").mkdir()
    dit_file = loading.save_single_file(tiny_model_dir / "transformer", made / "dit" / "dit.safetensors")
    vae_file = made / "vae.safetensors"
    vae_file.write_bytes((tiny_model_dir / "vae/diffusion_pytorch_model.safetensors").read_bytes())
    patcher = tiny_patcher(tiny_model_dir, 256, 256)
    dit_lora = made / "dit_lora.safetensors"
    save_file(dit_lora_tensors(patcher.model.diffusion_model), dit_lora)
    adapter = made_adapter(tiny_model_dir, made / "adapter")
    adapter_file = made / "adapter.safetensors"
    save_file(load_file(adapter / "adapter_model.safetensors"), adapter_file)
    (ar_model,) = glm["GLMImageARModelLoader"].execute(
        model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full"
    )
    dit_node, vae_node, lora_node = glm["GLMImageDiTLoader"], glm["GLMImageVAELoader"], glm["GLMImageLoraLoader"]
    encoder_node, adapter_node = glm["GLMImageGlyphEncoderLoader"], glm["GLMImageARLoraLoader"]

    def choice(path: Path) -> str:
        return path.relative_to(corpus_root).as_posix()

    shards = sorted(p.name for p in (tiny_model_dir / "transformer").glob("*.safetensors"))
    components = comfy_host.import_pack_module("glm_image_core.components")
    return [
        Loader(
            "DiT folder",
            tiny_model_dir / "transformer",
            shards,
            lambda p: dit_node.validate_inputs(dit=choice(p.parent)),
            lambda p: dit_node.execute(dit=choice(p.parent), weight_dtype="default"),
            "config.json",
            components.TRANSFORMER.config_sizes,
        ),
        Loader(
            "DiT file",
            dit_file,
            [""],
            lambda p: dit_node.validate_inputs(dit=choice(p)),
            lambda p: dit_node.execute(dit=choice(p), weight_dtype="default"),
            "metadata",
            components.TRANSFORMER.config_sizes,
        ),
        Loader(
            "VAE file",
            vae_file,
            [""],
            lambda p: vae_node.validate_inputs(vae=choice(p)),
            lambda p: vae_node.execute(vae=choice(p)),
        ),
        Loader(
            "glyph encoder",
            tiny_model_dir / "text_encoder",
            ["model.safetensors"],
            lambda p: encoder_node.validate_inputs(encoder=choice(p.parent)),
            lambda p: encoder_node.execute(encoder=choice(p.parent), dtype="fp32"),
            "config.json",
            components.TEXT_ENCODER.config_sizes,
            shapes_seen=WHEN_LOADED,
        ),
        Loader(
            "DiT LoRA",
            dit_lora,
            [""],
            lambda p: lora_node.validate_inputs(lora_name=choice(p)),
            lambda p: lora_node.execute(model=patcher, lora_name=choice(p), strength_model=1.0),
            kind="lora",
        ),
        *(
            Loader(
                name,
                base,
                [weights],
                lambda p: adapter_node.validate_inputs(lora_name=choice(p)),
                lambda p: adapter_node.execute(ar_model=ar_model, lora_name=choice(p), strength=1.0),
                config,
                kind="adapter",
            )
            for name, base, weights, config in (
                ("AR adapter folder", adapter, "adapter_model.safetensors", "adapter_config.json"),
                ("AR adapter file", adapter_file, "", None),
            )
        ),
    ]


def node_outcome(case: Case) -> tuple[str, str]:
    """(what happened, the message), as ComfyUI would see it: validate_inputs' answer when the prompt is queued,
    then the node's run."""
    try:
        answer = case.loader.check(case.path)
    except Exception as e:  # validate_inputs answers; it never raises
        return RAW, f"{QUEUE}: {type(e).__name__}: {e}"
    if answer is not True:
        return QUEUE, answer
    try:
        case.loader.load(case.path)
    except GlmImageError as e:
        return LOAD, str(e)
    except Exception as e:
        return RAW, f"{LOAD}: {type(e).__name__}: {e}"
    return LOADED, ""


def test_the_loader_nodes_refuse_every_damaged_file_when_queued_or_run_and_load_harmless_changes(
    node_loaders, corpus_root
):
    cases = damaged_cases(node_loaders, corpus_root, NODE_CASES, seed=1)
    for loader in node_loaders:  # the bases pass through the nodes
        assert node_outcome(Case(loader, "base", copy_of(loader, corpus_root / f"base-{loader.name}"), "", ())) == (
            LOADED,
            "",
        )
    wrong, counts = verdicts(cases, node_outcome, also_named=NOT_LISTED)
    assert not wrong, "\n".join(wrong)
    assert {name for name, _ in counts} == {loader.name for loader in node_loaders}
    assert counts.total() >= 150 and sum(n for (_, got), n in counts.items() if got != QUEUE) >= 10
    print("\n".join(f"{name}: {got} x{n}" for (name, got), n in sorted(counts.items())))  # with -s: the counts


def test_a_loha_passes_the_queue_time_check_and_comfyuis_lora_code_applies_it(tiny_model_dir, corpus_root):
    glm = comfy_host.load_pack()
    patcher = tiny_patcher(tiny_model_dir, 256, 256)
    (corpus_root / "loha").mkdir()
    save_file(loha_tensors(patcher.model.diffusion_model), corpus_root / "loha" / "loha.safetensors")
    lora_node = glm["GLMImageLoraLoader"]
    assert lora_node.validate_inputs(lora_name="loha/loha.safetensors") is True
    (patched,) = lora_node.execute(model=patcher, lora_name="loha/loha.safetensors", strength_model=1.0)
    assert list(patched.patches) == ["diffusion_model.proj_out.weight"]


# --- a real server --------------------------------------------------------------------------------------------------


def preview(node: dict) -> dict:
    """A prompt of ``node`` (id "1", its inputs linked from the others) shown by PreviewAny, so that it runs."""
    return {**node, "9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}


@pytest.mark.server
def test_the_server_refuses_a_damaged_lora_adapter_and_dit_folder_and_keeps_serving(tiny_model_dir, tmp_path):
    loras, damaged = tmp_path / "loras", tmp_path / "damaged"
    loras.mkdir()
    tensors = dit_lora_tensors(loading.load_transformer(tiny_model_dir, dtype=torch.float32))
    save_file(tensors, loras / "good.safetensors")
    (loras / "truncated.safetensors").write_bytes((loras / "good.safetensors").read_bytes()[:300])
    wide = dict(tensors, **{"transformer.proj_out.lora_B.weight": torch.zeros(200, 4)})
    save_file(wide, loras / "wide.safetensors")
    adapter = made_adapter(tiny_model_dir, loras / "style")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    (damaged / "GLM-Image-damaged" / "transformer").mkdir(parents=True)
    for file in (tiny_model_dir / "transformer").iterdir():
        (damaged / "GLM-Image-damaged" / "transformer" / file.name).write_bytes(file.read_bytes())
    shard = damaged / "GLM-Image-damaged/transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    model_paths = {"glm_image": [str(tiny_model_dir.parent), str(damaged)], "loras": str(loras)}

    dit = {"class_type": "GLMImageDiTLoader", "inputs": {"dit": "GLM-Image", "weight_dtype": "default"}}
    ar = {
        "class_type": "GLMImageARModelLoader",
        "inputs": {"model_folder": "GLM-Image", "dtype": "fp32", "device": "cpu", "weights": "full"},
    }

    def with_lora(name):
        lora = {
            "class_type": "GLMImageLoraLoader",
            "inputs": {"model": ["2", 0], "lora_name": name, "strength_model": 1},
        }
        return preview({"2": dit, "1": lora})

    with comfy_host.comfy_server(model_paths) as url:
        with pytest.raises(RuntimeError, match=r"truncated.safetensors is truncated or corrupt: its header length"):
            comfy_host.server_run_prompt(url, with_lora("truncated.safetensors"))

        failed = comfy_host.server_run_prompt(url, with_lora("wide.safetensors"))  # fits no layer: seen when run
        assert failed["status"]["status_str"] == "error"
        errors = [data for event, data in failed["status"]["messages"] if event == "execution_error"]
        assert "wide.safetensors: transformer.proj_out has A [4, " in errors[0]["exception_message"]

        adapter_prompt = preview(
            {
                "2": ar,
                "1": {
                    "class_type": "GLMImageARLoraLoader",
                    "inputs": {"ar_model": ["2", 0], "lora_name": "style", "strength": 1},
                },
            }
        )
        with pytest.raises(RuntimeError, match=r"style/adapter_config.json gives .* rank 16 .* have rank 4"):
            comfy_host.server_run_prompt(url, adapter_prompt)

        with pytest.raises(RuntimeError, match=r"diffusion_pytorch_model-00002-of-00003.safetensors is truncated"):
            comfy_host.server_run_prompt(
                url, preview({"1": {**dit, "inputs": {**dit["inputs"], "dit": "GLM-Image-damaged"}}})
            )

        served = comfy_host.server_run_prompt(url, with_lora("good.safetensors"))
        assert served["status"]["status_str"] == "success"
