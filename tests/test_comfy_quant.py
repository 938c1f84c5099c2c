"""ComfyUI's per-layer quantised DiT files (`comfy_quant` markers) without ComfyUI: save_single_file(quant=...) writes
them, the loaders check and read them (dequantised on load), and formats the core cannot dequantise are refused by
name. ComfyUI's own reading of these files is tested in test_comfy_weight_formats.py."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm_image_core.errors import InvalidInputError, ModelFilesError
from glm_image_core.formats import comfy_quant
from glm_image_core.loading import TRANSFORMER, check_files, load_transformer, read_state_dict, save_single_file
from tests.test_scaled_fp8 import dit_inputs, relative_error

# Measured on the tiny DiT against its float32 self (relative L2; README, Weight formats). Weights: every Linear
# weight together; int8 rounds to steps of scale = largest / 127, fp8 e4m3 keeps 3 mantissa bits.
MAX_WEIGHT_ERROR = {"int8_tensorwise": 0.012, "float8_e4m3fn": 0.03}  # measured 0.95%, 2.65%
MAX_OUTPUT_ERROR = {"int8_tensorwise": 0.025, "float8_e4m3fn": 0.08}  # measured 1.7%, 5.1%


@pytest.fixture(scope="module", params=comfy_quant.WRITABLE)
def written(request, tiny_model_dir, tmp_path_factory):
    """(format, the file save_single_file writes in it)."""
    out = tmp_path_factory.mktemp("quant") / f"dit_{request.param}.safetensors"
    return request.param, save_single_file(tiny_model_dir / "transformer", out, quant=request.param)


@pytest.fixture(scope="module")
def float32_dit(tiny_model_dir):
    return load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)


def linear_layers(model):
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def test_every_linear_weight_is_stored_with_a_scale_and_a_marker_and_the_rest_as_stored(
    tiny_model_dir, written, float32_dit
):
    fmt, path = written
    original = read_state_dict(tiny_model_dir / "transformer")
    layers = linear_layers(float32_dit)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        for layer in layers:
            assert f.get_tensor(f"{layer}.weight").dtype == comfy_quant.ELEMENTWISE[fmt]
            scale = f.get_tensor(f"{layer}.weight_scale")
            assert scale.dtype == torch.float32 and scale.shape == ()
            weight_only = comfy_quant.WEIGHT_ONLY if fmt.startswith("float8") else {}  # no input_scale stored
            assert json.loads(bytes(f.get_tensor(f"{layer}.comfy_quant").tolist())) == {"format": fmt, **weight_only}
        assert f.get_tensor("prior_token_embedding.weight").dtype == original["prior_token_embedding.weight"].dtype
    added = {f"{layer}{suffix}" for layer in layers for suffix in (".weight_scale", ".comfy_quant")}
    assert keys == set(original) | added


def test_int8_weights_round_to_the_nearest_step_of_their_scale(tiny_model_dir, tmp_path):
    path = save_single_file(tiny_model_dir / "transformer", tmp_path / "int8.safetensors", quant="int8_tensorwise")
    expected = read_state_dict(tiny_model_dir / "transformer")["transformer_blocks.0.attn1.to_q.weight"].float()
    with safe_open(path, "pt") as f:
        weight = f.get_tensor("transformer_blocks.0.attn1.to_q.weight")
        scale = f.get_tensor("transformer_blocks.0.attn1.to_q.weight_scale")
    assert scale == expected.abs().max() / 127
    assert weight.abs().max() == 127
    assert (weight.float() * scale - expected).abs().max() <= scale / 2 * (1 + 1e-5)


def test_the_loader_reads_the_file_within_the_formats_error(written, float32_dit):
    fmt, path = written
    loaded = load_transformer(path, dtype=torch.float32)
    layers = linear_layers(float32_dit)
    got = torch.cat([loaded.get_submodule(n).weight.flatten() for n in layers])
    expected = torch.cat([float32_dit.get_submodule(n).weight.flatten() for n in layers])
    assert 0 < relative_error(got, expected) <= MAX_WEIGHT_ERROR[fmt]
    with torch.no_grad():
        output_error = relative_error(loaded(*dit_inputs()), float32_dit(*dit_inputs()))
    assert 0 < output_error <= MAX_OUTPUT_ERROR[fmt]


def test_int8_has_a_third_of_the_scaled_fp8_error_on_the_tiny_dit(tiny_model_dir, tmp_path, float32_dit):
    """The README's numbers: on these (Gaussian) weights int8 keeps more; see README for heavy-tailed weights."""
    errors = {}
    for fmt in comfy_quant.WRITABLE:
        path = save_single_file(tiny_model_dir / "transformer", tmp_path / f"{fmt}.safetensors", quant=fmt)
        with torch.no_grad():
            errors[fmt] = relative_error(
                load_transformer(path, dtype=torch.float32)(*dit_inputs()), float32_dit(*dit_inputs())
            )
    assert errors["int8_tensorwise"] < errors["float8_e4m3fn"] / 2.5


