"""Model files checked before use (glm_image_core.file_checks): every damaged copy of a model file or folder is refused
with a GLM-Image error that names what is wrong, at the stage that can see it (when a prompt is queued: headers and
configs; when read: values and the fit of a LoRA to its model), and a harmless change (an extra file, NaN values, a
LoRA's keys for another model) still loads. Nothing reaches a raw exception from safetensors, torch or transformers.

`damaged_cases` writes the fuzz corpus (seeded: the same cases every run) over every loader: the DiT (folder with
shards, single file, ComfyUI's 8-bit file, 4-bit and SDNQ folders), the VAE file, the glyph encoder, the AR folder
and its 8-bit export, DiT LoRAs and AR adapters (folder and single file).
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_image_core import ar_lora, file_checks, lora
from glm_image_core.components import AR_MODEL, TEXT_ENCODER, TRANSFORMER, VAE
from glm_image_core.errors import GlmImageError, InvalidInputError, ModelFilesError
from glm_image_core.loading import (
    check_files,
    export_ar_int8,
    load_ar_model,
    load_glyph_encoder,
    load_transformer,
    load_vae,
    save_single_file,
)

CASES = 420
QUEUE, LOAD, LOADED, RAW = "refused when queued", "refused when read", "loaded", "raw exception"
WHEN_LOADED = f"{QUEUE}|{LOAD}"  # shapes of transformers' models: when loaded, or when queued by a size check


# --- safetensors bytes ----------------------------------------------------------------------------------------------


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def joined(header, body: bytes) -> bytes:
    text = (header if isinstance(header, bytes) else json.dumps(header).encode()).ljust(8, b" ")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


# --- the bases: a valid file or folder per loader -------------------------------------------------------------------


@dataclass
class Loader:
    name: str
    base: Path  # the valid file or folder
    weights: list[str]  # the safetensors files in it (names relative to base; "" when base is the file)
    check: Callable[[Path], object]  # what runs when a prompt is queued
    load: Callable[[Path], object]  # what reads it
    config: str | None = None  # the config file in it (relative), "metadata" (a single file's), or None
    sizes: tuple[str, ...] = ()  # the config's sizes (dotted keys)
    kind: str = "model"  # "model", "lora" or "adapter"
    # When the model the config builds is compared with the headers: when queued (DiT, VAE), or for transformers'
    # classes (slow to import) when loaded, unless a size check when queued sees the damage first
    shapes_seen: str = QUEUE


def dit_lora_tensors(model, seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    """A DiT LoRA in diffusers' key names for three layers, one with an alpha."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in ("transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2", "proj_out"):
        module = model.get_submodule(layer)
        tensors[f"transformer.{layer}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g)
        tensors[f"transformer.{layer}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * 0.01
    tensors["transformer.proj_out.alpha"] = torch.tensor(2.0)
    return tensors


@pytest.fixture(scope="module")
def core_dit(tiny_model_dir):
    return load_transformer(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def core_ar(tiny_model_dir):
    return load_ar_model(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def loaders(tiny_model_dir, autoround_model_dir, sdnq_model_dir, core_dit, core_ar, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    made = tmp_path_factory.mktemp("bases")
    dit_file = save_single_file(tiny_model_dir / "transformer", made / "dit.safetensors")
    dit_int8 = save_single_file(tiny_model_dir / "transformer", made / "dit_int8.safetensors", quant="int8_tensorwise")
    vae_file = made / "vae.safetensors"  # as ComfyUI users keep it: no config in the metadata
    vae_file.write_bytes((tiny_model_dir / "vae/diffusion_pytorch_model.safetensors").read_bytes())
    ar_int8 = export_ar_int8(tiny_model_dir, made / "ar.ar_int8.safetensors")
    dit_lora = made / "dit_lora.safetensors"
    save_file(dit_lora_tensors(core_dit), dit_lora)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        core_ar, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(made / "adapter")
    core_ar = peft_model.unload()  # the model as it was, for check_fits
    adapter_file = made / "adapter.safetensors"
    tensors = load_file(made / "adapter/adapter_model.safetensors")
    tensors.update({k.replace("lora_A.weight", "alpha"): torch.tensor(8.0) for k in tensors if "lora_A" in k})
    save_file(tensors, adapter_file)

    def fits(path):
        ar_lora.check_fits(core_ar, ar_lora.read_adapter(path), path.name)

    def weights(folder: Path) -> list[str]:
        return sorted(p.name for p in folder.glob("*.safetensors"))

    shards = weights(tiny_model_dir / "transformer")
    ar_shards = weights(tiny_model_dir / "vision_language_encoder")
    f32 = dict(dtype=torch.float32)
    quantised_ars = [
        Loader(
            name,
            folder,
            weights(folder),
            lambda p: check_files(p, AR_MODEL),
            lambda p: load_ar_model(p, **f32),
            "config.json",
            AR_MODEL.config_sizes,
            shapes_seen=WHEN_LOADED,
        )
        for name, folder in (
            ("AR 4-bit folder", autoround_model_dir / "vision_language_encoder"),
            ("AR SDNQ folder", sdnq_model_dir / "vision_language_encoder"),
        )
    ]
    return [
        *quantised_ars,
        Loader(
            "VAE folder",
            tiny_model_dir / "vae",
            ["diffusion_pytorch_model.safetensors"],
            lambda p: check_files(p, VAE),
            lambda p: load_vae(p, **f32),
            "config.json",
            VAE.config_sizes,
        ),
        Loader(
            "DiT folder",
            tiny_model_dir / "transformer",
            shards,
            lambda p: check_files(p, TRANSFORMER),
            lambda p: load_transformer(p, **f32),
            "config.json",
            TRANSFORMER.config_sizes,
        ),
        Loader(
            "DiT file",
            dit_file,
            [""],
            lambda p: check_files(p, TRANSFORMER),
            lambda p: load_transformer(p, **f32),
            "metadata",
            TRANSFORMER.config_sizes,
        ),
        Loader(
            "DiT 8-bit file",
            dit_int8,
            [""],
            lambda p: check_files(p, TRANSFORMER),
            lambda p: load_transformer(p, **f32),
            "metadata",
            TRANSFORMER.config_sizes,
        ),
        Loader(
            "DiT 4-bit folder",
            autoround_model_dir / "transformer",
            ["model.safetensors"],
            lambda p: check_files(p, TRANSFORMER),
            lambda p: load_transformer(p, **f32),
            "config.json",
            TRANSFORMER.config_sizes,
        ),
        Loader(
            "DiT SDNQ folder",
            sdnq_model_dir / "transformer",
            ["diffusion_pytorch_model.safetensors"],
            lambda p: check_files(p, TRANSFORMER),
            lambda p: load_transformer(p, **f32),
            "config.json",
            TRANSFORMER.config_sizes,
        ),
        Loader("VAE file", vae_file, [""], lambda p: check_files(p, VAE), lambda p: load_vae(p, **f32)),
        Loader(
            "glyph encoder",
            tiny_model_dir / "text_encoder",
            ["model.safetensors"],
            lambda p: check_files(p, TEXT_ENCODER),
            lambda p: load_glyph_encoder(p, **f32),
            "config.json",
            TEXT_ENCODER.config_sizes,
            shapes_seen=WHEN_LOADED,
        ),
        Loader(
            "AR folder",
            tiny_model_dir / "vision_language_encoder",
            ar_shards,
            lambda p: check_files(p, AR_MODEL),
            lambda p: load_ar_model(p, **f32),
            "config.json",
            AR_MODEL.config_sizes,
            shapes_seen=WHEN_LOADED,
        ),
        Loader(
            "AR 8-bit export",
            ar_int8,
            [""],
            lambda p: check_files(p, AR_MODEL),
            lambda p: load_ar_model(p, **f32),
            "metadata",
            AR_MODEL.config_sizes,
            shapes_seen=WHEN_LOADED,
        ),
        Loader(
            "DiT LoRA",
            dit_lora,
            [""],
            lora.check_dit_lora_file,
            lambda p: lora.read_dit_lora(p, core_dit),
            kind="lora",
        ),
        Loader(
            "AR adapter folder",
            made / "adapter",
            ["adapter_model.safetensors"],
            ar_lora.check_adapter,
            fits,
            "adapter_config.json",
            kind="adapter",
        ),
        Loader("AR adapter file", adapter_file, [""], ar_lora.check_adapter, fits, kind="adapter"),
    ]


# --- the fuzz corpus ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    loader: Loader
    kind: str
    path: Path
    expect: str  # QUEUE, LOAD or LOADED (or "|"-separated alternatives)
    named: tuple[str, ...]  # what the refusal must name: all of them, each one of its "|"-separated alternatives

    def is_named_in(self, message: str) -> bool:
        return all(any(alternative in message for alternative in n.split("|")) for n in self.named)


def copy_of(loader: Loader, folder: Path) -> Path:
    """The loader's base at ``folder``: a file copied, a folder of symlinks to the base's files (a mutation replaces
    the one it changes by a file of its own)."""
    if loader.base.is_file():
        path = folder / loader.base.name
        folder.mkdir(parents=True)
        path.write_bytes(loader.base.read_bytes())
        return path
    path = folder / loader.base.name
    path.mkdir(parents=True)
    for file in loader.base.iterdir():
        (path / file.name).symlink_to(file)
    return path


def write(path: Path, data: bytes | str) -> None:
    path.unlink(missing_ok=True)  # a symlink to the base: never written through
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def save(path: Path, tensors: dict, metadata: dict | None) -> None:
    path.unlink(missing_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def weights_file(rng: random.Random, loader: Loader, path: Path) -> Path:
    name = rng.choice(loader.weights)
    return path / name if name else path


def tensors_and_metadata(file: Path) -> tuple[dict, dict | None]:
    header, _ = split(file.read_bytes())
    return load_file(file), header.get("__metadata__")


def floating_keys(tensors: dict) -> list[str]:
    return sorted(k for k, t in tensors.items() if t.is_floating_point() and t.numel())


def header_damage(rng: random.Random, loader: Loader, path: Path):
    """Bytes that are no complete safetensors file: refused when queued, naming the file."""
    file = weights_file(rng, loader, path)
    data = file.read_bytes()
    header, body = split(data)
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    key = rng.choice(tensors)
    choice = rng.randrange(14)
    if choice == 0:
        kind, damaged = "truncated", data[: rng.randrange(8, len(data) - 1)]
    elif choice == 1:
        kind, damaged = "short", data[: rng.randrange(0, 8)]
    elif choice == 2:
        kind, damaged = "random_bytes", rng.randbytes(rng.choice([9, 100, 5000, len(data)]))
    elif choice == 3:
        lie = rng.choice([0, 1, 2, len(data) - 7, 2**40, 2**64 - 1])
        kind, damaged = "header_length", struct.pack("<Q", lie) + data[8:]
    elif choice == 4:
        kind, damaged = "header_list", joined(json.dumps([header]).encode(), body)
    elif choice == 5:
        kind, damaged = "header_garbage", joined(b"{" + rng.randbytes(40), body)
    elif choice == 6:
        header[key]["dtype"] = rng.choice(["F7", "Q4_K", "float32", 5, None])
        kind, damaged = "dtype_unknown", joined(header, body)
    elif choice == 7:
        shape = header[key]["shape"]
        header[key]["shape"] = rng.choice([[*shape, 2], [n + 1 for n in shape] or [3], [-1, *shape[1:]], "big"])
        kind, damaged = "shape_lie", joined(header, body)
    elif choice == 8 and len(tensors) > 1:
        first, second = tensors[0], tensors[1]
        header[second]["data_offsets"] = header[first]["data_offsets"]
        kind, damaged = "offsets_overlap", joined(header, body)
    elif choice == 9:
        begin, end = header[tensors[-1]]["data_offsets"]
        header[tensors[-1]]["data_offsets"] = [begin + 64, end + 64]
        kind, damaged = "offsets_beyond_file", joined(header, body)
    elif choice == 10:
        header[key]["data_offsets"] = rng.choice([[0], "0-8", [5, 2], None])
        kind, damaged = "offsets_broken", joined(header, body)
    elif choice == 11:
        header["__metadata__"] = rng.choice([{"format": 1}, ["pt"], "pt"])
        kind, damaged = "metadata_not_strings", joined(header, body)
    elif choice == 12:
        kind, damaged = "data_appended", data + rng.randbytes(rng.choice([1, 8, 1000]))
    else:
        file.unlink()
        torch.save({"weight": torch.zeros(2)}, file)  # a pickle renamed
        return "pickle", QUEUE, (file.name,)
    write(file, damaged)
    return kind, QUEUE, (file.name,)


def misshapen(rng: random.Random, t: torch.Tensor) -> torch.Tensor:
    """``t`` with another shape: a row more, a dimension more, flattened short, or its axes reversed."""
    if t.ndim == 0:
        return t.reshape(1).repeat(2)
    choice = rng.randrange(4)
    if choice == 1:
        return t[None]
    if choice == 2 and t.numel() > 1:
        return t.reshape(-1)[:-1]
    if choice == 3 and t.ndim > 1 and t.shape[0] != t.shape[-1]:
        return t.transpose(0, -1)
    return torch.cat([t, t[:1]])


# What may see a missing or misshapen tensor first: a size check, or (a file without a config) the config inferred
# from its shapes.
SEEN_FIRST = "more than the weights on disk can fill|does not describe GLM-Image's"


def model_tensor_damage(rng: random.Random, loader: Loader, path: Path):
    """A model file's tensors: missing, misshapen, of an integer dtype, extra, a quantised format's codes stored as
    floats (refused when queued, naming the tensor or its layer), or NaN values (loaded)."""
    file = weights_file(rng, loader, path)
    tensors, metadata = tensors_and_metadata(file)
    key = rng.choice(floating_keys(tensors))
    layer = key.rsplit(".", 1)[0]
    t = tensors[key]
    codes = sorted(k for k, v in tensors.items() if not v.is_floating_point() and not k.endswith(".comfy_quant"))
    choice = rng.randrange(6 if codes else 5)
    # ComfyUI's quantised files say each layer's format (whether it has a weight_scale, the weight's whole shape and
    # dtype) in its marker's values: seen when read
    marked = loader.name == "DiT 8-bit file"
    if choice == 0:
        del tensors[key]
        expect = LOAD if marked and key.endswith(".weight_scale") else loader.shapes_seen
        kind, named = "tensor_missing", (f"{layer}|{SEEN_FIRST}",)
    elif choice == 1:
        tensors[key] = misshapen(rng, t)
        expect = LOAD if marked and key.endswith(".weight_scale") and tensors[key].numel() > 1 else loader.shapes_seen
        kind, named = "tensor_misshapen", (f"{layer}|{SEEN_FIRST}",)
    elif choice == 2:
        tensors[key] = t.to(rng.choice([torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool]))
        kind, expect, named = "tensor_integer", QUEUE, (key,)
    elif choice == 3:
        extra = rng.choice(["extra.weight", "transformer_blocks.9.attn1.to_q.weight", "lm_head.bias", "x"])
        tensors[extra] = torch.zeros(4, 4)
        kind, expect, named = "tensor_extra", loader.shapes_seen, (extra,)
    elif choice == 4:
        tensors[key] = torch.full_like(t, float("nan"))
        kind, expect, named = "tensor_nan", LOADED, ()
    else:
        key = rng.choice(codes)
        tensors[key] = tensors[key].float()
        expect = LOAD if marked else QUEUE
        kind, named = "codes_as_floats", (key.rsplit(".", 1)[0],)
    save(file, tensors, metadata)
    return kind, expect, named


# Sizes that leave every tensor's shape as it is, so no file check can see them changed: head counts whose head size
# follows them, the VAE's group count.
SHAPELESS = ("text_config.num_attention_heads", "vision_config.num_heads", "norm_num_groups")
BAD_SIZES = [0, -1, -4096, "2", 2.5, True, None, [], {}, 10**9, 2**63]


def config_damage(rng: random.Random, loader: Loader, path: Path):
    """A config that is not an object, not JSON, of another model, without a size or with a size that is no
    positive integer or larger than the weights (refused when queued, naming the config and the key), or that builds
    a model of other shapes than the weights."""
    if loader.config == "metadata":
        header, body = split(path.read_bytes())
        text = header["__metadata__"]["config"]
        source = ("config", path.name)
    else:
        file = path / loader.config
        text = file.read_text()
        source = (loader.config,)
    config = json.loads(text)
    expect = QUEUE
    choice = rng.randrange(8)
    if choice == 0:
        kind, new, named = "config_not_object", rng.choice(["[]", "42", '"config"', "null", "[{}]"]), source
    elif choice == 1:
        kind, new, named = "config_not_json", rng.choice(["{", "", "{'a': 1}", "[" * 100_000]), source
    elif choice == 2:
        field = "_class_name" if "_class_name" in config else "model_type"
        config[field] = rng.choice(["UNet2DConditionModel", "llama", "", 7])
        kind, new, named = "config_other_model", json.dumps(config), (*source, field)
    elif choice in (3, 4) and loader.sizes:
        dotted = rng.choice(loader.sizes)
        *parents, last = dotted.split(".")
        section = config
        for part in parents:
            section = section[part]
        if choice == 3:
            del section[last]
        else:
            section[last] = rng.choice(BAD_SIZES)
        kind, new, named = "config_size", json.dumps(config), (*source, dotted)
    elif choice == 5 and loader.sizes:
        counts = ("num", "layers", "depth", "channels")
        dotted = rng.choice([s for s in loader.sizes if any(c in s for c in counts) and s not in SHAPELESS])
        *parents, last = dotted.split(".")
        section = config
        for part in parents:
            section = section[part]
        value = section[last]
        if isinstance(value, list):  # block_out_channels: one level wider
            i = rng.randrange(len(value))
            section[last] = [*value[:i], value[i] * 2, *value[i + 1 :]]
        else:
            section[last] = value + rng.choice([1, 2]) if rng.random() < 0.5 else value * 2
        kind, new, named = "config_other_shapes", json.dumps(config), source
        # a ComfyUI quantised layer's inputs: its format is in its marker's values, seen when read
        expect = WHEN_LOADED if loader.name == "DiT 8-bit file" else loader.shapes_seen
    elif choice == 6 and "quantization_config" in config:
        quant = config["quantization_config"]
        if quant.get("quant_method") == "sdnq":
            changed = [
                {**quant, "weights_dtype": "int3x"},
                {**quant, "use_hadamard": True},
                {**quant, "scale_dtype": "int8"},
            ]
        else:
            changed = [{**quant, "bits": 3}, {**quant, "group_size": 0}, {**quant, "sym": False}]
        config["quantization_config"] = rng.choice([[], "4bit", {}, {**quant, "quant_method": "awq"}, *changed])
        kind, new, named = "config_quantisation", json.dumps(config), ()
    else:
        config["_comment"] = "re-uploaded by someone"
        kind, new, named, expect = "config_extra_key", json.dumps(config), (), LOADED
    if loader.config == "metadata":
        header["__metadata__"]["config"] = new
        write(path, joined(header, body))
    else:
        write(file, new)
    return kind, expect, named


def index_damage(rng: random.Random, loader: Loader, path: Path):
    """A shard index that is no index, names a shard that is missing or outside the folder, puts a tensor in a shard
    that lacks it; a shard deleted; or an extra file beside them (loaded)."""
    index = next(path.glob("*.index.json"))
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    key = rng.choice(sorted(data["weight_map"]))
    choice = rng.randrange(7)
    if choice == 0:
        write(index, rng.choice(["", "{", "[]", '{"metadata": {}}', '{"weight_map": []}', '{"weight_map": {}}']))
        return "index_broken", QUEUE, (index.name,)
    if choice == 1:
        missing = "model-00009-of-00009.safetensors"
        data["weight_map"][key] = missing
        write(index, json.dumps(data))
        return "index_names_missing_shard", QUEUE, (missing,)
    if choice == 2:
        data["weight_map"][key] = rng.choice(["../../etc/passwd", "/tmp/x.safetensors", "", 5, None])
        write(index, json.dumps(data))
        return "index_names_outside", QUEUE, (index.name,)
    if choice == 3:
        other = next(s for s in shards if s != data["weight_map"][key])
        data["weight_map"][key] = other
        write(index, json.dumps(data))
        return "index_wrong_shard", QUEUE, (key,)
    if choice == 4:
        shard = rng.choice(shards)
        (path / shard).unlink()
        return "shard_deleted", QUEUE, (shard,)
    name = rng.choice(["README.md", "notes.txt", ".DS_Store", "model.safetensors.index.json.bak", "LICENSE"])
    write(path / name, rng.randbytes(100))
    return "extra_file", LOADED, ()


def lora_damage(rng: random.Random, loader: Loader, path: Path):
    """A DiT LoRA's tensors: A without B, ranks that disagree, an extra dimension, integers, an alpha that is a
    vector (refused when queued), pairs for a layer of another size, an alpha of NaN (refused when read), keys for
    another model beside (loaded) or alone (refused), NaN weights (loaded)."""
    tensors, _ = tensors_and_metadata(path)
    layer = rng.choice(sorted({k.rsplit(".", 2)[0] for k in tensors if "lora_A" in k}))
    down, up = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
    choice = rng.randrange(11)
    expect, named = QUEUE, (layer,)
    if choice == 0:
        del tensors[rng.choice([down, up])]
        kind = "lora_half_pair"
    elif choice == 1:
        tensors[down] = torch.cat([tensors[down], tensors[down][:1]])
        kind = "lora_ranks_disagree"
    elif choice == 2:
        tensors[up] = torch.cat([tensors[up], tensors[up][:1]])
        kind, expect = "lora_wider_layer", LOAD
    elif choice == 3:
        tensors[down] = torch.cat([tensors[down], tensors[down][:, :1]], 1)
        kind, expect = "lora_other_inputs", LOAD
    elif choice == 4:
        tensors[down] = tensors[down][None]
        kind = "lora_extra_dimension"
    elif choice == 5:
        key = rng.choice([down, up])
        tensors[key] = tensors[key].to(rng.choice([torch.int8, torch.int32, torch.bool]))
        kind, named = "lora_integer", (key,)
    elif choice == 6:
        tensors["transformer.proj_out.alpha"] = rng.choice([torch.ones(3), torch.ones(2, 2), torch.tensor([True])])
        kind, named = "lora_alpha_vector", ("transformer.proj_out.alpha",)
    elif choice == 7:
        tensors["transformer.proj_out.alpha"] = torch.tensor(rng.choice([float("nan"), float("inf")]))
        kind, expect, named = "lora_alpha_not_finite", LOAD, ("transformer.proj_out.alpha",)
    elif choice == 8:
        for i in range(rng.randrange(1, 5)):
            prefix = f"text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj"
            tensors[f"{prefix}.lora_A.weight"] = torch.zeros(4, 32)
            tensors[f"{prefix}.lora_B.weight"] = torch.zeros(32, 4)
        kind, expect, named = "lora_other_model_keys_beside", LOADED, ()
    elif choice == 9:
        tensors = {
            f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_down.weight": torch.zeros(4, 8) for i in range(3)
        }
        kind, named = "lora_for_another_model", ("matches no layer",)
    else:
        tensors[up] = torch.full_like(tensors[up], float("nan"))
        kind, expect, named = "lora_nan", LOADED, ()
    save(path, tensors, None)
    return kind, expect, named


def adapter_damage(rng: random.Random, loader: Loader, path: Path):
    """An AR adapter: its config against its tensors (r, lora_alpha, target_modules, patterns, PEFT options) and its
    tensors (half pairs, ranks, dtypes, foreign keys, alpha), refused when queued; NaN weights and an unknown config
    key loaded; a rank for a model of another width refused when fitted."""
    file = path / "adapter_model.safetensors" if path.is_dir() else path
    tensors, metadata = tensors_and_metadata(file)
    key_prefix = rng.choice(sorted({k.rsplit(".", 2)[0] for k in tensors if "lora_A" in k}))
    module = key_prefix.removeprefix(ar_lora.PEFT_PREFIX)  # as messages name it
    down, up = f"{key_prefix}.lora_A.weight", f"{key_prefix}.lora_B.weight"
    config_file = path / "adapter_config.json" if path.is_dir() else None
    if config_file is not None and rng.random() < 0.5:
        config = json.loads(config_file.read_text())
        choice = rng.randrange(10)
        named = ("adapter_config.json",)
        if choice == 0:
            config["r"] = rng.choice([0, -4, "4", 4.0, True, None, 2, 16])
            kind = "adapter_r"
        elif choice == 1:
            config["lora_alpha"] = rng.choice(["16", None, [], True, float("nan")])
            kind, named = "adapter_alpha", (*named, "lora_alpha")
        elif choice == 2:
            config["target_modules"] = rng.choice([["k_proj"], 5, [1], "(", "q_proj", {"q_proj": 1}])
            kind, named = "adapter_target_modules", (*named, "target_modules")
        elif choice == 3:
            config["rank_pattern"] = rng.choice([{"q_proj": 0}, {"q_proj": 7}, {"(": 4}, ["q_proj"]])
            kind, named = "adapter_rank_pattern", (*named, "rank_pattern")
        elif choice == 4:
            config.update(rng.choice([{"peft_type": "LOHA"}, {"use_dora": True}, {"modules_to_save": ["lm_head"]}]))
            kind = "adapter_unsupported"
        elif choice == 5:
            write(config_file, rng.choice(["[]", "{", "", "42", "null"]))
            return "adapter_config_broken", QUEUE, named
        elif choice == 6:
            config_file.unlink()
            return "adapter_config_missing", QUEUE, ("adapter_config.json",)
        elif choice == 7:
            config["use_rslora"] = rng.choice(["yes", 1, None])
            kind, named = "adapter_rslora", (*named, "use_rslora")
        elif choice == 8:
            config["alpha_pattern"] = rng.choice([{"q_proj": "8"}, {"q_proj": None}, "8"])
            kind, named = "adapter_alpha_pattern", (*named, "alpha_pattern")
        else:
            config["notes"] = "fine-tuned on my photos"
            write(config_file, json.dumps(config))
            return "adapter_config_extra_key", LOADED, ()
        write(config_file, json.dumps(config))
        return kind, QUEUE, named
    choice = rng.randrange(7)
    expect, named = QUEUE, (module,)
    if choice == 0:
        del tensors[rng.choice([down, up])]
        kind = "adapter_half_pair"
    elif choice == 1:
        tensors[down] = torch.cat([tensors[down], tensors[down][:1]])
        kind = "adapter_ranks_disagree"
    elif choice == 2:
        key = rng.choice([down, up])
        tensors[key] = tensors[key].to(rng.choice([torch.int8, torch.int64, torch.bool]))
        kind, named = "adapter_integer", (key,)
    elif choice == 3:
        extra = rng.choice(["base_model.model.model.visual.blocks.0.attn.qkv.lora_A.weight", "lm_head.weight"])
        tensors[extra] = torch.zeros(4, 4)
        kind, named = "adapter_foreign_key", (extra,)
    elif choice == 4:
        tensors[up] = torch.cat([tensors[up], tensors[up][:1]])
        kind, expect = "adapter_wider_layer", LOAD
    elif choice == 5 and config_file is None:
        alpha = down.replace("lora_A.weight", "alpha")
        tensors[alpha] = rng.choice([torch.ones(2), torch.tensor(float("nan"))])
        kind, expect, named = "adapter_alpha_tensor", (QUEUE if tensors[alpha].numel() > 1 else LOAD), (alpha,)
    else:
        tensors[up] = torch.full_like(tensors[up], float("nan"))
        kind, expect, named = "adapter_nan", LOADED, ()
    save(file, tensors, metadata)
    return kind, expect, named


def damaged_cases(loaders: list[Loader], folder: Path, count: int = CASES, seed: int = 0) -> list[Case]:
    """``count`` damaged copies of the loaders' files, round robin over the loaders, each with its expected outcome
    and what its refusal must name."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        loader = loaders[len(cases) % len(loaders)]
        path = copy_of(loader, folder / f"{len(cases):03d}")
        families = [header_damage]
        if loader.kind == "model":
            families += [model_tensor_damage, model_tensor_damage]
        if loader.kind == "lora":
            families += [lora_damage] * 3
        if loader.kind == "adapter":
            families += [adapter_damage] * 3
        if loader.config is not None and loader.kind == "model":
            families += [config_damage, config_damage]
        if path.is_dir() and any(path.glob("*.index.json")):
            families.append(index_damage)
        kind, expect, named = rng.choice(families)(rng, loader, path)
        cases.append(Case(loader, kind, path, expect, named))
    return cases


def outcome(case: Case) -> tuple[str, str]:
    """(what happened, the message): refused when queued, refused when read, loaded, or a raw exception (another
    type than GlmImageError: what this test exists to find)."""
    stage = QUEUE
    try:
        case.loader.check(case.path)
        stage = LOAD
        case.loader.load(case.path)
    except GlmImageError as e:
        return stage, str(e)
    except Exception as e:
        return RAW, f"{stage}: {type(e).__name__}: {e}"
    return LOADED, ""


def verdicts(cases: list[Case], outcome, also_named: str | None = None) -> tuple[list[str], Counter]:
    """(a line for each case whose outcome is not the expected one, or whose refusal does not name what it must;
    the outcomes counted by loader). ``also_named``: a message that counts as naming what a refusal when queued
    must (a host's own list of choices leaving the file out)."""
    wrong, counts = [], Counter()
    for case in cases:
        got, message = outcome(case)
        counts[case.loader.name, got] += 1
        named = case.is_named_in(message) or (also_named is not None and also_named in message and got == QUEUE)
        if got not in case.expect.split("|") or not named:
            wrong.append(
                f"{case.path.parent.name} {case.loader.name} {case.kind}: expected {case.expect} naming "
                f"{case.named}, got {got}: {message[:400]}"
            )
    return wrong, counts


# --- tests ----------------------------------------------------------------------------------------------------------


def test_every_base_passes_its_checks_and_loads(loaders):
    for loader in loaders:
        loader.check(loader.base)
        loader.load(loader.base)


def test_every_damaged_model_file_is_refused_clearly_and_every_harmless_change_loads(loaders, tmp_path):
    cases = damaged_cases(loaders, tmp_path)
    assert len(cases) >= 200
    wrong, counts = verdicts(cases, outcome)
    assert not wrong, "\n".join(wrong)
    assert {name for name, _ in counts} == {loader.name for loader in loaders}
    assert sum(n for (_, got), n in counts.items() if got == LOADED) >= 10  # harmless changes are in the corpus
    print("\n".join(f"{name}: {got} x{n}" for (name, got), n in sorted(counts.items())))  # with -s: the counts


def test_a_damaged_lora_header_is_refused_when_queued_not_by_safetensors(loaders, tmp_path):
    dit_lora = next(loader for loader in loaders if loader.name == "DiT LoRA").base
    path = tmp_path / "lora.safetensors"
    path.write_bytes(dit_lora.read_bytes()[:-100])
    with pytest.raises(
        InvalidInputError, match=r"lora.safetensors is truncated or corrupt: its tensors span \d+ bytes"
    ):
        lora.check_dit_lora_file(path)


def test_a_header_whose_tensor_size_is_not_its_byte_span_names_the_tensor(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, path)
    header, body = split(path.read_bytes())
    header["b"]["shape"] = [5]
    path.write_bytes(joined(header, body))
    with pytest.raises(ModelFilesError, match=r"tensor 'b' is F32 \[5\] \(20 bytes\) but its data_offsets .* span 16"):
        file_checks.read_header(path, "Download it again.")


def test_a_config_size_larger_than_the_weights_can_fill_is_refused_before_a_model_is_built(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "transformer"
    shutil.copytree(tiny_model_dir / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] = 10**6  # building it, even on the meta device, would take minutes
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFilesError, match=r"num_layers = 1000000, more than the weights on disk can fill"):
        check_files(folder, TRANSFORMER)


def test_an_integer_tensor_where_a_float_weight_belongs_is_refused_naming_it(tiny_model_dir, tmp_path):
    path = tmp_path / "vae.safetensors"
    tensors = load_file(tiny_model_dir / "vae/diffusion_pytorch_model.safetensors")
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"].to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(
        ModelFilesError, match=r"decoder.conv_out.weight is I32 in .*vae.safetensors; .* floating dtype"
    ):
        check_files(path, VAE)


def test_an_adapter_config_whose_rank_is_not_its_tensors_is_refused_naming_both(loaders, tmp_path):
    adapter = next(loader for loader in loaders if loader.name == "AR adapter folder")
    path = copy_of(adapter, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    write(path / "adapter_config.json", json.dumps({**config, "r": 16}))
    with pytest.raises(
        InvalidInputError,
        match=r"adapter_config.json gives model.language_model.layers.0.\S+_proj rank 16 .* have rank 4",
    ):
        ar_lora.check_adapter(path)


def test_a_lora_pair_for_a_layer_of_another_width_is_refused_when_fitted(core_dit, tmp_path):
    tensors = dit_lora_tensors(core_dit)
    key = "transformer.proj_out.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 8, tensors[key].shape[1])
    path = tmp_path / "wide.safetensors"
    save_file(tensors, path)
    lora.check_dit_lora_file(path)  # nothing in the file itself says which model it is for
    with pytest.raises(InvalidInputError, match=r"proj_out has A \[4, \d+\] and B \[\d+, 4\].*the layer of this model"):
        lora.read_dit_lora(path, core_dit)


def test_keys_for_another_model_in_a_lora_are_counted_in_a_warning(core_dit, tmp_path, caplog):
    tensors = dit_lora_tensors(core_dit)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 8)
    path = tmp_path / "with_te.safetensors"
    save_file(tensors, path)
    layers = lora.read_dit_lora(path, core_dit)
    assert len(layers) == 3
    assert "1 keys of with_te.safetensors match no layer of the DiT" in caplog.text


def test_nan_values_in_a_model_file_are_loaded_as_they_are(tiny_model_dir, tmp_path):
    tensors = load_file(tiny_model_dir / "vae/diffusion_pytorch_model.safetensors")
    tensors["decoder.conv_out.bias"] = torch.full_like(tensors["decoder.conv_out.bias"], math.nan)
    save_file(tensors, tmp_path / "vae.safetensors")
    assert load_vae(tmp_path / "vae.safetensors", dtype=torch.float32).decoder.conv_out.bias.isnan().all()


def loha_tensors(model, layer: str = "proj_out", rank: int = 2) -> dict[str, torch.Tensor]:
    """One layer of a LoHa (kohya names): tensors ComfyUI's LoRA code reads, that are not a LoRA pair."""
    module = model.get_submodule(layer)
    key = "lora_unet_" + layer.replace(".", "_")
    shapes = {"hada_w1_a": (module.out_features, rank), "hada_w1_b": (rank, module.in_features)}
    shapes |= {"hada_w2_a": (module.out_features, rank), "hada_w2_b": (rank, module.in_features)}
    return {f"{key}.{name}": torch.full(shape, 0.1) for name, shape in shapes.items()} | {
        f"{key}.alpha": torch.tensor(float(rank))
    }


def test_a_loha_passes_the_lora_check_and_the_core_names_what_it_ignores(core_dit, tmp_path, caplog):
    path = tmp_path / "loha.safetensors"
    save_file(dit_lora_tensors(core_dit) | loha_tensors(core_dit, "transformer_blocks.0.ff.net.2"), path)
    lora.check_dit_lora_file(path)  # ComfyUI's LoRA node reads LoHa layers
    assert len(lora.read_dit_lora(path, core_dit)) == 3  # the core reads the LoRA pairs only
    assert "1 layers of loha.safetensors are not LoRA pairs" in caplog.text


def test_an_alpha_without_its_pair_is_refused(core_dit, tmp_path):
    tensors = dit_lora_tensors(core_dit)
    del tensors["transformer.proj_out.lora_A.weight"], tensors["transformer.proj_out.lora_B.weight"]
    save_file(tensors, tmp_path / "alone.safetensors")
    with pytest.raises(InvalidInputError, match=r"alone.safetensors: transformer.proj_out has only an alpha but no"):
        lora.check_dit_lora_file(tmp_path / "alone.safetensors")


def test_the_header_reader_takes_every_dtype_safetensors_writes_sub_byte_ones_included(tmp_path):
    tensors = {"scale": ("F8_E8M0", [3], 3), "packed": ("F4", [2, 4], 4), "six": ("F6_E2M3", [4], 3)}
    header, offset = {}, 0
    for key, (dtype, shape, nbytes) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    (tmp_path / "x.safetensors").write_bytes(joined(header, bytes(offset)))
    read = file_checks.read_header(tmp_path / "x.safetensors", "")
    assert read.dtypes == {key: dtype for key, (dtype, _, _) in tensors.items()}
    header["six"]["shape"] = [3]  # 18 bits: no whole number of bytes
    (tmp_path / "x.safetensors").write_bytes(joined(header, bytes(offset)))
    with pytest.raises(ModelFilesError, match=r"tensor 'six' is F6_E2M3 \[3\]"):
        file_checks.read_header(tmp_path / "x.safetensors", "")
