"""SDNQ checkpoints (glm_image_core.formats.sdnq) against the `sdnq` library itself.

The reference files are made by sdnq 0.2.8 (tests/sdnq_reference.py) from the tiny folder, with the settings of
Disty0/GLM-Image-SDNQ-4bit-dynamic (dynamic per-layer dtypes from uint4, scales in the model's dtype) and, for the DiT,
also with SVD and float32 scales. The references are diffusers' and transformers' own loaders with sdnq installed:
they replace the quantised layers by sdnq's SDNQLinear. sdnq runs eagerly here (SDNQ_USE_TORCH_COMPILE=0, set before
it is imported): its compiled functions are the same arithmetic, and compiling costs ~20 s at import.
"""

import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import sdnq  # noqa: F401  (registers sdnq with transformers)
from diffusers import GlmImageTransformer2DModel as ReferenceDiT
from sdnq.layers import SDNQLinear as LibraryLinear
from sdnq.quantizer import sdnq_quantize_layer_weight
from transformers import GlmImageForConditionalGeneration

from glm_image_core import ar, checkpoint, formats, memory
from glm_image_core.errors import ModelFilesError
from glm_image_core.formats import sdnq as sdnq_format
from glm_image_core.loading import (
    AR_MODEL,
    TRANSFORMER,
    check_files,
    load_ar_model,
    load_ar_processor,
    load_transformer,
)
from glm_image_core.pipeline import generate, load_models
from tests.test_dit import make_inputs, run_reference
from tests.test_memory import allocation_peak, generation_peak
from tests.test_w4a16 import edited_copy, fast_decoder_against_the_loop, teacher_forced_logits

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def folder(sdnq_dirs, which: str):
    """The tiny checkpoint as published ("published": the whole folder) or the DiT with SVD ("svd")."""
    return sdnq_dirs / ("GLM-Image-SDNQ-4bit-dynamic" if which == "published" else "GLM-Image-SDNQ-4bit-dynamic-svd")


@pytest.fixture(scope="module")
def dits(sdnq_dirs):
    """{(checkpoint, dtype): (ours, diffusers' with sdnq's layers)} for the published DiT and the SVD one."""
    models = {}
    for which in ("published", "svd"):
        for name, dtype in DTYPES.items():
            path = folder(sdnq_dirs, which) / "transformer"
            models[which, name] = (
                load_transformer(path, dtype=dtype),
                ReferenceDiT.from_pretrained(path, torch_dtype=dtype),
            )
    return models


@pytest.fixture(scope="module")
def ars(sdnq_model_dir):
    """{dtype: (ours, transformers' with sdnq's layers)}; the reference's RoPE table is computed again in float32, as
    transformers computes it (our loader does the same)."""
    models = {}
    for name, dtype in DTYPES.items():
        reference = GlmImageForConditionalGeneration.from_pretrained(
            sdnq_model_dir / "vision_language_encoder", dtype=dtype
        )
        lm = reference.model.language_model
        lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
        models[name] = (load_ar_model(sdnq_model_dir, dtype=dtype), reference.eval())
    return models


