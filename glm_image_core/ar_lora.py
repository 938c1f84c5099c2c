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

Applied unmerged, beside each projection (``lora``: the fast decoder multiplies with the update beside each
projection, the transformers loop gets it from forward hooks), on every weight format.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from .defaults import AR_DECODER_LAYERS_PREFIX, AR_DECODER_PROJECTIONS
from .errors import InvalidInputError
from .file_checks import (
    LoraTensors,
    adapter_value,
    check_adapter_config,
    check_lora_alpha_values,
    check_lora_pairs,
    read_header,
)
from .lora import LayerLora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
DOWN, UP, ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
TARGETS = "the decoder's projections (model.language_model.layers.N.self_attn.q/k/v/o_proj, mlp.gate_up_proj/down_proj)"


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
    source = f"{config_path.parent.name}/{ADAPTER_CONFIG}"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InvalidInputError(f"{source} is not valid JSON ({e}). {ADAPTER_REMEDY}") from e
    if not isinstance(config, dict):
        raise InvalidInputError(f"{source} is a JSON {type(config).__name__}, not an object. {ADAPTER_REMEDY}")
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


ADAPTER_REMEDY = "Save the adapter again with PEFT's save_pretrained (safetensors), or download it again."


def _parts(keys) -> dict[str, LoraTensors]:
    """{module: its A, B and alpha keys} of keys that ``check_keys`` passed."""
    parts: dict[str, LoraTensors] = {}
    for key in keys:
        module, kind = _module_and_kind(key)
        setattr(parts.setdefault(module, LoraTensors()), {DOWN: "down", UP: "up", ALPHA: "alpha"}[kind], key)
    return parts


def check_adapter(path: str | Path) -> dict[str, LoraTensors]:
    """The checks that read no tensor data (for a host to run when a job is queued): the files are there, the
    safetensors header is whole, the config asks for nothing the merge cannot do, every key is a LoRA tensor of a
    decoder projection, every A has its B of one rank in a floating dtype, and the config agrees with the tensors as
    PEFT requires (``file_checks.check_adapter_config``). Returns the tensor keys by module."""
    weights, config_path = adapter_files(path)
    config = read_config(config_path)
    header = read_header(weights, ADAPTER_REMEDY, InvalidInputError)
    source = Path(path).name
    check_keys(header.shapes, source)
    parts = _parts(header.shapes)
    check_lora_pairs(source, header, parts, ADAPTER_REMEDY)
    if config_path is not None:
        ranks = {module: header.shapes[keys.down][0] for module, keys in parts.items()}
        check_adapter_config(f"{config_path.parent.name}/{ADAPTER_CONFIG}", config, ranks, ADAPTER_REMEDY)
    return parts


def read_adapter(path: str | Path) -> dict[str, LayerLora]:
    """{module name: its update} of an adapter folder or file, checked as ``check_adapter`` does."""
    parts = check_adapter(path)
    weights, config_path = adapter_files(path)
    config = read_config(config_path)
    layers = {}
    with safe_open(weights, framework="pt", device="cpu") as f:
        for module, keys in parts.items():
            down, up = f.get_tensor(keys.down), f.get_tensor(keys.up)
            rank = down.shape[0]
            if config:
                alpha = adapter_value(config, "alpha_pattern", "lora_alpha", module, rank)
            else:
                alpha = f.get_tensor(keys.alpha).item() if keys.alpha else rank
                check_lora_alpha_values(Path(path).name, {keys.alpha: alpha} if keys.alpha else {})
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
        shape = (linear.out_features, linear.in_features)
        if (lora.up.shape[0], lora.down.shape[1]) != shape:
            raise InvalidInputError(
                f"{source} updates {module} as [{lora.up.shape[0]}, {lora.down.shape[1]}], the model's is "
                f"{list(shape)}: the adapter is for another model."
            )
