"""8-bit AR weights: int8 weight-only quantisation of the text decoder's linear layers.

Format: each of the 40 decoder layers' q/k/v/o, gate_up and down projections keeps its key (``...q_proj.weight``)
as int8 [out, in], plus ``...q_proj.weight_scale`` float32 [out]: one symmetric scale per output channel,
``scale = max|w_row| / 127``, ``w ~= int8 * scale``. Everything else (embedding, lm_head, norms, biases, the vision
encoder and the VQ codebook) stays in the model dtype: the lm_head decides every sample, so its logits stay exact.
The weights come quantised while the bf16 shards are read (``read``), or from one file ``export`` wrote (its
metadata carries the config and ``EXPORT_TAG``).

Why int8 with per-channel scales rather than fp8 (measured on the tiny model, see tests/test_quant.py and the
README): int8's 255 evenly spaced levels per row give ~4x less weight error than fp8 e4m3's 3 mantissa bits with
the same per-channel scales, and int8 storage reads back on any GPU (fp8 matmuls need Ada/Hopper; most 12-16 GB
cards are Ampere or older). Both are 1 byte per weight, so memory and bandwidth are the same.

A layer computes ``linear(x, int8.to(x.dtype)) * scale + bias``: the integers are exact in bf16 (|q| <= 127), and
the float32 scale is applied to the output in float32, so the weight is never rounded twice. Decode steps on CUDA
take the compiled kernel of ``int8_kernel`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from ..checkpoint import REDOWNLOAD, ComponentFiles, display_name
from ..defaults import AR_DECODER_LAYERS_PREFIX, AR_DECODER_PROJECTIONS
from ..errors import ModelFilesError
from . import int8_kernel
from .base import WeightFormat

INT8_MAX = 127
QUANTISE_CHUNK = 2**20  # weights quantised at a time: a few float32 scratch tensors of 4 MB, whatever the layer
EXPORT_TAG = "glm_image_ar_int8/1"  # the `glm_image_ar` metadata value of an exported 8-bit AR file
EXPORT_DTYPES = {"weight": "I8", "scale": "F32"}  # an export's projections and their scales, as safetensors names them


def is_quantised_weight(key: str) -> bool:
    """Whether ``key`` (a GlmImageForConditionalGeneration state-dict key) is a weight that int8 mode quantises."""
    if not (key.startswith(AR_DECODER_LAYERS_PREFIX) and key.endswith(".weight")):
        return False
    return key[: -len(".weight")].split(".", 4)[-1] in AR_DECODER_PROJECTIONS


def quantise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight [out, in] -> (int8 [out, in], float32 scale [out]).

    Rows are quantised about ``QUANTISE_CHUNK`` weights at a time in float32, so the scratch memory stays small and
    independent of the layer's size. An all-zero row gets scale 1 (and zeros)."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = max(1, QUANTISE_CHUNK // weight.shape[1])
    for start in range(0, weight.shape[0], step):
        rows = weight[start : start + step].to(torch.float32, copy=True)  # scratch: the weight is not changed
        row_scale = rows.abs().amax(dim=1).div_(INT8_MAX)
        row_scale = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))
        q[start : start + step] = rows.div_(row_scale[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX)
        scale[start : start + step] = row_scale
    return q, scale


def dequantise_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight an int8 layer stands for, [out, in] in ``dtype``."""
    return (q.float() * scale[:, None]).to(dtype)


def int8_linear(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, fused: bool = True
) -> torch.Tensor:
    """``F.linear`` with an int8 weight q [out, in] and per-row scale [out]: x [..., in] -> [..., out] in x.dtype.

    Eager (CPU, and CUDA inputs with many rows such as a prefill): the int8 matrix is cast to x.dtype (exact) for one
    matmul, one matrix at a time, and the float32 scale multiplies the output in float32 (the scale is never rounded
    to x.dtype). On CUDA with at most ``int8_kernel.FUSED_MAX_ROWS`` rows (a decode step) and ``fused``: the
    compiled kernel of ``int8_kernel.fused_int8_linear``."""
    rows = x.numel() // x.shape[-1]
    if fused and x.is_cuda and rows <= int8_kernel.FUSED_MAX_ROWS:
        flat = x.reshape(rows, x.shape[-1])
        # inside a compiled caller (fast_ar's compiled decode layer) the reduction is traced inline
        kernel = int8_kernel.fused_int8_linear if torch.compiler.is_compiling() else int8_kernel.FUSED_KERNEL
        out = kernel(flat, q, scale)
        if out is not None:
            out = out.view(*x.shape[:-1], q.shape[0])
            return out if bias is None else out + bias
    out = (F.linear(x, q.to(x.dtype)).float() * scale).to(x.dtype)
    return out if bias is None else out + bias


class Int8Projection:
    """An int8 weight [out, in] with its float32 per-row scale, as the fast decoder multiplies with it."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale)


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` with an int8 weight and float32 per-output-channel scales (``weight_scale``).

    The weight keeps its name, so the state dict reads like the bf16 one plus one scale vector per layer. Both are
    frozen parameters (not buffers) so that everything that moves or counts a model's parameters sees them."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device), False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device), False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _swap_decoder_linears(model: nn.Module, make) -> list[str]:
    """Replace each quantisable ``nn.Linear`` of the decoder by ``make(linear)``; returns the modules' names."""
    replaced = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantised_weight(name + ".weight"):
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, make(module))
            replaced.append(name)
    return replaced


