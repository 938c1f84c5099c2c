"""4-bit weights as AutoRound and GPTQ publish them (W4A16: 4-bit weights, 16-bit activations).

The format (``packing_format "auto_round:auto_gptq"``, also GPTQ's own ``quant_method "gptq"``), per quantised
``nn.Linear`` of in x out features and group size g, in place of its ``weight``:

- ``qweight`` int32 [in / 8, out]: eight 4-bit codes per word, packed along the inputs, lowest bits first;
- ``qzeros`` int32 [ceil(in / g), out / 8]: the zero point of each group minus 1, packed the same way along the
  outputs (GPTQ's historic off-by-one: a symmetric checkpoint stores 7 for its zero point 8);
- ``scales`` float16 [ceil(in / g), out];
- ``g_idx`` int32 [in] (optional): the group of each input (act-order checkpoints; without it, input i is in group
  i // g);
- ``bias`` as the layer had it.

The weight is ``w[o, i] = scales[G, o] * (q[i, o] - zero[G, o])`` with ``G = g_idx[i]``. Layers keep these tensors
(4 bits per weight plus a scale and zero per group) and compute in one of two ways: ``dequantise`` then a matmul
(CPU, MPS, and on CUDA inputs of many rows such as a DiT step, which are compute-bound), or, on CUDA GPUs of compute
capability 8.0 or newer, torch's int4 weight-only matmul (``_weight_int4pack_mm``, 4 bits read per weight) on a copy
repacked at the first call of at most ``INT4PACK_MAX_ROWS`` rows (an AR decode step, bound by reading the weights).
The repacked copy then replaces the packed tensors on the device and serves every later input there (the next
prefill too: no packed tensor travels to the device again). ``W4A16Linear.kernel`` says which path ran last.

Only what this describes is read: 4 bits, integer, symmetric, weight-only; anything else is refused by name.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ComponentFiles, load_tensors
from ..errors import ModelFilesError
from .base import Projection, WeightFormat

CODES_PER_WORD = 8
PACKINGS = {  # quant_method -> the packing formats read here (the first: what a config without one means)
    "auto-round": ("auto_round:auto_gptq", "auto_round:gptq"),
    "gptq": ("gptq",),  # checkpoint_format; GPTQ v2 (zero points stored as is) is refused
}
DEFAULTS = {"bits": 4, "group_size": 128, "sym": True}  # what transformers' AutoRoundConfig assumes for a missing key
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's int4 matmul takes
INT4PACK_INNER_K_TILES = 8  # torch's int4 layout: inputs in tiles of 16 x this
INT4PACK_MAX_ROWS = 16  # inputs of at most this many rows (AR decode steps: one per sample) take the int4 matmul
INT4PACK_DEVICES = ("cuda",)  # where it runs by default (torch's CPU version is slower than dequantising there)
INT4PACK_MIN_CAPABILITY = (8, 0)  # torch's CUDA int4 matmul: Ampere or newer
DEQUANTISE_CHUNK = 2**22  # weights dequantised (or repacked) at a time: 16 MB of float32 scratch whatever the layer


@dataclass(frozen=True)
class W4A16Settings:
    """What a checkpoint's ``quantization_config`` says, once checked."""

    group_size: int


def quant_method(config: dict) -> str | None:
    """The ``quant_method`` of a model config's ``quantization_config`` ("?" without one; None without the block)."""
    quant = config.get("quantization_config")
    return None if quant is None else quant.get("quant_method", "?") if isinstance(quant, dict) else "?"


