"""Weight formats through ComfyUI's seam: the DiT loader takes model_options as comfy.sd.load_diffusion_model_state_dict
does (dtype, custom_operations, fp8_optimizations) and loads ComfyUI's quantised files with ComfyUI's own layers:
scaled fp8 on every version, per-layer (`comfy_quant`) files on ComfyUI with mixed-precision layers (0.33), made
here by ComfyUI's own quantisation code, and refused with the version needed on older ComfyUI."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402

from glm_image_core.formats import comfy_quant  # noqa: E402
from glm_image_core.loading import load_transformer, read_state_dict, save_single_file  # noqa: E402
from tests.comfy_glm import conditionings, dit_loading, model_sampling, sample, tiny_patcher  # noqa: E402
from tests.test_scaled_fp8 import MAX_OUTPUT_ERROR, dit_inputs, relative_error  # noqa: E402

loading = comfy_host.import_pack_module("glm_image_core.loading")  # the pack's copy, as the DiT loader node uses it


@pytest.fixture(scope="module")
def float32_dit(tiny_model_dir):
    return load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)


def load(path, weight_dtype="default", model_options=None):
    weights = loading.read_checked_weights(path, loading.TRANSFORMER)
    patcher = dit_loading.load_dit_patcher(
        weights.state_dict, weights.config, weight_dtype, model_options=model_options, fmt=weights.format
    )
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
            latent.to(dtype),
            t,
            glyph=[glyph.to(dtype), mask],
            prior_token_id=prior,
            prior_token_drop=drop,
            transformer_options={},
        ).float()


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


@pytest.mark.parametrize("fmt", ["scaled_fp8", "float8_e4m3fn"])
def test_our_fp8_files_run_weight_only_where_the_gpu_has_fp8_matmuls(tiny_model_dir, tmp_path, float32_dit, fmt):
    """On a GPU with fp8 matmuls, ComfyUI also casts a layer's activations to fp8 unless the file says weight-only:
    divided by the layer's `input_scale`, or, without one (our files have none: no activations were seen), as they
    are, clamped at +-448. Our files say weight-only (a scaled-fp8 marker of 2 elements, comfy_quant's
    full_precision_matrix_mult). The error both ways, fp8 matmuls stood in by torch's CPU _scaled_mm: ours stays the
    weight-only error (5.0%); the same file without the flag loses more (7.0-7.3%)."""
    if fmt != "scaled_fp8" and not MIXED_OPS:
        pytest.skip("this ComfyUI has no mixed-precision layers")
    folder = tiny_model_dir / "transformer"
    ours = save_single_file(
        folder, tmp_path / "ours.safetensors", **({"scaled_fp8": True} if fmt == "scaled_fp8" else {"quant": fmt})
    )
    state, config = read_state_dict(ours), (folder / "config.json").read_text()
    if fmt == "scaled_fp8":
        state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)  # the marker without the flag
    else:
        state = {k: comfy_quant.marker({"format": fmt}) if k.endswith(".comfy_quant") else v for k, v in state.items()}
    save_file(state, tmp_path / "unflagged.safetensors", metadata={"config": config})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comfy.model_management, "supports_fp8_compute", lambda device=None: True)
        with torch.no_grad():
            expected = float32_dit(*dit_inputs())
        error = {
            name: relative_error(velocity(load(tmp_path / f"{name}.safetensors")), expected)
            for name in ("ours", "unflagged")
        }
    print(f"{fmt} with fp8 matmuls: output error {error}")
    assert error["ours"] <= MAX_OUTPUT_ERROR and error["ours"] < error["unflagged"]


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
    state = read_state_dict(tiny_model_dir / "transformer") | {"proj_out.SCB": torch.zeros(4)}
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "q.safetensors", metadata={"config": config})
    with pytest.raises(loading.ModelFilesError, match="bitsandbytes 8-bit"):
        loading.read_checked_weights(tmp_path / "q.safetensors", loading.TRANSFORMER)


# ---------------------------------------------------------------------------------------------------------------
# ComfyUI's per-layer quantised files (comfy_quant)

MIXED_OPS = hasattr(comfy.ops, "mixed_precision_ops")
needs_mixed_ops = pytest.mark.skipif(not MIXED_OPS, reason="this ComfyUI has no mixed-precision layers")

# format: (the keyword arguments of its ComfyUI layout's quantize, the largest relative L2 between the DiT's output
# on ComfyUI's layers and on the dequantised weights in float32). Measured on this CPU host: fp8, mxfp8 and nvfp4 run
# on the dequantised weight (no fp8/fp4 matmul here), so only the cast differs (<1e-6; nvfp4 0.2%: its dequantised
# weight is bf16 in the reference, float32 in ComfyUI); the int8 formats also round activations to int8 per row
# (0.4-0.7%); ConvRot W4A4 rounds them to 4 bits (7.1%).
COMFY_FORMATS = {
    "float8_e4m3fn": ({}, 1e-4),
    "float8_e5m2": ({}, 1e-4),
    "mxfp8": ({}, 1e-4),
    "nvfp4": ({}, 0.005),
    "int8_tensorwise": ({}, 0.02),
    "int8_tensorwise+convrot": ({"per_channel": True, "convrot": True, "convrot_groupsize": 16}, 0.02),
    "asym_w4a8_int8": ({"convrot_groupsize": 16}, 0.02),
    "convrot_w4a4": ({"convrot_groupsize": 64}, 0.12),
}


def comfy_made_file(folder, path, fmt: str, **quantize_kwargs) -> dict:
    """A per-layer quantised DiT file made by ComfyUI's own code: each Linear of the transformer blocks (as ComfyUI's
    quantised DiTs keep embedders and output layers in high precision) becomes a QuantizedTensor through its format's
    ComfyUI layout, and ComfyUI's mixed-precision Linear writes it (weight, scales, comfy_quant marker) in its
    state_dict. Layers the layout cannot hold (ConvRot needs whole groups of inputs) stay as stored. Returns the
    dequantised state dict (ComfyUI's QuantizedTensor.dequantize), the reference."""
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

    state = read_state_dict(folder)
    reference = dict(state)
    ops = comfy.ops.mixed_precision_ops({}, torch.float32)
    layers = [k.removesuffix(".weight") for k, v in state.items() if k.startswith("transformer_blocks") and v.ndim == 2]
    for layer in layers:
        try:
            weight = QuantizedTensor.from_float(
                state[f"{layer}.weight"], QUANT_ALGOS[fmt]["comfy_tensor_layout"], **quantize_kwargs
            )
        except ValueError:  # a shape this layout cannot hold
            continue
        linear = ops.Linear(*reversed(weight.shape), bias=False)
        linear.weight, linear.quant_format = torch.nn.Parameter(weight, requires_grad=False), fmt
        del state[f"{layer}.weight"]
        state.update(linear.state_dict(prefix=f"{layer}."))
        reference[f"{layer}.weight"] = weight.dequantize()
    config = (folder / "config.json").read_text()
    save_file({k: v.contiguous() for k, v in state.items()}, path, metadata={"config": config})
    return reference


def float32_velocity_of(state_dict, folder):
    model = load_transformer(folder, dtype=torch.float32)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    with torch.no_grad():
        return model(*dit_inputs())


@needs_mixed_ops
@pytest.mark.parametrize("name", list(COMFY_FORMATS))
def test_a_comfyui_made_file_runs_on_comfyuis_quantised_layers(tiny_model_dir, tmp_path, name):
    from comfy.quant_ops import QUANT_ALGOS, QuantizedTensor

    fmt = name.split("+")[0]
    if fmt not in QUANT_ALGOS:
        pytest.skip(f"this ComfyUI's comfy-kitchen has no {fmt}")
    kwargs, tolerance = COMFY_FORMATS[name]
    folder = tiny_model_dir / "transformer"
    reference = comfy_made_file(folder, tmp_path / f"{fmt}.safetensors", fmt, **kwargs)
    patcher = load(tmp_path / f"{fmt}.safetensors", model_options={"dtype": torch.float32})
    assert isinstance(patcher.model.diffusion_model.transformer_blocks[0].attn1.to_q.weight, QuantizedTensor)
    assert relative_error(velocity(patcher), float32_velocity_of(reference, folder)) <= tolerance


@needs_mixed_ops
def test_a_file_level_quantisation_block_loads_as_the_markers_do(tiny_model_dir, tmp_path):
    comfy_made_file(tiny_model_dir / "transformer", tmp_path / "markers.safetensors", "int8_tensorwise")
    with safe_open(tmp_path / "markers.safetensors", "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    layers = {
        k.removesuffix(".comfy_quant"): json.loads(bytes(tensors.pop(k).tolist()))
        for k in list(tensors)
        if k.endswith(".comfy_quant")
    }
    block = metadata | {"_quantization_metadata": json.dumps({"layers": layers})}
    save_file(tensors, tmp_path / "block.safetensors", metadata=block)
    options = {"dtype": torch.float32}
    expected = velocity(load(tmp_path / "markers.safetensors", model_options=options))
    assert torch.equal(velocity(load(tmp_path / "block.safetensors", model_options=options)), expected)


@needs_mixed_ops
@pytest.mark.parametrize("fmt", comfy_quant.WRITABLE)
def test_our_files_are_what_comfyuis_own_layers_read(tiny_model_dir, tmp_path, fmt):
    """Every quantised layer of a save_single_file(quant=...) file, loaded by ComfyUI's mixed-precision Linear,
    dequantises (ComfyUI's code) to exactly what our loader reads; ComfyUI's detection finds the file quantised."""
    path = save_single_file(tiny_model_dir / "transformer", tmp_path / f"{fmt}.safetensors", quant=fmt)
    state = read_state_dict(path)
    assert comfy.utils.detect_layer_quantization(state, "") == {"mixed_ops": True}
    ours = load_transformer(path, dtype=torch.float32)
    ops = comfy.ops.mixed_precision_ops({}, torch.float32)
    for layer in comfy_quant.layer_configs(state):
        linear = ops.Linear(*reversed(state[f"{layer}.weight"].shape))
        linear.load_state_dict({k.removeprefix(f"{layer}."): v for k, v in state.items() if k.startswith(f"{layer}.")})
        assert linear.quant_format == fmt
        assert torch.equal(linear.weight.dequantize().float(), ours.get_submodule(layer).weight)


@needs_mixed_ops
@pytest.mark.parametrize("fmt", comfy_quant.WRITABLE)
def test_our_files_sample_through_the_loader_close_to_the_float_model(tiny_model_dir, tmp_path, fmt):
    path = save_single_file(tiny_model_dir / "transformer", tmp_path / f"{fmt}.safetensors", quant=fmt)
    patcher = load(path)
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(256, 256))
    expected = sample(tiny_patcher(tiny_model_dir, 256, 256), 256, 256)
    got = sample(patcher, 256, 256)
    assert 0 < relative_error(got, expected) <= MAX_OUTPUT_ERROR


