"""ComfyUI's scaled-fp8 single files: save_single_file writes one, load_transformer reads it back within fp8
tolerance, and quantisations the loaders cannot use are refused by name (ComfyUI's per-layer files:
test_comfy_quant.py)."""

import json
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from glm_image_core.errors import ModelFilesError
from glm_image_core.formats.scaled_fp8 import MARKER as SCALED_FP8_MARKER
from glm_image_core.loading import load_transformer, read_state_dict, save_single_file

# fp8 e4m3 keeps 3 mantissa bits: each weight within 2^-4 of itself (relative, ~3.6% RMS); through the tiny DiT the
# velocity is 5.1% off the float32 model's (relative L2, measured). Bounded at 8%: rounding, not a wrong scale (every
# scale 10% too large gives 43%, measured).
MAX_OUTPUT_ERROR = 0.08


@pytest.fixture(scope="module")
def scaled_file(tiny_model_dir, tmp_path_factory):
    return save_single_file(
        tiny_model_dir / "transformer", tmp_path_factory.mktemp("fp8") / "dit_fp8.safetensors", True
    )


def dit_inputs(seed=0, size=256):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(2, 16, size // 8, size // 8, generator=g)
    glyph = torch.randn(2, 5, 64, generator=g)
    prior = torch.randint(0, 16384, (2, (size // 16) ** 2), generator=g)
    target = torch.tensor([[size, size]] * 2, dtype=torch.float32)
    return latent, glyph, prior, torch.tensor([[0], [1]]), torch.tensor([999.0, 499.0]), target, torch.zeros(2, 2)


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


def test_every_linear_weight_is_fp8_with_a_scale_and_the_rest_as_stored(tiny_model_dir, scaled_file):
    original = read_state_dict(tiny_model_dir / "transformer")
    with safe_open(scaled_file, "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor(SCALED_FP8_MARKER).dtype == torch.float8_e4m3fn
        weight = f.get_tensor("transformer_blocks.0.attn1.to_q.weight")
        scale = f.get_tensor("transformer_blocks.0.attn1.to_q.scale_weight")
        assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == ()
        dequantised = weight.float() * scale
        expected = original["transformer_blocks.0.attn1.to_q.weight"]
        assert (dequantised - expected).abs().max() <= expected.abs().max() * 2**-4
        assert f.get_tensor("prior_token_embedding.weight").dtype == original["prior_token_embedding.weight"].dtype
        assert json.loads(f.metadata()["config"])["num_layers"] == 2
    scales = {k for k in keys if k.endswith(".scale_weight")}
    linear_weights = {k for k in original if k.endswith(".weight") and original[k].ndim == 2} - {
        "prior_token_embedding.weight"
    }
    assert {k.replace(".scale_weight", ".weight") for k in scales} == linear_weights
    assert keys == set(original) | scales | {SCALED_FP8_MARKER}


def test_load_transformer_reads_the_scaled_file_within_fp8_tolerance(tiny_model_dir, scaled_file):
    full = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)
    fp8 = load_transformer(scaled_file, dtype=torch.float32)
    with torch.no_grad():
        expected, got = full(*dit_inputs()), fp8(*dit_inputs())
    assert 0 < relative_error(got, expected) <= MAX_OUTPUT_ERROR


@pytest.mark.parametrize(
    "extra,named",
    [
        ({"proj_out.qweight": torch.zeros(4, dtype=torch.int32)}, "GPTQ/AWQ"),
        ({"proj_out.weight.absmax": torch.zeros(4)}, "bitsandbytes 4-bit"),
        ({"proj_out.SCB": torch.zeros(4)}, "bitsandbytes 8-bit"),
    ],
)
def test_quantisations_it_cannot_use_are_refused_by_name(tiny_model_dir, tmp_path, extra, named):
    state = read_state_dict(tiny_model_dir / "transformer") | extra
    config = (tiny_model_dir / "transformer" / "config.json").read_text()
    save_file(state, tmp_path / "quantised.safetensors", metadata={"config": config})
    with pytest.raises(ModelFilesError, match=f"holds {named} weights .*proj_out.*scaled fp8, comfy_quant"):
        load_transformer(tmp_path / "quantised.safetensors")


class _ReadRecorder:
    """``safe_open`` that remembers the Linear weights it handed out (weakly), and how many were still alive at each
    read: what a writer holds of the source file at once."""

    def __init__(self, real, linear_weights: set[str]):
        self.real, self.linear_weights = real, linear_weights
        self.alive: list = []
        self.most_alive = 0

    def __call__(self, *args, **kwargs):
        recorder, handle = self, self.real(*args, **kwargs)

        class Opened:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def __getattr__(self, name):  # get_slice, metadata, keys: as the real handle
                return getattr(self.f, name)

            def get_tensor(self, key):
                recorder.alive = [ref for ref in recorder.alive if ref() is not None]
                recorder.most_alive = max(recorder.most_alive, len(recorder.alive))
                tensor = self.f.get_tensor(key)
                if key in recorder.linear_weights:
                    recorder.alive.append(weakref.ref(tensor))
                return tensor

        return Opened()


@pytest.mark.parametrize(
    "kwargs", [{"scaled_fp8": True}, {"quant": "float8_e4m3fn"}], ids=["scaled_fp8", "comfy_quant"]
)
def test_quantised_export_holds_one_full_precision_linear_weight_at_a_time(
    tiny_model_dir, tmp_path, monkeypatch, kwargs
):
    # At full size the DiT's bf16 weights (12.9 GiB) and their 8-bit copies (6.5 GiB) do not fit in 16-24 GB of RAM
    # together: each weight is quantised right after it is read.
    from glm_image_core import checkpoint
    from glm_image_core.dit import GlmImageTransformer2DModel
    from glm_image_core.loading import constructor_kwargs

    config = json.loads((tiny_model_dir / "transformer" / "config.json").read_text())
    with torch.device("meta"):
        model = GlmImageTransformer2DModel(**constructor_kwargs(GlmImageTransformer2DModel, config))
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    recorder = _ReadRecorder(checkpoint.safe_open, linear)
    monkeypatch.setattr(checkpoint, "safe_open", recorder)
    save_single_file(tiny_model_dir / "transformer", tmp_path / "dit.safetensors", **kwargs)
    assert len(linear) > 10 and recorder.most_alive <= 1
