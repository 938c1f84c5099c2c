"""Weight formats through ComfyUI's seam: the DiT loader takes model_options as comfy.sd.load_diffusion_model_state_dict
does (dtype, custom_operations, fp8_optimizations) and loads ComfyUI scaled-fp8 files with ComfyUI's own layers."""

import pytest
import torch
from safetensors.torch import save_file

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402

from glm_image_core.loading import load_transformer, read_state_dict, save_single_file  # noqa: E402
from tests.comfy_glm import model_nodes  # noqa: E402
from tests.test_scaled_fp8 import MAX_OUTPUT_ERROR, dit_inputs, relative_error  # noqa: E402

loading = comfy_host.import_pack_module("glm_image_core.loading")  # the pack's copy, as the DiT loader node uses it


@pytest.fixture(scope="module")
def float32_dit(tiny_model_dir):
    return load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)


def load(path, weight_dtype="default", model_options=None):
    config, state_dict = loading.read_checked_weights(path, loading.TRANSFORMER)
    patcher = model_nodes.load_dit_patcher(state_dict, config, weight_dtype, model_options=model_options)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    return patcher


def velocity(patcher):
    """The DiT's output through ComfyUI's call convention on dit_inputs()."""
    latent, glyph, prior, drop, t, _, _ = dit_inputs()
    model = patcher.model
    mask = torch.ones(glyph.shape[:2], dtype=torch.long)
    dtype = model.manual_cast_dtype or model.get_dtype()
    with torch.no_grad():
        return model.diffusion_model(
            latent.to(dtype), t, glyph=[glyph.to(dtype), mask], prior_token_id=prior, prior_token_drop=drop,
            transformer_options={},
        ).float()  # fmt: skip


def test_a_scaled_fp8_file_loads_with_fp8_layers_and_matches_the_float32_model(tiny_model_dir, tmp_path, float32_dit):
    path = save_single_file(tiny_model_dir / "transformer", tmp_path / "glm_dit_fp8_scaled.safetensors", True)
    patcher = load(path)
    to_q = patcher.model.diffusion_model.transformer_blocks[0].attn1.to_q
    # stored in fp8 (half of bf16), not dequantised on load: an fp8 parameter (ComfyUI 0.3.x's scaled-fp8 ops) or a
    # QuantizedTensor holding fp8 data (newer ComfyUI's mixed-precision ops)
    assert getattr(to_q.weight, "_qdata", to_q.weight).dtype == torch.float8_e4m3fn
    with torch.no_grad():
        expected = float32_dit(*dit_inputs())
    assert 0 < relative_error(velocity(patcher), expected) <= MAX_OUTPUT_ERROR


def test_custom_operations_build_every_layer(tiny_model_dir):
    built = []

    class RecordingOps(comfy.ops.disable_weight_init):
        class Linear(comfy.ops.disable_weight_init.Linear):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                built.append(self)

    patcher = load(tiny_model_dir / "transformer", model_options={"custom_operations": RecordingOps})
    linears = [m for m in patcher.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, RecordingOps.Linear) for m in linears) and len(built) == len(linears)


def test_model_options_dtype_and_fp8_optimizations_are_used(tiny_model_dir, float32_dit):
    patcher = load(tiny_model_dir / "transformer", model_options={"dtype": torch.bfloat16, "fp8_optimizations": True})
    assert patcher.model.get_dtype() == torch.bfloat16
    assert patcher.model.diffusion_model.proj_out.weight.dtype == torch.bfloat16
    assert patcher.model.model_config.optimizations["fp8"]
    with torch.no_grad():
        expected = float32_dit(*dit_inputs())
    assert relative_error(velocity(patcher), expected) <= 0.02  # bf16 weights: 8 mantissa bits


def test_the_loader_refuses_a_quantisation_it_cannot_use(tiny_model_dir, tmp_path):
    state = read_state_dict(tiny_model_dir / "transformer")
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "q.safetensors", metadata={"config": config, "_quantization_metadata": "{}"})
    with pytest.raises(loading.ModelFilesError, match="_quantization_metadata"):
        loading.read_checked_weights(tmp_path / "q.safetensors", loading.TRANSFORMER)
