"""GLM-Image's components (DiT, VAE, glyph encoder, AR model): what identifies each, where its files are in the
published folder layout (docs/), and its config: ``config.json``, the metadata of a single file, or inferred from the
tensor shapes with the published values for what shapes cannot tell. Then the check that the weights are exactly the
tensors of the model a config builds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import formats
from .checkpoint import REDOWNLOAD, ComponentFiles, WeightFiles, display_name, scan_weights
from .defaults import PUBLISHED_LATENTS_MEAN, PUBLISHED_LATENTS_STD
from .errors import ModelFilesError
from .file_checks import check_config_sizes, config_object
from .files import outside_name_reason


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
    config_sizes: tuple[str, ...] = ()  # the config's sizes the model is built from (dotted keys), checked first


TRANSFORMER = Component(
    "transformer",
    "the DiT (GlmImageTransformer2DModel)",
    "diffusion_pytorch_model",
    "_class_name",
    "GlmImageTransformer2DModel",
    ("prior_token_embedding.weight", "transformer_blocks.0.attn1.to_q.weight"),
    layer_prefix="transformer_blocks",
    layer_config_key="num_layers",
    config_sizes=(
        "attention_head_dim",
        "condition_dim",
        "in_channels",
        "num_attention_heads",
        "num_layers",
        "out_channels",
        "patch_size",
        "prior_vq_quantizer_codebook_size",
        "text_embed_dim",
        "time_embed_dim",
    ),
)
VAE = Component(
    "vae",
    "the VAE (AutoencoderKL)",
    "diffusion_pytorch_model",
    "_class_name",
    "AutoencoderKL",
    ("decoder.conv_in.weight", "encoder.conv_in.weight"),
    config_sizes=(
        "block_out_channels",
        "in_channels",
        "latent_channels",
        "layers_per_block",
        "norm_num_groups",
        "out_channels",
    ),
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
    config_sizes=("d_ff", "d_kv", "d_model", "num_heads", "num_layers", "relative_attention_num_buckets", "vocab_size"),
)
AR_MODEL = Component(
    "vision_language_encoder",
    "the AR model (GlmImageForConditionalGeneration)",
    "model",
    "model_type",
    "glm_image",
    ("lm_head.weight",),
    signature_prefixes=("model.language_model.", "model.vqmodel.", "model.visual."),
    config_sizes=tuple(
        f"text_config.{key}"
        for key in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_hidden_layers",
            "num_key_value_heads",
            "vision_vocab_size",
            "vocab_size",
        )
    )
    + tuple(f"vision_config.{key}" for key in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size"))
    + tuple(f"vq_config.{key}" for key in ("embed_dim", "latent_channels", "num_embeddings")),
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


def check_signature(component: Component, weights: WeightFiles) -> None:
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


def check_config_class(component: Component, config: dict, source: str) -> None:
    config_object(config, source, f"Download {component.subfolder}/config.json again from zai-org/GLM-Image.")
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
    except (OSError, ValueError, RecursionError) as e:
        raise ModelFilesError(f"{display_name(config_path)} is not valid JSON ({e}); {REDOWNLOAD}.") from e
    check_config_class(component, config, display_name(config_path))
    return config


# The JSON files of a processor or tokenizer folder that transformers reads, and the keys in them whose values it
# takes as file names (vocab_file, tokenizer_file, fast_tokenizer_files, ...).
TOKENIZER_CONFIGS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
)
FILE_NAME_KEYS = ("_file", "_files")


def _named_files(data, key: str = ""):
    """(key, value) of every entry of a JSON tree whose key ends in _file/_files (each name of a list separately)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _named_files(v, k)
    elif isinstance(data, list):
        for v in data:
            yield from _named_files(v, key)
    elif key.endswith(FILE_NAME_KEYS) and data is not None:
        yield key, data


def check_config_file_names(folder: Path) -> None:
    """ModelFilesError unless every file name in ``folder``'s tokenizer/processor configs is a plain relative name
    inside ``folder`` (transformers would open such a name as given)."""
    for config_name in TOKENIZER_CONFIGS:
        path = folder / config_name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise ModelFilesError(f"{display_name(path)} is not valid JSON ({e}); {REDOWNLOAD}.") from e
        for key, name in _named_files(data):
            reason = outside_name_reason(name)
            if reason is not None:
                raise ModelFilesError(
                    f"{display_name(path)} is refused: its entry {key!r} names a file outside {folder.name}/ "
                    f"({reason}). A config may name only files inside its own folder, by a plain relative name. "
                    f"The file was changed after download: delete it and {REDOWNLOAD}."
                )