def read_settings(config: dict, source: str) -> W4A16Settings | None:
    """The W4A16 format of a model config's ``quantization_config`` (None without one); a ModelFilesError naming
    what is not supported for any other quantisation."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant_method(config)
    quant = {**DEFAULTS, **quant}
    default_packing = PACKINGS.get(method, ("?",))[0]
    packing = quant.get("checkpoint_format" if method == "gptq" else "packing_format", default_packing)
    problems = []
    if method not in PACKINGS:
        problems.append(f"quant_method {method!r}")
    elif packing not in PACKINGS[method]:
        problems.append(f"packing {packing!r}")
    if quant.get("bits") != 4:
        problems.append(f"{quant.get('bits')} bits")
    if quant.get("data_type", "int") != "int":
        problems.append(f"data_type {quant.get('data_type')!r}")
    if not quant.get("sym", False):
        problems.append("asymmetric zero points (sym false)")
    if quant.get("act_bits", 16) < 16:
        problems.append(f"{quant['act_bits']}-bit activations")
    group_size = quant.get("group_size")
    if not isinstance(group_size, int) or group_size <= 0 or group_size % CODES_PER_WORD:
        problems.append(f"group size {group_size!r}")
    for layer, override in (quant.get("extra_config") or {}).items():
        if override.get("bits", 4) not in (4, 16) or override.get("group_size", group_size) != group_size:
            problems.append(f"a per-layer setting for {layer} ({override})")
            break
    if problems:
        raise ModelFilesError(
            f"{source} describes a quantised re-upload this loader cannot read: {', '.join(problems)}. It reads "
            "symmetric 4-bit integer weights in AutoRound's auto_round:auto_gptq packing or GPTQ's (W4A16, e.g. "
            "Intel/GLM-Image-int4-AutoRound), ComfyUI's quantised files, and the bf16 weights of zai-org/GLM-Image."
        )
    return W4A16Settings(group_size)


def packed_layers(keys) -> list[str]:
    """The module names whose weights a checkpoint holds packed (``<name>.qweight``)."""
    return sorted(k.removesuffix(".qweight") for k in keys if k.endswith(".qweight"))


# ---------------------------------------------------------------------------------------------------------------
# The arithmetic


def unpack_codes(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit codes (uint8, 0..15), unpacked along ``dim`` (0: qweight, 1: qzeros)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    if dim == 0:
        codes = packed.unsqueeze(1) >> shifts[None, :, None]  # [rows, 8, cols]
        return (codes & 15).to(torch.uint8).reshape(-1, packed.shape[1])
    codes = packed.unsqueeze(2) >> shifts[None, None, :]  # [rows, cols, 8]
    return (codes & 15).to(torch.uint8).reshape(packed.shape[0], -1)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None, device) -> torch.Tensor:
    """The group of each input: ``g_idx`` as stored, or i // group_size."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    return torch.arange(in_features, device=device) // group_size


