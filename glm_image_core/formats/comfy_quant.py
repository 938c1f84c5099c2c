"""ComfyUI's per-layer quantised files, the format of its mixed-precision layers (comfy/quant_ops.py, ComfyUI 0.33).

A quantised Linear stores `<layer>.weight` in its format's storage type, its scales (`<layer>.weight_scale`, ...) and
`<layer>.comfy_quant`: uint8 bytes of a JSON object such as {"format": "int8_tensorwise"}. A file may instead name its
quantised layers once, in its metadata: `_quantization_metadata` = {"layers": {<layer>: {"format": ...}}}. Layers
without either are plain weights.

Here: which layers a file marks, the file-level block turned into per-layer markers (what
comfy.utils.convert_old_quants does, so hosts see one form), the writer for float8_e4m3fn and int8_tensorwise, and
the dequantisation of the formats whose weight is one stored number per element times a scale, for the core
loaders. ComfyUI's own layers run every format (nodes/dit_loading.py).

What the writer's layers ask of ComfyUI's activations: int8_tensorwise layers quantise them per row on the fly
(W8A8, ComfyUI's int8 kernel); float8 layers are written with `full_precision_matrix_mult`, weight-only (the weight
is cast for a full-precision matmul), because the writer stores no `input_scale` and ComfyUI would otherwise cast
the activations to fp8 as they are, clamped at +-448."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from ..checkpoint import ComponentFiles, load_tensors
from ..errors import ModelFilesError
from .base import WeightFormat

MARKER_SUFFIX = ".comfy_quant"
FILE_METADATA_KEY = "_quantization_metadata"
# What a quantised layer may store beside its weight (comfy/ops.py, _load_quantized_module).
PARAMETER_SUFFIXES = (
    ".weight_scale",
    ".weight_scale_2",
    ".input_scale",
    ".pre_quant_scale",
    ".weight_s_rel",
    ".weight_s_channel",
    ".weight_codebook",
)
# Formats whose weight is storage * weight_scale (one scale per tensor or per output row).
ELEMENTWISE = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2, "int8_tensorwise": torch.int8}
WRITABLE = ("float8_e4m3fn", "int8_tensorwise")  # what save_single_file(..., quant=...) writes
LARGEST = {"float8_e4m3fn": 448.0, "int8_tensorwise": 127.0}
WEIGHT_ONLY = {"full_precision_matrix_mult": True}  # a layer config's key for weight-only layers


class ComfyQuantFormat(WeightFormat):
    name = "comfy_quant"
    label = "ComfyUI per-layer quantised (comfy_quant)"
    components = ("transformer", "vae")

    def recognise(self, files: ComponentFiles) -> bool:
        return bool(marked_layers(files.weights.shapes, files.weights.metadata, files.weights.where))

    def check(self, files: ComponentFiles) -> None:
        """Every marked layer stores its weight (what else it stores depends on its format, in its marker's values:
        ``check_marked_layers``)."""
        shapes = files.weights.shapes
        for layer in sorted(marked_layers(shapes, files.weights.metadata, files.weights.where)):
            if f"{layer}.weight" not in shapes:
                raise ModelFilesError(
                    f"{files.weights.where} marks {layer} as quantised but lacks {layer}.weight. The file was changed "
                    "after it was written: make it again (save_single_file(..., quant=...)) or download it again."
                )

    def check_read(self, files: ComponentFiles, state_dict: dict, expected: dict[str, tuple[int, ...]]) -> None:
        """A layer whose marker names a format of one stored number per weight (fp8, int8) has the weight's whole
        shape, which the headers alone could not tell (``rows_only``); dequantised (``read``), every layer has."""
        configs = layer_configs(state_dict, files.weights.where)
        for key in sorted(self.rows_only(files)):
            config = configs.get(key.removesuffix(".weight"))
            elementwise = config is None or config.get("format") in ELEMENTWISE  # None: read dequantised
            found = tuple(state_dict[key].shape)
            if elementwise and key in expected and found != expected[key]:
                raise ModelFilesError(
                    f"{key} is {list(found)} in {files.weights.where}, {files.config_source} expects "
                    f"{list(expected[key])}. The weights and the config come from different models or downloads: "
                    "make the file again from one folder (save_single_file) or download it again."
                )

    def extra_key(self, key: str, expected) -> bool:
        suffix = next((s for s in (MARKER_SUFFIX, *PARAMETER_SUFFIXES) if key.endswith(s)), None)
        return suffix is not None and f"{key[: -len(suffix)]}.weight" in expected

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return self.rows_only(files) | {k for k in files.weights.shapes if k.endswith(MARKER_SUFFIX)}

    def rows_only(self, files: ComponentFiles) -> set[str]:
        # 4-bit formats among them pack a weight along its inputs; ComfyUI's layers check those shapes
        return {
            f"{layer}.weight"
            for layer in marked_layers(files.weights.shapes, files.weights.metadata, files.weights.where)
        }

    def read(self, files: ComponentFiles, dtype: torch.dtype | None, device="cpu") -> dict[str, torch.Tensor]:
        state_dict = with_file_markers(
            load_tensors(files.weights, None, device), files.weights.metadata, files.weights.where
        )
        return dequantise_state_dict(state_dict, dtype, files.weights.where)

    def read_as_stored(self, files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        # a file-level block becomes per-layer markers, as ComfyUI's loader makes it
        state_dict = with_file_markers(load_tensors(files.weights), files.weights.metadata, files.weights.where)
        check_marked_layers(state_dict, files.weights.where)
        return state_dict


def file_layers(metadata: dict[str, str], where: str) -> dict[str, dict]:
    """The layers a file's `_quantization_metadata` block quantises ({} without one)."""
    if FILE_METADATA_KEY not in metadata:
        return {}
    try:
        layers = json.loads(metadata[FILE_METADATA_KEY])["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFilesError(
            f"{where}: its {FILE_METADATA_KEY} is not ComfyUI's per-layer quantisation block (JSON with 'layers'): "
            f"{e!r}. Re-export the file with the tool that made it."
        ) from e
    return layers if isinstance(layers, dict) else {}


