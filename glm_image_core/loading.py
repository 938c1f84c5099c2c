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

This module builds the DiT, the VAE and the glyph encoder and is the loaders' public face (``__all__``). The parts:
``checkpoint`` (safetensors files and their headers), ``components`` (which component, its config, the weights
check), ``formats`` (how weights are stored: recognised, built, read; other quantisations refused by name) and
``ar_loading`` (the AR model, its 8-bit export and the processor).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats
from .ar_loading import (
    AR_INT8_SUFFIX,
    check_ar_files,
    export_ar_int8,
    load_ar_model,
    load_ar_processor,
    trim_embedding,
)
from .checkpoint import (
    REDOWNLOAD,
    ComponentFiles,
    display_name,
    iter_tensors,
    load_tensors,
    read_state_dict,
    scan_weights,
)
from .components import (
    AR_MODEL,
    COMPONENTS,
    TEXT_ENCODER,
    TRANSFORMER,
    VAE,
    Component,
    built_shapes,
    check_config_file_names,
    check_signature,
    check_weights_match,
    infer_text_encoder_config,
    infer_transformer_config,
    infer_vae_config,
    open_component,
)
from .errors import InvalidInputError, ModelFilesError
from .files import save_safetensors

__all__ = [  # the loaders' public face: nodes, tests and the CLI import these from here
    "AR_INT8_SUFFIX",
    "AR_MODEL",
    "COMPONENTS",
    "TEXT_ENCODER",
    "TRANSFORMER",
    "VAE",
    "CheckedWeights",
    "Component",
    "ModelFilesError",
    "check_files",
    "export_ar_int8",
    "load_ar_model",
    "load_ar_processor",
    "load_glyph_encoder",
    "load_glyph_tokenizer",
    "load_transformer",
    "load_vae",
    "read_checked_weights",
    "read_state_dict",
    "save_single_file",
    "trim_embedding",
]


# ---------------------------------------------------------------------------------------------------------------
# Building a model from checked weights


def constructor_kwargs(cls: type, config: dict) -> dict:
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