def dequantise(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight [out, in] a packed layer stands for, in ``dtype`` (a transposed view of an [in, out] tensor, which
    ``F.linear`` reads as is). The product of the float16 scale and the integer code is exact in float32 and is
    rounded once, to ``dtype`` (for float16 and float32 this is AutoRound's own dequantisation, bit for bit). Rows
    are dequantised ``DEQUANTISE_CHUNK`` weights at a time, so the float32 scratch stays small whatever the layer."""
    in_features, out_features = qweight.shape[0] * CODES_PER_WORD, qweight.shape[1]
    zeros = unpack_codes(qzeros, 1)[:, :out_features].to(torch.int16) + 1  # the stored value is zero - 1
    scales = scales.float()
    groups = group_index(in_features, group_size, g_idx, qweight.device)
    weight = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    words = max(1, DEQUANTISE_CHUNK // (CODES_PER_WORD * out_features))
    for start in range(0, qweight.shape[0], words):
        rows = slice(start * CODES_PER_WORD, (start + words) * CODES_PER_WORD)
        codes = unpack_codes(qweight[start : start + words], 0).to(torch.int16)
        weight[rows] = (codes - zeros[groups[rows]]).float() * scales[groups[rows]]
    return weight.t()


def int4pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """(packed weight, scales_and_zeros) for torch's int4 weight-only matmul on qweight's device, which computes
    ``w = (code - 8) * scale + zero`` per group: the codes as stored, and ``zero = (8 - zero point) * scale``
    (0 for a symmetric checkpoint's zero point 8). Scales become bfloat16, the matmul's only dtype."""
    scales_and_zeros = int4pack_scales_and_zeros(qzeros, scales)
    if not qweight.is_cuda:  # torch's CPU twin takes the codes in int32 [out, in]
        codes = unpack_codes(qweight, 0).t().contiguous().to(torch.int32)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4PACK_INNER_K_TILES), scales_and_zeros
    return torch.ops.aten._convert_weight_to_int4pack(code_pairs(qweight), INT4PACK_INNER_K_TILES), scales_and_zeros


def int4pack_scales_and_zeros(qzeros: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """bfloat16 [groups, out, 2]: each group's scale and ``(8 - zero point) * scale``."""
    zeros = unpack_codes(qzeros, 1)[:, : scales.shape[1]].float() + 1
    offsets = (8 - zeros) * scales.float()
    return torch.stack([scales.float(), offsets], dim=-1).to(torch.bfloat16).contiguous()


def code_pairs(qweight: torch.Tensor) -> torch.Tensor:
    """The codes as CUDA's int4 repacking takes them: uint8 [out, in / 2], two codes a byte (the even input in the
    high bits), made ``DEQUANTISE_CHUNK`` weights at a time: about one byte per weight beside the layer (this and
    the packed result), not a copy of the codes in int32."""
    in_features, out_features = qweight.shape[0] * CODES_PER_WORD, qweight.shape[1]
    pairs = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=qweight.device)
    step = max(1, DEQUANTISE_CHUNK // in_features)
    for start in range(0, out_features, step):
        codes = unpack_codes(qweight[:, start : start + step], 0).t()  # [rows, in] uint8
        pairs[start : start + step] = codes[:, ::2] << 4 | codes[:, 1::2]
    return pairs


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """torch's int4 weight-only matmul, x [rows, in] bfloat16 -> [rows, out] bfloat16, on CUDA or the CPU."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def int4pack_supported(in_features: int, out_features: int, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """Whether torch's int4 matmul can run this layer: its group sizes, whole groups and whole tiles of inputs,
    outputs by 8, and groups in input order (an act-order ``g_idx`` that permutes them dequantises instead)."""
    if group_size not in INT4PACK_GROUP_SIZES or in_features % group_size or out_features % 8:
        return False
    if in_features % (16 * INT4PACK_INNER_K_TILES):
        return False
    if g_idx is None:
        return True
    return bool(torch.equal(g_idx.cpu().long(), torch.arange(in_features) // group_size))


def device_problem(device: torch.device) -> str | None:
    """Why torch's int4 matmul cannot run on ``device`` (None when it can)."""
    if device.type not in INT4PACK_DEVICES:
        return f"{device.type} is not one of {INT4PACK_DEVICES}"
    return _cuda_capability_problem(device.index) if device.type == "cuda" else None


@functools.cache
def _cuda_capability_problem(index: int | None) -> str | None:
    """The compute capability of a CUDA GPU, when too old for torch's int4 matmul; asked and logged once per GPU."""
    major, minor = torch.cuda.get_device_capability(index)
    if (major, minor) >= INT4PACK_MIN_CAPABILITY:
        return None
    problem = f"compute capability {major}.{minor} (torch's int4 matmul needs 8.0 or newer)"
    logging.warning("GLM-Image: 4-bit layers on cuda:%s dequantise for every matmul: %s.", index, problem)
    return problem


# ---------------------------------------------------------------------------------------------------------------
# The layer


class W4A16Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding a W4A16 layer as published (``qweight``, ``qzeros``, ``scales``,
    optional ``g_idx``, ``bias``: frozen parameters, so everything that moves or counts a model's parameters sees
    them).

    ``forward``: on a device where torch's int4 matmul runs (``device_problem``), the first input of at most
    ``INT4PACK_MAX_ROWS`` rows repacks the layer for it; the repacked copy then stands in for the packed tensors on
    that device (they go to the CPU, where they stay for the state dict and the next move), so the device holds 4
    bits per weight once, and every later input there takes the int4 matmul. Any other input takes the dequantised
    weight in its dtype. Whether the int4 matmul can run the layer at all is decided once, not per call (an
    act-order ``g_idx`` is read back from the device to decide)."""

    DEQUANTISE, INT4PACK = "dequantise", "int4pack"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        group_size: int,
        g_idx: bool = False,
        dtype=None,
        device=None,
    ):
        super().__init__()
        if in_features % CODES_PER_WORD or out_features % CODES_PER_WORD:
            raise ValueError(f"a 4-bit layer needs features in multiples of 8, not {in_features} x {out_features}")
        groups = -(-in_features // group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size

        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.qweight = frozen(in_features // CODES_PER_WORD, out_features, dtype=torch.int32)
        self.qzeros = frozen(groups, out_features // CODES_PER_WORD, dtype=torch.int32)
        self.scales = frozen(groups, out_features, dtype=torch.float16)
        self.g_idx = frozen(in_features, dtype=torch.int32) if g_idx else None
        self.bias = frozen(out_features, dtype=dtype) if bias else None
        self.use_int4pack = True
        self.kernel = None  # the path the last forward took
        self._int4pack = None  # (device, packed, scales_and_zeros), made at the first int4 matmul call
        self._int4pack_fits = None  # whether int4pack_supported holds, once asked

    def dequantise(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        device = device or self.qweight.device
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        tensors = (t.to(device) for t in (self.qweight, self.qzeros, self.scales))
        return dequantise(*tensors, self.group_size, g_idx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(x)
        return out if self.bias is None else out + self.bias.to(x.device, x.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` without the bias, in x's dtype."""
        rows = x.numel() // self.in_features
        repacked = self._repacked(x.device, may_make=rows <= INT4PACK_MAX_ROWS) if self.use_int4pack else None
        if repacked is not None:
            flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
            self.kernel = self.INT4PACK
            out = int4pack_mm(flat, repacked[0], self.group_size, repacked[1])
            return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        self.kernel = self.DEQUANTISE
        return F.linear(x, self.dequantise(x.dtype, x.device))

    def _repacked(self, device: torch.device, may_make: bool):
        """(packed, scales_and_zeros) on ``device``: the copy made there before, or, if ``may_make``, made now; None
        where torch's int4 matmul cannot run the layer or the device."""
        if self._int4pack is not None and self._int4pack[0] == device:
            return self._int4pack[1:]
        if not may_make or device_problem(device) is not None:
            return None
        if self._int4pack_fits is None:
            self._int4pack_fits = int4pack_supported(self.in_features, self.out_features, self.group_size, self.g_idx)
        if not self._int4pack_fits:
            return None
        tensors = (t.to(device) for t in (self.qweight, self.qzeros, self.scales))
        self._int4pack = (device, *int4pack(*tensors, self.group_size))
        for param in (self.qweight, self.qzeros):  # the repacked copy stands in for them on the device
            param.data = param.data.cpu()
        return self._int4pack[1:]

    def release_repacked(self) -> None:
        self._int4pack = None

    def _apply(self, fn, recurse=True):
        self._int4pack = None  # a move or cast of the parameters makes the repacked copy stale
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._int4pack = self._int4pack_fits = None  # new tensors: another g_idx, another copy
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"4-bit, group size {self.group_size}"
        )


def concat_outputs(layers: list[W4A16Linear]) -> W4A16Linear:
    """One layer computing the given layers' outputs side by side, without bias (as ``torch.cat`` of their weights
    would): their packed tensors joined along the outputs. The layers must share group size and ``g_idx``."""
    first = layers[0]
    if any(m.group_size != first.group_size or (m.g_idx is None) != (first.g_idx is None) for m in layers):
        raise ValueError("only layers with the same group size and grouping can be joined")
    if first.g_idx is not None and any(not torch.equal(m.g_idx, first.g_idx) for m in layers):
        raise ValueError("only layers with the same g_idx can be joined")
    joined = W4A16Linear(
        first.in_features,
        sum(m.out_features for m in layers),
        False,
        first.group_size,
        first.g_idx is not None,
        device="meta",
    )
    for name in ("qweight", "qzeros", "scales"):
        setattr(joined, name, nn.Parameter(torch.cat([getattr(m, name) for m in layers], dim=-1), False))
    joined.g_idx = first.g_idx
    return joined


def swap_linears(
    model: nn.Module,
    keys,
    settings: W4A16Settings,
    dtype: torch.dtype | None = None,
    device="meta",
    layer_class: type[W4A16Linear] = W4A16Linear,
) -> None:
    """Replace each ``nn.Linear`` the checkpoint packs (``keys``: its tensor names) by an empty ``layer_class`` of the
    same shape, with a bias (in ``dtype``) and a ``g_idx`` where the checkpoint has them; a ModelFilesError when a
    packed name is not a linear layer of the model. What the layer needs is read from ``keys``, not from the Linear,
    which a host may have built without tensors (ComfyUI under dynamic VRAM)."""
    keys = set(keys)
    for name in packed_layers(keys):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ModelFilesError(f"the checkpoint packs {name}.qweight, which is not a linear layer of the model")
        layer = layer_class(
            linear.in_features,
            linear.out_features,
            f"{name}.bias" in keys,
            settings.group_size,
            f"{name}.g_idx" in keys,
            dtype,
            device,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def cast_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating tensors in ``dtype``, but the packed layers' scales, which stay float16 as stored (they are the
    format, not a weight)."""
    if dtype is None:
        return state_dict
    return {k: t.to(dtype) if t.is_floating_point() and not k.endswith(".scales") else t for k, t in state_dict.items()}


class W4A16Format(WeightFormat):
    name = "w4a16"
    label = "AutoRound/GPTQ 4-bit (W4A16)"
    components = ("transformer", "vision_language_encoder")
    layer_class = W4A16Linear
    packed = True

    def recognise(self, files: ComponentFiles) -> bool:
        return quant_method(files.config) in PACKINGS

    def check(self, files: ComponentFiles) -> None:
        read_settings(files.config, files.config_source)
        if not packed_layers(files.weights.shapes):
            raise ModelFilesError(
                f"{files.config_source} describes 4-bit weights, but {files.weights.where} holds no packed layer "
                "(no `.qweight` tensor). Download the folder again: its config and weights come from different models."
            )
        for key in sorted(self.integer_keys(files)):
            dtype = files.weights.dtypes.get(key)
            if dtype not in (None, "I32"):
                raise ModelFilesError(
                    f"{key} is {dtype} in {files.weights.where}; packed 4-bit layers store qweight, qzeros and g_idx "
                    "as I32. The file was converted wrongly or damaged: download the folder again."
                )

    def extra_key(self, key: str, expected) -> bool:
        return False  # the packed layers' tensors are the model's own (build_layers makes them)

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return {f"{name}.{t}" for name in packed_layers(files.weights.shapes) for t in ("qweight", "qzeros", "g_idx")}

    def build_layers(
        self, model: nn.Module, files: ComponentFiles, dtype: torch.dtype | None, layer_class=None
    ) -> None:
        settings = read_settings(files.config, files.config_source)
        swap_linears(model, files.weights.shapes, settings, dtype, layer_class=layer_class or W4A16Linear)

    def cast(self, files: ComponentFiles, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
        return cast_state_dict(state_dict, dtype)

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        return self.cast(files, load_tensors(files.weights, None, device), dtype)

    def read_as_stored(self, files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        return load_tensors(files.weights)

    def dequantise(self, layer: nn.Module, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return layer.dequantise(dtype, device)

    def projection(self, layers: Sequence[nn.Module]) -> Projection:
        return (layers[0] if len(layers) == 1 else concat_outputs(list(layers))).project

    def release_device_copies(self, layer: nn.Module) -> None:
        layer.release_repacked()

    def joined_bytes(self, out_features: int, in_features: int, dtype_bytes: int, group_size: int) -> int:
        groups = -(-in_features // group_size)
        return out_features * in_features // 2 + int(groups * out_features * (2 + 0.5))  # codes; fp16 scales, zeros

    def many_rows_matmul_bytes(self, in_features: int, out_features: int, rows: int, dtype_bytes: int) -> dict:
        """A dequantising matmul (before the first decode step made the repacked copy): the weight in the
        activations' dtype, the scratch of one chunk (the unpacked int32 codes, int16 codes minus the zero points,
        their float32 copy and the float32 product; 14 bytes a weight, measured) and the output. Checked against
        measured allocations in tests/test_memory.py."""
        weights = in_features * out_features
        return {
            "matmul": {
                "weight dequantised to the model dtype": weights * dtype_bytes,
                "dequantising scratch (one chunk)": min(DEQUANTISE_CHUNK, weights) * (4 + 2 + 4 + 4),
                "matmul output": rows * out_features * dtype_bytes,
            }
        }

    def first_step_bytes(self, in_features: int, out_features: int, group_size: int) -> dict:
        """The repack of one layer for torch's int4 matmul (``int4pack`` on CUDA), beside its packed tensors."""
        weights = in_features * out_features
        chunk = min(DEQUANTISE_CHUNK // in_features, out_features) * in_features
        return {
            "codes two per byte": weights // 2,
            "the repacked copy": weights // 2,
            "unpacking scratch (one chunk)": chunk * (4 + 4 + 1 + 1),  # shifted int32, masked int32, uint8, transposed
            "scales and zeros (bf16)": self.device_copy_bytes(in_features, out_features, group_size),
        }

    def device_copy_bytes(self, in_features: int, out_features: int, group_size: int) -> int:
        """The repacked copy's scales and zeros (bf16 pairs) beside the layer's own tensors; its codes replace the
        packed ones on the device, the same bytes."""
        return -(-in_features // group_size) * out_features * 2 * 2