def quantised(model, cls):
    return {name: m for name, m in model.named_modules() if isinstance(m, cls)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a tensor (equal bits, not merely equal values: -0.0 is not 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# --- the files sdnq writes ---------------------------------------------------------------------------------------------


def test_the_published_layout_is_recognised_from_its_headers_and_loads_whole(sdnq_model_dir):
    check_files(sdnq_model_dir, TRANSFORMER)
    check_files(sdnq_model_dir, AR_MODEL)
    models = load_models(sdnq_model_dir, dtype=torch.float32)
    for model in (models.dit, models.ar_model):
        layers = quantised(model, sdnq_format.SDNQLinear)
        assert {layer.code.name for layer in layers.values()} == {"uint4", "int5", "float5_e3m1fn"}
        assert all(formats.of_layer(layer) is formats.SDNQ for layer in layers.values())
    assert models.ar_model.lm_head.weight.dtype == torch.float32  # the logits' own layer stays as published
    image = generate(models, "a red 'sign'", 512, 512, steps=1, seed=0)
    assert image.size == (512, 512)


@pytest.mark.parametrize("model", ["dit", "dit-svd", "ar"])
def test_the_same_layers_are_quantised_in_the_same_dtypes_as_sdnqs(dits, ars, model):
    ours, reference = pair(dits, ars, model, "float32")
    layers, library = quantised(ours, sdnq_format.SDNQLinear), quantised(reference, LibraryLinear)
    assert layers.keys() == library.keys()
    assert {n: m.code.name for n, m in layers.items()} == {
        n: m.sdnq_dequantizer.weights_dtype for n, m in library.items()
    }
    if model == "ar":  # sdnq's skip keys: the ViT is quantised, the embeddings, the VQ model and the lm_head are not
        assert any(n.startswith("model.visual.blocks.") for n in layers)
        assert not any(n.startswith(("lm_head", "model.vqmodel")) for n in layers)


def pair(dits, ars, model: str, dtype: str):
    """(ours, the reference) of "dit", "dit-svd" or "ar", loaded in ``dtype``."""
    return ars[dtype] if model == "ar" else dits["svd" if model == "dit-svd" else "published", dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["dit", "dit-svd", "ar"])
def test_the_layers_hold_the_tensors_sdnqs_loader_gives_its_own(dits, ars, model, dtype):
    """The codes as stored; scales, zero points and SVD factors in float32 (dequantize_fp32) or in the loaded dtype,
    as sdnq's loader casts them. One difference, diffusers' and not sdnq's: loading in bfloat16, diffusers casts the
    file's tensors to bfloat16 before sdnq casts the float32 ones back to float32, so the SVD DiT's reference (float32
    scales in its file) holds its scales and zero points rounded to bfloat16; ours hold them as written."""
    ours, reference = pair(dits, ars, model, dtype)
    library = quantised(reference, LibraryLinear)
    rounded_by_diffusers = model == "dit-svd" and dtype == "bfloat16"
    for name, layer in quantised(ours, sdnq_format.SDNQLinear).items():
        for tensor in sdnq_format.LAYER_TENSORS:
            mine, theirs = layer.stored(tensor), getattr(library[name], tensor)
            if mine is None:
                assert theirs is None, (name, tensor)
                continue
            if rounded_by_diffusers and tensor in ("scale", "zero_point"):
                mine = mine.to(torch.bfloat16).to(mine.dtype)
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), (name, tensor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model", ["dit", "dit-svd", "ar"])
def test_dequantised_weights_equal_sdnqs_own_bit_for_bit(dits, ars, model, dtype):
    """Each layer's weight in the loaded dtype (float32, or bfloat16: the published scales then compute in bfloat16,
    as sdnq computes them) against sdnq's dequantisation of the same layer (its dequantiser: dtype, groups, shapes)
    on the same tensors."""
    ours, reference = pair(dits, ars, model, dtype)
    library = quantised(reference, LibraryLinear)
    for name, layer in quantised(ours, sdnq_format.SDNQLinear).items():
        tensors = {t: layer.stored(t) for t in sdnq_format.LAYER_TENSORS}
        expected = library[name].sdnq_dequantizer(**tensors, skip_compile=True, dtype=DTYPES[dtype])
        assert torch.equal(bits(layer.dequantise(DTYPES[dtype])), bits(expected)), name


@pytest.mark.parametrize("which", ["published", "svd"])
def test_the_dit_forward_matches_diffusers_with_sdnq(dits, which):
    dit, reference = dits[which, "float32"]
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, 512, 512, text_len=7)
    drop = torch.tensor([[False], [True]]).expand_as(prior)
    expected = run_reference(reference, latent, glyph, prior, drop, timestep, target, crop)
    with torch.no_grad():
        got = dit(latent, glyph, prior, drop, timestep, target, crop)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"SDNQ DiT ({which}) against diffusers with sdnq: {error:.1e} of the largest output")
    assert error <= 1e-4


def test_ar_teacher_forced_logits_match_transformers_with_sdnq(ars, sdnq_model_dir):
    ar_model, reference = ars["float32"]
    processor = load_ar_processor(sdnq_model_dir)
    expected, got = teacher_forced_logits([reference, ar_model], processor, steps=24)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    print(f"SDNQ AR against transformers with sdnq, 24 teacher-forced steps: {error:.1e} of the largest logit")
    assert error <= 1e-4


def test_the_fast_decoder_reads_sdnq_layers_like_the_transformers_loop(ars, sdnq_model_dir):
    """The fused k/v of the fast decoder joins the outputs of a k in int5 and a v in uint4 (tests/sdnq_reference.py)."""
    decoder, diffs = fast_decoder_against_the_loop(ars["float32"][0], load_ar_processor(sdnq_model_dir))
    kv = decoder.layers[0].kv
    assert isinstance(kv, sdnq_format.SideBySide) and [m.code.name for m in kv.layers] == ["int5", "uint4"]
    assert max(diffs) <= 1e-4, diffs