def open_component(
    path: str | Path, component: Component, infer_config: Callable[[dict[str, tuple[int, ...]]], dict] | None
) -> ComponentFiles:
    """Validate a component's files and find its config: config.json, single-file metadata or inferred; its sizes
    checked against the weights (``file_checks.check_config_sizes``)."""
    location = component_location(path, component)
    weights = scan_weights(location, component.weights_name)
    check_signature(component, weights)
    if location.is_dir():
        files = ComponentFiles(
            weights, read_config(location, component), display_name(location / "config.json"), component.subfolder
        )
    elif "config" in weights.metadata:
        source = f"the config in the metadata of {weights.where}"
        try:
            config = json.loads(weights.metadata["config"])
        except (ValueError, RecursionError) as e:
            raise ModelFilesError(f"{source} is not valid JSON ({e}); re-export the file with save_single_file.") from e
        check_config_class(component, config, source)
        files = ComponentFiles(weights, config, source, component.subfolder)
    elif infer_config is None:
        raise ModelFilesError(f"{weights.where}: {component.label} loads from its folder, not from a single file.")
    else:
        files = ComponentFiles(
            weights,
            inferred_config(weights, component, infer_config),
            f"the config inferred from the shapes in {weights.where}",
            component.subfolder,
        )
    check_config_sizes(
        files.config, component.config_sizes, weights.shapes, files.config_source, config_remedy(component)
    )
    return files


def config_remedy(component: Component) -> str:
    return (
        f"Download the {component.subfolder}/ folder again from zai-org/GLM-Image (config.json and weights "
        "together), or re-export a single file with save_single_file."
    )


def inferred_config(weights: WeightFiles, component: Component, infer_config) -> dict:
    """The config of a single file without one in its metadata, from its tensor shapes."""
    try:
        return infer_config(weights.shapes)
    except (KeyError, TypeError, ValueError, IndexError, ZeroDivisionError) as e:
        reason = f"tensor {e.args[0]} is missing" if isinstance(e, KeyError) else str(e)
        raise ModelFilesError(
            f"{weights.where} has no config in its metadata, and the config of {component.label} cannot be "
            f"inferred from its tensors ({reason}). Use the files of zai-org/GLM-Image, or a single file written by "
            "save_single_file."
        ) from e


# ---------------------------------------------------------------------------------------------------------------
# Checking weights against the model a config builds


def _layer_count(keys, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def built_shapes(model, fmt: formats.WeightFormat, files: ComponentFiles, dtype) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a meta-device ``model`` once ``fmt`` has built its layers, and the biases of the layers it
    replaced: a quantised layer takes its bias where the files have one, so a bias the files lack would otherwise go
    unnoticed (the model would run without it)."""
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    fmt.build_layers(model, files, dtype)
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return after | {k: shape for k, shape in before.items() if k.endswith(".bias") and k not in after}


def check_weights_match(
    component: Component,
    expected: dict[str, tuple[int, ...]],
    files: ComponentFiles,
    fmt: formats.WeightFormat = formats.PLAIN,
    optional: frozenset[str] = frozenset(),
) -> None:
    """Every tensor the model expects is in the files with its shape, and nothing else but what the files' weight
    format stores beside them (scales, markers); else ModelFilesError. Weights the format packs along their inputs
    are compared by their rows only."""
    found = files.weights.shapes
    packed = fmt.rows_only(files)
    missing = [k for k in expected if k not in found and k not in optional]
    unexpected = [k for k in found if k not in expected and not fmt.extra_key(k, expected)]

    def compared(key: str, shape) -> tuple[int, ...]:
        return tuple(shape)[:1] if key in packed else tuple(shape)

    mismatched = [k for k in expected if k in found and compared(k, found[k]) != compared(k, expected[k])]
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


# ---------------------------------------------------------------------------------------------------------------
# Configs inferred from tensor shapes (single files without a config in their metadata)


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