def _checked_meta_model(cls: type, kwargs: dict, files: ComponentFiles, fmt: formats.WeightFormat, dtype):
    """``cls(**kwargs)`` on the meta device (no memory) with the layers of the files' weight format, after checking
    that the files hold exactly its tensors."""
    component = next(c for c in COMPONENTS if c.subfolder == files.component)
    try:
        meta_model = cls(**kwargs, dtype=dtype, device="meta")
    except (InvalidInputError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {component.label}: {e}") from e
    check_weights_match(component, built_shapes(meta_model, fmt, files, dtype), files, fmt)
    return meta_model


def _open_module_component(path: str | Path, component: Component):
    """The DiT's or the VAE's files opened and checked once, for every loader that builds it: (module class, its
    constructor arguments from the config, the files, their weight format)."""
    if component is TRANSFORMER:
        from .dit import GlmImageTransformer2DModel as cls

        files = open_component(path, TRANSFORMER, infer_transformer_config)
    elif component is VAE:
        from .vae import AutoencoderKL as cls

        files = open_component(path, VAE, infer_vae_config)
    else:
        raise ValueError(f"this reads the DiT or the VAE, not {component.label}")
    kwargs = {
        k: v for k, v in constructor_kwargs(cls, files.config).items() if k not in ("dtype", "device", "operations")
    }
    return cls, kwargs, files, formats.detect(files)


@dataclass
class CheckedWeights:
    """A component's config and tensors, read after every check the loaders make, and the weight format they are in
    (quantised tensors as stored), for hosts that build the module with their own layers."""

    config: dict
    state_dict: dict[str, torch.Tensor]
    format: formats.WeightFormat


def read_checked_weights(
    path: str | Path, component: Component, dtype: torch.dtype | None = None, as_stored: bool = True
) -> CheckedWeights:
    """The DiT's or the VAE's config and tensors with every check the loaders make, for hosts that build the module
    themselves (ComfyUI builds the DiT with its own layer classes and the VAE as its own VAE object). Quantised
    tensors come as stored for the host's own layers, or, ``as_stored=False``, as a core model takes them (ComfyUI's
    quantised files dequantised; floating tensors in ``dtype``, None: as stored)."""
    cls, kwargs, files, fmt = _open_module_component(path, component)
    meta_model = _checked_meta_model(cls, kwargs, files, fmt, None)
    state_dict = fmt.read_as_stored(files, dtype) if as_stored else fmt.read(files, dtype)
    fmt.check_read(files, state_dict, _shapes(meta_model))
    return CheckedWeights(files.config, state_dict, fmt)


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _build_and_load(
    path: str | Path, component: Component, dtype: torch.dtype | None, device: torch.device | str
) -> torch.nn.Module:
    """The DiT or the VAE with the checkpoint's weights: shapes are checked on the meta-device model, which then
    receives the loaded tensors (no random init, no second copy), as its weight format gives them (ComfyUI's
    quantised files dequantised to ``dtype``, 4-bit layers packed). Hosts that build the module with their own
    layers take ``read_checked_weights`` instead."""
    cls, kwargs, files, fmt = _open_module_component(path, component)
    model = _checked_meta_model(cls, kwargs, files, fmt, dtype)
    state_dict = fmt.read(files, dtype, device)
    fmt.check_read(files, state_dict, _shapes(model))
    _assign_weights(model, state_dict)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------------
# DiT


def load_transformer(path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"):
    """The DiT (``glm_image_core.dit.GlmImageTransformer2DModel``) from the root, ``transformer/`` or one file."""
    return _build_and_load(path, TRANSFORMER, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# VAE


def load_vae(path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"):
    """The VAE (``glm_image_core.vae.AutoencoderKL``) from the root, ``vae/`` or one file. float16 is refused."""
    if dtype == torch.float16:
        raise InvalidInputError(
            "The GLM-Image VAE overflows in float16 (NaN or black images); load it in torch.bfloat16 or torch.float32."
        )
    return _build_and_load(path, VAE, dtype, device)


# ---------------------------------------------------------------------------------------------------------------
# Glyph encoder (T5) and its tokenizer


# The token embedding is one matrix under two names (`shared`, `encoder.embed_tokens`); files store either.
GLYPH_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def _checked_glyph_encoder(path: str | Path):
    """(T5EncoderModel of the files' config on the meta device, the files, their format), after checking that the
    files hold exactly its tensors."""
    from transformers import T5Config, T5EncoderModel

    files = open_component(path, TEXT_ENCODER, infer_text_encoder_config)
    try:
        config = T5Config.from_dict({k: v for k, v in files.config.items() if not k.startswith("_")})
        with torch.device("meta"):
            model = T5EncoderModel(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe {TEXT_ENCODER.label}: {e}") from e
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fmt = formats.detect(files)
    check_weights_match(TEXT_ENCODER, shapes, files, fmt, optional=frozenset(GLYPH_TIED))
    if not any(k in files.weights.shapes for k in GLYPH_TIED):
        raise ModelFilesError(f"{files.weights.where} lacks the token embedding (shared.weight); {REDOWNLOAD}.")
    return model, files, fmt


def load_glyph_encoder(
    path: str | Path, dtype: torch.dtype | None = torch.bfloat16, device: torch.device | str = "cpu"
):
    """The Glyph-ByT5 encoder (``transformers.T5EncoderModel``) from the root, ``text_encoder/`` or one file."""
    model, files, fmt = _checked_glyph_encoder(path)
    state_dict = fmt.read(files, dtype, device)
    embedding = state_dict.get(GLYPH_TIED[0], state_dict.get(GLYPH_TIED[1]))
    state_dict.update(dict.fromkeys(GLYPH_TIED, embedding))
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
    check_config_file_names(folder)
    try:
        return ByT5Tokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many types for unreadable tokenizer files
        raise ModelFilesError(f"{folder.name}/ could not be read as a ByT5 tokenizer ({e}); {REDOWNLOAD}.") from e


# ---------------------------------------------------------------------------------------------------------------
# The checks that read no weights


def check_files(path: str | Path, component: Component) -> None:
    """Raise ModelFilesError unless ``path`` passes every check that reads no tensor data: the folder or file exists,
    the index's shards are all present, every safetensors header reads and covers its file, the weights are this
    component's and its config is of the right class (for the AR model given a GLM-Image root, also that the
    processor's files are there), a quantised file is in a format the loaders read, the config's sizes fit the
    weights, every tensor is floating or one of the format's codes, and (DiT, VAE) the model the config builds (on the
    meta device: no memory) has exactly the files' tensors. It reads headers and configs only (no tensor data), in
    milliseconds, so a host can run it when a job is queued; the loaders repeat it before reading the weights
    (``file_checks``). The glyph encoder and the AR are transformers' classes, which take seconds to import: the model
    their config builds is compared with the headers when they load, before anything is allocated."""
    if component is AR_MODEL:
        check_ar_files(path)
    elif component is TEXT_ENCODER:
        formats.detect(open_component(path, TEXT_ENCODER, infer_text_encoder_config))
    else:
        cls, kwargs, files, fmt = _open_module_component(path, component)
        _checked_meta_model(cls, kwargs, files, fmt, None)


# ---------------------------------------------------------------------------------------------------------------
# Single-file export


def save_single_file(
    component_path: str | Path, out_file: str | Path, scaled_fp8: bool = False, quant: str | None = None
) -> Path:
    """Merge a component folder (``transformer/``, ``vae/`` or ``text_encoder/``) into one .safetensors file.

    The folder's config.json goes into the file's metadata (``config``), so the loaders rebuild exactly the same
    model from the file alone. Tensors are written as stored (no cast). Needs the component's size in memory.
    For the DiT, every Linear weight can be stored in 8 bits with one scale per layer (about half the size of bf16):
    ``quant="int8_tensorwise"`` or ``"float8_e4m3fn"`` in ComfyUI's per-layer format (`comfy_quant` markers; ComfyUI
    0.33+ and ``load_transformer`` read it), or ``scaled_fp8=True`` in the older scaled-fp8 format that ComfyUI 0.3.x
    also reads (its weights equal ``quant="float8_e4m3fn"``'s).
    """
    if quant is not None and (scaled_fp8 or quant not in formats.comfy_quant.WRITABLE):
        raise InvalidInputError(
            f"quant={quant!r}{' with scaled_fp8=True' if scaled_fp8 else ''}: give one of "
            f"{', '.join(formats.comfy_quant.WRITABLE)}, or scaled_fp8=True alone."
        )
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
    check_signature(component, weights)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    if scaled_fp8 or quant is not None:
        if component is not TRANSFORMER:
            raise InvalidInputError(f"Quantised export is for the DiT, not {component.label}.")
        from .dit import GlmImageTransformer2DModel

        kwargs = constructor_kwargs(GlmImageTransformer2DModel, config)
        with torch.device("meta"):
            model = GlmImageTransformer2DModel(**kwargs)
        linear = {f"{name}.weight": name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        # each weight is quantised right after it is read: the memory peak is the 8-bit result plus one weight, not
        # the bf16 DiT (12.9 GiB) beside its 8-bit copy
        tensors = {}
        for key, tensor in iter_tensors(weights, copy=True):
            if key not in linear:
                tensors[key] = tensor.contiguous()
            elif scaled_fp8:
                tensors.update(formats.scaled_fp8.quantise_state_dict({key: tensor}, [linear[key]]))
            else:
                tensors.update(formats.comfy_quant.quantise_state_dict({key: tensor}, [linear[key]], quant))
    else:
        tensors = {k: t.contiguous() for k, t in load_tensors(weights).items()}
    return save_safetensors(tensors, out_file, metadata={"format": "pt", "config": json.dumps(config)})
