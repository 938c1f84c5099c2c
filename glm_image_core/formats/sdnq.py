"""SDNQ weights (SD.Next's quantisation engine, PyPI ``sdnq``) as SD.Next publishes them, e.g.
Disty0/GLM-Image-SDNQ-4bit-dynamic: each quantised ``nn.Linear`` in its own dtype, integer or small float, chosen
per layer ("dynamic": the smallest dtype whose error is under a threshold).

A component folder says ``quantization_config.quant_method "sdnq"`` in its config.json; the config names each layer's
dtype (``modules_dtype_dict``: dtype -> layer names, the rest ``weights_dtype``). A quantised layer of in x out
features keeps, in place of its float ``weight`` (sdnq's own tensor names):

- ``weight``: the codes. 4 bits: uint8 [out * in / 2], two codes a byte, the first in the low bits; 5 bits: uint8
  [out * in / 8, 5], eight codes in five bytes (``unpack_codes``); 8 bits: int8, uint8 or float8 [out, in] or
  [out, groups, in / groups], as they are;
- ``scale`` [out, groups, 1] ([out, 1] for one group per row), float32 or the model's dtype as written;
- ``zero_point``, the same shape, for unsigned dtypes (uint4, float5_e2m3fnu, ...); signed ones have none;
- ``svd_up`` [out, rank] and ``svd_down`` [rank, in] with SVD (``use_svd``): a low-rank part added to the weight;
- ``bias`` as the layer had it.

A code stands for an integer (int: code - 2^(bits - 1); uint: the code) or a small float (e.g. float5_e3m1fn: sign,
3 exponent bits, 1 mantissa bit, read through ``float_values``). The weight is ``value * scale`` (signed) or
``zero_point + value * scale`` (unsigned), plus ``svd_up @ svd_down``: ``dequantise`` computes it as sdnq does, in
the scales' dtype, with the same operations in the same order (bit for bit sdnq's own, tests/test_sdnq.py). The
groups run along the inputs and their number is read from the scales' shape, not recomputed from ``group_size``.

Layers keep these tensors and dequantise one weight at a time for each matmul (a few rows at a time, so the float32
scratch stays small); no kernel reads the codes directly yet. Only what this describes is read; other settings
(Hadamard rotations, codebooks, quantised scales, 2-, 3-, 6- and 7-bit codes, per-module settings) are refused by
name from the config alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import ComponentFiles, load_tensors
from ..errors import ModelFilesError
from .base import Projection, WeightFormat

QUANT_METHOD = "sdnq"
PACKED_BITS = (4, 5)  # codes packed below a byte; 8-bit codes are stored as they are
NATIVE_DTYPES = {  # 8-bit dtypes stored as a torch dtype (safetensors names them by it)
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
}
CODE_STORAGE = ("U8", "I8", "F8_E4M3", "F8_E5M2")  # a quantised layer's ``weight`` in the safetensors headers
ALIASES = {"fp4": "float4_e2m1fn", "fp5": "float5_e2m2fn", "fp8": "float8_e4m3fn", "ufp4": "float4_e2m2fnu"}
LAYER_TENSORS = ("weight", "scale", "zero_point", "svd_up", "svd_down")  # sdnq's names, beside the bias
FLOAT_TENSORS = ("scale", "zero_point", "svd_up", "svd_down")
SUBNORMALS_SINCE = (0, 2, 3)  # sdnq before 0.2.3 wrote packed floats without subnormals (``float_values``)
DEQUANTISE_CHUNK = 2**22  # weights dequantised at a time: ~40 MB of scratch whatever the layer


# ---------------------------------------------------------------------------------------------------------------
# The dtypes


@dataclass(frozen=True)
class CodeDtype:
    """One of sdnq's weight dtypes, as far as dequantising it goes."""

    name: str
    bits: int
    signed: bool  # symmetric (no zero point); unsigned dtypes are asymmetric
    exponent_bits: int | None = None  # a small float read through ``float_values``: its exponent and mantissa bits
    mantissa_bits: int = 0
    native: torch.dtype | None = None  # 8-bit dtypes stored as a torch dtype (int8, uint8, float8): cast, not decoded

    @property
    def is_float(self) -> bool:
        """A small float of sdnq's own (float5_e3m1fn, ...), its values read from a table."""
        return self.exponent_bits is not None

    def storage(self) -> str:
        """The safetensors dtype of its ``weight``."""
        return NATIVE_DTYPES[self.name][1] if self.native is not None else "U8"