# --- the arithmetic ------------------------------------------------------------------------------------------------------

LAYER_DTYPES = [
    "uint4",
    "int4",
    "uint5",
    "int5",
    "float4_e2m1fn",
    "float4_e1m3fnu",
    "float5_e3m1fn",
    "float5_e2m3fnu",
    "int8",
    "uint8",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e1m6fn",
]


@pytest.mark.parametrize("scales", ["float32", "bfloat16"])
@pytest.mark.parametrize("svd", [False, True], ids=["", "svd"])
@pytest.mark.parametrize("dtype_name", LAYER_DTYPES)
def test_every_dtype_read_here_dequantises_like_sdnq(dtype_name, svd, scales, monkeypatch):
    """Every dtype the format reads, made by sdnq's own quantiser on a layer of several groups per row (the 8-bit
    dtypes: one), with and without SVD, its scales, zero points and SVD factors in float32 (dequantize_fp32) or in
    bfloat16 (as sdnq's loader casts them otherwise); dequantised in chunks of 8 rows (the chunking of a large layer)
    and compared with sdnq's dequantisation bit for bit."""
    monkeypatch.setattr(sdnq_format, "DEQUANTISE_CHUNK", 8 * 512)
    weight = torch.randn(40, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    dequantiser, tensors = sdnq_quantize_layer_weight(
        weight, "Linear", weights_dtype=dtype_name, torch_dtype=torch.bfloat16, use_svd=svd, svd_rank=8
    )
    factors = sdnq_format.FLOAT_TENSORS
    tensors = {k: t.to(DTYPES[scales]) if k in factors else t for k, t in tensors.items() if t is not None}
    scale = tensors["scale"]
    groups = scale.shape[1] if scale.ndim == 3 else 1
    layer = sdnq_format.SDNQLinear(512, 40, False, dtype_name, groups, tensors["svd_up"].shape[1] if svd else 0)
    layer.load_state_dict(tensors, assign=True)
    for dtype in (torch.float32, torch.bfloat16):
        expected = dequantiser(**tensors, skip_compile=True, dtype=dtype)
        assert torch.equal(bits(layer.dequantise(dtype)), bits(expected))


def test_files_of_sdnq_before_0_2_3_read_small_floats_as_they_were_written(sdnq_model_dir, tmp_path):
    """sdnq 0.2.3 (July 2026) began reading a small float's exponent field 0 as subnormals; before, sdnq wrote it as
    one more binade, flushing smaller values to 0 (its 0.1.5 wrote float5_e3m1fn's code 1 for 0.1875 and read it so;
    0.2.8 reads that code as 0.125). A file's config says which sdnq wrote it (``sdnq_version``), and its small floats
    are read as that version wrote them; integer codes are the same in every version."""
    values = sdnq_format.float_values(sdnq_format.code_dtype("float5_e3m1fn"), subnormals=False)
    magnitudes = [0, 0.1875, 0.25, 0.375, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24]
    assert values.tolist() == magnitudes + [0.0] + [-m for m in magnitudes[1:]]
    assert sdnq_format.float_values(sdnq_format.code_dtype("float5_e3m1fn"), subnormals=True)[1] == 0.125

    root = edited_copy(sdnq_model_dir, tmp_path, "transformer", sdnq_version="0.1.5")
    old, new = load_transformer(root, dtype=torch.float32), load_transformer(sdnq_model_dir, dtype=torch.float32)
    for name, layer in quantised(new, sdnq_format.SDNQLinear).items():
        written_by_0_1_5 = old.get_submodule(name).dequantise()
        if layer.code.is_float:
            assert not torch.equal(written_by_0_1_5, layer.dequantise()), name  # codes +-1 read as +-0.1875
        else:
            assert torch.equal(written_by_0_1_5, layer.dequantise()), name


def test_every_layer_finds_its_format():
    layer = sdnq_format.SDNQLinear(64, 32, True, "int5")
    assert formats.of_layer(layer) is formats.SDNQ
    assert formats.projection([layer]) == layer.project


# --- what is refused -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes,named",
    [
        ({"use_hadamard": True}, "Hadamard rotations"),
        ({"use_codebook": True}, "codebook weights"),
        ({"scale_dtype": "int8"}, "quantised scales .scale_dtype 'int8'"),
        ({"weights_dtype": "uint3"}, "weights dtype 'uint3'"),
        ({"modules_dtype_dict": {"int6": ["some.layer.weight"]}}, "weights dtype 'int6' for 1 layers"),
        ({"modules_quant_config": {"some.layer": {"group_size": 32}}}, "per-module settings"),
        ({"use_quantized_matmul": True, "use_svd": True}, "use_quantized_matmul"),
        ({"quant_method": "sdnq_training"}, "quant_method 'sdnq_training'"),
    ],
)
@pytest.mark.parametrize("component", ["transformer", "vision_language_encoder"])
def test_unsupported_settings_are_refused_by_name_from_the_headers_and_config(
    sdnq_model_dir, tmp_path, component, changes, named, monkeypatch
):
    root = edited_copy(sdnq_model_dir, tmp_path, component, **changes)
    for module in (sdnq_format, checkpoint):  # no weight is read to refuse
        monkeypatch.setattr(module, "load_tensors", None)
    with pytest.raises(ModelFilesError, match=named):
        check_files(root / component, TRANSFORMER if component == "transformer" else AR_MODEL)


