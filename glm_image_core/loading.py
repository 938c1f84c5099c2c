"""Load GLM-Image's components from the published folder layout (docs/) or from single .safetensors files.

Every check runs on the safetensors headers before a weight is read: missing or truncated shards, an index that
lists keys its shard lacks, a file of another component, a config of another model, weights whose shapes do not
match the config. Each failure is a ``ModelFilesError`` that names the file, says what was expected and what to
do. Only safetensors are read (pickled .bin/.pt files can run code when opened).

``path`` arguments take the GLM-Image root folder (the one with ``model_index.json``), the component's sub-folder
(``transformer/``, ``vae/``, ...) or, for the DiT, the VAE and the glyph encoder, one ``.safetensors`` file as
ComfyUI users keep them (models/diffusion_models, models/vae, models/text_encoders). A single file carries its
config in the safetensors metadata (``save_single_file`` writes it); without one, the config is inferred from the
tensor shapes, with the published values for what shapes cannot tell.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import InvalidInputError, ModelFilesError
from .vae import PUBLISHED_LATENTS_MEAN, PUBLISHED_LATENTS_STD

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
REDOWNLOAD = "re-download it from zai-org/GLM-Image"  # ends most messages: what to do


@dataclass(frozen=True)
class Component:
    """What identifies one component: its folder, weight file name, config class and signature keys."""

    subfolder: str
    label: str
    weights_name: str  # file stem: "{weights_name}.safetensors" or "{weights_name}.safetensors.index.json" + shards
    config_field: str  # "_class_name" (diffusers) or "model_type" (transformers)
    config_value: str
    signature: tuple[str, ...]  # a key any checkpoint of this component has ...
    signature_prefixes: tuple[str, ...] = ()  # ... or a key prefix only this component uses
    layer_prefix: str | None = None  # "<layer_prefix>.<i>." numbers the repeated blocks
    layer_config_key: str | None = None


TRANSFORMER = Component(
    "transformer",
    "the DiT (GlmImageTransformer2DModel)",
    "diffusion_pytorch_model",
    "_class_name",
    "GlmImageTransformer2DModel",
    ("prior_token_embedding.weight", "transformer_blocks.0.attn1.to_q.weight"),
    layer_prefix="transformer_blocks",
    layer_config_key="num_layers",
)
VAE = Component(
    "vae",
    "the VAE (AutoencoderKL)",
    "diffusion_pytorch_model",
    "_class_name",
    "AutoencoderKL",
    ("decoder.conv_in.weight", "encoder.conv_in.weight"),
)
TEXT_ENCODER = Component(
    "text_encoder",
    "the glyph encoder (T5EncoderModel)",
    "model",
    "model_type",
    "t5",
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "shared.weight"),
    layer_prefix="encoder.block",
    layer_config_key="num_layers",
)
AR_MODEL = Component(
    "vision_language_encoder",
    "the AR model (GlmImageForConditionalGeneration)",
    "model",
    "model_type",
    "glm_image",
    ("lm_head.weight",),
    signature_prefixes=("model.language_model.", "model.vqmodel.", "model.visual."),
)
COMPONENTS = (TRANSFORMER, VAE, TEXT_ENCODER, AR_MODEL)

# Published values (reference/glm-image-configs) for what tensor shapes cannot tell.
DIT_ATTENTION_HEAD_DIM = 128
DIT_PATCH_SIZE = 2
VAE_NORM_NUM_GROUPS = 32
VAE_PUBLISHED_EXTRAS = {"force_upcast": True, "sample_size": 1024, "scaling_factor": 0.18215, "shift_factor": None}
T5_RELATIVE_ATTENTION_MAX_DISTANCE = 128
T5_LAYER_NORM_EPSILON = 1e-6


# ---------------------------------------------------------------------------------------------------------------
# Weight files: discovery and header validation


@dataclass
class WeightFiles:
    """The safetensors files of one component, read from their headers only (no tensor data yet)."""

    where: str  # how messages name them: "transformer/ (3 shards)" or "vae/diffusion_pytorch_model.safetensors"
    key_file: dict[str, Path]  # key -> the file holding it
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]  # the __metadata__ of a single file ({} for shards)


def display_name(path: Path) -> str:
    """``transformer/diffusion_pytorch_model-00002-of-00003.safetensors``: the file and the folder it sits in."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def _refuse_pickle(path: Path) -> ModelFilesError:
    return ModelFilesError(
        f"{display_name(path)} is a pickle checkpoint ({path.suffix}); only .safetensors weights are loaded, because "
        "pickle files can run code when opened. Download the .safetensors files of zai-org/GLM-Image, or convert "
        "this file with safetensors.torch.save_file in a trusted environment."
    )


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor shapes and metadata of one safetensors file; a truncated or corrupt file -> ModelFilesError."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except SafetensorError as e:
        raise ModelFilesError(
            f"{display_name(path)} is truncated or corrupt ({path.stat().st_size} bytes; safetensors says: {e}). "
            f"The download was probably interrupted: delete the file and {REDOWNLOAD}."
        ) from e
    except OSError as e:
        raise ModelFilesError(f"{display_name(path)} cannot be read: {e}") from e
    return shapes, metadata