@pytest.mark.skipif(MIXED_OPS, reason="this ComfyUI has mixed-precision layers")
def test_a_per_layer_file_is_refused_naming_the_comfyui_version_needed(tiny_model_dir, tmp_path):
    path = save_single_file(tiny_model_dir / "transformer", tmp_path / "int8.safetensors", quant="int8_tensorwise")
    version = ".".join(map(str, comfy_host.comfyui_version()))
    with pytest.raises(loading.InvalidInputError, match=rf"per-layer quantised.*\({version}\).*0\.33 or newer"):
        load(path)


# ---------------------------------------------------------------------------------------------------------------
# Our comfy_quant files on ComfyUI's layers against diffusers' DiT on the same layers (issue: an int8 file's sampled
# latent differed from that reference by 0.0014, 19% of what int8 moves it)


def quantised_file(tiny_model_dir, tmp_path, fmt: str):
    return save_single_file(tiny_model_dir / "transformer", tmp_path / f"{fmt}.safetensors", quant=fmt)


def diffusers_dit_on_comfyuis_layers(folder, patcher):
    """diffusers' GlmImageTransformer2DModel with every Linear the patcher's model holds quantised replaced by a new
    layer of ComfyUI's class for it (the one ComfyUI picked for this device), loaded with the same tensors."""
    from diffusers import GlmImageTransformer2DModel

    reference = GlmImageTransformer2DModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = patcher.model.diffusion_model
    state = patcher.model_state_dict(filter_prefix="diffusion_model.")
    for name, module in list(reference.named_modules()):
        layer = ours.get_submodule(name) if isinstance(module, torch.nn.Linear) else None
        if getattr(layer, "quant_format", None) is None:
            continue
        fresh = type(layer)(module.in_features, module.out_features, bias=module.bias is not None)
        prefix = f"diffusion_model.{name}."
        fresh.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, fresh)
    return reference