def marked_layers(keys: Iterable[str], metadata: dict[str, str], where: str) -> set[str]:
    """The layers a file quantises: a `.comfy_quant` marker tensor each, or listed in its metadata."""
    marked = {key[: -len(MARKER_SUFFIX)] for key in keys if key.endswith(MARKER_SUFFIX)}
    return marked | set(file_layers(metadata, where))


def marker(config: dict) -> torch.Tensor:
    """A layer's `.comfy_quant` tensor: its config as JSON bytes, as ComfyUI writes it."""
    return torch.tensor(list(json.dumps(config).encode("utf-8")), dtype=torch.uint8)


def with_file_markers(state_dict: dict[str, torch.Tensor], metadata: dict[str, str], where: str) -> dict:
    """The state dict with a `.comfy_quant` marker for each layer the file's metadata block names."""
    layers = file_layers(metadata, where)
    return state_dict | {f"{layer}{MARKER_SUFFIX}": marker(config) for layer, config in layers.items()}


def layer_configs(state_dict: dict[str, torch.Tensor], where: str = "the file") -> dict[str, dict]:
    """{layer: its decoded config} for each marker tensor (its values: a ModelFilesError naming it unless they are
    the bytes of a JSON object)."""
    configs = {}
    for key, tensor in state_dict.items():
        if key.endswith(MARKER_SUFFIX):
            try:
                config = json.loads(bytes(tensor.to(torch.uint8).reshape(-1).tolist()).decode("utf-8"))
            except (ValueError, RecursionError) as e:
                config = e
            if not isinstance(config, dict):
                raise ModelFilesError(
                    f'{key} in {where} is not the bytes of a JSON object such as {{"format": "int8_tensorwise"}} '
                    f"({config}); the file was changed after it was written: make it again or download it again."
                )
            configs[key[: -len(MARKER_SUFFIX)]] = config
    return configs