def replace_decoder_linears(model: nn.Module) -> list[str]:
    """Swap the decoder's quantisable ``nn.Linear`` s of a (meta-device) GlmImageForConditionalGeneration for empty
    ``Int8Linear`` s of the same shapes; returns their module names."""

    def empty_int8(linear: nn.Linear) -> Int8Linear:
        dtype = None if linear.bias is None else linear.bias.dtype
        return Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)

    return _swap_decoder_linears(model, empty_int8)


@torch.no_grad()
def quantise_model_(model: nn.Module) -> list[str]:
    """Quantise the decoder projections of an already loaded GlmImageForConditionalGeneration in place (on its
    device); each full-precision matrix is released once its int8 copy exists. Returns the modules' names."""

    def quantised(linear: nn.Linear) -> Int8Linear:
        layer = Int8Linear(linear.in_features, linear.out_features, False, device="meta")
        q, scale = quantise_int8(linear.weight)
        layer.weight, layer.weight_scale = nn.Parameter(q, False), nn.Parameter(scale, False)
        layer.bias = linear.bias
        return layer

    return _swap_decoder_linears(model, quantised)


def read_quantising(files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The AR's state dict with the decoder projections in int8 (+ ``weight_scale``), read tensor by tensor.

    From bf16 shards, each projection is quantised right after it is read, so the memory in use grows by about one
    byte per decoder weight. Every tensor is copied out of the file and the file is closed again before the next one
    is read: no tensor stays a view of a memory-mapped shard, so pages of the shards read so far are not kept
    resident and the peak is the result plus about one tensor. From an exported file, the int8 tensors and their
    float32 scales are taken as stored. Other floating-point tensors are cast to ``dtype`` (None: as stored)."""
    state_dict = {}
    for key, file in files.weights.key_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
                if is_quantised_weight(key) and tensor.dtype != torch.int8:
                    state_dict[key], state_dict[key + "_scale"] = quantise_int8(tensor)
                elif dtype is None or not tensor.is_floating_point() or key.endswith(".weight_scale"):
                    state_dict[key] = tensor.clone()
                else:
                    state_dict[key] = tensor.to(dtype, copy=True)
                del tensor
        except SafetensorError as e:
            raise ModelFilesError(f"{display_name(file)} could not be read ({e}); delete it and {REDOWNLOAD}.") from e
    return state_dict


class Int8Format(WeightFormat):
    name = "int8"
    label = "8-bit AR weights (int8 per output channel)"
    components = ("vision_language_encoder",)

    layer_class = Int8Linear

    def recognise(self, files: ComponentFiles) -> bool:
        return files.weights.metadata.get("glm_image_ar") == EXPORT_TAG

    def check(self, files: ComponentFiles) -> None:
        """An export holds its projections in int8 with float32 scales, as written."""
        if not self.recognise(files):
            return  # bf16 shards, quantised while read
        for key, found in files.weights.dtypes.items():
            expected = EXPORT_DTYPES["scale"] if key.endswith(".weight_scale") else EXPORT_DTYPES["weight"]
            if (is_quantised_weight(key) or key.endswith(".weight_scale")) and found != expected:
                raise ModelFilesError(
                    f"{key} is {found} in {files.weights.where}, an 8-bit AR export stores it as {expected}; the "
                    "file was changed after export: export it again."
                )

    def extra_key(self, key: str, expected) -> bool:
        return key.endswith(".weight_scale") and is_quantised_weight(key.removesuffix("_scale"))

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return {k for k in files.weights.shapes if is_quantised_weight(k)} if self.recognise(files) else set()

    def made_while_reading(self, files: ComponentFiles, expected) -> frozenset[str]:
        if self.recognise(files):
            return frozenset()  # an export stores its scales
        return frozenset(k for k in expected if k.endswith(".weight_scale"))  # bf16 shards, quantised while read

    def build_layers(
        self, model: nn.Module, files: ComponentFiles, dtype: torch.dtype | None, layer_class=None
    ) -> None:
        replace_decoder_linears(model)

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        return {k: t.to(device) for k, t in read_quantising(files, dtype).items()}

    def dequantise(self, layer: nn.Module, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        device = device or layer.weight.device
        return dequantise_int8(layer.weight.to(device), layer.weight_scale.to(device), dtype)

    def projection(self, layers: Sequence[nn.Module]) -> Int8Projection:
        if len(layers) == 1:
            return Int8Projection(layers[0].weight, layers[0].weight_scale)
        return Int8Projection(torch.cat([m.weight for m in layers]), torch.cat([m.weight_scale for m in layers]))

    def joined_bytes(self, out_features: int, in_features: int, dtype_bytes: int, group_size: int) -> int:
        return out_features * in_features + out_features * 4  # int8 weights, float32 scales

    def many_rows_matmul_bytes(self, in_features: int, out_features: int, rows: int, dtype_bytes: int) -> dict:
        # int8_linear's eager path: the matrix cast for one matmul, then the output scaled in float32
        return {
            "matmul": {
                "weight cast to the model dtype": out_features * in_features * dtype_bytes,
                "output": rows * out_features * dtype_bytes,
            },
            "scale": {"output in float32, scaled": 2 * rows * out_features * 4},
        }
