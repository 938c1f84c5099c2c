"""4-bit AutoRound/GPTQ checkpoints (glm_image_core.w4a16) against the `auto-round` library itself.

The reference files are made by auto-round (RTN, tests/autoround_reference.py) from the tiny folder, as
Intel/GLM-Image-int4-AutoRound was made from the published one. The references are diffusers' and transformers'
own loaders with auto-round installed: they replace the packed layers by auto-round's QuantLinear.
"""

import json
import shutil

import pytest
import torch
from auto_round_extension.torch.qlinear_torch_zp import QuantLinear
from diffusers import GlmImageTransformer2DModel as ReferenceDiT
from safetensors.torch import load_file
from transformers import DynamicCache, GlmImageForConditionalGeneration

from glm_image_core import ar, fast_ar
from glm_image_core.errors import ModelFilesError
from glm_image_core.formats import w4a16
from glm_image_core.loading import (
    AR_MODEL,
    TRANSFORMER,
    check_files,
    load_ar_model,
    load_ar_processor,
    load_transformer,
)
from tests.test_dit import make_inputs, run_reference

GROUP_SIZE = 32  # the tiny model's layers have 64 inputs; the published checkpoint uses 128


@pytest.fixture(scope="module")
def reference_dit(autoround_model_dir, tmp_path_factory):
    """diffusers' GlmImageTransformer2DModel through its auto-round quantizer, in float32. Its loader reads
    `diffusion_pytorch_model.safetensors` (AutoRound names the file `model.safetensors`) and refuses float32 for a
    quantised model, so it loads in float16 and then gets the file's tensors exactly, in float32."""
    file = autoround_model_dir / "transformer" / "model.safetensors"
    folder = tmp_path_factory.mktemp("reference") / "transformer"
    folder.mkdir()
    shutil.copy(autoround_model_dir / "transformer" / "config.json", folder)
    (folder / "diffusion_pytorch_model.safetensors").symlink_to(file)
    return in_float32(ReferenceDiT.from_pretrained(folder, torch_dtype=torch.float16), file)


def in_float32(reference, file):
    """A reference model loaded in float16 (the only float dtype auto-round's loaders keep for a quantised model)
    cast to float32, with the file's tensors loaded again exactly."""
    torch.nn.Module.to(reference, torch.float32)  # the libraries' own `to` refuses casting a quantised model
    exact = {k: t.float() if t.is_floating_point() else t for k, t in load_file(file).items()}
    _, unexpected = reference.load_state_dict(exact, strict=False)
    assert not unexpected
    return reference.eval()


