"""Weight formats: how the weights of a model's linear layers are stored, one module per format, and the registry that
the loaders, the memory accounting, the fast AR decoder, the LoRA code and the nodes ask (none of them tests a
layer's class to learn its format).

Each format (``base.WeightFormat``) says in one place how it is recognised from headers and configs alone (cheap
enough for queue time), what it refuses, the layer it builds in a core model and the tensors it gives it, its
dequantisation, what the fast AR decoder multiplies with, the bytes it needs beyond its weights, and the device
copies it makes for itself. A host with its own layers for a format (ComfyUI's ops) keys them by ``name``
(nodes/dit_loading.py).

Formats, in the order they are recognised: w4a16 (AutoRound/GPTQ 4-bit) and sdnq (SD.Next's per-layer quantisation),
both by the config's quantization_config, comfy_quant (ComfyUI's per-layer markers), scaled_fp8 (ComfyUI's marker), int8 (the AR's 8-bit export), plain.
Adding one: docs/how-it-works.md, "Adding a weight format".
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..checkpoint import ComponentFiles
from ..errors import ModelFilesError
from ..file_checks import check_dtypes, display_name
from .base import DenseProjection, Projection, WeightFormat
from .comfy_quant import ComfyQuantFormat
from .int8 import Int8Format
from .plain import PlainFormat
from .scaled_fp8 import ScaledFp8Format
from .sdnq import SdnqFormat
from .w4a16 import W4A16Format, quant_method

PLAIN, SCALED_FP8, COMFY_QUANT = PlainFormat(), ScaledFp8Format(), ComfyQuantFormat()
INT8, W4A16, SDNQ = Int8Format(), W4A16Format(), SdnqFormat()
FORMATS: list[WeightFormat] = [W4A16, SDNQ, COMFY_QUANT, SCALED_FP8, INT8]  # recognised in this order; else PLAIN

# Formats recognised only to be refused by name: a key suffix -> what stores it.
FOREIGN_KEY_SUFFIXES = {".absmax": "bitsandbytes 4-bit", ".SCB": "bitsandbytes 8-bit", ".qweight": "GPTQ/AWQ"}
WHAT_IS_READ = (
    "bf16/fp32/fp8 weights, AutoRound/GPTQ 4-bit and SDNQ folders with their config, ComfyUI's quantised files "
    "(scaled fp8, comfy_quant) and the AR's 8-bit export"
)

__all__ = [
    "COMFY_QUANT",
    "FORMATS",
    "INT8",
    "PLAIN",
    "SCALED_FP8",
    "SDNQ",
    "W4A16",
    "DenseProjection",
    "Projection",
    "WeightFormat",
    "by_name",
    "dequantised_weight",
    "detect",
    "of_layer",
    "projection",
    "register",
    "release_device_copies",
]


def register(fmt: WeightFormat) -> WeightFormat:
    """Add a format, recognised before the others (a host's or a test's own)."""
    FORMATS.insert(0, fmt)
    return fmt


def detect(files: ComponentFiles) -> WeightFormat:
    """The format of a component's files, checked (headers and config only); a ModelFilesError naming the format
    for what these loaders cannot use: a quantisation of no format here, or a format for another component."""
    fmt = next((f for f in FORMATS if f.recognise(files)), None)
    if fmt is None:
        _refuse_foreign(files)
        fmt = PLAIN
    if files.component not in fmt.components:
        raise ModelFilesError(
            f"{files.weights.where} holds {fmt.label}, which the {files.component} loader does not read; it reads "
            f"{', '.join(f.label for f in (*FORMATS, PLAIN) if files.component in f.components)}."
        )
    fmt.check(files)
    weights = files.weights
    where = {key: display_name(file) for key, file in weights.key_file.items()}
    check_dtypes(weights.dtypes, where, fmt.integer_keys(files), fmt.label)
    return fmt


def _refuse_foreign(files: ComponentFiles) -> None:
    method = quant_method(files.config)
    if method is not None:
        raise ModelFilesError(
            f"{files.config_source} describes a quantisation this loader cannot read (quant_method {method!r}). It "
            f"reads {WHAT_IS_READ}; use the files of zai-org/GLM-Image or a supported re-upload."
        )
    for key in files.weights.shapes:
        fmt = next((f for suffix, f in FOREIGN_KEY_SUFFIXES.items() if key.endswith(suffix)), None)
        if fmt is not None:
            raise ModelFilesError(
                f"{files.weights.where} holds {fmt} weights (e.g. {key}); this loader reads {WHAT_IS_READ}. Use the "
                "files of zai-org/GLM-Image, or make a quantised file from them with "
                "save_single_file(..., quant='int8_tensorwise')."
            )


def by_name(name: str) -> WeightFormat:
    return next(f for f in (*FORMATS, PLAIN) if f.name == name)


def of_layer(layer: nn.Module) -> WeightFormat:
    """The format of a built linear layer (torch's ``nn.Linear`` and its host subclasses: plain)."""
    return next((f for f in FORMATS if f.layer_class is not None and isinstance(layer, f.layer_class)), PLAIN)


def dequantised_weight(layer: nn.Module, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The weight [out, in] a layer of any format stands for."""
    return of_layer(layer).dequantise(layer, dtype, device)


def projection(layers: Sequence[nn.Module]) -> Projection:
    """What the fast AR decoder multiplies with for these layers (one format), side by side, without biases."""
    return of_layer(layers[0]).projection(layers)


def release_device_copies(module: nn.Module) -> None:
    """Drop the device copies that the layers under ``module`` made for themselves (see ``WeightFormat``)."""
    for layer in module.modules():
        of_layer(layer).release_device_copies(layer)