def test_a_layer_stored_in_another_dtype_than_the_config_says_is_named(sdnq_model_dir, tmp_path):
    """A config whose per-layer dtypes are not its weights' (another download's): int5 (symmetric) over a uint4 layer
    (with zero points) is found from the headers."""
    config = json.loads((sdnq_model_dir / "transformer" / "config.json").read_text())
    dtypes = config["quantization_config"]["modules_dtype_dict"]
    layer = dtypes["uint4"][0]
    dtypes = {"int5": [layer, *dtypes["int5"]], **{k: v for k, v in dtypes.items() if k != "int5"}}
    root = edited_copy(sdnq_model_dir, tmp_path, "transformer", modules_dtype_dict=dtypes)
    with pytest.raises(ModelFilesError, match=f"stores {layer.removesuffix('.weight')} as .* makes it int5"):
        check_files(root, TRANSFORMER)


def test_a_config_that_says_sdnq_over_plain_weights_is_refused(tiny_model_dir, tmp_path):
    root = tmp_path / "GLM-Image"
    shutil.copytree(tiny_model_dir, root)
    config_path = root / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "sdnq", "weights_dtype": "uint4"}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match="holds no quantised layer"):
        load_transformer(root, dtype=torch.float32)


# --- memory --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", ["uint4", "int5", "float5_e3m1fn"])
@pytest.mark.parametrize("in_features, out_features", [(1024, 4096), (4096, 4096)], ids=["one-chunk", "four-chunks"])
def test_a_dequantising_sdnq_matmul_allocates_what_the_estimate_counts(dtype_name, in_features, out_features):
    """The moment of a real AR's prefill in SDNQ (its gate_up: 4096 x 27392 dequantised for one matmul), on layers
    big enough to measure: the estimate of ``many_rows_matmul_bytes`` within 10% of the measured peak."""
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    _, tensors = sdnq_quantize_layer_weight(weight, "Linear", weights_dtype=dtype_name, torch_dtype=torch.bfloat16)
    scale = tensors["scale"]
    layer = sdnq_format.SDNQLinear(
        in_features, out_features, False, dtype_name, scale.shape[1] if scale.ndim == 3 else 1
    )
    layer.load_state_dict({k: t for k, t in tensors.items() if t is not None}, assign=True)
    x = torch.randn(8, in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        measured = allocation_peak(lambda: layer(x))
    estimate = sum(formats.SDNQ.many_rows_matmul_bytes(in_features, out_features, 8, 2)["matmul"].values())
    assert abs(estimate - measured) <= 0.10 * measured, (estimate, measured)


def test_the_ar_working_memory_estimate_holds_for_sdnq_layers(sdnq_model_dir):
    """A bf16 generation on the tiny SDNQ AR (batch 2, a ~1000-token prompt): the estimate within 10% of the
    measured peak, as tests/test_memory.py checks it for the other formats."""
    model = load_ar_model(sdnq_model_dir, dtype=torch.bfloat16, trim=True)
    inputs = ar.build_ar_inputs(load_ar_processor(sdnq_model_dir), "a cat on a mat, " * 60, 256, 256)
    prompt_length, new_tokens = inputs.input_ids.shape[1], inputs.geometry.num_grid_tokens
    estimate = memory.ar_model_working_memory(model, 2, prompt_length, new_tokens)
    assert estimate.persistent["fused k/v projections and biases"] == 2 * 64 * 2  # 2 layers' k/v biases: read in place
    measured = generation_peak(model, inputs, 2)
    assert abs(estimate.total - measured) <= 0.10 * measured, (estimate.total, measured, estimate)
