"""LoRA on the GLM-Image MODEL in both key formats: ComfyUI/kohya keys through the stock LoraLoaderModelOnly,
diffusers/PEFT keys through Load GLM-Image LoRA. The patched weight is W + strength * alpha / rank * B @ A."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.sd  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402
from tests.comfy_glm import sample, tiny_patcher  # noqa: E402

lora_nodes = comfy_host.import_pack_module("nodes.lora_nodes")
InvalidInputError = comfy_host.import_pack_module("glm_image_core.errors").InvalidInputError
SIZE, RANK, ALPHA, STRENGTH = 256, 4, 2.0, 0.7
LAYER = "transformer_blocks.1.attn1.to_q"


@pytest.fixture(scope="module")
def patcher(tiny_model_dir):
    return tiny_patcher(tiny_model_dir, SIZE, SIZE)


def linear_layers(patcher) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in patcher.model.diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}


def random_lora(patcher, seed=0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A rank-4 (down A [rank, in], up B [out, rank]) pair for every Linear layer of the DiT: full coverage."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(RANK, m.in_features, generator=g) * 0.1,
            torch.randn(m.out_features, RANK, generator=g) * 0.1,
        )
        for name, m in linear_layers(patcher).items()
    }


def kohya_keys(lora):
    out = {}
    for name, (down, up) in lora.items():
        key = "lora_unet_" + name.replace(".", "_")
        out |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    return out


def peft_keys(lora, prefix="transformer."):
    out = {}
    for name, (down, up) in lora.items():
        key = prefix + name
        out |= {f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up, f"{key}.alpha": torch.tensor(ALPHA)}
    return out


def patched_weight(patcher, layer=LAYER) -> torch.Tensor:
    patcher.patch_model()
    try:
        return dict(patcher.model.diffusion_model.named_modules())[layer].weight.detach().clone()
    finally:
        patcher.unpatch_model()


def by_hand(patcher, lora, layer=LAYER, strength=STRENGTH):
    down, up = lora[layer]
    weight = dict(patcher.model.diffusion_model.named_modules())[layer].weight.detach()
    return weight + strength * ALPHA / RANK * (up @ down)


@pytest.fixture
def loras_folder(tmp_path):
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    yield tmp_path
    folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))


def not_loaded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]


def test_kohya_lora_through_the_stock_loader_patches_w_plus_scaled_b_a(patcher, loras_folder, caplog):
    lora = random_lora(patcher)
    save_file(kohya_keys(lora), loras_folder / "glm_kohya.safetensors")
    with caplog.at_level(logging.WARNING):
        (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "glm_kohya.safetensors", STRENGTH)
    assert not not_loaded(caplog)  # every key consumed
    assert set(patched.patches) == {f"diffusion_model.{n}.weight" for n in lora}  # every Linear layer patched
    assert torch.allclose(patched_weight(patched), by_hand(patcher, lora), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prefix", ["transformer.", "base_model.model.", ""])
def test_diffusers_peft_lora_through_the_glm_loader_patches_w_plus_scaled_b_a(patcher, loras_folder, caplog, prefix):
    lora = random_lora(patcher, seed=1)
    save_file(peft_keys(lora, prefix), loras_folder / "glm_peft.safetensors")
    with caplog.at_level(logging.WARNING):
        patched = lora_nodes.LoraLoader.execute(patcher, "glm_peft.safetensors", STRENGTH)[0]
    assert not not_loaded(caplog) and not caplog.records
    assert set(patched.patches) == {f"diffusion_model.{n}.weight" for n in lora}
    assert torch.allclose(patched_weight(patched), by_hand(patcher, lora), rtol=1e-6, atol=1e-6)


def test_the_stock_loader_does_not_read_diffusers_keys(patcher, caplog):
    """Why Load GLM-Image LoRA exists: ComfyUI's key map has no diffusers names for a model class it does not list."""
    with caplog.at_level(logging.WARNING):
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, peft_keys(random_lora(patcher)), STRENGTH, 0)
    assert not patched.patches and not_loaded(caplog)


def test_strength_zero_gives_the_unpatched_output_bit_for_bit(patcher):
    lora = peft_keys(random_lora(patcher, seed=2))
    zero = lora_nodes.apply_lora(patcher, lora, 0.0)
    assert zero.patches  # really patched, with strength 0
    assert torch.equal(sample(zero, SIZE, SIZE), sample(patcher, SIZE, SIZE))
    assert not torch.equal(sample(lora_nodes.apply_lora(patcher, lora, 1.0), SIZE, SIZE), sample(patcher, SIZE, SIZE))


def test_a_lora_for_another_model_is_refused_with_its_keys_named(patcher):
    sdxl = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
    }
    with pytest.raises(InvalidInputError, match="matches no layer.*lora_unet_down_blocks_0_attentions_0_proj_in"):
        lora_nodes.apply_lora(patcher, sdxl, 1.0, "sdxl_style.safetensors")


def test_keys_that_match_no_layer_are_named_in_a_warning(patcher, caplog):
    lora = peft_keys(random_lora(patcher)) | {"transformer.no_such_layer.lora_A.weight": torch.zeros(4, 8)}
    with caplog.at_level(logging.WARNING):
        patched = lora_nodes.apply_lora(patcher, lora, 1.0)
    assert "transformer.no_such_layer.lora_A.weight" in caplog.text
    assert len(patched.patches) == len(linear_layers(patcher))


def test_a_lora_removed_from_the_folder_is_named_in_a_core_error(patcher):
    with pytest.raises(
        InvalidInputError, match=r"'gone\.safetensors' is not one of the choices for \*\.safetensors files in loras"
    ):
        lora_nodes.LoraLoader.execute(patcher, "gone.safetensors", 1.0)