def reference_sample(reference, width, height, steps, seed=0, noise_scale=1.0):
    """What comfy_glm.sample samples (euler, simple, CFG 1.5, the same conditionings and noise), with the reference
    DiT in glm_image_core.sampling's loop: cond and uncond as two passes, as diffusers' pipeline runs them."""
    from glm_image_core.sampling import DitCondition, denoise
    from glm_image_core.schedule import glm_schedule

    def dit(latent, glyph, prior, drop, timestep, target, crop, encoder_attention_mask=None, reference_kv=None):
        drop = drop[:, None].expand_as(prior).clone()
        return reference(latent, glyph, prior, drop, timestep, target, crop, return_dict=False)[0]

    dit.dtype = None
    (glyph, positive), (empty, negative) = (c[0] for c in conditionings(width, height, seed))
    prior = positive["glm_prior_token_ids"]
    noise = torch.randn(1, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed + 1)) * noise_scale
    sigmas, timesteps = glm_schedule(steps, height, width)
    cond, uncond = DitCondition(glyph, prior), DitCondition(empty, prior, drop_prior=True)
    with torch.no_grad():
        return denoise(dit, noise, sigmas, timesteps, cond, uncond, 1.5, batched_cfg=False)


@needs_mixed_ops
def test_every_int8_layer_computes_what_comfyuis_own_layer_computes_on_a_sampling_steps_inputs(
    tiny_model_dir, tmp_path
):
    """Each quantised Linear of the pack's DiT, from an int8_tensorwise file, against a new ComfyUI mixed-precision
    Linear loaded with the same tensors, on the inputs it saw in a real sampling step: equal, bit for bit."""
    patcher = load(quantised_file(tiny_model_dir, tmp_path, "int8_tensorwise"), model_options={"dtype": torch.float32})
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(256, 256))
    layers = {n: m for n, m in patcher.model.diffusion_model.named_modules() if getattr(m, "quant_format", None)}
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, args, out, n=n: seen.setdefault(n, (args[0].clone(), out.clone())) and None)
        for n, m in layers.items()
    ]
    try:
        sample(patcher, 256, 256, steps=1)
    finally:
        for hook in hooks:
            hook.remove()
    state = patcher.model_state_dict(filter_prefix="diffusion_model.")
    assert layers and set(seen) == set(layers)
    for name, (x, out) in seen.items():
        layer = layers[name]
        fresh = type(layer)(layer.in_features, layer.out_features, bias=layer.bias is not None)
        prefix = f"diffusion_model.{name}."
        fresh.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        assert fresh.quant_format == "int8_tensorwise"
        with torch.no_grad():
            assert torch.equal(fresh(x), out), name