@pytest.fixture(scope="module")
def dit(autoround_model_dir):
    return load_transformer(autoround_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_ar(autoround_model_dir):
    """transformers' GlmImageForConditionalGeneration through its auto-round quantizer (which loads it in float16),
    in float32; its RoPE table is computed again in float32, as transformers computes it."""
    folder = autoround_model_dir / "vision_language_encoder"
    reference = in_float32(GlmImageForConditionalGeneration.from_pretrained(folder), folder / "model.safetensors")
    lm = reference.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    return reference


@pytest.fixture(scope="module")
def ar_model(autoround_model_dir):
    return load_ar_model(autoround_model_dir, dtype=torch.float32)


def packed_modules(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def library_weight(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """auto-round's own dequantisation: its layer's forward on the identity, bias removed, in ``dtype``."""
    bias, layer.bias = layer.bias, None
    try:
        with torch.no_grad():
            return layer.to(dtype)(torch.eye(layer.infeatures, dtype=dtype)).t()
    finally:
        layer.bias = bias


# --- the files AutoRound writes --------------------------------------------------------------------------------------


def test_the_dit_packs_exactly_its_transformer_blocks_and_keeps_them_packed(dit, reference_dit):
    ours = packed_modules(dit, w4a16.W4A16Linear)
    assert ours.keys() == packed_modules(reference_dit, QuantLinear).keys()
    assert ours and all(name.startswith("transformer_blocks.") for name in ours)
    for layer in ours.values():
        assert layer.qweight.dtype == torch.int32 and layer.scales.dtype == torch.float16
        packed_bytes = sum(t.numel() * t.element_size() for t in (layer.qweight, layer.qzeros, layer.scales))
        assert packed_bytes <= 0.6 * layer.in_features * layer.out_features  # 4 bits + 1/32 scale per weight


def test_the_ar_packs_its_text_decoder_projections(ar_model, reference_ar):
    ours = packed_modules(ar_model, w4a16.W4A16Linear)
    assert ours.keys() == packed_modules(reference_ar, QuantLinear).keys()
    assert len(ours) == 6 * len(ar_model.model.language_model.layers)
    assert ar_model.lm_head.weight.dtype == torch.float32  # the logits' own layer stays as published


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("model", ["dit", "ar"])
def test_dequantised_weights_equal_auto_rounds_own_bit_for_bit(request, model, dtype):
    ours, reference = (
        (request.getfixturevalue("dit"), request.getfixturevalue("reference_dit"))
        if model == "dit"
        else (request.getfixturevalue("ar_model"), request.getfixturevalue("reference_ar"))
    )
    library = packed_modules(reference, QuantLinear)
    for name, layer in packed_modules(ours, w4a16.W4A16Linear).items():
        assert torch.equal(layer.dequantise(dtype), library_weight(library[name], dtype)), name


def test_the_dit_forward_matches_diffusers_with_auto_round(dit, reference_dit):
    latent, glyph, prior, timestep, target, crop = make_inputs(reference_dit, 2, 512, 512, text_len=7)
    drop = torch.tensor([[False], [True]]).expand_as(prior)
    expected = run_reference(reference_dit, latent, glyph, prior, drop, timestep, target, crop)
    with torch.no_grad():
        got = dit(latent, glyph, prior, drop, timestep, target, crop)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def teacher_forced_logits(models, processor, steps):
    """Each model's logits over ``steps`` decode steps, all fed the first model's greedy token."""
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 256)
    caches = [DynamicCache(config=models[0].config) for _ in models]
    out = [[] for _ in models]
    with torch.inference_mode():
        logits = [ar.next_token_logits(m, inputs.input_ids, inputs.position_ids, c) for m, c in zip(models, caches)]
        for step in range(steps):
            for o, lg in zip(out, logits):
                o.append(lg[:, :16384])
            token = logits[0][:, :16384].argmax(dim=-1, keepdim=True)
            position = inputs.decode_position_ids[:, :, step : step + 1]
            logits = [ar.next_token_logits(m, token, position, c) for m, c in zip(models, caches)]
    return [torch.cat(o) for o in out]


def test_ar_teacher_forced_logits_match_transformers_with_auto_round(ar_model, reference_ar, autoround_model_dir):
    processor = load_ar_processor(autoround_model_dir)
    expected, got = teacher_forced_logits([reference_ar, ar_model], processor, steps=24)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def fast_decoder_against_the_loop(ar_model, processor, steps: int = 6):
    """(the fast decoder of ``ar_model``, the largest difference of its logits from the transformers loop's at the
    prefill and at each of ``steps`` decode steps) on one prompt."""
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 384)
    decoder = fast_ar.FastDecoder(ar_model, batch=1, max_length=inputs.input_ids.shape[1] + steps)
    cos, sin = decoder.rope(inputs.decode_position_ids)
    cache = DynamicCache(config=ar_model.config)
    prompt_length = inputs.input_ids.shape[1]
    with torch.inference_mode():
        expected = ar.next_token_logits(ar_model, inputs.input_ids, inputs.position_ids, cache)
        diffs = [(decoder.prefill(inputs.input_ids, inputs.position_ids, 16512) - expected).abs().max()]
        for k in range(steps):
            token = expected[:, :16384].argmax(dim=-1, keepdim=True)
            expected = ar.next_token_logits(ar_model, token, inputs.decode_position_ids[:, :, k : k + 1], cache)
            logits = decoder.step(token, cos[:, k : k + 1], sin[:, k : k + 1], torch.tensor([prompt_length + k]), 16512)
            diffs.append((logits - expected).abs().max())
    return decoder, diffs


def test_the_fast_decoder_reads_4bit_layers_like_the_transformers_loop(ar_model, autoround_model_dir):
    decoder, diffs = fast_decoder_against_the_loop(ar_model, load_ar_processor(autoround_model_dir))
    assert isinstance(decoder.layers[0].kv.__self__, w4a16.W4A16Linear)  # k and v joined, still packed
    assert max(diffs) <= 1e-4, diffs


# --- 4-bit against the unquantised weights (the numbers in the README) -----------------------------------------------


def relative_error(got, expected) -> float:
    return ((got - expected).norm() / expected.norm()).item()


def test_4bit_dit_output_error_against_the_unquantised_dit(dit, tiny_model_dir, reference_dit):
    """Measured on the tiny model: weights 8.6% (RTN at 4 bits, group size 32), DiT output 3.9%; a broken scale or
    zero point gives errors near 100%."""
    full = load_transformer(tiny_model_dir, dtype=torch.float32)
    weights = [
        relative_error(layer.dequantise(), full.get_submodule(name).weight)
        for name, layer in packed_modules(dit, w4a16.W4A16Linear).items()
    ]
    latent, glyph, prior, timestep, target, crop = make_inputs(reference_dit, 2, 512, 512, text_len=7)
    inputs = (latent, glyph, prior, torch.zeros_like(prior, dtype=torch.bool), timestep, target, crop)
    with torch.no_grad():
        error = relative_error(dit(*inputs), full(*inputs))
    print(f"4-bit DiT: weights {sum(weights) / len(weights):.2%} mean, output {error:.2%}")
    assert max(weights) <= 0.15 and error <= 0.15


def test_4bit_ar_logit_error_against_the_unquantised_ar(ar_model, tiny_model_dir, autoround_model_dir):
    """Measured on the tiny model (random weights, logits of std ~1 with close top-2 margins): 19% mean relative
    error of the logits, the same greedy token at 66% of 64 teacher-forced steps (int8: 1.8%, 96%)."""
    full = load_ar_model(tiny_model_dir, dtype=torch.float32)
    processor = load_ar_processor(tiny_model_dir)
    expected, got = teacher_forced_logits([full, ar_model], processor, steps=64)
    errors = [relative_error(g, e) for g, e in zip(got, expected)]
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    print(f"4-bit AR: logits {sum(errors) / len(errors):.2%} mean, {max(errors):.2%} max; greedy token {agree:.0%}")
    assert sum(errors) / len(errors) <= 0.3 and agree >= 0.5


# --- the arithmetic ----------------------------------------------------------------------------------------------------


def random_layer(in_features=256, out_features=64, group_size=GROUP_SIZE, g_idx=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = QuantLinear(4, group_size, in_features, out_features, False, g_idx=g_idx is not None)
    layer.qweight.copy_(torch.randint(-(2**31), 2**31 - 1, layer.qweight.shape, generator=g, dtype=torch.int64))
    layer.qzeros.fill_(0x77777777)  # symmetric: every zero point 8, stored as 7
    layer.scales.copy_(torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.001)
    if g_idx is not None:
        layer.g_idx.copy_(g_idx)
    return layer


def test_act_order_g_idx_dequantises_like_auto_round():
    groups = 256 // GROUP_SIZE
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(torch.int32) % groups
    library = random_layer(g_idx=g_idx)
    ours = w4a16.dequantise(library.qweight, library.qzeros, library.scales, GROUP_SIZE, g_idx, torch.float32)
    assert torch.equal(ours, library_weight(library, torch.float32))
    assert not w4a16.int4pack_supported(256, 64, GROUP_SIZE, g_idx)  # permuted groups: the dequantising path


def test_torchs_int4_matmul_computes_the_same_layer():
    """The repacking for CUDA's int4 matmul, checked with its CPU twin (same (code - 8) * scale + zero contract)."""
    library = random_layer()
    packed, scales_and_zeros = w4a16.int4pack(library.qweight, library.qzeros, library.scales, GROUP_SIZE)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_and_zeros).float()
    exact = x.float() @ library_weight(library, torch.float32).t()
    assert relative_error(got, exact) <= 0.01  # bf16 scales and output: ~0.2%; wrong offsets give ~100%


def layer_from(library: QuantLinear) -> w4a16.W4A16Linear:
    layer = w4a16.W4A16Linear(library.infeatures, library.outfeatures, False, library.group_size)
    for name in ("qweight", "qzeros", "scales"):
        getattr(layer, name).data.copy_(getattr(library, name))
    return layer


def test_a_decode_sized_input_repacks_the_layer_and_every_later_input_takes_the_int4_matmul(monkeypatch):
    """CUDA's path, run on the CPU twin of torch's int4 matmul: a prefill-sized input before any decode step takes
    the dequantised weight; the first decode-sized input (at most INT4PACK_MAX_ROWS rows) repacks the layer, whose
    packed tensors then leave the device; every later input, a prefill's too, takes the repacked copy, so no packed
    tensor travels to the device again. Every path computes the layer."""
    monkeypatch.setattr(w4a16, "INT4PACK_DEVICES", ("cpu",))
    library = random_layer()
    layer = layer_from(library)
    exact = library_weight(library, torch.float32)
    generator = torch.Generator().manual_seed(3)
    for rows, kernel in ((40, "dequantise"), (1, "int4pack"), (w4a16.INT4PACK_MAX_ROWS, "int4pack"), (40, "int4pack")):
        x = torch.randn(rows, 256, generator=generator).to(torch.bfloat16)
        got = layer(x)
        assert layer.kernel == kernel and got.dtype == torch.bfloat16
        assert relative_error(got.float(), x.float() @ exact.t()) <= 0.01


def test_a_group_size_that_does_not_divide_the_inputs_dequantises(monkeypatch):
    """Group size 256 on 384 inputs (the AR's down_proj: 13696 = 53.5 x 256) passes the tiling check (384 = 3 x 128)
    but not torch's int4 matmul ("K divisible by qGroupSize"): such a layer takes the dequantising path, right.
    (auto-round's own layer cannot dequantise an incomplete last group; the weight is written out here.)"""
    monkeypatch.setattr(w4a16, "INT4PACK_DEVICES", ("cpu",))
    g = torch.Generator().manual_seed(4)
    layer = w4a16.W4A16Linear(384, 64, False, 256)
    codes = torch.randint(0, 16, (384, 64), generator=g, dtype=torch.int32)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    layer.qweight.data.copy_((codes.view(48, 8, 64) << shifts[None, :, None]).sum(dim=1, dtype=torch.int32))
    layer.qzeros.data.fill_(0x77777777)  # zero point 8
    layer.scales.data.copy_(torch.rand(2, 64, generator=g) * 0.02 + 0.001)
    weight = (codes - 8).float() * layer.scales.float().repeat_interleave(256, dim=0)[:384]  # [in, out]
    x = torch.randn(1, 384, generator=g).to(torch.bfloat16)
    got = layer(x)
    assert layer.kernel == w4a16.W4A16Linear.DEQUANTISE
    assert relative_error(got.float(), x.float() @ weight) <= 0.01


def test_whether_a_layer_fits_the_int4_matmul_is_decided_once_not_per_call(monkeypatch):
    """An act-order layer cannot take the int4 matmul; deciding that reads its g_idx back to the host, which a decode
    step must not do per call (a sync per projection per token, and no CUDA-graph capture)."""
    monkeypatch.setattr(w4a16, "INT4PACK_DEVICES", ("cpu",))
    groups = 256 // GROUP_SIZE
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)).to(torch.int32) % groups
    library = random_layer(g_idx=g_idx)
    layer = w4a16.W4A16Linear(256, 64, False, GROUP_SIZE, g_idx=True)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        getattr(layer, name).data.copy_(getattr(library, name))
    decided = []
    supported = w4a16.int4pack_supported
    monkeypatch.setattr(w4a16, "int4pack_supported", lambda *a: decided.append(1) or supported(*a))
    for _ in range(5):
        layer(torch.randn(1, 256).to(torch.bfloat16))
    assert layer.kernel == w4a16.W4A16Linear.DEQUANTISE and len(decided) == 1


