"""LoRA adapters for the AR model's text decoder, in PEFT's format (GLM-Image is fine-tuned on its AR: a PEFT LoRA on
the language model's projections, saved with save_pretrained).

An adapter is a folder (``adapter_config.json`` + ``adapter_model.safetensors``) or one ``.safetensors`` file. Keys
name modules of ``GlmImageForConditionalGeneration`` behind PEFT's ``base_model.model.`` prefix or none:
``model.language_model.layers.0.self_attn.q_proj.lora_A.weight`` (A, [rank, in]) and ``...lora_B.weight`` (B,
[out, rank]). The update is W + strength * scaling * B @ A with scaling = alpha / rank (alpha / sqrt(rank) with
``use_rslora``); alpha comes from the config (``lora_alpha``, ``alpha_pattern``), or in a single file from a
``<module>.alpha`` tensor, else alpha = rank. Dropout only acts in training. Only the decoder's projections
(q/k/v/o, gate_up, down) take an update: anything else (``modules_to_save``, DoRA, LoRA biases, other modules) is
refused by name.

Applied by merging, for the time of a run (``merged``): the fast decoder (``fast_ar``) reads the projection weights
directly, so a side path beside the weights would need a second code path there, while a merge costs nothing per
token. The original tensors are put back afterwards: the loaded model is shared (ComfyUI caches it). An int8
projection (``quant``) is dequantised, merged and quantised again with new per-row scales, as ComfyUI's own
quantised layers take a LoRA (requantize_from_float with the scale recalculated): one more int8 rounding.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import formats
from .defaults import AR_DECODER_LAYERS_PREFIX, AR_DECODER_PROJECTIONS
from .errors import InvalidInputError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DOWN, UP, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
TARGETS = "the decoder's projections (model.language_model.layers.N.self_attn.q/k/v/o_proj, mlp.gate_up_proj/down_proj)"


@dataclass(frozen=True)
class LayerLora:
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [out, rank]
    scaling: float  # alpha / rank, or alpha / sqrt(rank)

    def delta(self, device) -> torch.Tensor:
        """scaling * B @ A in float32, [out, in]."""
        return (self.up.to(device, torch.float32) @ self.down.to(device, torch.float32)) * self.scaling


@dataclass(frozen=True)
class ArLora:
    """One adapter at one strength, as the AR LoRA node adds it to an AR model."""

    layers: dict[str, LayerLora]  # module name in GlmImageForConditionalGeneration -> its update
    strength: float
    source: str


def adapter_files(path: str | Path) -> tuple[Path, Path | None]:
    """(the weights file, the config file or None) of an adapter folder or single file."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / ADAPTER_WEIGHTS, path / ADAPTER_CONFIG
        if not weights.is_file() or not config.is_file():
            found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "nothing"
            raise InvalidInputError(
                f"{path.name}/ is not a PEFT adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                f"(found {found}). Save the adapter with PEFT's save_pretrained (safetensors), or give its "
                ".safetensors file."
            )
        return weights, config
    if path.suffix != ".safetensors" or not path.is_file():
        raise InvalidInputError(f"{path.name} is neither a PEFT adapter folder nor a .safetensors file.")
    return path, None


def read_config(config_path: Path | None) -> dict:
    """The adapter's PEFT config ({} for a single file), refused where it asks for what the merge does not do."""
    if config_path is None:
        return {}
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{config_path.parent.name}/{ADAPTER_CONFIG} is not valid JSON ({e}).") from e
    refused = {
        "peft_type": config.get("peft_type", "LORA") != "LORA" and f"peft_type {config.get('peft_type')!r}",
        "modules_to_save": bool(config.get("modules_to_save")) and f"modules_to_save {config['modules_to_save']}",
        "use_dora": bool(config.get("use_dora")) and "use_dora (DoRA)",
        "bias": config.get("bias", "none") != "none" and f"bias {config['bias']!r}",
        "lora_bias": bool(config.get("lora_bias")) and "lora_bias",
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")) and "fan_in_fan_out",
    }
    reasons = [reason for reason in refused.values() if reason]
    if reasons:
        raise InvalidInputError(
            f"{config_path.parent.name}/{ADAPTER_CONFIG} asks for {', '.join(reasons)}: the AR LoRA loader merges "
            f"plain LoRA updates into {TARGETS} only (whole modules to save, DoRA and LoRA biases are not applied). "
            "Train the adapter without them."
        )
    return config


def is_decoder_projection(module: str) -> bool:
    """Whether ``module`` names a linear projection of the AR's text decoder (an adapter's only targets)."""
    return module.startswith(AR_DECODER_LAYERS_PREFIX) and module.split(".", 4)[-1] in AR_DECODER_PROJECTIONS


def _module_and_kind(key: str) -> tuple[str, str] | None:
    key = key.removeprefix(PEFT_PREFIX)
    for suffix in (DOWN, UP, ALPHA):
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return (module, suffix) if is_decoder_projection(module) else None
    return None