@needs_mixed_ops
@pytest.mark.parametrize("fmt", comfy_quant.WRITABLE)
def test_a_comfy_quant_dit_samples_what_diffusers_dit_samples_on_comfyuis_layers(tiny_model_dir, tmp_path, fmt):
    """One forward: equal within float rounding, in both formats. Five sampling steps: weight-only layers (float8
    on a CPU) stay equal. ComfyUI's int8 layers round their activations to int8 per row on the fly (W8A8, its int8
    kernel), a function with steps: the float rounding of two equal implementations (ours attends over [image;
    text], diffusers over [text; image]; ComfyUI batches cond and uncond) lands some activations on the other side
    of a step, and the latents part by as much as a 1-ulp change of the reference's own starting noise parts them
    (measured alongside): that is ComfyUI's int8 kernel, whatever model it runs, not a wrong layer."""
    folder = tiny_model_dir / "transformer"
    patcher = load(quantised_file(tiny_model_dir, tmp_path, fmt), model_options={"dtype": torch.float32})
    reference = diffusers_dit_on_comfyuis_layers(folder, patcher)
    latent, glyph, prior, drop, t, target, crop = dit_inputs()
    with torch.no_grad():
        drop = drop.expand_as(prior).bool().clone()
        expected = reference(latent, glyph, prior, drop, t, target, crop, return_dict=False)[0]
    assert (velocity(patcher) - expected).abs().max() <= 1e-5

    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(256, 256))
    ours = patcher.model.process_latent_in(sample(patcher, 256, 256, steps=5))  # KSampler returns raw VAE latents
    theirs = reference_sample(reference, 256, 256, steps=5)
    plain = reference_sample(
        diffusers_dit_on_comfyuis_layers(folder, tiny_patcher(tiny_model_dir, 256, 256)), 256, 256, 5
    )
    moved = (theirs - plain).abs().max().item()  # what quantising moves the reference's latent
    difference = (ours - theirs).abs().max().item()
    one_ulp = max(
        (reference_sample(reference, 256, 256, 5, noise_scale=1 + k * 2**-23) - theirs).abs().max().item()
        for k in (1, -1)
    )
    print(
        f"{fmt}: sampled latent vs the reference {difference:.2g}; the reference vs itself from noise 1 ulp away "
        f"{one_ulp:.2g}; quantising moves it {moved:.2g}"
    )
    if fmt == "int8_tensorwise":
        assert one_ulp > 1e-3 and difference <= 3 * one_ulp and difference < 0.5 * moved
    else:
        assert difference <= 1e-4 < moved
