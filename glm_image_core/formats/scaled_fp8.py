"""ComfyUI's scaled-fp8 single files (the format ComfyUI 0.3.x reads; 0.33 turns them into per-layer `comfy_quant`
layers): the `scaled_fp8` marker tensor, each Linear weight in fp8 with a float32 `scale_weight` (the weight is
fp8 * scale) and possibly a `scale_input`; everything else as in the bf16 files.

The marker also says what ComfyUI does with the activations: with 2 elements the layers run weight-only (the
weight is cast for a full-precision matmul); otherwise, where the GPU has fp8 matmuls, the activations are cast to
fp8 too, divided by `scale_input` or, without one, clamped to +-448 as they are. The writer here stores no input
scales (it has seen no activations), so its files say weight-only."""

from __future__ import annotations

import torch

from ..checkpoint import ComponentFiles, load_tensors
from .base import WeightFormat

MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8_MAX = 448.0  # the largest float8_e4m3fn
WEIGHT_ONLY_MARKER_ELEMENTS = 2  # comfy.model_detection / comfy.utils.convert_old_quants: full-precision matmuls


class ScaledFp8Format(WeightFormat):
    name = "scaled_fp8"
    label = "ComfyUI scaled fp8"
    components = ("transformer", "vae")

    def recognise(self, files: ComponentFiles) -> bool:
        return MARKER in files.weights.shapes

    def extra_key(self, key: str, expected) -> bool:
        return key == MARKER or (key.endswith(SCALE_SUFFIXES) and f"{key.rsplit('.', 1)[0]}.weight" in expected)

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return {MARKER}

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        return dequantise_state_dict(load_tensors(files.weights, None, device), dtype)

    def read_as_stored(self, files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return load_tensors(files.weights)


def weight_only(marker: torch.Tensor) -> bool:
    """Whether a file's marker asks for weight-only layers (full-precision matmuls), as ComfyUI reads it."""
    return marker.numel() == WEIGHT_ONLY_MARKER_ELEMENTS


def dequantise_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A scaled-fp8 state dict as plain weights: each Linear weight = fp8 * scale_weight (in float32), then ``dtype``
    (None: float32 for them, the others as stored)."""
    out = {}
    for key, tensor in state_dict.items():
        if key == MARKER or key.endswith(SCALE_SUFFIXES):
            continue
        scale = state_dict.get(f"{key.rsplit('.', 1)[0]}.scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            tensor = tensor.float() * scale.float()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def quantise_state_dict(state_dict: dict[str, torch.Tensor], linear_layers) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: the weight of every layer in ``linear_layers`` (module names) in float8_e4m3fn
    with one float32 ``scale_weight`` per layer (its largest magnitude / 448), the rest as given, plus the marker
    that asks for weight-only layers."""
    out = dict(state_dict)
    for name in linear_layers:
        weight = state_dict[f"{name}.weight"].float()
        scale = (weight.abs().max() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        out[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        out[f"{name}.scale_weight"] = scale.reshape(())
    out[MARKER] = torch.zeros(WEIGHT_ONLY_MARKER_ELEMENTS, dtype=torch.float8_e4m3fn)
    return out
