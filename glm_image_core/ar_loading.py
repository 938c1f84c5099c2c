"""The AR model (``transformers.GlmImageForConditionalGeneration``) and its processor, from the published folder or
from one 8-bit file written by ``export_ar_int8`` (the decoder's projections in int8, ``glm_image_core.quant``).

The folder is validated with ``components``' checks before transformers reads it; the int8 path builds the model on
the meta device and reads the shards tensor by tensor, so the memory peak stays near the 8-bit size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import w4a16
from .checkpoint import REDOWNLOAD, display_name, load_tensors, scan_weights
from .components import (
    AR_MODEL,
    ComponentFiles,
    check_config_class,
    check_config_file_names,
    check_signature,
    check_weights_match,
    component_location,
    open_component,
)
from .dependencies import glm_image_classes
from .errors import InvalidInputError, ModelFilesError
from .files import save_safetensors

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

    A folder whose config has a ``quantization_config`` (AutoRound/GPTQ 4-bit, ``glm_image_core.w4a16``) loads with
    its packed layers kept packed (4 bits per weight), everything else in ``dtype``.

    quantization: None keeps every weight in ``dtype``; "int8" quantises the text decoder's linear layers while
    the shards are read, tensor by tensor (``glm_image_core.quant``), so the CPU memory peak stays near the 8-bit
    size. An exported 8-bit file is int8 whatever this says. trim: keep only the 16384 VQ-code rows of the input
    embedding as a parameter (``trim_embedding``), so that moving the model to a GPU leaves the other 151680 rows in
    CPU memory.
    """
    if quantization not in AR_QUANTIZATIONS:
        raise InvalidInputError(f"AR quantization {quantization!r} is not one of {AR_QUANTIZATIONS}.")
    location = component_location(folder, AR_MODEL)
    files = None if location.is_file() else open_component(location, AR_MODEL, None)
    fmt = None if files is None else w4a16.read_format(files.config, files.config_source)
    if location.is_file():
        model = load_ar_int8_file(location, dtype)
    elif fmt is not None:  # a 4-bit re-upload: its packed layers stay packed, whatever `quantization` says
        model = _meta_w4a16_ar_model(files, fmt)
        _assign_ar_weights(model, w4a16.cast_state_dict(load_tensors(files.weights), dtype))
        model.generation_config = _generation_config(location)
    elif quantization == "int8":
        model = _meta_int8_ar_model(files)
        _assign_ar_weights(model, read_ar_int8_tensors(files, dtype))
        model.generation_config = _generation_config(location)
    else:
        model = _load_ar_with_transformers(location, dtype)
    if trim:
        trim_embedding(model)
    return model.to(device).eval()


def _load_ar_with_transformers(location: Path, dtype: torch.dtype | None):
    (GlmImageForConditionalGeneration,) = glm_image_classes("GlmImageForConditionalGeneration")
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


def _meta_ar_model(files: ComponentFiles):
    """GlmImageForConditionalGeneration of ``files``' config on the meta device (no memory, no init)."""
    GlmImageConfig, GlmImageForConditionalGeneration = glm_image_classes(
        "GlmImageConfig", "GlmImageForConditionalGeneration"
    )
    try:
        # quantization_config is dropped: these loaders read the packing themselves (transformers' own reader of
        # it would need the auto-round library)
        kept = {k: v for k, v in files.config.items() if not k.startswith("_") and k != "quantization_config"}
        config = GlmImageConfig.from_dict(kept)
        with torch.device("meta"):
            model = GlmImageForConditionalGeneration(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ModelFilesError(f"{files.config_source} does not describe GLM-Image's {AR_MODEL.label}: {e}") from e
    return model


def _meta_w4a16_ar_model(files: ComponentFiles, fmt: w4a16.W4A16Format):
    """The meta-device AR with ``W4A16Linear`` s where the checkpoint packs a layer, after checking that the files
    hold exactly its tensors."""
    model = _meta_ar_model(files)
    w4a16.swap_linears(model, files.weights.shapes, fmt)
    check_weights_match(AR_MODEL, {k: tuple(v.shape) for k, v in model.state_dict().items()}, files)
    return model


def _meta_int8_ar_model(files: ComponentFiles):
    """GlmImageForConditionalGeneration on the meta device with ``Int8Linear`` decoder projections, after checking
    that the files hold exactly its tensors (the scales aside, for bf16 sources)."""
    from .quant import replace_decoder_linears

    model = _meta_ar_model(files)
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
    check_signature(AR_MODEL, weights)
    source = f"the config in the metadata of {weights.where}"
    try:
        config = json.loads(weights.metadata["config"])
    except (KeyError, ValueError) as e:
        raise ModelFilesError(f"{source} is missing or not valid JSON ({e}); export the file again.") from e
    check_config_class(AR_MODEL, config, source)
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


def trim_embedding(model, rows: int = 16384) -> None:
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
    an 8-bit export; headers and configs only."""
    location = component_location(path, AR_MODEL)
    if location.is_file():  # an 8-bit export
        _open_ar_int8_file(location)
        return
    files = open_component(location, AR_MODEL, None)
    w4a16.read_format(files.config, files.config_source)
    if (Path(path) / "model_index.json").is_file():  # a root: the AR loads with the processor beside it
        _processor_folder(path)