def check_marked_layers(state_dict: dict[str, torch.Tensor], where: str) -> dict[str, dict]:
    """The layer configs of a marked state dict, after checking what its markers' values say: a layer of a format
    whose weight is storage * weight_scale stores its weight in that format's dtype, with one scale or one per output
    row. Returns the configs."""
    configs = layer_configs(state_dict, where)
    for layer, config in configs.items():
        storage = ELEMENTWISE.get(config.get("format"))
        if storage is None:
            continue  # ComfyUI's layers check the formats they run
        scale, weight = state_dict.get(f"{layer}.weight_scale"), state_dict[f"{layer}.weight"]
        if scale is None:
            raise ModelFilesError(
                f"{where} marks {layer} as {config['format']} but lacks {layer}.weight_scale, which that format "
                "multiplies its stored numbers by. The file was changed after it was written: make it again or "
                "download it again."
            )
        if weight.dtype != storage:
            raise ModelFilesError(
                f"{layer}.weight is {weight.dtype} in {where}, its marker says {config['format']} (stored as "
                f"{storage}). The file was changed after it was written: make it again or download it again."
            )
        if scale.numel() not in (1, weight.shape[0]):
            raise ModelFilesError(
                f"{layer}.weight_scale is {list(scale.shape)} in {where}; a {config['format']} layer has one scale, or "
                f"one per output row ({weight.shape[0]}). The file was changed after it was written: make it again or "
                "download it again."
            )
    return configs


def dequantise_state_dict(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None, where: str) -> dict:
    """Plain weights from a marked state dict: weight = storage * weight_scale in float32, then ``dtype`` (None:
    float32 for them, the rest as stored). Formats that pack or rotate their weights are refused: ComfyUI's layers
    run them."""
    configs = check_marked_layers(state_dict, where)
    out = {k: v for k, v in state_dict.items() if not k.endswith(MARKER_SUFFIX)}
    for layer, config in configs.items():
        fmt = config.get("format")
        if fmt not in ELEMENTWISE or config.get("convrot") or config.get("params", {}).get("convrot"):
            raise ModelFilesError(
                f"{where} quantises {layer} as {fmt}{' with ConvRot' if fmt in ELEMENTWISE else ''}; this loader "
                f"dequantises {', '.join(ELEMENTWISE)} (without ConvRot). Load the file in ComfyUI 0.33 or newer "
                "(Load GLM-Image DiT runs it with ComfyUI's own layers), or use the bf16 weights."
            )
        scale = out.pop(f"{layer}.weight_scale").float()
        weight = out[f"{layer}.weight"].float() * scale.reshape(-1, *[1] * (out[f"{layer}.weight"].ndim - 1))
        out.pop(f"{layer}.input_scale", None)  # activation quantisation: not part of the weight
        out[f"{layer}.weight"] = weight
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in out.items()}


def quantise_state_dict(state_dict: dict[str, torch.Tensor], layers: Iterable[str], fmt: str) -> dict:
    """ComfyUI's per-layer format: the weight of each of ``layers`` (module names) stored as ``fmt`` with one float32
    `weight_scale` per layer (its largest magnitude / the format's largest value; int8 rounds to nearest) and its
    marker (float8: weight-only, see the module's docstring); the rest as given."""
    if fmt not in WRITABLE:
        raise ValueError(f"quant={fmt!r}: the writer makes {' or '.join(WRITABLE)}")
    config = {"format": fmt, **(WEIGHT_ONLY if fmt.startswith("float8") else {})}
    out = dict(state_dict)
    for layer in layers:
        weight = state_dict[f"{layer}.weight"].float()
        scale = (weight.abs().max() / LARGEST[fmt]).clamp(min=torch.finfo(torch.float32).tiny)
        scaled = weight / scale
        if fmt == "int8_tensorwise":
            scaled = scaled.round().clamp(-LARGEST[fmt], LARGEST[fmt])
        out[f"{layer}.weight"] = scaled.to(ELEMENTWISE[fmt])
        out[f"{layer}.weight_scale"] = scale.reshape(())
        out[f"{layer}{MARKER_SUFFIX}"] = marker(config)
    return out
