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
check), ``scaled_fp8`` and ``comfy_quant`` (ComfyUI's quantised files; other quantisations refused) and
``ar_loading`` (the AR model, its 8-bit export and the processor).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch

from . import comfy_quant, w4a16
from .ar_loading import (
    AR_INT8_FORMAT,
    AR_INT8_SUFFIX,
    check_ar_files,
    export_ar_int8,
    load_ar_model,
    load_ar_processor,
    trim_embedding,
)
from .checkpoint import REDOWNLOAD, display_name, load_tensors, read_state_dict, scan_weights
from .components import (
    AR_MODEL,
    COMPONENTS,
    TEXT_ENCODER,
    TRANSFORMER,
    VAE,
    Component,
    ComponentFiles,
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
from .scaled_fp8 import (
    COMFY_QUANT,
    SCALED_FP8_MARKER,
    check_quantisation,
    dequantise_scaled_fp8,
    quantise_scaled_fp8,
)

__all__ = [  # the loaders' public face: nodes, tests and the CLI import these from here
    "AR_INT8_FORMAT",
    "AR_INT8_SUFFIX",
    "AR_MODEL",
    "COMPONENTS",
    "SCALED_FP8_MARKER",
    "TEXT_ENCODER",
    "TRANSFORMER",
    "VAE",
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


def _checked_meta_model(cls: type, kwargs: dict, component: Component, files: ComponentFiles, dtype, quantisation):
    """``cls(**kwargs)`` on the meta device (no memory), after checking the files hold exactly its tensors; a 4-bit
    checkpoint's packed layers are ``w4a16.W4A16Linear`` s there."""
    try:
        meta_model = cls(**kwargs, dtype=dtype, device="meta")
    except (InvalidInputError, TypeError, ValueError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {component.label}: {e}") from e
    if quantisation == w4a16.W4A16:
        w4a16.swap_linears(
            meta_model, files.weights.shapes, w4a16.read_format(files.config, files.config_source), dtype
        )
    check_weights_match(component, {k: tuple(v.shape) for k, v in meta_model.state_dict().items()}, files)
    return meta_model


def _open_module_component(path: str | Path, component: Component):
    """The DiT's or the VAE's files opened and checked once, for every loader that builds it: (module class, its
    constructor arguments from the config, the files, their quantisation)."""
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
    return cls, kwargs, files, check_quantisation(files)


def read_checked_weights(
    path: str | Path, component: Component, dtype: torch.dtype | None = None
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config, state_dict)`` of the DiT or the VAE, with every check the loaders make, for hosts that build the
    module themselves (ComfyUI builds the DiT with its own layer classes and the VAE as its own VAE object)."""
    cls, kwargs, files, quantisation = _open_module_component(path, component)
    _checked_meta_model(cls, kwargs, component, files, None, quantisation)
    if quantisation is None:
        return files.config, load_tensors(files.weights, dtype)
    state_dict = load_tensors(files.weights)  # quantised weights and their scales go to the host as stored
    if quantisation == COMFY_QUANT:  # a file-level block becomes per-layer markers, as ComfyUI's loader makes it
        state_dict = comfy_quant.with_file_markers(state_dict, files.weights.metadata, files.weights.where)
    return files.config, state_dict


def _build_and_load(
    path: str | Path, component: Component, dtype: torch.dtype | None, device: torch.device | str
) -> torch.nn.Module:
    """The DiT or the VAE with the checkpoint's weights: shapes are checked on the meta-device model, which then
    receives the loaded tensors (no random init, no second copy); quantised files are dequantised to ``dtype``, but
    4-bit layers stay packed. Hosts that build the module with their own layers take ``read_checked_weights``
    instead."""
    cls, kwargs, files, quantisation = _open_module_component(path, component)
    model = _checked_meta_model(cls, kwargs, component, files, dtype, quantisation)
    if quantisation == w4a16.W4A16:  # the packed layers stay packed
        state_dict = w4a16.cast_state_dict(load_tensors(files.weights, None, device), dtype)
    elif quantisation == SCALED_FP8_MARKER:
        state_dict = dequantise_scaled_fp8(load_tensors(files.weights, None, device), dtype)
    elif quantisation == COMFY_QUANT:
        state_dict = comfy_quant.with_file_markers(
            load_tensors(files.weights, None, device), files.weights.metadata, files.weights.where
        )
        state_dict = comfy_quant.dequantise(state_dict, dtype, files.weights.where)
    else:
        state_dict = load_tensors(files.weights, dtype, device)
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
    processor's files are there), a quantised file is in a format the loaders read. It reads headers and configs
    only (milliseconds, also for the 9B AR), so a host can run it when a job is queued; the loaders repeat it before
    reading the weights, and then check the tensor shapes against the model the config builds."""
    if component is AR_MODEL:
        check_ar_files(path)
        return
    infer_config = {
        TRANSFORMER: infer_transformer_config,
        VAE: infer_vae_config,
        TEXT_ENCODER: infer_text_encoder_config,
    }[component]
    check_quantisation(open_component(path, component, infer_config))


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
    if quant is not None and (scaled_fp8 or quant not in comfy_quant.WRITABLE):
        raise InvalidInputError(
            f"quant={quant!r}{' with scaled_fp8=True' if scaled_fp8 else ''}: give one of "
            f"{', '.join(comfy_quant.WRITABLE)}, or scaled_fp8=True alone."
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
    tensors = load_tensors(weights)
    if scaled_fp8 or quant is not None:
        if component is not TRANSFORMER:
            raise InvalidInputError(f"Quantised export is for the DiT, not {component.label}.")
        from .dit import GlmImageTransformer2DModel

        kwargs = constructor_kwargs(GlmImageTransformer2DModel, config)
        with torch.device("meta"):
            model = GlmImageTransformer2DModel(**kwargs)
        linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        tensors = quantise_scaled_fp8(tensors, linear) if scaled_fp8 else comfy_quant.quantise(tensors, linear, quant)
    tensors = {k: t.contiguous() for k, t in tensors.items()}
    return save_safetensors(tensors, out_file, metadata={"format": "pt", "config": json.dumps(config)})