def check_keys(keys, source: str) -> None:
    """InvalidInputError naming the keys that are no LoRA tensor of a decoder projection."""
    keys = list(keys)
    foreign = [k for k in keys if _module_and_kind(k) is None]
    if foreign or not keys:
        raise InvalidInputError(
            f"{source} is not a LoRA for GLM-Image's AR: {len(foreign)} of its {len(keys)} keys name no LoRA "
            f"tensor of {TARGETS} (e.g. {', '.join(foreign[:3]) or 'none: the file is empty'}). AR adapters name "
            "them as PEFT does: base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight."
        )


def check_adapter(path: str | Path) -> None:
    """The checks that read no tensor data (for a host to run when a job is queued): the files are there, the
    config asks for nothing the merge cannot do, every key is a LoRA tensor of a decoder projection."""
    weights, config = adapter_files(path)
    read_config(config)
    try:
        with safe_open(weights, framework="pt", device="cpu") as f:
            keys = list(f.keys())
    except SafetensorError as e:
        raise InvalidInputError(f"{weights.name} is not a readable safetensors file ({e}).") from e
    check_keys(keys, Path(path).name)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first pattern that matches the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_adapter(path: str | Path) -> dict[str, LayerLora]:
    """{module name: its update} of an adapter folder or file, checked as ``check_adapter`` does."""
    check_adapter(path)
    weights, config_path = adapter_files(path)
    config = read_config(config_path)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(weights, framework="pt", device="cpu") as f:
        for key in f.keys():
            module, kind = _module_and_kind(key)
            tensors.setdefault(module, {})[kind] = f.get_tensor(key)
    layers = {}
    for module, parts in tensors.items():
        if DOWN not in parts or UP not in parts:
            missing = DOWN if DOWN not in parts else UP
            raise InvalidInputError(f"{Path(path).name} has no {module}{missing}: the adapter is incomplete.")
        down, up = parts[DOWN], parts[UP]
        rank = down.shape[0]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != rank:
            raise InvalidInputError(
                f"{Path(path).name}: {module}'s lora_A {list(down.shape)} and lora_B {list(up.shape)} are not a "
                "rank-r pair ([r, in] and [out, r])."
            )
        if config:
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        else:
            alpha = parts[ALPHA].item() if ALPHA in parts else rank
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        layers[module] = LayerLora(down, up, scaling)
    return layers


def check_fits(model, layers: dict[str, LayerLora], source: str) -> None:
    """InvalidInputError unless every update has the shape of its projection in ``model``."""
    for module, lora in layers.items():
        try:
            linear = model.get_submodule(module)
        except AttributeError:
            raise InvalidInputError(
                f"{source} updates {module}, which this AR model does not have (an adapter for a model with more "
                "layers)."
            ) from None
        fmt = formats.of_layer(linear)
        if not fmt.mergeable:
            raise InvalidInputError(
                f"{source} updates {module}, which this AR model holds packed ({fmt.label}): an adapter cannot be "
                "merged into packed weights. Load the AR from the bf16 folder (weights full or int8) to use it."
            )
        shape = (linear.out_features, linear.in_features)
        if (lora.up.shape[0], lora.down.shape[1]) != shape:
            raise InvalidInputError(
                f"{source} updates {module} as [{lora.up.shape[0]}, {lora.down.shape[1]}], the model's is "
                f"{list(shape)}: the adapter is for another model."
            )


def _merge(linear: torch.nn.Module, parts: list[tuple[LayerLora, float]]) -> None:
    """Give ``linear`` new weight tensors: its weight plus the updates (an int8 layer requantised per row)."""
    weight = linear.weight
    delta = sum(strength * lora.delta(weight.device) for lora, strength in parts)
    if formats.of_layer(linear) is formats.INT8:
        q, new_scale = formats.int8.quantise_int8(formats.dequantised_weight(linear) + delta)
        linear.weight, linear.weight_scale = (torch.nn.Parameter(t, False) for t in (q, new_scale))
    else:
        linear.weight = torch.nn.Parameter((weight.float() + delta).to(weight.dtype), weight.requires_grad)


@contextmanager
def merged(model, loras: Sequence[ArLora], backup_device: torch.device | str = "cpu") -> Iterator[None]:
    """The adapters merged into ``model`` (a GlmImageForConditionalGeneration) while the block runs; afterwards its
    modules hold their original tensors again, exactly. The originals wait on ``backup_device`` meanwhile, so the
    device holds one copy of each projection."""
    updates: dict[str, list[tuple[LayerLora, float]]] = {}
    for lora in loras:
        if lora.strength != 0:
            for module, layer in lora.layers.items():
                updates.setdefault(module, []).append((layer, lora.strength))
    saved: dict[str, tuple[torch.device, dict[str, torch.nn.Parameter]]] = {}
    try:
        for module, parts in updates.items():
            linear = model.get_submodule(module)
            originals = {name: getattr(linear, name) for name in ("weight", "weight_scale") if hasattr(linear, name)}
            saved[module] = (linear.weight.device, originals)
            _merge(linear, parts)
            for param in originals.values():
                param.data = param.data.to(backup_device)
        yield
    finally:
        for module, (device, originals) in saved.items():
            linear = model.get_submodule(module)
            for name, param in originals.items():
                param.data = param.data.to(device)
                setattr(linear, name, param)
