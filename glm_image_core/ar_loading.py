"""The AR model (``transformers.GlmImageForConditionalGeneration``) and its processor, from the published folder, a
quantised re-upload of it, or one 8-bit file written by ``export_ar_int8`` (``formats.int8``).

The folder is validated with ``components``' checks before transformers reads it; a quantised model is built on the
meta device with its weight format's layers (``formats``) and read tensor by tensor, so the memory peak stays near
its quantised size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import formats
from .checkpoint import REDOWNLOAD, ComponentFiles, display_name, scan_weights
from .components import (
    AR_MODEL,
    built_shapes,
    check_config_class,
    check_config_file_names,
    check_signature,
    check_weights_match,
    component_location,
    open_component,
)
from .defaults import NUM_VQ_CODES
from .dependencies import glm_image_classes
from .errors import InvalidInputError, ModelFilesError
from .file_checks import check_config_sizes
from .files import save_safetensors
from .formats.int8 import EXPORT_TAG, read_quantising

AR_QUANTISATIONS = (None, "int8")  # what load_ar_model can make of bf16 weights while it reads them
AR_INT8_SUFFIX = ".ar_int8.safetensors"  # how export names its files, and how the ComfyUI loader finds them


def load_ar_model(
    folder: str | Path,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str = "cpu",
    quantisation: str | None = None,
    trim: bool = False,
):
    """The AR model (``transformers.GlmImageForConditionalGeneration``) from the root or ``vision_language_encoder/``,
    or from one 8-bit file written by ``export_ar_int8``.

    The folder is validated here first (shards, headers, index, config class, component, weight format), because
    transformers reports a missing shard as a bare FileNotFoundError and silently accepts an index that lists absent
    tensors; tensors the config expects but the files lack (left randomly initialised by transformers) are an error.

    A quantised folder (its config's ``quantization_config``: AutoRound/GPTQ 4-bit, ``formats.w4a16``) loads with its
    layers as published (4 bits per weight), everything else in ``dtype``.

    quantisation: None keeps full-precision weights in ``dtype``; "int8" quantises the text decoder's linear layers
    while the shards are read, tensor by tensor (``formats.int8``), so the CPU memory peak stays near the 8-bit size.
    A quantised folder or an exported 8-bit file stays as it is whatever this says. trim: keep only the 16384 VQ-code
    rows of the input embedding as a parameter (``trim_embedding``), so that moving the model to a GPU leaves the
    other 151680 rows in CPU memory.
    """
    if quantisation not in AR_QUANTISATIONS:
        raise InvalidInputError(f"AR quantisation {quantisation!r} is not one of {AR_QUANTISATIONS}.")
    location = component_location(folder, AR_MODEL)
    files, generation_config = _open_ar_files(location)
    fmt = formats.detect(files)
    if fmt is formats.PLAIN and quantisation == "int8":
        fmt = formats.INT8  # bf16 shards, quantised while read
    if fmt is formats.PLAIN:
        model = _load_ar_with_transformers(location, dtype)
    else:
        model = _meta_ar_model(files, fmt)
        _assign_ar_weights(model, fmt.read(files, dtype))
        model.generation_config = generation_config
    if trim:
        trim_embedding(model)
    return model.to(device).eval()


def _open_ar_files(location: Path):
    """(the checked ComponentFiles, the generation config) of an AR folder or of an 8-bit export file."""
    if location.is_file():
        return _open_ar_int8_file(location)
    return open_component(location, AR_MODEL, None), _generation_config(location)


def _load_ar_with_transformers(location: Path, dtype: torch.dtype | None):
    (GlmImageForConditionalGeneration,) = glm_image_classes("GlmImageForConditionalGeneration")
    files = open_component(location, AR_MODEL, None)
    _meta_ar_model(files, formats.PLAIN)  # the config builds exactly these tensors: transformers allocates no more
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


def _meta_ar_model(files: ComponentFiles, fmt: formats.WeightFormat):
    """GlmImageForConditionalGeneration of ``files``' config on the meta device (no memory, no init) with the layers of
    the weight format ``fmt``, after checking that the files hold exactly its tensors."""
    GlmImageConfig, GlmImageForConditionalGeneration = glm_image_classes(
        "GlmImageConfig", "GlmImageForConditionalGeneration"
    )
    try:
        # quantization_config is dropped: the formats read the packing themselves (transformers' own reader of it
        # would need the library that wrote it)
        kept = {k: v for k, v in files.config.items() if not k.startswith("_") and k != "quantization_config"}
        config = GlmImageConfig.from_dict(kept)
        with torch.device("meta"):
            model = GlmImageForConditionalGeneration(config)
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {AR_MODEL.label}: {e}") from e
    expected = built_shapes(model, fmt, files, None)
    check_weights_match(AR_MODEL, expected, files, fmt, optional=fmt.made_while_reading(files, expected))
    return model  # dtypes come with the loaded tensors (assign=True)


def _assign_ar_weights(model, state_dict: dict[str, torch.Tensor]) -> None:
    """Give the meta-device AR model its tensors; its RoPE tables (buffers computed in __init__, not in the files)
    are rebuilt on the CPU."""
    model.load_state_dict(state_dict, strict=True, assign=True)
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(config=lm.config)
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ModelFilesError(f"the AR model kept {len(left)} tensors without weights after loading (e.g. {left[0]}).")


def _open_ar_int8_file(path: Path):
    """The checks of an 8-bit AR export that read no tensor data: (its ComponentFiles, its generation config)."""
    weights = scan_weights(path)
    marker = weights.metadata.get("glm_image_ar")
    if marker != EXPORT_TAG:
        found = f"its format is {marker!r}" if marker else "it has no 'glm_image_ar' entry in its metadata"
        raise ModelFilesError(
            f"{weights.where} is not an 8-bit GLM-Image AR export ({found}; expected {EXPORT_TAG!r}). "
            f"{AR_MODEL.label} loads from its folder (vision_language_encoder/), or from a file written by "
            "`python -m glm_image_core export-ar-int8`; export it again with this version."
        )
    check_signature(AR_MODEL, weights)
    source = f"the config in the metadata of {weights.where}"
    try:
        config = json.loads(weights.metadata["config"])
    except (KeyError, ValueError, RecursionError) as e:
        raise ModelFilesError(f"{source} is missing or not valid JSON ({e}); export the file again.") from e
    check_config_class(AR_MODEL, config, source)
    check_config_sizes(config, AR_MODEL.config_sizes, weights.shapes, source, "Export the file again.")
    files = ComponentFiles(weights, config, source, AR_MODEL.subfolder)
    try:
        generation_config = _generation_config(path.parent, weights.metadata.get("generation_config", "{}"))
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise ModelFilesError(f"the generation config in the metadata of {weights.where} is not valid ({e}).") from e
    return files, generation_config


def export_ar_int8(folder: str | Path, out_file: str | Path) -> Path:
    """Quantise the AR of a GLM-Image folder (root or ``vision_language_encoder/``) into one .safetensors file.

    The decoder projections are int8 with float32 ``weight_scale`` s; other tensors are written as stored (bf16).
    The metadata carries the config, the generation config and the format tag that ``load_ar_model`` checks. Peak
    memory: about the 8-bit model's size (the shards are quantised tensor by tensor, as when loading)."""
    location = component_location(folder, AR_MODEL)
    if location.is_file():
        raise ModelFilesError(f"{display_name(location)}: export-ar-int8 reads the published AR folder, not a file.")
    files = open_component(location, AR_MODEL, None)
    fmt = formats.detect(files)
    if fmt is not formats.PLAIN:
        raise ModelFilesError(
            f"{files.weights.where} holds {fmt.label}; export-ar-int8 quantises the full-precision weights of "
            "zai-org/GLM-Image. Load this folder as it is instead."
        )
    _meta_ar_model(files, formats.INT8)  # the config and the shards agree, before minutes of work
    tensors = read_quantising(files, None)
    return write_ar_int8_file(tensors, files.config, _generation_config(location).to_dict(), out_file)


def write_ar_int8_file(tensors: dict[str, torch.Tensor], config: dict, generation_config: dict, out_file) -> Path:
    """One 8-bit AR file: ``tensors`` (int8 projections + float32 ``_scale`` s, the rest as given) with the config,
    the generation config and the format tag in the metadata."""
    metadata = {
        "format": "pt",
        "glm_image_ar": EXPORT_TAG,
        "quantization": "int8 weight-only, symmetric, one float32 scale per output channel (`<key>_scale`)",
        "config": json.dumps(config),
        "generation_config": json.dumps(generation_config),
    }
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors({k: t.contiguous() for k, t in tensors.items()}, out_file, metadata=metadata)


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


def trim_embedding(model, rows: int = NUM_VQ_CODES) -> None:
    """Replace the AR's ``embed_tokens`` by a ``CodeRowsEmbedding`` of its first ``rows`` rows (the VQ codes)."""
    lm = model.model.language_model
    if isinstance(lm.embed_tokens, CodeRowsEmbedding):
        return
    lm.embed_tokens = CodeRowsEmbedding(lm.embed_tokens.weight.detach().cpu(), rows)


def load_ar_processor(folder: str | Path):
    """The AR processor (``transformers.GlmImageProcessor``: tokenizer + image processor) from the root or
    ``processor/``."""
    (GlmImageProcessor,) = glm_image_classes("GlmImageProcessor")
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
    check_config_file_names(location)
    return location


def check_ar_files(path: str | Path) -> None:
    """``check_files`` for the AR model: its folder (and, given a GLM-Image root, the processor's files beside it) or
    an 8-bit export; headers and configs only. The model the config builds is compared with the headers when it
    loads, before transformers allocates it: its class takes transformers seconds to import, too long for a queued
    prompt's check."""
    location = component_location(path, AR_MODEL)
    files, _ = _open_ar_files(location)
    formats.detect(files)
    if (Path(path) / "model_index.json").is_file():  # a root: the AR loads with the processor beside it
        _processor_folder(path)