def test_a_file_level_quantisation_block_reads_as_the_markers_do(written, tmp_path):
    fmt, path = written
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    markers = {k: tensors.pop(k) for k in list(tensors) if k.endswith(".comfy_quant")}
    layers = {k.removesuffix(".comfy_quant"): json.loads(bytes(v.tolist())) for k, v in markers.items()}
    block = tmp_path / "block.safetensors"
    save_file(tensors, block, metadata=metadata | {"_quantization_metadata": json.dumps({"layers": layers})})
    check_files(block, TRANSFORMER)
    with torch.no_grad():
        got = load_transformer(block, dtype=torch.float32)(*dit_inputs())
        expected = load_transformer(path, dtype=torch.float32)(*dit_inputs())
    assert torch.equal(got, expected)


def test_a_packed_format_is_refused_by_name_with_where_it_runs(tiny_model_dir, tmp_path):
    state = read_state_dict(tiny_model_dir / "transformer")
    state["proj_out.weight"] = torch.zeros(64, 32, dtype=torch.uint8)  # 4-bit: two weights a byte
    state["proj_out.weight_scale"] = torch.ones(64, 4, dtype=torch.float8_e4m3fn)
    state["proj_out.weight_scale_2"] = torch.ones(())
    state["proj_out.comfy_quant"] = comfy_quant.marker({"format": "nvfp4"})
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "nvfp4.safetensors", metadata={"config": config})
    check_files(tmp_path / "nvfp4.safetensors", TRANSFORMER)  # the header checks pass: ComfyUI can run it
    with pytest.raises(ModelFilesError, match=r"quantises proj_out as nvfp4.*ComfyUI 0\.33"):
        load_transformer(tmp_path / "nvfp4.safetensors")


def test_a_quantised_weight_with_other_rows_is_refused(tiny_model_dir, tmp_path):
    state = read_state_dict(tiny_model_dir / "transformer")
    state["proj_out.weight"] = torch.zeros(32, 64, dtype=torch.int8)
    state["proj_out.weight_scale"] = torch.ones(())
    state["proj_out.comfy_quant"] = comfy_quant.marker({"format": "int8_tensorwise"})
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "rows.safetensors", metadata={"config": config})
    with pytest.raises(ModelFilesError, match=r"proj_out.weight is \[32, 64\].*expects \[64, 64\]"):
        load_transformer(tmp_path / "rows.safetensors")


def test_a_broken_file_level_block_is_refused(tiny_model_dir, tmp_path):
    state = read_state_dict(tiny_model_dir / "transformer")
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "b.safetensors", metadata={"config": config, "_quantization_metadata": "{}"})
    with pytest.raises(ModelFilesError, match="_quantization_metadata is not ComfyUI's per-layer"):
        check_files(tmp_path / "b.safetensors", TRANSFORMER)


@pytest.mark.parametrize(
    "component,kwargs,named",
    [
        ("transformer", {"quant": "nvfp4"}, "quant='nvfp4'"),
        ("transformer", {"quant": "int8_tensorwise", "scaled_fp8": True}, "scaled_fp8=True alone"),
        ("vae", {"quant": "int8_tensorwise"}, "for the DiT, not the VAE"),
    ],
)
def test_the_writer_refuses_what_it_does_not_make(tiny_model_dir, tmp_path, component, kwargs, named):
    with pytest.raises(InvalidInputError, match=named):
        save_single_file(tiny_model_dir / component, tmp_path / "x.safetensors", **kwargs)