def _read_index(index_path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFilesError(
            f"{display_name(index_path)} is not a valid shard index (expected JSON with a 'weight_map'): {e}. "
            f"Delete it and {REDOWNLOAD}."
        ) from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFilesError(f"{display_name(index_path)} has an empty 'weight_map'; {REDOWNLOAD}.")
    return weight_map


def _scan_sharded(folder: Path, index_path: Path) -> WeightFiles:
    weight_map = _read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        names = ", ".join(f"{folder.name}/{name}" for name in missing)
        verb = "is" if len(missing) == 1 else "are"
        raise ModelFilesError(
            f"{names} {verb} missing; the index {index_path.name} lists {len(shard_names)} shards. "
            f"Download the missing shard{'s' if len(missing) > 1 else ''} from zai-org/GLM-Image into {folder}."
        )
    key_file: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name in shard_names:
        shard = folder / name
        shard_shapes, _ = _read_header(shard)
        listed = [key for key, file in weight_map.items() if file == name]
        absent = [key for key in listed if key not in shard_shapes]
        if absent:
            raise ModelFilesError(
                f"{display_name(shard)} lacks {len(absent)} of the {len(listed)} tensors that {index_path.name} "
                f"puts in it (e.g. {absent[0]}); the shard and the index come from different downloads. "
                f"Delete both and download them again from zai-org/GLM-Image."
            )
        for key in shard_shapes:
            key_file[key] = shard
        shapes.update(shard_shapes)
    return WeightFiles(f"{folder.name}/ ({len(shard_names)} shards)", key_file, shapes, {})


def scan_weights(location: str | Path, weights_name: str | None = None) -> WeightFiles:
    """Find and validate the safetensors of a component folder (single file or index + shards) or one file."""
    location = Path(location)
    if location.is_file():
        if location.suffix in PICKLE_SUFFIXES:
            raise _refuse_pickle(location)
        if location.suffix != ".safetensors":
            raise ModelFilesError(
                f"{display_name(location)} is not a .safetensors file; give a .safetensors file or a GLM-Image folder."
            )
        shapes, metadata = _read_header(location)
        return WeightFiles(display_name(location), dict.fromkeys(shapes, location), shapes, metadata)
    if not location.is_dir():
        raise ModelFilesError(f"{location} does not exist; expected a GLM-Image folder or a .safetensors file.")

    indexes = sorted(location.glob("*.safetensors.index.json"))
    preferred = location / f"{weights_name}.safetensors.index.json"
    if preferred.is_file() or len(indexes) == 1:
        return _scan_sharded(location, preferred if preferred.is_file() else indexes[0])
    single = location / f"{weights_name}.safetensors"
    files = sorted(location.glob("*.safetensors"))
    if single.is_file() or len(files) == 1:
        return scan_weights(single if single.is_file() else files[0])
    if files:
        raise ModelFilesError(
            f"{location.name}/ holds {len(files)} .safetensors files but no *.safetensors.index.json saying which "
            f"tensor is where; {REDOWNLOAD} (including the index)."
        )
    pickles = [p for p in sorted(location.iterdir()) if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise _refuse_pickle(pickles[0])
    expected = f"{weights_name}.safetensors" if weights_name else "a .safetensors file"
    raise ModelFilesError(
        f"{location.name}/ has no weights (expected {expected} or an index with shards); download them from "
        "zai-org/GLM-Image."
    )


def load_tensors(
    weights: WeightFiles, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Read every tensor of ``weights``; floating-point ones are cast to ``dtype`` (None: as stored)."""
    state_dict = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in weights.key_file.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    state_dict[key] = tensor.to(device)
        except SafetensorError as e:
            raise ModelFilesError(f"{display_name(file)} could not be read ({e}); delete it and {REDOWNLOAD}.") from e
    return state_dict


def read_state_dict(
    path: str | Path,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    weights_name: str | None = None,
) -> dict[str, torch.Tensor]:
    """The state dict of a component folder (one file or index + shards) or of one .safetensors file.

    Validates before reading: shards the index lists are present, every header is intact, every key the index
    assigns to a shard is in it. ``dtype`` casts floating-point tensors (None keeps the stored dtype).
    """
    return load_tensors(scan_weights(path, weights_name), dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Locating a component, identifying weights, reading its config


def identify_component(keys) -> Component | None:
    """The component whose signature keys appear among ``keys`` (None when none does)."""
    keys = set(keys)
    for component in COMPONENTS:
        if any(k in keys for k in component.signature) or any(
            k.startswith(component.signature_prefixes) for k in keys if component.signature_prefixes
        ):
            return component
    return None


def _check_signature(component: Component, weights: WeightFiles) -> None:
    found = identify_component(weights.shapes)
    if found is component:
        return
    expected = " or ".join(component.signature + tuple(p + "*" for p in component.signature_prefixes))
    if found is not None:
        raise ModelFilesError(
            f"{weights.where} holds the weights of {found.label}, not of {component.label} (expected a key "
            f"{expected}). Give this loader the {component.subfolder} weights, and load this file with the "
            f"{found.subfolder} loader."
        )
    first = ", ".join(sorted(weights.shapes)[:3])
    raise ModelFilesError(
        f"{weights.where} does not look like {component.label} of GLM-Image: none of its {len(weights.shapes)} "
        f"tensors is {expected} (its first keys: {first}). Keys with an extra prefix (other converters) are not "
        f"supported; use the files of zai-org/GLM-Image."
    )


def component_location(path: str | Path, component: Component) -> Path:
    """The component folder (or single file) that ``path`` points to: the GLM-Image root or the folder itself."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ModelFilesError(
            f"{path} does not exist; expected the GLM-Image folder (with model_index.json), its "
            f"{component.subfolder}/ folder or a .safetensors file."
        )
    if (path / component.subfolder).is_dir():
        return path / component.subfolder
    if (path / "model_index.json").is_file():
        raise ModelFilesError(
            f"{path.name}/{component.subfolder}/ is missing; the GLM-Image folder needs it for {component.label}. "
            f"Download the {component.subfolder}/ folder of zai-org/GLM-Image into {path}."
        )
    return path


def _check_config_class(component: Component, config: dict, source: str) -> None:
    value = config.get(component.config_field)
    if value == component.config_value:
        return
    other = next((c for c in COMPONENTS if c is not component and config.get(c.config_field) == c.config_value), None)
    hint = f" It is the config of {other.label}." if other else ""
    raise ModelFilesError(
        f"{source} has {component.config_field} {value!r}; expected {component.config_value!r} for "
        f"{component.label}.{hint} Point this loader at the {component.subfolder}/ folder, or download that "
        "config.json again from zai-org/GLM-Image."
    )


def read_config(folder: Path, component: Component) -> dict:
    """``folder/config.json``, checked to be the config of ``component``."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(
            f"{display_name(config_path)} is missing; {component.label} needs its published config.json next to "
            f"the weights ({component.config_field} {component.config_value!r}). Download "
            f"{component.subfolder}/config.json from zai-org/GLM-Image into {folder}."
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelFilesError(f"{display_name(config_path)} is not valid JSON ({e}); {REDOWNLOAD}.") from e
    _check_config_class(component, config, display_name(config_path))
    return config


@dataclass
class ComponentFiles:
    """A component's validated weights and its config, and where the config came from (for messages)."""

    weights: WeightFiles
    config: dict
    config_source: str


def open_component(
    path: str | Path, component: Component, infer_config: Callable[[dict[str, tuple[int, ...]]], dict] | None
) -> ComponentFiles:
    """Validate a component's files and find its config: config.json, single-file metadata or inferred."""
    location = component_location(path, component)
    weights = scan_weights(location, component.weights_name)
    _check_signature(component, weights)
    if location.is_dir():
        return ComponentFiles(weights, read_config(location, component), display_name(location / "config.json"))
    if "config" in weights.metadata:
        source = f"the config in the metadata of {weights.where}"
        try:
            config = json.loads(weights.metadata["config"])
        except ValueError as e:
            raise ModelFilesError(f"{source} is not valid JSON ({e}); re-export the file with save_single_file.") from e
        _check_config_class(component, config, source)
        return ComponentFiles(weights, config, source)
    if infer_config is None:
        raise ModelFilesError(f"{weights.where}: {component.label} loads from its folder, not from a single file.")
    try:
        config = infer_config(weights.shapes)
    except (KeyError, TypeError, ValueError) as e:
        reason = f"tensor {e.args[0]} is missing" if isinstance(e, KeyError) else str(e)
        raise ModelFilesError(
            f"{weights.where} has no config in its metadata, and the config of {component.label} cannot be "
            f"inferred from its tensors ({reason}). Use the files of zai-org/GLM-Image, or a single file written by "
            "save_single_file."
        ) from e
    return ComponentFiles(weights, config, f"the config inferred from the shapes in {weights.where}")


# ---------------------------------------------------------------------------------------------------------------
# Checking weights against the model a config builds


def _layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def check_weights_match(
    component: Component,
    expected: dict[str, tuple[int, ...]],
    files: ComponentFiles,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Every tensor the model expects is in the files with its shape, and nothing else (but the scales of a scaled-fp8
    file); else ModelFilesError."""
    found = files.weights.shapes
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected and not is_scaled_fp8_key(k, expected)]
    mismatched = [k for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    details = []
    if component.layer_prefix:
        have, want = _layer_count(found, component.layer_prefix), _layer_count(expected, component.layer_prefix)
        if have != want:
            details.append(f"the config says {component.layer_config_key}={want}, the weights have {have} layers")
    if mismatched:
        k = mismatched[0]
        details.append(
            f"{k} is {list(found[k])} in {display_name(files.weights.key_file[k])}, the config expects "
            f"{list(expected[k])} ({len(mismatched)} tensors differ in shape)"
        )
    if missing:
        details.append(f"{len(missing)} tensors are missing (e.g. {missing[0]})")
    if unexpected:
        details.append(f"{len(unexpected)} tensors are not in the model (e.g. {unexpected[0]})")
    raise ModelFilesError(
        f"{files.weights.where} does not match {files.config_source}: {'; '.join(details)}. The weights and the "
        f"config come from different models or downloads: download the {component.subfolder}/ folder again from "
        "zai-org/GLM-Image (config.json and weights together), or re-export a single file with save_single_file."
    )


def _constructor_kwargs(cls: type, config: dict) -> dict:
    """The config keys that ``cls.__init__`` takes (diffusers bookkeeping keys such as ``_class_name`` dropped)."""
    accepted = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return {k: v for k, v in config.items() if k in accepted}


def _assign_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load into a model built on the meta device: the loaded tensors become its parameters (no copy, no init)."""
    model.load_state_dict(state_dict, strict=strict, assign=True)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{type(model).__name__} kept tensors on the meta device after loading: {left[:3]}")


# ---------------------------------------------------------------------------------------------------------------
# Quantised weights: ComfyUI's scaled-fp8 single files are read; other quantisations are refused by name

# A scaled-fp8 file: the `scaled_fp8` marker tensor, each Linear weight in fp8 with a float32 `scale_weight` (the
# weight is fp8 * scale) and possibly a `scale_input`; everything else as in the bf16 files.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")
FP8_MAX = 448.0  # the largest float8_e4m3fn
FOREIGN_QUANTISATIONS = {  # a key suffix -> the format it belongs to
    ".comfy_quant": "ComfyUI mixed-precision (comfy_quant)",
    ".weight_scale": "ComfyUI mixed-precision (comfy_quant)",
    ".absmax": "bitsandbytes 4-bit",
    ".SCB": "bitsandbytes 8-bit",
    ".qweight": "GPTQ/AWQ",
}


def is_scaled_fp8_key(key: str, expected) -> bool:
    """The marker, or the scale of a layer whose weight the model has."""
    if key == SCALED_FP8_MARKER:
        return True
    return key.endswith(SCALE_SUFFIXES) and f"{key.rsplit('.', 1)[0]}.weight" in expected


def check_quantisation(files: ComponentFiles) -> bool:
    """True for a ComfyUI scaled-fp8 file, False for plain (bf16/fp32/fp8) weights; a ModelFilesError naming the
    format for quantisations this loader cannot use."""
    refuse = None
    if "quantization_config" in files.config:
        refuse = f"{files.config_source} describes a quantised re-upload ({files.config['quantization_config'].get('quant_method', '?')})"
    elif "_quantization_metadata" in files.weights.metadata:
        refuse = f"{files.weights.where} carries ComfyUI's per-layer quantisation metadata (_quantization_metadata)"
    else:
        for key in files.weights.shapes:
            fmt = next((f for suffix, f in FOREIGN_QUANTISATIONS.items() if key.endswith(suffix)), None)
            if fmt is not None:
                refuse = f"{files.weights.where} holds {fmt} weights (e.g. {key})"
                break
    if refuse:
        raise ModelFilesError(
            f"{refuse}; this loader reads bf16/fp32/fp8 weights and ComfyUI scaled-fp8 files. Use the files of "
            "zai-org/GLM-Image, or make a scaled-fp8 file from them with save_single_file(..., scaled_fp8=True)."
        )
    return SCALED_FP8_MARKER in files.weights.shapes


def dequantise_scaled_fp8(state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """A scaled-fp8 state dict as plain weights: each Linear weight = fp8 * scale_weight (in float32), then ``dtype``
    (None: float32 for them, the others as stored)."""
    out = {}
    for key, tensor in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith(SCALE_SUFFIXES):
            continue
        scale = state_dict.get(f"{key.rsplit('.', 1)[0]}.scale_weight") if key.endswith(".weight") else None
        if scale is not None:
            tensor = tensor.float() * scale.float()
        out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def quantise_scaled_fp8(state_dict: dict[str, torch.Tensor], linear_layers) -> dict[str, torch.Tensor]:
    """ComfyUI's scaled-fp8 layout: the weight of every layer in ``linear_layers`` (module names) in float8_e4m3fn
    with one float32 ``scale_weight`` per layer (its largest magnitude / 448), the rest as given, plus the marker."""
    out = dict(state_dict)
    for name in linear_layers:
        weight = state_dict[f"{name}.weight"].float()
        scale = (weight.abs().max() / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        out[f"{name}.weight"] = (weight / scale).to(torch.float8_e4m3fn)
        out[f"{name}.scale_weight"] = scale.reshape(())
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def _checked_meta_model(cls: type, kwargs: dict, component: Component, files: ComponentFiles, dtype, ops: dict):
    """``cls(**kwargs)`` on the meta device (no memory), after checking the files hold exactly its tensors."""
    try:
        meta_model = cls(**kwargs, dtype=dtype, device="meta", **ops)
    except (InvalidInputError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {component.label}: {e}") from e
    check_weights_match(component, {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}, files)
    return meta_model


def read_checked_weights(
    path: str | Path, component: Component, dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the DiT or the VAE, with every check the loaders make, for hosts that build the
    module themselves (ComfyUI builds the DiT with its own layer classes and the VAE as its own VAE object)."""
    if component is TRANSFORMER:
        from .dit import GlmImageTransformer2DModel as cls

        files = open_component(path, TRANSFORMER, infer_transformer_config)
    elif component is VAE:
        from .vae import AutoencoderKL as cls

        files = open_component(path, VAE, infer_vae_config)
    else:
        raise ValueError(f"read_checked_weights reads the DiT or the VAE, not {component.label}")
    kwargs = {
        k: v for k, v in _constructor_kwargs(cls, files.config).items() if k not in ("dtype", "device", "operations")
    }
    _checked_meta_model(cls, kwargs, component, files, None, {})
    if check_quantisation(files):  # the fp8 weights and their scales go to the host as stored
        dtype = None
    return files.config, load_tensors(files.weights, dtype)


def _build_and_load(
    cls: type,
    kwargs: dict,
    component: Component,
    files: ComponentFiles,
    dtype: torch.dtype | None,
    device: torch.device | str,
    operations,
) -> torch.nn.Module:
    """Build ``cls(**kwargs)`` with the checkpoint's weights; shapes are checked on a meta-device copy first.

    With plain torch layers the meta model receives the loaded tensors (no random init, no second copy); with
    host ``operations`` (e.g. ComfyUI's ``comfy.ops``) the model is built on ``device`` and loaded by copying, so
    the host's layer hooks see an ordinary ``load_state_dict``.
    """
    ops = {} if operations is None else {"operations": operations}
    meta_model = _checked_meta_model(cls, kwargs, component, files, dtype, ops)
    if check_quantisation(files):
        state_dict = dequantise_scaled_fp8(load_tensors(files.weights, None, device), dtype)
    else:
        state_dict = load_tensors(files.weights, dtype, device)
    if operations is None:
        model = meta_model
        _assign_weights(model, state_dict)
    else:
        model = cls(**kwargs, dtype=dtype, device=device, **ops)
        model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# DiT


def infer_transformer_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The DiT config from tensor shapes; head size (128) and patch size (2) are the published values."""
    inner_dim, patch_in = shapes["image_projector.proj.weight"]
    patch_area = DIT_PATCH_SIZE**2
    if inner_dim % DIT_ATTENTION_HEAD_DIM:
        raise ValueError(
            f"its width {inner_dim} is not a multiple of the published head size {DIT_ATTENTION_HEAD_DIM}, so the "
            "head count is unknown"
        )
    return {
        "_class_name": TRANSFORMER.config_value,
        "attention_head_dim": DIT_ATTENTION_HEAD_DIM,
        "condition_dim": shapes["time_condition_embed.condition_embedder.linear_1.weight"][1] // 4,
        "in_channels": patch_in // patch_area,
        "num_attention_heads": inner_dim // DIT_ATTENTION_HEAD_DIM,
        "num_layers": _layer_count(shapes, "transformer_blocks"),
        "out_channels": shapes["proj_out.weight"][0] // patch_area,
        "patch_size": DIT_PATCH_SIZE,
        "prior_vq_quantizer_codebook_size": shapes["prior_token_embedding.weight"][0],
        "text_embed_dim": shapes["glyph_projector.net.0.proj.weight"][1],
        "time_embed_dim": shapes["time_condition_embed.timestep_embedder.linear_1.weight"][0],
    }


def load_transformer(
    path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu", operations=None
):
    """The DiT (``glm_image_core.dit.GlmImageTransformer2DModel``) from the root, ``transformer/`` or one file.

    ``operations``: the namespace of layer classes the model is built from (None: ``torch.nn``).
    """
    from .dit import GlmImageTransformer2DModel

    files = open_component(path, TRANSFORMER, infer_transformer_config)
    check_quantisation(files)
    kwargs = _constructor_kwargs(GlmImageTransformer2DModel, files.config)
    for key in ("dtype", "device", "operations"):
        kwargs.pop(key, None)
    return _build_and_load(GlmImageTransformer2DModel, kwargs, TRANSFORMER, files, dtype, device, operations)


# ---------------------------------------------------------------------------------------------------------------
# VAE


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The VAE config from tensor shapes; group count (32) and latent statistics are the published values."""
    levels = _layer_count(shapes, "encoder.down_blocks")
    latent_channels = shapes["decoder.conv_in.weight"][1]
    if latent_channels != len(PUBLISHED_LATENTS_MEAN):
        raise ValueError(
            f"it has {latent_channels} latent channels, GLM-Image's VAE has {len(PUBLISHED_LATENTS_MEAN)}: it is the VAE of "
            "another model"
        )
    return {
        "_class_name": VAE.config_value,
        "act_fn": "silu",
        "block_out_channels": [shapes[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"][0] for i in range(levels)],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "in_channels": shapes["encoder.conv_in.weight"][1],
        "latent_channels": latent_channels,
        "latents_mean": list(PUBLISHED_LATENTS_MEAN),
        "latents_std": list(PUBLISHED_LATENTS_STD),
        "layers_per_block": _layer_count(shapes, "encoder.down_blocks.0.resnets"),
        "mid_block_add_attention": any(k.startswith("decoder.mid_block.attentions.") for k in shapes),
        "norm_num_groups": VAE_NORM_NUM_GROUPS,
        "out_channels": shapes["decoder.conv_out.weight"][0],
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "use_quant_conv": "quant_conv.weight" in shapes,
        **VAE_PUBLISHED_EXTRAS,
    }


def load_vae(path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"):
    """The VAE (``glm_image_core.vae.AutoencoderKL``) from the root, ``vae/`` or one file. float16 is refused."""
    if dtype == torch.float16:
        raise InvalidInputError(
            "The GLM-Image VAE overflows in float16 (NaN or black images); load it in torch.bfloat16 or torch.float32."
        )
    from .vae import AutoencoderKL

    files = open_component(path, VAE, infer_vae_config)
    kwargs = _constructor_kwargs(AutoencoderKL, files.config)
    return _build_and_load(AutoencoderKL, kwargs, VAE, files, dtype, device, None)


# ---------------------------------------------------------------------------------------------------------------
# Glyph encoder (T5) and its tokenizer


def infer_text_encoder_config(shapes: dict[str, tuple[int, ...]]) -> dict:
    """The T5 encoder config from tensor shapes; the ByT5 defaults for distance (128) and norm epsilon."""
    prefix = "encoder.block.0.layer"
    vocab_size, d_model = shapes.get("shared.weight", shapes.get("encoder.embed_tokens.weight"))
    buckets, num_heads = shapes[f"{prefix}.0.SelfAttention.relative_attention_bias.weight"]
    gated = f"{prefix}.1.DenseReluDense.wi_0.weight" in shapes  # gated-gelu (ByT5) has wi_0 and wi_1, relu has wi
    d_ff = shapes[f"{prefix}.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"][0]
    return {
        "architectures": ["T5EncoderModel"],
        "d_ff": d_ff,
        "d_kv": shapes[f"{prefix}.0.SelfAttention.q.weight"][0] // num_heads,
        "d_model": d_model,
        "feed_forward_proj": "gated-gelu" if gated else "relu",
        "is_encoder_decoder": False,
        "layer_norm_epsilon": T5_LAYER_NORM_EPSILON,
        "model_type": "t5",
        "num_heads": num_heads,
        "num_layers": _layer_count(shapes, "encoder.block"),
        "relative_attention_max_distance": T5_RELATIVE_ATTENTION_MAX_DISTANCE,
        "relative_attention_num_buckets": buckets,
        "use_cache": False,
        "vocab_size": vocab_size,
    }


def load_glyph_encoder(
    path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"
):
    """The Glyph-ByT5 encoder (``transformers.T5EncoderModel``) from the root, ``text_encoder/`` or one file."""
    from transformers import T5Config, T5EncoderModel

    files = open_component(path, TEXT_ENCODER, infer_text_encoder_config)
    config = T5Config.from_dict({k: v for k, v in files.config.items() if not k.startswith("_")})
    with torch.device("meta"):
        model = T5EncoderModel(config)
    # The token embedding is one matrix under two names (`shared`, `encoder.embed_tokens`); files store either.
    tied = ("shared.weight", "encoder.embed_tokens.weight")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_weights_match(TEXT_ENCODER, shapes, files, optional=frozenset(tied))
    if not any(k in files.weights.shapes for k in tied):
        raise ModelFilesError(f"{files.weights.where} lacks the token embedding (shared.weight); {REDOWNLOAD}.")
    state_dict = load_tensors(files.weights, dtype, device)
    embedding = state_dict.get(tied[0], state_dict.get(tied[1]))
    state_dict.update(dict.fromkeys(tied, embedding))
    _assign_weights(model, state_dict)
    model.encoder.embed_tokens.weight = model.shared.weight
    return model.to(device).eval()


def load_glyph_tokenizer(path: str | Path | None = None):
    """The ByT5 tokenizer: from the root's ``tokenizer/`` (or that folder), else the built-in byte tokenizer.

    ByT5 needs no vocabulary file (token id = byte + 3), so a single-file glyph encoder can pass its file or None.
    """
    from transformers import ByT5Tokenizer

    if path is None:
        return ByT5Tokenizer()
    path = Path(path)
    folder = path / "tokenizer" if (path / "tokenizer").is_dir() else path
    if path.is_file() or not (folder / "tokenizer_config.json").is_file():
        return ByT5Tokenizer()
    try:
        return ByT5Tokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise ModelFilesError(f"{folder.name}/ could not be read as a ByT5 tokenizer ({e}); {REDOWNLOAD}.") from e


# ---------------------------------------------------------------------------------------------------------------
# AR model and processor (transformers)


AR_QUANTIZATIONS = (None, "int8")
AR_INT8_FORMAT = "glm_image_ar_int8/1"  # the `glm_image_ar` metadata value of an exported 8-bit AR file
AR_INT8_SUFFIX = ".ar_int8.safetensors"  # how export names its files, and how the ComfyUI loader finds them


def load_ar_model(
    folder: str | Path,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
    trim: bool = False,
):
    """The AR model (``transformers.GlmImageForConditionalGeneration``) from the root or ``vision_language_encoder/``,
    or from one 8-bit file written by ``export_ar_int8``.

    The folder is validated here first (shards, headers, index, config class, component), because transformers
    reports a missing shard as a bare FileNotFoundError and silently accepts an index that lists absent tensors;
    tensors the config expects but the files lack (left randomly initialised by transformers) are an error.

    quantization: None keeps every weight in ``dtype``; "int8" quantises the text decoder's linear layers while
    the shards are read, tensor by tensor (``glm_image_core.quant``), so the CPU memory peak stays near the 8-bit
    size. An exported 8-bit file is int8 whatever this says. trim: keep only the 16384 VQ-code rows of the input
    embedding as a parameter (``trim_embedding``), so that moving the model to a GPU leaves the other 151680 rows in
    CPU memory.
    """
    if quantization not in AR_QUANTIZATIONS:
        raise InvalidInputError(f"AR quantization {quantization!r} is not one of {AR_QUANTIZATIONS}.")
    location = component_location(folder, AR_MODEL)
    if location.is_file():
        model = load_ar_int8_file(location, dtype)
    elif quantization == "int8":
        files = open_component(location, AR_MODEL, None)
        model = _meta_int8_ar_model(files)
        _assign_ar_weights(model, read_ar_int8_tensors(files, dtype))
        model.generation_config = _generation_config(location)
    else:
        model = _load_ar_with_transformers(location, dtype)
    if trim:
        trim_embedding(model)
    return model.to(device).eval()


def _load_ar_with_transformers(location: Path, dtype: torch.dtype | None):
    from transformers import GlmImageForConditionalGeneration

    files = open_component(location, AR_MODEL, None)
    try:
        # ignore_mismatched_sizes: transformers then reports shape mismatches instead of raising a bare RuntimeError
        model, info = GlmImageForConditionalGeneration.from_pretrained(
            location, dtype=dtype, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as e:  # transformers raises many types for inconsistent checkpoints
        raise ModelFilesError(
            f"{AR_MODEL.subfolder}/ could not be loaded by transformers ({type(e).__name__}: {e}); {REDOWNLOAD}."
        ) from e
    details = []
    if info.get("mismatched_keys"):
        key, found, expected = sorted(info["mismatched_keys"], key=str)[0]
        details.append(
            f"{key} is {list(found)} in {display_name(files.weights.key_file.get(key, location))}, the config expects "
            f"{list(expected)} ({len(info['mismatched_keys'])} tensors differ in shape)"
        )
    for name, what in (("missing_keys", "are missing"), ("unexpected_keys", "are not in the model")):
        if info.get(name):
            details.append(f"{len(info[name])} tensors {what} (e.g. {sorted(info[name])[0]})")
    if details:
        raise ModelFilesError(
            f"{files.weights.where} does not match {files.config_source}: {'; '.join(details)}. The weights and the "
            "config come from different models or downloads: download the vision_language_encoder/ folder again "
            "from zai-org/GLM-Image (config.json and the shards together)."
        )
    return model


def _generation_config(location: Path, metadata_json: str | None = None):
    """The AR's sampling defaults: ``generation_config.json`` beside the weights, or the JSON an export stored."""
    from transformers import GenerationConfig

    if metadata_json is not None:
        return GenerationConfig.from_dict(json.loads(metadata_json))
    if (location / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(location, local_files_only=True)
    return GenerationConfig()


def _meta_int8_ar_model(files: ComponentFiles):
    """GlmImageForConditionalGeneration on the meta device with ``Int8Linear`` decoder projections, after checking
    that the files hold exactly its tensors (the scales aside, for bf16 sources)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    from .quant import replace_decoder_linears

    try:
        config = GlmImageConfig.from_dict({k: v for k, v in files.config.items() if not k.startswith("_")})
        with torch.device("meta"):
            model = GlmImageForConditionalGeneration(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {AR_MODEL.label}: {e}") from e
    replace_decoder_linears(model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    exported = AR_INT8_FORMAT == files.weights.metadata.get("glm_image_ar")
    scales = frozenset(k for k in expected if k.endswith(".weight_scale"))
    check_weights_match(AR_MODEL, expected, files, optional=frozenset() if exported else scales)
    return model  # dtypes come with the loaded tensors (assign=True)


def read_ar_int8_tensors(files: ComponentFiles, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """The AR's state dict with the decoder projections in int8 (+ ``weight_scale``), read tensor by tensor.

    From bf16 shards, each projection is quantised right after it is read, so the memory in use grows by about one
    byte per decoder weight. Every tensor is copied out of the file and the file is closed again before the next one
    is read: no tensor stays a view of a memory-mapped shard, so pages of the shards read so far are not kept
    resident and the peak is the result plus about one tensor. From an exported file, the int8 tensors and their
    float32 scales are taken as stored. Other floating-point tensors are cast to ``dtype`` (None: as stored)."""
    from .quant import is_quantized_weight, quantize_int8

    state_dict = {}
    for key, file in files.weights.key_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                tensor = f.get_tensor(key)
                if is_quantized_weight(key) and tensor.dtype != torch.int8:
                    state_dict[key], state_dict[key + "_scale"] = quantize_int8(tensor)
                elif dtype is None or not tensor.is_floating_point() or key.endswith(".weight_scale"):
                    state_dict[key] = tensor.clone()
                else:
                    state_dict[key] = tensor.to(dtype, copy=True)
                del tensor
        except SafetensorError as e:
            raise ModelFilesError(f"{display_name(file)} could not be read ({e}); delete it and {REDOWNLOAD}.") from e
    return state_dict


def _assign_ar_weights(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Give the meta-device AR model its tensors; its RoPE tables (buffers computed in __init__, not in the files)
    are rebuilt on the CPU."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelFilesError(f"the AR model kept {len(left)} tensors without weights after loading (e.g. {left[0]}).")


def load_ar_int8_file(path: str | Path, dtype: torch.dtype | None = torch.bfloat16):
    """The AR model from one file written by ``export_ar_int8``; anything else is refused with what it is."""
    files, generation_config = _open_ar_int8_file(Path(path))
    model = _meta_int8_ar_model(files)
    _assign_ar_weights(model, read_ar_int8_tensors(files, dtype))
    model.generation_config = generation_config
    return model


def _open_ar_int8_file(path: Path):
    """The checks of an 8-bit AR export that read no tensor data: (its ComponentFiles, its generation config)."""
    weights = scan_weights(path)
    marker = weights.metadata.get("glm_image_ar")
    if marker != AR_INT8_FORMAT:
        found = f"its format is {marker!r}" if marker else "it has no 'glm_image_ar' entry in its metadata"
        raise ModelFilesError(
            f"{weights.where} is not an 8-bit GLM-Image AR export ({found}; expected {AR_INT8_FORMAT!r}). "
            f"{AR_MODEL.label} loads from its folder (vision_language_encoder/), or from a file written by "
            "`python -m glm_image_core export-ar-int8`; export it again with this version."
        )
    _check_signature(AR_MODEL, weights)
    source = f"the config in the metadata of {weights.where}"
    try:
        config = json.loads(weights.metadata["config"])
    except (KeyError, ValueError) as e:
        raise ModelFilesError(f"{source} is missing or not valid JSON ({e}); export the file again.") from e
    _check_config_class(AR_MODEL, config, source)
    files = ComponentFiles(weights, config, source)
    _check_int8_dtypes(files)
    try:
        generation_config = _generation_config(path.parent, weights.metadata.get("generation_config", "{}"))
    except ValueError as e:
        raise ModelFilesError(f"the generation config in the metadata of {weights.where} is not valid ({e}).") from e
    return files, generation_config


def _check_int8_dtypes(files: ComponentFiles) -> None:
    from .quant import is_quantized_weight

    for key, file in files.weights.key_file.items():
        if not (is_quantized_weight(key) or key.endswith(".weight_scale")):
            continue
        expected = "F32" if key.endswith(".weight_scale") else "I8"
        with safe_open(file, framework="pt", device="cpu") as f:
            found = f.get_slice(key).get_dtype()
        if found != expected:
            raise ModelFilesError(
                f"{key} is {found} in {files.weights.where}, an 8-bit AR export stores it as {expected}; the file "
                "was changed after export: export it again."
            )


def export_ar_int8(folder: str | Path, out_file: str | Path) -> Path:
    """Quantise the AR of a GLM-Image folder (root or ``vision_language_encoder/``) into one .safetensors file.

    The decoder projections are int8 with float32 ``weight_scale`` s; other tensors are written as stored (bf16).
    The metadata carries the config, the generation config and the format tag that ``load_ar_model`` checks. Peak
    memory: about the 8-bit model's size (the shards are quantised tensor by tensor, as when loading)."""
    location = component_location(folder, AR_MODEL)
    if location.is_file():
        raise ModelFilesError(f"{display_name(location)}: export-ar-int8 reads the published AR folder, not a file.")
    files = open_component(location, AR_MODEL, None)
    _meta_int8_ar_model(files)  # the config and the shards agree, before minutes of work
    tensors = read_ar_int8_tensors(files, None)
    return write_ar_int8_file(tensors, files.config, _generation_config(location).to_dict(), out_file)


def write_ar_int8_file(tensors: dict[str, torch.Tensor], config: dict, generation_config: dict, out_file) -> Path:
    """One 8-bit AR file: ``tensors`` (int8 projections + float32 ``_scale`` s, the rest as given) with the config,
    the generation config and the format tag in the metadata."""
    metadata = {
        "format": "pt",
        "glm_image_ar": AR_INT8_FORMAT,
        "quantization": "int8 weight-only, symmetric, one float32 scale per output channel (`<key>_scale`)",
        "config": json.dumps(config),
        "generation_config": json.dumps(generation_config),
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, out_file, metadata=metadata)
    return out_file


class CodeRowsEmbedding(torch.nn.Module):
    """The AR's input embedding with only the VQ-code rows [0, rows) as its parameter ``weight``.

    Decoding feeds back VQ codes only, so those rows are all a decode step reads. The full table (``table``, all
    168064 rows, 1.38 GB in bf16) is a plain attribute: moving or counting the model's parameters leaves it where it
    is (CPU memory), and prompt tokens beyond the code rows are looked up there and copied to the model's device."""

    def __init__(self, table: torch.Tensor, rows: int):
        super().__init__()
        self.rows = rows
        self.table = table
        self.weight = torch.nn.Parameter(table[:rows].clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.embedding(input_ids.clamp(max=self.rows - 1), self.weight)
        beyond = input_ids >= self.rows
        if beyond.any():  # text tokens of a prompt: a host sync, once per prefill
            rows = torch.nn.functional.embedding(input_ids[beyond].cpu(), self.table)
            out[beyond] = rows.to(out.device, out.dtype)
        return out


def trim_embedding(model, rows: int = 16384) -> None:
    """Replace the AR's ``embed_tokens`` by a ``CodeRowsEmbedding`` of its first ``rows`` rows (the VQ codes)."""
    lm = model.model.language_model
    if isinstance(lm.embed_tokens, CodeRowsEmbedding):
        return
    lm.embed_tokens = CodeRowsEmbedding(lm.embed_tokens.weight.detach().cpu(), rows)


def load_ar_processor(folder: str | Path):
    """The AR processor (``transformers.GlmImageProcessor``: tokenizer + image processor) from the root or
    ``processor/``."""
    from transformers import GlmImageProcessor

    location = _processor_folder(folder)
    try:
        return GlmImageProcessor.from_pretrained(location, local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise ModelFilesError(
            f"{location.name}/ could not be loaded as a GlmImageProcessor ({type(e).__name__}: {e}); {REDOWNLOAD}."
        ) from e


def _processor_folder(folder: str | Path) -> Path:
    """The processor folder of a root (or the folder itself), after checking that the files it needs are there."""
    folder = Path(folder)
    location = folder / "processor" if (folder / "processor").is_dir() else folder
    if (folder / "model_index.json").is_file() and location == folder:
        raise ModelFilesError(f"{folder.name}/processor/ is missing; download it from zai-org/GLM-Image into {folder}.")
    required = ("tokenizer.json", "tokenizer_config.json")
    missing = [name for name in required if not (location / name).is_file()]
    if not (location / "preprocessor_config.json").is_file() and not (location / "processor_config.json").is_file():
        missing.append("preprocessor_config.json")
    if missing:
        raise ModelFilesError(
            f"{location.name}/{missing[0]} is missing; the GLM-Image processor needs {', '.join(required)} and "
            f"preprocessor_config.json. Download the processor/ folder of zai-org/GLM-Image into {location}."
        )
    return location


# ---------------------------------------------------------------------------------------------------------------
# The checks that read no weights


def check_files(path: str | Path, component: Component) -> None:
    """Raise ModelFilesError unless ``path`` passes every check that reads no tensor data: the folder or file exists,
    the index's shards are all present, every safetensors header reads and covers its file, the weights are this
    component's and its config is of the right class (for the AR model given a GLM-Image root, also that the
    processor's files are there). It reads headers and configs only (milliseconds, also for the 9B AR), so a host can
    run it when a job is queued; the loaders repeat it before reading the weights, and then check the tensor shapes
    against the model the config builds."""
    if component is AR_MODEL:
        location = component_location(path, AR_MODEL)
        if location.is_file():  # an 8-bit export
            _open_ar_int8_file(location)
            return
        open_component(location, AR_MODEL, None)
        if (Path(path) / "model_index.json").is_file():  # a root: the AR loads with the processor beside it
            _processor_folder(path)
        return
    infer_config = {
        TRANSFORMER: infer_transformer_config,
        VAE: infer_vae_config,
        TEXT_ENCODER: infer_text_encoder_config,
    }[component]
    open_component(path, component, infer_config)


# ---------------------------------------------------------------------------------------------------------------
# Single-file export


def save_single_file(component_path: str | Path, out_file: str | Path, scaled_fp8: bool = False) -> Path:
    """Merge a component folder (``transformer/``, ``vae/`` or ``text_encoder/``) into one .safetensors file.

    The folder's config.json goes into the file's metadata (``config``), so the loaders rebuild exactly the same
    model from the file alone. Tensors are written as stored (no cast). Needs the component's size in memory.
    ``scaled_fp8`` (the DiT only): every Linear weight in fp8 with a per-layer scale, ComfyUI's scaled-fp8 format
    (about half the size of bf16; ComfyUI's DiT loader and ``load_transformer`` read it).
    """
    folder = Path(component_path)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(
            f"{display_name(config_path)} is missing; save_single_file takes a component folder "
            "(transformer/, vae/ or text_encoder/) with its config.json."
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    component = next((c for c in COMPONENTS if config.get(c.config_field) == c.config_value), None)
    if component is None or component is AR_MODEL:
        raise ModelFilesError(
            f"{display_name(config_path)} is not the config of the DiT, the VAE or the glyph encoder; "
            "save_single_file exports those three."
        )
    weights = scan_weights(folder, component.weights_name)
    _check_signature(component, weights)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tensors = load_tensors(weights)
    if scaled_fp8:
        if component is not TRANSFORMER:
            raise InvalidInputError(f"scaled_fp8 export is for the DiT, not {component.label}.")
        from .dit import GlmImageTransformer2DModel

        kwargs = _constructor_kwargs(GlmImageTransformer2DModel, config)
        with torch.device("meta"):
            model = GlmImageTransformer2DModel(**kwargs)
        linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        tensors = quantise_scaled_fp8(tensors, linear)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    save_file(tensors, out_file, metadata={"format": "pt", "config": json.dumps(config)})
    return out_file
