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
(4 bits per weight plus a scale and zero per group) and compute in one of two ways: ``dequantize`` then a matmul
(CPU, MPS, and on CUDA inputs of many rows such as a prefill or a DiT step, which are compute-bound), or, on CUDA for
inputs of at most ``INT4PACK_MAX_ROWS`` rows (AR decode steps, bound by reading the weights), torch's int4
weight-only matmul (``_weight_int4pack_mm``) on a copy repacked at the first call, which reads 4 bits per weight
and replaces the packed tensors on the device. ``W4A16Linear.kernel`` says which path ran last.

Only what this describes is read: 4 bits, integer, symmetric, weight-only; anything else is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelFilesError

W4A16 = "w4a16"  # check_quantisation's name for these checkpoints
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
DEQUANTIZE_CHUNK = 2**22  # weights dequantised at a time: 16 MB of float32 scratch whatever the layer


@dataclass(frozen=True)
class W4A16Format:
    """What a checkpoint's ``quantization_config`` says, once checked."""

    group_size: int


def read_format(config: dict, source: str) -> W4A16Format | None:
    """The W4A16 format of a model config's ``quantization_config`` (None without one); a ModelFilesError naming
    what is not supported for any other quantisation."""
    quant = config.get("quantization_config")
    if quant is None:
        return None
    method = quant.get("quant_method", "?")
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
    return W4A16Format(group_size)


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


def dequantize(
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
    are dequantised ``DEQUANTIZE_CHUNK`` weights at a time, so the float32 scratch stays small whatever the layer."""
    in_features, out_features = qweight.shape[0] * CODES_PER_WORD, qweight.shape[1]
    zeros = unpack_codes(qzeros, 1)[:, :out_features].to(torch.int16) + 1  # the stored value is zero - 1
    scales = scales.float()
    groups = group_index(in_features, group_size, g_idx, qweight.device)
    weight = torch.empty(in_features, out_features, dtype=dtype, device=qweight.device)
    words = max(1, DEQUANTIZE_CHUNK // (CODES_PER_WORD * out_features))
    for start in range(0, qweight.shape[0], words):
        rows = slice(start * CODES_PER_WORD, (start + words) * CODES_PER_WORD)
        codes = unpack_codes(qweight[start : start + words], 0).to(torch.int16)
        weight[rows] = (codes - zeros[groups[rows]]).float() * scales[groups[rows]]
    return weight.t()


def int4pack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int):
    """(packed weight, scales_and_zeros) for torch's int4 weight-only matmul on qweight's device, which computes
    ``w = (code - 8) * scale + zero`` per group: the codes as stored, and ``zero = (8 - zero point) * scale``
    (0 for a symmetric checkpoint's zero point 8). Scales become bfloat16, the matmul's only dtype."""
    codes = unpack_codes(qweight, 0).t().contiguous().to(torch.int32)  # [out, in]
    zeros = unpack_codes(qzeros, 1)[:, : scales.shape[1]].float() + 1
    offsets = (8 - zeros) * scales.float()
    scales_and_zeros = torch.stack([scales.float(), offsets], dim=-1).to(torch.bfloat16).contiguous()
    if codes.is_cuda:
        pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, INT4PACK_INNER_K_TILES)
    else:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4PACK_INNER_K_TILES)
    return packed, scales_and_zeros


def int4pack_mm(x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor):
    """torch's int4 weight-only matmul, x [rows, in] bfloat16 -> [rows, out] bfloat16, on CUDA or the CPU."""
    if x.is_cuda:
        return torch.ops.aten._weight_int4pack_mm(x, packed, group_size, scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def int4pack_supported(in_features: int, out_features: int, group_size: int, g_idx: torch.Tensor | None) -> bool:
    """Whether torch's int4 matmul can run this layer: its group sizes, inputs in whole tiles, outputs by 8, and
    groups in input order (an act-order ``g_idx`` that permutes them dequantises instead)."""
    if group_size not in INT4PACK_GROUP_SIZES or in_features % (16 * INT4PACK_INNER_K_TILES) or out_features % 8:
        return False
    if g_idx is None:
        return True
    return bool(torch.equal(g_idx.cpu().long(), torch.arange(in_features) // group_size))


# ---------------------------------------------------------------------------------------------------------------
# The layer


class W4A16Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding a W4A16 layer as published (``qweight``, ``qzeros``, ``scales``,
    optional ``g_idx``, ``bias``: frozen parameters, so everything that moves or counts a model's parameters sees
    them).

    ``forward``: inputs of at most ``INT4PACK_MAX_ROWS`` rows on a device of ``INT4PACK_DEVICES`` take torch's int4
    matmul. The layer is repacked for it at the first such call; the repacked copy then stands in for the packed
    tensors on that device (they go to the CPU, where they stay for the state dict and the next move), so the
    device holds 4 bits per weight once. Any other input takes the dequantised weight in its dtype."""

    DEQUANTIZE, INT4PACK = "dequantize", "int4pack"

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

    def dequantize(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        device = device or self.qweight.device
        g_idx = None if self.g_idx is None else self.g_idx.to(device)
        tensors = (t.to(device) for t in (self.qweight, self.qzeros, self.scales))
        return dequantize(*tensors, self.group_size, g_idx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(x)
        return out if self.bias is None else out + self.bias.to(x.device, x.dtype)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` without the bias, in x's dtype."""
        rows = x.numel() // self.in_features
        if self.use_int4pack and x.device.type in INT4PACK_DEVICES and rows <= INT4PACK_MAX_ROWS:
            repacked = self._repacked(x.device)
            if repacked is not None:
                flat = x.reshape(rows, self.in_features).to(torch.bfloat16)
                self.kernel = self.INT4PACK
                out = int4pack_mm(flat, repacked[0], self.group_size, repacked[1])
                return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        self.kernel = self.DEQUANTIZE
        return F.linear(x, self.dequantize(x.dtype, x.device))

    def _repacked(self, device: torch.device):
        """(packed, scales_and_zeros) on ``device``, made once; None where torch's int4 matmul cannot run the layer."""
        if self._int4pack is not None and self._int4pack[0] == device:
            return self._int4pack[1:]
        if not int4pack_supported(self.in_features, self.out_features, self.group_size, self.g_idx):
            return None
        tensors = (t.to(device) for t in (self.qweight, self.qzeros, self.scales))
        self._int4pack = (device, *int4pack(*tensors, self.group_size))
        for param in (self.qweight, self.qzeros):  # the repacked copy stands in for them on the device
            param.data = param.data.cpu()
        return self._int4pack[1:]

    def _apply(self, fn, recurse=True):
        self._int4pack = None  # a move or cast of the parameters makes the repacked copy stale
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"4-bit, group size {self.group_size}"
        )


def release_repacked(module: nn.Module) -> None:
    """Drop the repacked copies made under ``module``: a host that lends a model to the device by swapping tensors'
    ``.data`` (the core pipeline's stages) never calls ``_apply``, so the copies would outlive the loan."""
    for layer in module.modules():
        if isinstance(layer, W4A16Linear):
            layer._int4pack = None


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
    fmt: W4A16Format,
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
            fmt.group_size,
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