def test_gpus_older_than_ampere_dequantise_instead_of_launching_the_int4_matmul(monkeypatch):
    """torch's CUDA int4 matmul needs compute capability 8.0: on a Turing/Volta/Pascal card the 4-bit layers
    dequantise (logged once), instead of failing at the first decode step."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (7, 5))
    w4a16._cuda_capability_problem.cache_clear()
    problem = w4a16.device_problem(torch.device("cuda", 0))
    w4a16._cuda_capability_problem.cache_clear()
    assert problem is not None and "7.5" in problem
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 6))
    assert w4a16.device_problem(torch.device("cuda", 0)) is None
    w4a16._cuda_capability_problem.cache_clear()


def test_the_cpu_runs_the_dequantising_path_and_says_so(dit):
    layer = next(iter(packed_modules(dit, w4a16.W4A16Linear).values()))
    layer(torch.randn(2, layer.in_features))
    assert layer.kernel == w4a16.W4A16Linear.DEQUANTISE


# --- what is refused -------------------------------------------------------------------------------------------------


def edited_copy(autoround_model_dir, tmp_path, component, **changes):
    root = tmp_path / "GLM-Image"
    shutil.copytree(autoround_model_dir, root, symlinks=True)
    config_path = root / component / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"].update(changes)
    config_path.write_text(json.dumps(config))
    return root


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"sym": False}, "asymmetric"),
        ({"bits": 8}, "8 bits"),
        ({"act_bits": 8}, "8-bit activations"),
        ({"packing_format": "auto_round:gptqmodel"}, "packing 'auto_round:gptqmodel'"),
        ({"quant_method": "awq"}, "quant_method 'awq'"),
        ({"group_size": 12}, "group size 12"),
    ],
)
@pytest.mark.parametrize("component", ["transformer", "vision_language_encoder"])
def test_unsupported_quantisations_are_refused_by_name_before_any_weight_is_read(
    autoround_model_dir, tmp_path, component, changes, named
):
    root = edited_copy(autoround_model_dir, tmp_path, component, **changes)
    with pytest.raises(ModelFilesError, match=named):
        check_files(root / component, TRANSFORMER if component == "transformer" else AR_MODEL)


def test_a_config_that_says_4bit_over_unpacked_weights_is_refused(tiny_model_dir, tmp_path):
    root = tmp_path / "GLM-Image"
    shutil.copytree(tiny_model_dir, root)
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True}
    config["quantization_config"]["packing_format"] = "auto_round:auto_gptq"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match="holds no packed layer"):
        load_transformer(root, dtype=torch.float32)