def code_dtype(name: str) -> CodeDtype | None:
    """The dtype sdnq names ``name`` (int5, uint4, float5_e3m1fn, float4_e1m3fnu, int8, ...); None for one not read
    here."""
    name = ALIASES.get(name, name)
    if name in NATIVE_DTYPES:
        return CodeDtype(name, 8, not name.startswith("u"), native=NATIVE_DTYPES[name][0])
    if m := re.fullmatch(r"(u?)int(\d+)", name):
        bits = int(m[2])
        return CodeDtype(name, bits, not m[1]) if bits in PACKED_BITS else None
    if m := re.fullmatch(r"float(\d+)_e(\d+)m(\d+)fn(u?)", name):
        bits, exponent, mantissa, signed = int(m[1]), int(m[2]), int(m[3]), not m[4]
        if bits in (*PACKED_BITS, 8) and exponent > 0 and bits == signed + exponent + mantissa:
            return CodeDtype(name, bits, signed, exponent, mantissa)
    return None


def float_values(dtype: CodeDtype, subnormals: bool) -> torch.Tensor:
    """float32 [2^bits]: the value of each code of a small float without infinities or NaNs (sign bit highest, then
    the exponent, biased by 2^(e-1) - 1, then the mantissa). An exponent field of 0 holds subnormals as sdnq reads them
    since 0.2.3; before, sdnq wrote it as one more binade (only the all-zero magnitude meaning 0) and flushed smaller
    values to 0, so float5_e3m1fn's code 1 is 0.1875 in such a file, 0.125 in a newer one."""
    e_bits, m_bits = dtype.exponent_bits, dtype.mantissa_bits
    bias = 2 ** (e_bits - 1) - 1
    values = []
    for code in range(2**dtype.bits):
        negative = dtype.signed and code >> (e_bits + m_bits)
        exponent, mantissa = (code >> m_bits) & (2**e_bits - 1), code & (2**m_bits - 1)
        if exponent == 0 and (subnormals or mantissa == 0):
            magnitude = mantissa / 2**m_bits * 2.0 ** (1 - bias)
        else:
            magnitude = (1 + mantissa / 2**m_bits) * 2.0 ** (exponent - bias)
        values.append(-magnitude if negative and magnitude else magnitude)  # no negative zero: sdnq reads +0
    return torch.tensor(values, dtype=torch.float32)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes (uint8, flat) of sdnq's packing: 4 bits: two a byte, the first in the low half; 5 bits: rows of five
    bytes holding eight codes: codes 0-4 in the low five bits of bytes 0-4; codes 5-7 with their low three bits in
    the top three of bytes 0-2 and their high two bits in the top three of bytes 3-4 (codes 5 and 6: bits 5-6 of
    bytes 3 and 4; code 7: bit 7 of byte 3 its bit 4, bit 7 of byte 4 its bit 3)."""
    if bits == 4:
        return torch.stack((packed & 15, packed >> 4), dim=-1).view(-1)
    low = packed[:, :3] >> 5
    codes_5_to_7 = torch.stack(
        (
            low[:, 0] | ((packed[:, 3] >> 2) & 24),
            low[:, 1] | ((packed[:, 4] >> 2) & 24),
            low[:, 2] | ((packed[:, 3] >> 3) & 16) | ((packed[:, 4] >> 4) & 8),
        ),
        dim=-1,
    )
    return torch.cat((packed & 31, codes_5_to_7), dim=-1).view(-1)


def chunk_rows(in_features: int) -> int:
    """How many rows ``SDNQLinear.dequantise`` makes at a time: about ``DEQUANTISE_CHUNK`` weights, in multiples of 8
    rows (whole 5-bit packs, and the row counts for which the CPU's SVD product rounds as for the whole matrix)."""
    return max(8, DEQUANTISE_CHUNK // in_features // 8 * 8)


def packed_shape(dtype: CodeDtype, out_features: int, in_features: int, groups: int) -> tuple[int, ...]:
    """The shape of a layer's ``weight`` as sdnq stores it."""
    if dtype.bits == 4:
        return (out_features * in_features // 2,)
    if dtype.bits == 5:
        return (out_features * in_features // 8, 5)
    return (out_features, in_features) if groups == 1 else (out_features, groups, in_features // groups)


# ---------------------------------------------------------------------------------------------------------------
# The config


@dataclass(frozen=True)
class SdnqSettings:
    """What a checkpoint's ``quantization_config`` says, once checked."""

    weights_dtype: str  # the dtype of layers no entry of ``modules_dtype`` names
    modules_dtype: dict[str, list[str]]  # dtype -> layer names or patterns (sdnq's modules_dtype_dict)
    scales_in_float32: bool  # dequantize_fp32: scales, zero points and SVD factors read in float32
    subnormals: bool  # written by sdnq 0.2.3 or newer (``float_values``)

    def dtype_of(self, layer: str) -> str:
        """The dtype of ``layer``, as sdnq's loader decides it: the first entry of ``modules_dtype`` naming its
        weight, else ``weights_dtype``."""
        param = f"{layer}.weight"
        return next(
            (dtype for dtype, names in self.modules_dtype.items() if names_match(param, names)), self.weights_dtype
        )


def names_match(param: str, names) -> bool:
    """Whether sdnq's name list ``names`` covers ``param`` (sdnq's ``check_param_name_in``): the name itself, one of
    its dotted parts, a ``.prefix`` it starts with, or a ``*`` pattern."""
    parts = param.split(".")
    for name in [names] if isinstance(names, str) else names:
        if name.startswith("."):
            if param.startswith(name[1:]):
                return True
        elif name == param or name in parts:
            return True
        elif "*" in name and re.match(name.replace(".*", "\\.*").replace("*", ".*"), param):
            return True
    return False


def version(text) -> tuple[int, ...]:
    """(major, minor, patch) of a version string such as "0.1.5"."""
    return tuple(int(n) for n in re.findall(r"\d+", str(text))[:3])


def read_settings(config: dict, source: str) -> SdnqSettings:
    """The SDNQ settings of a model config's ``quantization_config``; a ModelFilesError naming what is not supported.
    Only settings that change what the files hold are checked: sdnq's run-time options (quantised matmuls,
    devices, training flags) do not, except where they change the layout (``use_quantized_matmul`` stores SVD
    factors and unpacked 8-bit codes transposed)."""
    quant = config.get("quantization_config") or {}
    problems = []
    weights_dtype = quant.get("weights_dtype", "int8")  # sdnq's default
    modules_dtype = quant.get("modules_dtype_dict") or {}
    for dtype in (weights_dtype, *modules_dtype):
        if code_dtype(dtype) is None:
            names = modules_dtype.get(dtype, [])
            where = f" for {len(names)} layers (e.g. {names[0]})" if names and dtype != weights_dtype else ""
            problems.append(f"weights dtype {dtype!r}{where}")
    for key, what in (("use_hadamard", "Hadamard rotations"), ("use_codebook", "codebook weights")):
        if quant.get(key):
            problems.append(f"{what} ({key})")
    for key in ("scale_dtype", "zero_point_dtype"):
        if quant.get(key) not in (None, "none"):
            problems.append(f"quantised scales ({key} {quant[key]!r})")
    if quant.get("modules_quant_config"):
        problems.append(f"per-module settings (modules_quant_config for {', '.join(quant['modules_quant_config'])})")
    if quant.get("use_quantized_matmul") and (
        quant.get("use_svd") or any(code_dtype(d) and code_dtype(d).bits == 8 for d in (weights_dtype, *modules_dtype))
    ):
        problems.append(
            "SVD factors or 8-bit codes stored transposed for sdnq's quantised matmul (use_quantized_matmul)"
        )
    if quant.get("is_training"):
        problems.append("a training checkpoint (is_training)")
    if problems:
        raise ModelFilesError(
            f"{source} describes an SDNQ quantisation this loader cannot read: {', '.join(problems)}. It reads SDNQ's "
            "4-, 5- and 8-bit integer and float weights, with or without SVD (e.g. Disty0/GLM-Image-SDNQ-4bit-dynamic), "
            "AutoRound/GPTQ 4-bit folders, ComfyUI's quantised files, and the bf16 weights of zai-org/GLM-Image."
        )
    return SdnqSettings(
        weights_dtype,
        dict(modules_dtype),
        bool(quant.get("dequantize_fp32", False)),  # False: sdnq's default before 0.1.7
        version(quant.get("sdnq_version", "0")) >= SUBNORMALS_SINCE,
    )


def quantised_layers(files: ComponentFiles) -> list[str]:
    """The module names whose weights the files hold quantised: a ``scale`` beside a ``weight`` of codes."""
    dtypes = files.weights.dtypes
    return sorted(
        key.removesuffix(".scale")
        for key in dtypes
        if key.endswith(".scale") and dtypes.get(key.removesuffix("scale") + "weight") in CODE_STORAGE
    )


def quantised_keys(files: ComponentFiles) -> set[str]:
    """The keys of the quantised layers' own tensors (``LAYER_TENSORS``), which stay in sdnq's dtypes."""
    return {f"{name}.{t}" for name in quantised_layers(files) for t in LAYER_TENSORS}


# ---------------------------------------------------------------------------------------------------------------
# The layer


class SDNQLinear(nn.Module):
    """A drop-in for ``nn.Linear`` holding an SDNQ layer as published: ``codes`` (the checkpoint's ``weight``),
    ``scale``, ``zero_point`` (unsigned dtypes), ``svd_up`` and ``svd_down`` (with SVD) and ``bias`` as frozen
    parameters, so everything that moves or counts a model's parameters sees them. ``forward`` and ``project``
    dequantise the weight in the input's dtype (``dequantise``) for one matmul. The codes are no weight to cast, patch
    or page: they are held as ``codes``, and read from and written to a state dict under the checkpoint's name
    (``STORED_AS``), so that code looking for a ``weight`` of this layer finds none."""

    STORED_AS = {"codes": "weight"}  # attribute -> its key in the checkpoint

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype_name: str,
        groups: int = 1,
        svd_rank: int = 0,
        subnormals: bool = True,
        dtype=None,
        device=None,
    ):
        super().__init__()
        code = code_dtype(dtype_name)
        if code is None:
            raise ValueError(f"SDNQ weights dtype {dtype_name!r} is not read here")
        if in_features % groups or (code.bits == 5 and in_features % 8):
            raise ValueError(f"{in_features} inputs do not make {groups} groups of {code.name} codes")
        self.in_features, self.out_features, self.groups, self.code = in_features, out_features, groups, code

        def frozen(*shape, dtype):
            return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        scale_shape = (out_features, groups, 1) if groups > 1 else (out_features, 1)
        self.codes = frozen(*packed_shape(code, out_features, in_features, groups), dtype=code.native or torch.uint8)
        self.scale = frozen(*scale_shape, dtype=dtype)
        self.zero_point = None if code.signed else frozen(*scale_shape, dtype=dtype)
        self.svd_up = frozen(out_features, svd_rank, dtype=dtype) if svd_rank else None
        self.svd_down = frozen(svd_rank, in_features, dtype=dtype) if svd_rank else None
        self.bias = frozen(out_features, dtype=dtype) if bias else None
        # a small float's value per code: a buffer (it moves with the layer, even when built on the meta device) that
        # the state dict leaves out
        values = float_values(code, subnormals) if code.is_float else None
        self.register_buffer("code_values", values, persistent=False)

    def stored(self, key: str) -> torch.Tensor | None:
        """The tensor the checkpoint stores under ``key`` (sdnq's names: ``LAYER_TENSORS``)."""
        attribute = next((a for a, k in self.STORED_AS.items() if k == key), key)
        return getattr(self, attribute)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for attribute, key in self.STORED_AS.items():
            if prefix + key in state_dict:
                state_dict[prefix + attribute] = state_dict.pop(prefix + key)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for attribute, key in self.STORED_AS.items():
            if prefix + attribute in destination:
                destination[prefix + key] = destination.pop(prefix + attribute)

    def dequantise(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The weight [out, in] in ``dtype``, made ``DEQUANTISE_CHUNK`` weights at a time, each chunk as sdnq makes the
        whole weight: the values in the scales' dtype, times the scale (plus the zero point), plus the SVD product,
        then cast."""
        device = device or self.scale.device
        weight = torch.empty(self.out_features, self.in_features, dtype=dtype, device=device)
        rows = chunk_rows(self.in_features)
        for start in range(0, self.out_features, rows):
            weight[start : start + rows] = self._rows(start, min(start + rows, self.out_features), dtype, device)
        return weight

    def _rows(self, start: int, stop: int, dtype: torch.dtype, device) -> torch.Tensor:
        scale = self.scale[start:stop].to(device)
        values = self._values(start, stop, scale.dtype, device)
        if self.zero_point is None:
            rows = values * scale
        else:
            rows = torch.addcmul(self.zero_point[start:stop].to(device), values, scale)
        rows = rows.view(stop - start, self.in_features)
        if self.svd_up is not None:
            svd_up, svd_down = self.svd_up[start:stop].to(device), self.svd_down.to(device)
            rows = rows.to(svd_up.dtype).addmm_(svd_up, svd_down)
        return rows.to(dtype)

    def _values(self, start: int, stop: int, dtype: torch.dtype, device) -> torch.Tensor:
        """The values the codes of rows [start, stop) stand for, in ``dtype`` (the scales'), shaped like the scales
        broadcast: [rows, groups, group] (or [rows, in])."""
        code = self.code
        if code.bits == 8:
            codes = self.codes[start:stop].to(device)
        else:
            codes = unpack_codes(self._packed_rows(start, stop).to(device), code.bits)
        if self.code_values is not None:
            index = codes.view(-1).int()  # int32: index_select takes it as is (indexing would widen it to int64)
            values = torch.index_select(self.code_values.to(device), 0, index).to(dtype)
        elif code.native is None and code.signed:
            values = codes.to(dtype) - 2 ** (code.bits - 1)
        else:
            values = codes.to(dtype)
        rows = stop - start
        return values.view(rows, self.groups, -1) if self.groups > 1 else values.view(rows, -1)

    def _packed_rows(self, start: int, stop: int) -> torch.Tensor:
        """The packed bytes of rows [start, stop) (whole 5-bit packs: rows of 8 codes)."""
        if self.code.bits == 4:
            return self.codes[start * self.in_features // 2 : stop * self.in_features // 2]
        return self.codes[start * self.in_features // 8 : stop * self.in_features // 8]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ weight.T`` without the bias, in x's dtype."""
        return F.linear(x, self.dequantise(x.dtype, x.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(x)
        return out if self.bias is None else out + self.bias.to(x.device, x.dtype)

    def extra_repr(self) -> str:
        svd = f", SVD rank {self.svd_up.shape[1]}" if self.svd_up is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self.code.name}, {self.groups} groups per row{svd}"
        )


class SideBySide:
    """What the fast AR decoder multiplies with for several SDNQ layers (the AR's k and v): each layer's output,
    joined. Their dtypes and groups may differ, so their codes are not joined into one layer."""

    def __init__(self, layers: Sequence[SDNQLinear]):
        self.layers = list(layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer.project(x) for layer in self.layers], dim=-1)


def swap_linears(
    model: nn.Module,
    files: ComponentFiles,
    dtype: torch.dtype | None = None,
    device="meta",
    layer_class: type[SDNQLinear] = SDNQLinear,
) -> None:
    """Replace each ``nn.Linear`` the files quantise by an empty ``layer_class`` of the same shape, in the dtype the
    config gives it, with the files' groups, SVD rank and bias; a ModelFilesError when a quantised name is not a
    linear layer of the model. What a layer needs is read from the files' headers and config, not from the Linear,
    which a host may have built without tensors."""
    settings = read_settings(files.config, files.config_source)
    shapes = files.weights.shapes
    for name in quantised_layers(files):
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ModelFilesError(f"{files.weights.where} quantises {name}, which is not a linear layer of the model")
        scale = shapes[f"{name}.scale"]
        try:
            layer = layer_class(
                linear.in_features,
                linear.out_features,
                f"{name}.bias" in shapes,
                settings.dtype_of(name),
                groups=scale[1] if len(scale) == 3 else 1,
                svd_rank=shapes[f"{name}.svd_up"][1] if f"{name}.svd_up" in shapes else 0,
                subnormals=settings.subnormals,
                dtype=dtype,
                device=device,
            )
        except (ValueError, IndexError) as e:
            raise ModelFilesError(
                f"{files.weights.where} stores {name} in a layout that is not SDNQ's for its [{linear.out_features}, "
                f"{linear.in_features}] weight ({name}.scale is {list(scale)}: {e}). Download the folder again."
            ) from e
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)


def check_layers(files: ComponentFiles, settings: SdnqSettings) -> None:
    """A ModelFilesError unless every quantised layer is stored as the dtype the config gives it (its codes' storage,
    a zero point exactly for unsigned dtypes, both SVD factors or none), and every weight of integer codes has its
    scale: headers only."""
    dtypes = files.weights.dtypes
    for key, dtype in dtypes.items():
        scale = key.removesuffix("weight") + "scale"
        if key.endswith(".weight") and dtype.startswith(("U", "I")) and scale not in dtypes:
            raise ModelFilesError(
                f"{files.weights.where} stores {key} as {dtype} codes without {scale}; an SDNQ layer stores its "
                "codes with their scale. Download the folder again."
            )
        weight = key.removesuffix("scale") + "weight"
        if key.endswith(".scale") and dtypes.get(weight, CODE_STORAGE[0]) not in CODE_STORAGE:
            raise ModelFilesError(
                f"{files.weights.where} stores {weight} as {dtypes[weight]} beside {key}; an SDNQ layer stores its "
                f"codes as {', '.join(CODE_STORAGE)}. The file was converted wrongly or damaged: download the folder "
                "again."
            )
    for name in quantised_layers(files):
        code = code_dtype(settings.dtype_of(name))
        found = {t: dtypes.get(f"{name}.{t}") for t in LAYER_TENSORS}
        expected_zero = not code.signed
        if found["weight"] != code.storage() or (found["zero_point"] is not None) != expected_zero:
            stored = ", ".join(f"{t} {d}" for t, d in found.items() if d is not None)
            raise ModelFilesError(
                f"{files.weights.where} stores {name} as {stored}, but {files.config_source} makes it {code.name} "
                f"({code.storage()} codes, {'a' if expected_zero else 'no'} zero point). The config and the weights "
                "come from different downloads: download the folder again (config.json and weights together)."
            )
        if (found["svd_up"] is None) != (found["svd_down"] is None):
            raise ModelFilesError(
                f"{files.weights.where} holds one SVD factor of {name} without the other; download it again."
            )


def cast_state_dict(state_dict: dict[str, torch.Tensor], files: ComponentFiles, dtype: torch.dtype | None):
    """The tensors as the core model computes with them, as sdnq's loader casts them: the codes as stored; scales,
    zero points and SVD factors in float32 where the config says ``dequantize_fp32``, else in ``dtype``; every other
    floating tensor in ``dtype`` (None: as stored)."""
    settings = read_settings(files.config, files.config_source)
    quantised = quantised_keys(files)
    out = {}
    for key, tensor in state_dict.items():
        if key in quantised:
            is_factor = key.rsplit(".", 1)[1] in FLOAT_TENSORS
            cast = (torch.float32 if settings.scales_in_float32 else dtype) if is_factor else None
        else:
            cast = dtype if tensor.is_floating_point() else None
        out[key] = tensor if cast is None else tensor.to(cast)
    return out


class SdnqFormat(WeightFormat):
    name = "sdnq"
    label = "SDNQ (SD.Next's per-layer quantisation)"
    components = ("transformer", "vision_language_encoder")
    layer_class = SDNQLinear
    packed = True

    def recognise(self, files: ComponentFiles) -> bool:
        quant = files.config.get("quantization_config")
        return isinstance(quant, dict) and quant.get("quant_method") == QUANT_METHOD

    def check(self, files: ComponentFiles) -> None:
        settings = read_settings(files.config, files.config_source)
        if not quantised_layers(files):
            raise ModelFilesError(
                f"{files.config_source} describes SDNQ weights, but {files.weights.where} holds no quantised layer (no "
                "`.scale` beside integer codes). Download the folder again: its config and weights come from "
                "different models."
            )
        check_layers(files, settings)

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return {f"{name}.weight" for name in quantised_layers(files)}  # the codes; scales and factors are floating

    def build_layers(
        self, model: nn.Module, files: ComponentFiles, dtype: torch.dtype | None, layer_class=None
    ) -> None:
        swap_linears(model, files, dtype, layer_class=layer_class or SDNQLinear)

    def cast(self, files: ComponentFiles, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict:
        return cast_state_dict(state_dict, files, dtype)

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        return self.cast(files, load_tensors(files.weights, None, device), dtype)

    def read_as_stored(self, files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        quantised = quantised_keys(files)
        stored = load_tensors(files.weights)
        return {
            k: t if k in quantised or dtype is None or not t.is_floating_point() else t.to(dtype)
            for k, t in stored.items()
        }

    def dequantise(self, layer: nn.Module, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        return layer.dequantise(dtype, device)

    def projection(self, layers: Sequence[nn.Module]) -> Projection:
        return layers[0].project if len(layers) == 1 else SideBySide(layers)

    def joined_bytes(self, out_features: int, in_features: int, dtype_bytes: int, group_size: int) -> int:
        return 0  # SideBySide reads the layers in place

    def many_rows_matmul_bytes(self, in_features: int, out_features: int, rows: int, dtype_bytes: int) -> dict:
        """A dequantising matmul: the weight in the activations' dtype, the scratch of one chunk (the values and their
        product in float32 and the chunk cast to the activations' dtype: 10 bytes a weight in bf16 whatever the
        dtype, measured; scales in bf16 take less) and the output. Checked against measured allocations in
        tests/test_sdnq.py."""
        weights = in_features * out_features
        chunk = min(chunk_rows(in_features), out_features) * in_features
        return {
            "matmul": {
                "weight dequantised to the model dtype": weights * dtype_bytes,
                "dequantising scratch (one chunk)": chunk * (4 + 4 + dtype_bytes),
                "matmul output": rows * out_features * dtype_bytes,
            }
        }
