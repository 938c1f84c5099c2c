"""GLM-Image at full size on a CPU machine: the published shapes written, loaded and run once, host memory and load
time measured, and the ratios to the reference implementations at real width (issue 30).

    python benchmarks/full_size.py --workdir DIR [--quick] [--stages NAME ...] [--json OUT]
    python benchmarks/full_size.py --dry-run        # the same code paths on the tiny model in a temporary folder

What it does, each step skipped when already complete (it resumes after an interruption):

1. **The folder.** ``DIR/GLM-Image``: random weights at the published shapes in the published layout (``write``): the
   AR and the DiT as bf16 safetensors shards of at most ``SHARD_BYTES`` with their index files, the glyph encoder in
   float32, the VAE in bf16, the published configs unchanged, and the tiny model's processor and tokenizer files
   (they keep every published token id). Every shard is written tensor by tensor straight into the file
   (``write_streamed``), so writing holds one tensor in memory, not a shard.
2. **Derived files**, one at a time (each measured and deleted before the next, since they do not all fit beside
   the folder on a 75 GB disk): the int8 AR export and the scaled-fp8 and ``comfy_quant`` DiT files written by the
   pack's own commands (``python -m glm_image_core export-ar-int8`` / ``export-dit``), and a 4-bit
   AutoRound-layout folder (AR text decoder and DiT blocks) and an SDNQ folder as Disty0/GLM-Image-SDNQ-4bit-dynamic
   lays it out (AR decoder and ViT blocks, DiT blocks; uint4, int5 and float5_e3m1fn layers), with random packed
   codes in the layout the loaders read.
3. **Stages**, each in its own process on the CPU through the loaders the nodes call (``STAGES``): seconds to load,
   peak RSS (``VmHWM``), the weights resident after loading against the memory table's computed bytes, then one pass
   at real size. Before a stage starts, ``MemAvailable`` is read and the stage is skipped (with both figures) when
   its expected peak would leave less than ``FREE_FLOOR`` free; while it runs, a watchdog in this process polls the
   child's RSS and kills it above its limit ("killed at N GiB").
4. **Ratios** at real width and reduced depth (``ratios``): ours and the reference side by side in one process.

Every row is verified, failed (with the exception) or skipped (with the measured reason). CPU numbers: the thread
count is fixed (``THREADS``) and printed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
for _path in (REPO, BENCHMARKS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GiB = 2**30
SHARD_BYTES = 5 * 10**9  # the Hub's default shard size ("5GB"), what save_pretrained wrote for the published folder
FREE_FLOOR = 2 * GiB  # a stage starts only if its expected peak leaves this much free
THREADS = 2
FOLDER = "GLM-Image"
W4_FOLDER = "GLM-Image-int4-AutoRound"
AR_INT8_FILE = "GLM-Image.ar_int8.safetensors"
DIT_FILES = {"fp8": "glm_image_dit_fp8.safetensors", "scaled_fp8": "glm_image_dit_scaled_fp8.safetensors"}
W4_GROUP_SIZE = 128  # Intel/GLM-Image-int4-AutoRound's
W4_QUANTISED = {"vision_language_encoder": "model.language_model.layers.", "transformer": "transformer_blocks."}
SDNQ_FOLDER = "GLM-Image-SDNQ-4bit-dynamic"
SDNQ_PARTS = {"vision_language_encoder": "ar", "transformer": "dit"}  # memory_table.SDNQ_QUANTISED's keys
# Disty0/GLM-Image-SDNQ-4bit-dynamic's layers are uint4, int5 or float5_e3m1fn, chosen per layer by sdnq's error
# threshold; which layer gets which depends on the real weights: here each block's MLP output layer is int5 and its
# attention output float5_e3m1fn, the rest uint4, so that every dtype and packing runs at full size.
SDNQ_LAYER_DTYPES = {
    "int5": ("mlp.down_proj", "mlp.fc2", "ff.net.2"),
    "float5_e3m1fn": ("self_attn.o_proj", "attn.proj", "attn1.to_out.0"),
}
SAFETENSORS_NAMES = {
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.int32: "I32",
    torch.uint8: "U8",
}


# --- writing safetensors tensor by tensor ------------------------------------------------------------------------


def write_streamed(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    make: Callable[[str, tuple[int, ...], torch.dtype], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """One safetensors file holding ``specs`` (name, shape, dtype) in that order, each tensor made by ``make`` and
    written as soon as it is made: the header is known from the shapes, so memory holds one tensor at a time. The
    file appears under ``path`` only once complete."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    partial = path.with_name(f".{path.name}.partial")
    with open(partial, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, shape, dtype in specs:
            tensor = make(name, shape, dtype).contiguous()
            assert tuple(tensor.shape) == tuple(shape) and tensor.dtype == dtype, name
            f.write(memoryview(tensor.view(torch.uint8).reshape(-1).numpy()))
            del tensor
    os.replace(partial, path)


def write_sharded(
    folder: Path,
    stem: str,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    make,
    shard_bytes: int,
) -> None:
    """``{stem}-0000i-of-0000n.safetensors`` shards of at most ``shard_bytes`` (huggingface_hub's rule: a tensor
    starts a new shard when it would overflow the current one) and ``{stem}.safetensors.index.json``; shards already
    complete are kept (resumable)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * torch.empty((), dtype=spec[2]).element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    total = sum(math.prod(s[1]) * torch.empty((), dtype=s[2]).element_size() for s in specs)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"{stem}-{i:05d}-of-{len(shards):05d}.safetensors"
        if not (folder / name).is_file():
            started = time.perf_counter()
            write_streamed(folder / name, shard, make)
            print(f"  wrote {folder.name}/{name} in {time.perf_counter() - started:.0f} s", flush=True)
        weight_map.update(dict.fromkeys((s[0] for s in shard), name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# --- random values, by name --------------------------------------------------------------------------------------


def random_maker(embeddings: set[str], w4_scale: bool = False):
    """``make(name, shape, dtype)``: deterministic random values (a pure function of the name) that keep activations
    O(1), as ``glm_image_core.tiny`` and ``common.randomize_`` make them: matrices N(0, 1/fan_in), embeddings N(0, 1),
    norm scales 1 + N(0, 0.1), biases N(0, 0.05). 4-bit layers: random codes, every zero point 8 (stored as 7), and
    fp16 scales that give the dequantised weight a 1/fan_in variance."""

    def make(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        if name.endswith(".qweight"):
            return torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=generator)
        if name.endswith(".qzeros"):
            return torch.full(shape, 0x77777777, dtype=torch.int32)
        if name.endswith(".g_idx"):
            raise ValueError("act-order layers are not written")
        if name.endswith(".scales"):
            fan_in = shape[0] * W4_GROUP_SIZE
            return torch.full(shape, 1 / (4.6 * math.sqrt(fan_in)), dtype=dtype)  # codes - 8: std ~4.6
        out = torch.randn(shape, dtype=dtype, generator=generator)
        if len(shape) == 1:
            if name.endswith("bias"):
                return out.mul_(0.05)
            return out.mul_(0.1).add_(1.0)
        if name in embeddings:
            return out
        return out.mul_(1 / math.sqrt(math.prod(shape[1:])))

    return make


# --- the models' tensors, from their configs, on the meta device --------------------------------------------------


def ar_meta(config: dict):
    from glm_image_core.dependencies import glm_image_classes

    GlmImageConfig, GlmImageForConditionalGeneration = glm_image_classes(
        "GlmImageConfig", "GlmImageForConditionalGeneration"
    )
    kept = {k: v for k, v in config.items() if k != "quantization_config"}
    with torch.device("meta"):
        return GlmImageForConditionalGeneration(GlmImageConfig.from_dict(kept))


def dit_meta(config: dict):
    from glm_image_core.dit import GlmImageTransformer2DModel
    from glm_image_core.loading import constructor_kwargs

    return GlmImageTransformer2DModel(**constructor_kwargs(GlmImageTransformer2DModel, config), device="meta")


def vae_meta(config: dict):
    from glm_image_core.loading import constructor_kwargs
    from glm_image_core.vae import AutoencoderKL

    return AutoencoderKL(**constructor_kwargs(AutoencoderKL, config), device="meta")


def glyph_meta(config: dict):
    from transformers import T5Config, T5EncoderModel

    with torch.device("meta"):
        return T5EncoderModel(T5Config.from_dict({k: v for k, v in config.items() if not k.startswith("_")}))


def specs_of(model: torch.nn.Module, dtype: torch.dtype, skip=()) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor a checkpoint of ``model`` stores: floating ones in ``dtype``, others as
    the model holds them (4-bit layers' int32 codes; their scales keep fp16)."""
    specs = []
    for name, tensor in model.state_dict().items():
        if name in skip:
            continue
        keep = not tensor.is_floating_point() or name.endswith(".scales")
        specs.append((name, tuple(tensor.shape), tensor.dtype if keep else dtype))
    return specs


def embedding_names(model: torch.nn.Module) -> set[str]:
    return {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}


def autoround_config(prefix: str) -> dict:
    """The ``quantization_config`` Intel/GLM-Image-int4-AutoRound publishes (its transformer/config.json), for the
    blocks under ``prefix``."""
    from glm_image_core.tiny import PUBLISHED_CONFIGS

    published = json.loads((PUBLISHED_CONFIGS / "variant-intel-int4-autoround__transformer__config.json").read_text())
    return {**published["quantization_config"], "block_name_to_quantize": prefix.rstrip(".")}


# --- the folder -------------------------------------------------------------------------------------------------


def configs(tiny_folder: Path, full: bool) -> dict[str, dict]:
    """Each weighted component's config: published (full size; the glyph encoder's is ByT5-small's shape, see
    common.py) or the tiny folder's."""
    from common import published_config

    names = ("vision_language_encoder", "transformer", "text_encoder", "vae")
    if full:
        return {name: published_config(name) for name in names}
    return {name: json.loads((tiny_folder / name / "config.json").read_text()) for name in names}


def write_folder(root: Path, tiny_folder: Path, full: bool, shard_bytes: int) -> Path:
    """The random-weight GLM-Image folder ``root/GLM-Image`` (resumable: complete files are kept)."""
    folder = root / FOLDER
    for relative in (
        "model_index.json",
        "scheduler",
        "processor",
        "tokenizer",
        "vision_language_encoder/generation_config.json",
    ):
        source, target = tiny_folder / relative, folder / relative
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    cfg = configs(tiny_folder, full)
    for name, config in cfg.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    for name, build, stem in (
        ("vision_language_encoder", ar_meta, "model"),
        ("transformer", dit_meta, "diffusion_pytorch_model"),
    ):
        model = build(cfg[name])
        specs = specs_of(model, torch.bfloat16)
        write_sharded(folder / name, stem, specs, random_maker(embedding_names(model)), shard_bytes)
    glyph = glyph_meta(cfg["text_encoder"])
    path = folder / "text_encoder" / "model.safetensors"  # the tied embedding stored once, as `shared`
    if not path.is_file():
        specs = specs_of(glyph, torch.float32, skip={"encoder.embed_tokens.weight"})
        write_streamed(path, specs, random_maker(embedding_names(glyph)))
    vae = vae_meta(cfg["vae"])
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        write_streamed(path, specs_of(vae, torch.bfloat16), random_maker(embedding_names(vae)))
    return folder


def write_w4_folder(root: Path, folder: Path, shard_bytes: int) -> Path:
    """``root/GLM-Image-int4-AutoRound``: the folder with the AR's text decoder layers and the DiT's blocks in
    AutoRound's 4-bit layout (``auto_round:auto_gptq``, group size 128, symmetric), random codes; the other
    components linked to the bf16 folder's files."""
    from memory_table import w4_layers

    out = root / W4_FOLDER
    for item in folder.iterdir():
        if item.name not in W4_QUANTISED and not (out / item.name).exists():
            (out / item.name).parent.mkdir(parents=True, exist_ok=True)
            (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    builders = {"vision_language_encoder": (ar_meta, "model"), "transformer": (dit_meta, "diffusion_pytorch_model")}
    for name, (build, stem) in builders.items():
        config = json.loads((folder / name / "config.json").read_text())
        config["quantization_config"] = autoround_config(W4_QUANTISED[name])
        (out / name).mkdir(parents=True, exist_ok=True)
        for extra in (folder / name).glob("generation_config.json"):
            shutil.copyfile(extra, out / name / extra.name)
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        model = build(config)
        embeddings = embedding_names(model)
        w4_layers(model, W4_QUANTISED[name], W4_GROUP_SIZE)  # the layers the loaders build for the checkpoint
        write_sharded(out / name, stem, specs_of(model, torch.bfloat16), random_maker(embeddings), shard_bytes)
    return out


def sdnq_dtype_of(layer: str) -> str:
    return next((d for d, ends in SDNQ_LAYER_DTYPES.items() if layer.endswith(ends)), "uint4")


def sdnq_config(model: torch.nn.Module, skipped: list[str]) -> dict:
    """The ``quantization_config`` sdnq 0.2.8 writes (every key, as in its config.json and quantization_config.json)
    with Disty0/GLM-Image-SDNQ-4bit-dynamic's settings (uint4 from which the dynamic search starts, no SVD, scales in
    bf16) and this folder's per-layer dtypes."""
    from glm_image_core.formats import sdnq

    modules_dtype: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, sdnq.SDNQLinear):
            modules_dtype.setdefault(module.code.name, []).append(f"{name}.weight")
    return {
        "add_skip_keys": True,
        "codebook_steps": 24,
        "dequantize_fp32": False,
        "dynamic_loss_threshold": 1e-2,
        "group_size": 0,
        "hadamard_group_size": 256,
        "is_integer": True,
        "is_training": False,
        "is_unsigned": True,
        "minimum_allowed_channel_size": 32,
        "minimum_allowed_numel": 16384,
        "modules_dtype_dict": modules_dtype,
        "modules_quant_config": {},
        "modules_to_not_convert": skipped,
        "modules_to_not_use_matmul": [],
        "non_blocking": False,
        "quant_conv": False,
        "quant_embedding": False,
        "quant_method": "sdnq",
        "quantization_device": None,
        "quantized_matmul_dtype": None,
        "return_device": None,
        "scale_dtype": None,
        "sdnq_version": "0.2.8",
        "svd_rank": 32,
        "svd_steps": 8,
        "use_codebook": False,
        "use_codebook_scale": False,
        "use_dynamic_quantization": True,
        "use_grad_ckpt": True,
        "use_hadamard": False,
        "use_quantized_matmul": False,
        "use_quantized_matmul_conv": False,
        "use_static_quantization": True,
        "use_stochastic_rounding": False,
        "use_svd": False,
        "weights_dtype": "uint4",
        "zero_point_dtype": None,
    }


def sdnq_maker(model: torch.nn.Module, base):
    """``make`` for a model with SDNQ layers: random codes (every byte is a valid pack of codes) and bf16 scales and
    zero points that centre the codes' values and give the dequantised weight a 1/fan_in variance; other tensors
    from ``base``."""
    from glm_image_core.formats import sdnq

    layers = {name: m for name, m in model.named_modules() if isinstance(m, sdnq.SDNQLinear)}

    def values_of(code) -> torch.Tensor:
        if code.is_float:
            return sdnq.float_values(code, subnormals=True)
        return torch.arange(2**code.bits, dtype=torch.float32) - (2 ** (code.bits - 1) if code.signed else 0)

    def make(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        module, _, tensor = name.rpartition(".")
        layer = layers.get(module)
        if layer is None or tensor == "bias":
            return base(name, shape, dtype)
        if tensor == "weight":
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
        values = values_of(layer.code)
        scale = 1 / (float(values.std()) * math.sqrt(layer.in_features))
        return torch.full(shape, scale if tensor == "scale" else -float(values.mean()) * scale, dtype=dtype)

    return make


def write_sdnq_folder(root: Path, folder: Path, shard_bytes: int) -> Path:
    """``root/GLM-Image-SDNQ-4bit-dynamic``: the folder with the AR's (text decoder and ViT blocks) and the DiT's
    (blocks) layers in SDNQ's layout as Disty0/GLM-Image-SDNQ-4bit-dynamic publishes it (``sdnq_config``;
    ``SDNQ_LAYER_DTYPES``), random codes; sdnq's ``save_pretrained`` shards (one file when everything fits one);
    the other components linked to the bf16 folder's files."""
    from memory_table import SDNQ_QUANTISED, sdnq_layers

    out = root / SDNQ_FOLDER
    for item in folder.iterdir():
        if item.name not in SDNQ_PARTS and not (out / item.name).exists():
            (out / item.name).parent.mkdir(parents=True, exist_ok=True)
            (out / item.name).symlink_to(item.resolve(), target_is_directory=item.is_dir())
    builders = {"vision_language_encoder": (ar_meta, "model"), "transformer": (dit_meta, "diffusion_pytorch_model")}
    for name, (build, stem) in builders.items():
        config = json.loads((folder / name / "config.json").read_text())
        model = build(config)
        embeddings = embedding_names(model)
        sdnq_layers(model, SDNQ_PARTS[name], sdnq_dtype_of)
        config["quantization_config"] = sdnq_config(model, list(SDNQ_QUANTISED[SDNQ_PARTS[name]][1]))
        (out / name).mkdir(parents=True, exist_ok=True)
        for extra in (folder / name).glob("generation_config.json"):
            shutil.copyfile(extra, out / name / extra.name)
        (out / name / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        quant = json.dumps(config["quantization_config"], indent=2) + "\n"
        (out / name / "quantization_config.json").write_text(quant)
        specs = specs_of(model, torch.bfloat16)
        make = sdnq_maker(model, random_maker(embeddings))
        total = sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size() for _, shape, dtype in specs)
        single = out / name / f"{stem}.safetensors"
        if total <= shard_bytes:
            if not single.is_file():
                write_streamed(single, specs, make)
        else:
            write_sharded(out / name, stem, specs, make, shard_bytes)
    return out


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free_disk(path: Path) -> int:
    return shutil.disk_usage(path).free


# --- memory: what a process holds, and the guard that keeps the machine up ------------------------------------------


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of a process, and VmRSS's parts: RssAnon (the process's own memory) and RssFile
    (pages of memory-mapped files, such as safetensors shards read through mmap: page cache the kernel can drop),
    from /proc/<pid>/status."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def mem_available() -> int:
    return _meminfo("MemAvailable")


def resident_bytes(*modules: torch.nn.Module, extra: tuple[torch.Tensor, ...] = ()) -> int:
    """Bytes of the distinct storages behind the modules' parameters and buffers (and ``extra`` tensors): the
    weights a loaded model keeps in memory, shared tensors counted once."""
    seen, total = set(), 0
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())] + list(extra)
    for embedding in (m for module in modules for m in module.modules() if hasattr(m, "table")):
        tensors.append(embedding.table)  # CodeRowsEmbedding: the full table stays beside the code rows
    while tensors:
        t = tensors.pop()
        if hasattr(t, "__tensor_flatten__"):  # a wrapper subclass (ComfyUI 0.33's QuantizedTensor): its inner tensors
            names, _ = t.__tensor_flatten__()
            tensors.extend(getattr(t, name) for name in names)
            continue
        storage = t.untyped_storage()
        if t.device.type == "meta" or storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def run_guarded(command: list[str], limit: int, timeout: float, log: Path) -> dict:
    """Run ``command`` with a watchdog thread that polls its RSS (and the machine's MemAvailable) every 0.2 s and
    kills it above ``limit`` bytes or below 1 GiB available, or after ``timeout`` seconds. Returns
    {"rc", "seconds", "max_rss", "killed"} ("killed": why, or None)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        state = {"max_rss": 0, "max_anon": 0, "killed": None}

        def watch():
            while child.poll() is None:
                status = proc_status(child.pid)
                rss = status.get("VmRSS", 0)
                state["max_rss"] = max(state["max_rss"], rss)
                state["max_anon"] = max(state["max_anon"], status.get("RssAnon", 0))
                why = None
                if rss > limit:
                    why = f"killed at {rss / GiB:.1f} GiB RSS (limit {limit / GiB:.1f} GiB)"
                elif mem_available() < GiB:
                    why = f"killed at {rss / GiB:.1f} GiB RSS: the machine had under 1 GiB available"
                elif time.perf_counter() - started > timeout:
                    why = f"killed after {timeout:.0f} s (time limit), RSS {rss / GiB:.1f} GiB"
                if why:
                    state["killed"] = why
                    child.kill()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = child.wait()
        watcher.join()
    return {"rc": rc, "seconds": time.perf_counter() - started, **state}


# --- the stages, each run in its own process ------------------------------------------------------------------------

SIZE = 512  # the passes' image size
DECODE_TOKENS = 16


class _Enough(Exception):
    """Raised from the AR's token callback once the measured tokens are decoded."""


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all())


@torch.inference_mode()
def ar_pass(model, processor, vision: bool) -> dict:
    """Prefill + ``DECODE_TOKENS`` decoded tokens of a 512x512 text-to-image (and, ``vision``, the vision encoder
    on one 512x512 reference) as the AR node runs them (``glm_image_core.ar``)."""
    import numpy as np
    from common import PROMPT
    from PIL import Image

    from glm_image_core import ar

    passes = {}
    if vision:
        pixels = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        inputs = ar.build_ar_inputs(processor, PROMPT, SIZE, SIZE, images=[Image.fromarray(pixels)])
        seconds, ids = _timed(lambda: ar.encode_reference_images(model, inputs))
        ok = len(ids) == 1 and ids[0].numel() == (SIZE // 32) ** 2 and int(ids[0].max()) < 16384
        passes["vision encoder, one 512x512 reference"] = {"seconds": seconds, "ok": ok}
    inputs = ar.build_ar_inputs(processor, PROMPT, SIZE, SIZE)
    marks: list[tuple[int, float, torch.Tensor]] = []

    def on_token(step, total, ids):
        marks.append((step, time.perf_counter(), ids))
        if step >= DECODE_TOKENS + 1:
            raise _Enough

    started = time.perf_counter()
    try:
        ar.generate_prior_tokens(model, inputs, [torch.Generator().manual_seed(0)], callback=on_token, callback_every=1)
    except _Enough:
        pass
    (first, t0, _), (last, t1, ids) = marks[0], marks[-1]
    ok = last - first >= DECODE_TOKENS and int(ids.max()) < 16384
    passes[f"AR prefill ({inputs.input_ids.shape[1]} tokens) + first token"] = {"seconds": t0 - started, "ok": ok}
    passes[f"AR decode, {last - first} tokens"] = {
        "seconds": t1 - t0,
        "ok": ok,
        "s_per_token": (t1 - t0) / (last - first),
    }
    return passes


def stage_ar(work: Path, source: str) -> tuple[float, int, callable]:
    from glm_image_core.loading import load_ar_model, load_ar_processor

    folder = work / FOLDER
    path, quantisation = {
        "bf16": (folder, None),
        "int8_read": (folder, "int8"),
        "int8_file": (work / AR_INT8_FILE, None),
        "4bit": (work / W4_FOLDER, None),
        "sdnq": (work / SDNQ_FOLDER, None),
    }[source]
    seconds, model = _timed(lambda: load_ar_model(path, dtype=torch.bfloat16, quantisation=quantisation))
    processor = load_ar_processor(folder)
    return seconds, resident_bytes(model), lambda: ar_pass(model, processor, vision=source != "int8_read")


def stage_glyph(work: Path, _source: str):
    from common import PROMPT

    from glm_image_core.glyph import encode_glyphs
    from glm_image_core.loading import load_glyph_encoder, load_glyph_tokenizer

    folder = work / FOLDER
    seconds, model = _timed(lambda: load_glyph_encoder(folder, dtype=torch.bfloat16))
    tokenizer = load_glyph_tokenizer(folder)

    @torch.inference_mode()
    def run():
        took, out = _timed(lambda: encode_glyphs(PROMPT, model, tokenizer))
        ok = out.shape[-1] == model.config.d_model and _finite(out)
        return {"glyph encoder, the prompt's quoted text": {"seconds": took, "ok": ok}}

    return seconds, resident_bytes(model), run


def stage_vae(work: Path, _source: str):
    from glm_image_core.loading import load_vae

    seconds, model = _timed(lambda: load_vae(work / FOLDER, dtype=torch.bfloat16))

    @torch.inference_mode()
    def run():
        latent = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
        took, image = _timed(lambda: model.decode(latent.to(torch.bfloat16)))
        ok = tuple(image.shape) == (1, 3, SIZE, SIZE) and _finite(image)
        return {"VAE decode 512x512": {"seconds": took, "ok": ok}}

    return seconds, resident_bytes(model), run


class _Inputs:  # what bench_dit.dit_inputs reads of a Setup
    device = torch.device("cpu")
    dtype = torch.bfloat16


def stage_dit_core(work: Path, source: str):
    """The DiT through the core loader (bf16 folder), one forward at 512x512 (batch 1, the cond branch)."""
    from bench_dit import dit_inputs

    from glm_image_core.loading import load_transformer
    from glm_image_core.sampling import DitCondition, predict_velocity

    seconds, model = _timed(lambda: load_transformer(work / FOLDER, dtype=torch.bfloat16))
    text_dim = model.glyph_projector.net[0].proj.in_features

    @torch.inference_mode()
    def run():
        latent, cond, _, prior, timestep = dit_inputs(_Inputs, SIZE, text_dim)
        took, v = _timed(lambda: predict_velocity(model, latent, timestep, DitCondition(cond, prior), (SIZE, SIZE)))
        return {
            "DiT step 512x512 (batch 1)": {"seconds": took, "ok": tuple(v.shape) == tuple(latent.shape) and _finite(v)}
        }

    return seconds, resident_bytes(model), run


def stage_dit_comfy(work: Path, source: str):
    """The DiT as ComfyUI's DiT loader node builds it (``read_checked_weights`` + ``load_dit_patcher``): the fp8
    (comfy_quant), scaled-fp8 and 4-bit files; one forward at 512x512 (batch 1, the cond branch)."""
    from bench_comfy import PACK, dit_forwards

    _import_for(STAGES["dit_4bit"])
    pack_nodes = sys.modules[f"{PACK}.nodes"]
    # the loader of the pack as the nodes import it (its formats registry is the one the nodes' layers are keyed by)
    loading = importlib.import_module(f"{PACK}.glm_image_core.loading")
    path = {
        "fp8": work / DIT_FILES["fp8"],
        "scaled_fp8": work / DIT_FILES["scaled_fp8"],
        "4bit": work / W4_FOLDER,
        "sdnq": work / SDNQ_FOLDER,
    }[source]

    def load():
        weights = loading.read_checked_weights(path, loading.TRANSFORMER)
        return pack_nodes.dit_loading.load_dit_patcher(weights.state_dict, weights.config, fmt=weights.format)

    seconds, patcher = _timed(load)
    model = patcher.model
    text_dim = model.diffusion_model.glyph_projector.net[0].proj.in_features

    @torch.inference_mode()
    def run():
        forward = dit_forwards(_Inputs, model, torch.device("cpu"), SIZE, text_dim)
        took, v = _timed(forward(1))
        dtype = model.manual_cast_dtype or model.get_dtype()
        ok = tuple(v.shape) == (1, 16, SIZE // 8, SIZE // 8) and _finite(v)
        return {
            f"DiT step 512x512 (batch 1, ComfyUI, compute {str(dtype).removeprefix('torch.')})": {
                "seconds": took,
                "ok": ok,
            }
        }

    return seconds, resident_bytes(model.diffusion_model), run


def _import_for(stage) -> None:
    """Import what the stage's loader imports (torch, transformers, the pack; ComfyUI for its DiT loader)."""
    import transformers  # noqa: F401

    import glm_image_core.loading  # noqa: F401

    if stage.run is stage_dit_comfy:
        from bench_comfy import PACK, import_comfy

        if PACK not in sys.modules:
            import_comfy(Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")), cpu=True)


def run_child(name: str, work: Path, out: Path) -> None:
    """One stage, in this process: load (timed, VmHWM), resident bytes, the pass; the result as JSON in ``out``."""
    torch.set_num_threads(THREADS)
    print(f"{name}: torch threads {torch.get_num_threads()}", flush=True)
    stage = STAGES[name]
    result: dict = {"stage": name, "threads": torch.get_num_threads()}
    try:
        _import_for(stage)  # so that the baseline below is the process before any weight is read
        result["rss_before_load"] = proc_status()["VmRSS"]
        load_s, resident, run = stage.run(work, stage.source)
        after = proc_status()
        result.update(
            load_s=load_s,
            resident=resident,
            peak_load_rss=after["VmHWM"],
            rss_after_load=after["VmRSS"],
            anon_after_load=after.get("RssAnon"),
            file_after_load=after.get("RssFile"),
        )
        print(
            f"{name}: loaded in {load_s:.1f} s, resident {_gib(resident)} GiB, peak RSS {_gib(result['peak_load_rss'])} GiB",
            flush=True,
        )
        result["passes"] = run()
        result["status"] = "verified" if all(p["ok"] for p in result["passes"].values()) else "failed"
        if result["status"] == "failed":
            result["error"] = "a pass gave a wrong shape, non-finite values or out-of-range ids"
    except Exception as e:  # the row says what failed
        import traceback

        if "Update ComfyUI" in str(e):  # a format this ComfyUI cannot run, refused by the loader by design
            result.update(status="skipped", reason=f"refused by the loader on this ComfyUI: {e}"[:600])
            result["peak_rss"] = proc_status()["VmHWM"]
            out.write_text(json.dumps(result, indent=1))
            return

        traceback.print_exc()
        result.update(status="failed", error=f"{type(e).__name__}: {e}"[:600])
    result["peak_rss"] = proc_status()["VmHWM"]
    out.write_text(json.dumps(result, indent=1))


def stage_ratios(work: Path, full: bool) -> dict:
    """Ours ÷ the reference at real width and reduced depth (``RATIO_DEPTH`` of the AR's text decoder layers and of
    the DiT's blocks; the VAE whole), side by side in this process with the same weights: the AR decode step (ours ÷
    transformers' ``generate``, per token), the DiT forward at 512x512 batch 1 (ours ÷ diffusers), the VAE decode at
    512x512 (ours ÷ diffusers). Tiny configs on a dry run."""
    import bench_ar
    import bench_dit
    from common import PROMPT, Setup, build_ar_model, published_config

    from glm_image_core import ar
    from glm_image_core.loading import load_ar_processor

    class Reduced(Setup):
        def config(self, component):
            config = dict(published_config(component) if full else super().config(component))
            if component == "vision_language_encoder":
                config["text_config"] = {
                    **config["text_config"],
                    "num_hidden_layers": min(RATIO_DEPTH, config["text_config"]["num_hidden_layers"]),
                }
                config["vision_config"] = {
                    **config["vision_config"],
                    "depth": min(RATIO_DEPTH, config["vision_config"]["depth"]),
                }
            if component == "transformer":
                config["num_layers"] = min(RATIO_DEPTH, config["num_layers"])
            return config

    setup = Reduced(
        tiny=not full, device=torch.device("cpu"), dtype=torch.bfloat16, folder=work / "tiny" / FOLDER, repeats=1
    )
    rows = {}
    model = build_ar_model(setup)
    processor = load_ar_processor(work / FOLDER)
    inputs = ar.build_ar_inputs(processor, PROMPT, SIZE, SIZE)
    ours = bench_ar.measure_ours(model, inputs, setup)
    reference = bench_ar.measure_reference(model, inputs, setup, new_tokens=DECODE_TOKENS)
    rows["AR decode step (ours ÷ transformers generate, per token)"] = (
        ours["ms_per_token"] / 1000,
        reference["ms_per_token"] / 1000,
    )
    del model
    for row in bench_dit.run_dit(setup, SIZE):
        if "batch 1" in row.name:
            rows["DiT forward 512x512, batch 1 (ours ÷ diffusers)"] = (row.ours, row.reference)
    row = bench_dit.run_vae(setup, SIZE)
    rows["VAE decode 512x512 (ours ÷ diffusers)"] = (row.ours, row.reference)
    return {
        name: {"ours_s": o, "reference_s": r, "ratio": None if not (o and r) else o / r}
        for name, (o, r) in rows.items()
    }


RATIO_DEPTH = 4


# --- the plan ----------------------------------------------------------------------------------------------------


class Stage:
    """One row: how the child loads and runs it, the derived files it needs, what the memory table computes for its
    weights (``computed(components, extra_rows)``), the staging its loader is designed to need beyond its weights
    (for the skip rule), and the card recipes (README memory table) it belongs to."""

    def __init__(self, label, run, source, computed, staging=0.0, needs=None, recipes=()):
        self.label, self.run, self.source, self.computed = label, run, source, computed
        self.staging, self.needs, self.recipes = staging * GiB, needs, recipes


def _ar(decoder: str):
    return lambda c, extra_rows: c[decoder] + c["AR vision encoder + VQ"] + extra_rows


def _ar_sdnq(_components, extra_rows: int) -> int:
    """The memory table's count for the AR of this folder's SDNQ layer dtypes (its ViT blocks quantised too)."""
    import memory_table

    from glm_image_core import memory

    model = memory_table.ar_meta_model(memory_table.SDNQ, sdnq_dtype_of)
    return memory.ar_decode_bytes(model) + memory.module_bytes(*memory.ar_vision_modules(model)) + extra_rows


def _dit_sdnq(_components, _extra_rows: int) -> int:
    import memory_table

    from glm_image_core import memory

    return memory.module_bytes(memory_table.dit_meta_model(memory_table.SDNQ, sdnq_dtype_of)[0])


AR_BF16, AR_INT8, AR_W4 = (
    "AR decoder, bf16 (code rows of the embedding)",
    "AR decoder, int8 projections",
    "AR decoder, 4-bit projections (W4A16, group size 128)",
)
STAGES = {
    "glyph": Stage(
        "glyph encoder (bf16)",
        stage_glyph,
        "",
        lambda c, _: c["glyph encoder bf16"],
        1,
        None,
        ("8 GB", "12 GB", "16 GB", "24 GB"),
    ),
    "vae": Stage("VAE (bf16)", stage_vae, "", lambda c, _: c["VAE bf16"], 2, None, ("8 GB", "12 GB", "16 GB", "24 GB")),
    "ar_int8_read": Stage(
        "AR int8, quantised while the bf16 shards are read",
        stage_ar,
        "int8_read",
        _ar(AR_INT8),
        2.0,
        None,
        ("12 GB", "16 GB"),
    ),
    "ar_int8_file": Stage(
        "AR int8, from the exported file", stage_ar, "int8_file", _ar(AR_INT8), 1.5, "ar_int8", ("12 GB", "16 GB")
    ),
    "dit_fp8": Stage(
        "DiT fp8 (comfy_quant file, ComfyUI loader)",
        stage_dit_comfy,
        "fp8",
        lambda c, _: c["DiT fp8"],
        1.5,
        "dit_fp8",
        ("12 GB",),
    ),
    "dit_scaled_fp8": Stage(
        "DiT scaled fp8 (ComfyUI loader)",
        stage_dit_comfy,
        "scaled_fp8",
        lambda c, _: c["DiT fp8"],
        1.5,
        "dit_scaled_fp8",
        ("12 GB",),
    ),
    "ar_4bit": Stage("AR 4-bit (AutoRound folder)", stage_ar, "4bit", _ar(AR_W4), 2.0, "w4", ("8 GB",)),
    "dit_4bit": Stage(
        "DiT 4-bit (AutoRound folder, ComfyUI loader)",
        stage_dit_comfy,
        "4bit",
        lambda c, _: c["DiT 4-bit transformer blocks (W4A16, group size 128)"],
        1.5,
        "w4",
        ("8 GB",),
    ),
    "ar_sdnq": Stage("AR SDNQ (4- and 5-bit layers)", stage_ar, "sdnq", _ar_sdnq, 2.0, "sdnq", ("8 GB (SDNQ)",)),
    "dit_sdnq": Stage(
        "DiT SDNQ (4- and 5-bit layers, ComfyUI loader)",
        stage_dit_comfy,
        "sdnq",
        _dit_sdnq,
        1.5,
        "sdnq",
        ("8 GB (SDNQ)",),
    ),
    "dit_bf16": Stage(
        "DiT bf16 (core loader)", stage_dit_core, "", lambda c, _: c["DiT bf16"], 1.5, None, ("16 GB", "24 GB")
    ),
    "ar_bf16": Stage("AR bf16 (transformers from_pretrained)", stage_ar, "bf16", _ar(AR_BF16), 1.5, None, ("24 GB",)),
}
QUICK = ("glyph", "vae")


def derived_commands(work: Path, full: bool = True) -> dict[str, tuple[Path, list[str]]]:
    """Each derived set: (its path, the command that writes it)."""
    python = [sys.executable]
    folder = str(work / FOLDER)
    export_dit = [*python, "-m", "glm_image_core", "export-dit", "--model", folder, "--quant"]
    return {
        "ar_int8": (
            work / AR_INT8_FILE,
            [*python, "-m", "glm_image_core", "export-ar-int8", "--model", folder, "-o", str(work / AR_INT8_FILE)],
        ),
        **{
            f"dit_{kind}": (work / DIT_FILES[kind], [*export_dit, quant, "-o", str(work / DIT_FILES[kind])])
            for kind, quant in (("fp8", "float8_e4m3fn"), ("scaled_fp8", "scaled_fp8"))
        },
        "w4": (
            work / W4_FOLDER,
            [*python, __file__, "--write-w4", "--workdir", str(work), *([] if full else ["--tiny"])],
        ),
        "sdnq": (
            work / SDNQ_FOLDER,
            [*python, __file__, "--write-sdnq", "--workdir", str(work), *([] if full else ["--tiny"])],
        ),
    }


def derived_estimate(name: str, components: dict, extra_rows: int) -> int:
    """Disk bytes a derived set needs (from the memory table's computed weights)."""
    return {
        "ar_int8": _ar(AR_INT8)(components, extra_rows),
        "dit_fp8": components["DiT fp8"],
        "dit_scaled_fp8": components["DiT fp8"],
        "w4": _ar(AR_W4)(components, extra_rows) + components["DiT 4-bit transformer blocks (W4A16, group size 128)"],
        "sdnq": _ar_sdnq(components, extra_rows) + _dit_sdnq(components, extra_rows),
    }[name]


def guarded_stages(names: list[str], work: Path, full: bool, expected: int, log_dir: Path, timeout: float) -> list:
    """Run stages ``names`` (or "ratios") in one child process under the watchdog, after the MemAvailable check:
    one stage per process at full size; a dry run batches them (tiny models: the imports are the cost)."""
    available = mem_available()
    rows = [{"stage": name, "expected_peak": expected, "available_before": available} for name in names]
    if available - expected < FREE_FLOOR:
        reason = (
            f"expected peak {_gib(expected)} GiB (computed weights + staging) with {_gib(available)} GiB available "
            f"would leave under {_gib(FREE_FLOOR)} GiB free"
        )
        for row in rows:
            row.update(status="skipped", reason=reason)
            print(f"{row['stage']}: skipped: {reason}", flush=True)
        return rows
    label = "+".join(names)
    for name in names:
        (log_dir / f"{name}.json").unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", ",".join(names), "--workdir", str(work), "--out", str(log_dir)]
    if not full:
        command.append("--tiny")
    guard = run_guarded(command, available - FREE_FLOOR, timeout, log_dir / f"{label}.log")
    for row in rows:
        out = log_dir / f"{row['stage']}.json"
        row.update(watchdog_max_rss=guard["max_rss"], watchdog_max_anon=guard["max_anon"], wall_s=guard["seconds"])
        if out.is_file():
            row.update(json.loads(out.read_text()))
        elif guard["killed"]:
            row.update(status="skipped" if "limit" in guard["killed"] else "failed", reason=guard["killed"])
        else:
            tail = (log_dir / f"{label}.log").read_text()[-600:]
            row.update(status="failed", error=f"the child exited with {guard['rc']} and no result: {tail}")
        print(f"{row['stage']}: {row.get('status')} {row.get('error') or row.get('reason') or ''}", flush=True)
    return rows


def make_derived(name: str, work: Path, full: bool, needed: int, log_dir: Path, timeout: float) -> dict:
    """Write one derived set with its command under the watchdog, after checking the disk (the space needed is
    printed first)."""
    path, command = derived_commands(work, full)[name]
    free = free_disk(work)
    print(f"derived {name}: needs ~{_gib(needed)} GiB of disk, {_gib(free)} GiB free", flush=True)
    row = {"derived": name, "needed_disk": needed, "free_disk": free}
    if path.exists():
        row.update(status="present", bytes=folder_bytes(path))
        return row
    if free - needed < 2 * GiB:
        row.update(status="skipped", reason=f"needs ~{_gib(needed)} GiB of disk, {_gib(free)} GiB free")
        return row
    available = mem_available()
    guard = run_guarded(command, available - FREE_FLOOR, timeout, log_dir / f"derive_{name}.log")
    row.update(
        seconds=guard["seconds"], max_rss=guard["max_rss"], max_anon=guard["max_anon"], available_before=available
    )
    if guard["rc"] == 0 and path.exists():
        row.update(status="written", bytes=folder_bytes(path))
    else:
        tail = (log_dir / f"derive_{name}.log").read_text()[-600:]
        row.update(status="failed", error=guard["killed"] or f"exit {guard['rc']}: {tail}")
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
    print(
        f"derived {name}: {row['status']} {_gib(row.get('bytes'))} GiB, max RSS {_gib(row.get('max_rss'))} GiB",
        flush=True,
    )
    return row


def remove_derived(name: str, work: Path) -> None:
    path, _ = derived_commands(work)[name]
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def folder_estimate(cfg: dict[str, dict]) -> int:
    """Bytes of the weights the folder holds, from the configs' shapes."""
    sizes = {
        "vision_language_encoder": (ar_meta, 2),
        "transformer": (dit_meta, 2),
        "text_encoder": (glyph_meta, 4),
        "vae": (vae_meta, 2),
    }
    total = 0
    for name, (build, width) in sizes.items():
        model = build(cfg[name])
        total += sum(t.numel() for t in model.state_dict().values()) * width
    return total


def run(work: Path, full: bool, stage_names: list[str], shard_bytes: int, timeout: float) -> dict:
    from common import versions

    from glm_image_core.tiny import write_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    log_dir = work / "logs"
    log_dir.mkdir(exist_ok=True)
    tiny = work / "tiny" / FOLDER
    if not (tiny / "model_index.json").is_file():
        write_tiny_model(tiny)
    cfg = configs(tiny, full)
    components: dict = {}
    if full:
        import memory_table

        components = memory_table.stage_table()["components"]
    text = cfg["vision_language_encoder"]["text_config"]
    extra_rows = (text["vocab_size"] - 16384) * text["hidden_size"] * 2
    result: dict = {
        "machine": {
            "cpus": os.cpu_count(),
            "mem_total": _meminfo("MemTotal"),
            "threads": THREADS,
            "versions": versions(),
        },
        "full_size": full,
        "components_computed": components,
    }
    needed = folder_estimate(cfg)
    present = folder_bytes(work / FOLDER) if (work / FOLDER).is_dir() else 0
    largest = (
        max((derived_estimate(n, components, extra_rows) for n in ("ar_int8", "dit_fp8", "w4", "sdnq")), default=0)
        if full
        else 0
    )
    print(
        f"disk: the folder needs {_gib(needed)} GiB ({_gib(present)} GiB written), the largest derived set "
        f"~{_gib(largest)} GiB; {_gib(free_disk(work))} GiB free",
        flush=True,
    )
    if free_disk(work) + present < needed + 2 * GiB:
        raise SystemExit(f"not enough disk for the folder: {_gib(needed)} GiB needed, {_gib(free_disk(work))} GiB free")
    seconds, folder = _timed(lambda: write_folder(work, tiny, full, shard_bytes))
    result["folder"] = {"path": str(folder), "bytes": folder_bytes(folder), "seconds_this_run": seconds}
    groups: list[list[str]] = []  # stages run in one process: one each at full size, by derived set on a dry run
    for name in (n for n in stage_names if n != "ratios"):
        if groups and not full and STAGES[groups[-1][0]].needs == STAGES[name].needs:
            groups[-1].append(name)
        else:
            groups.append([name])
    rows, derived, current = [], [], None
    for group in groups:
        needs = STAGES[group[0]].needs
        if needs != current and current is not None:
            remove_derived(current, work)
            current = None
        if needs and current is None:
            estimate = derived_estimate(needs, components, extra_rows) if full else 0
            made = make_derived(needs, work, full, estimate, log_dir, timeout)
            derived.append(made)
            current = needs
            if made["status"] in ("skipped", "failed"):
                why = f"{needs} could not be written: {made.get('error') or made.get('reason')}"
                rows += [{"stage": name, "status": "skipped", "reason": why} for name in group]
                continue
        computed = {name: STAGES[name].computed(components, extra_rows) if full else None for name in group}
        expected = sum((computed[name] or 0) + int(STAGES[name].staging if full else 0) for name in group)
        for row in guarded_stages(group, work, full, expected, log_dir, timeout):
            stage = STAGES[row["stage"]]
            row.update(label=stage.label, computed=computed[row["stage"]], recipes=list(stage.recipes))
            rows.append(row)
    if current is not None:
        remove_derived(current, work)
    result.update(stages=rows, derived=derived)
    if "ratios" in stage_names:
        result["ratios"] = guarded_stages(["ratios"], work, full, 6 * GiB if full else 0, log_dir, timeout)[0]
    result["system_ram"] = system_ram(rows)
    return result


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    return 0


def system_ram(rows: list[dict]) -> dict:
    """Per card recipe: each of its stages that loaded, with its peak RSS while loading and overall, its resident
    weights and its staging overhead (peak RSS while loading - resident weights - the process before loading; None
    where the weights were mapped lazily, so that loading ended below them and the pass paged them in)."""
    table: dict = {}
    for row in rows:
        if not row.get("load_s"):
            continue
        baseline = row.get("rss_before_load") or 0
        mapped = row["peak_load_rss"] < row["resident"]
        entry = {
            "stage": row["stage"],
            "status": row.get("status"),
            "peak_load_rss": row["peak_load_rss"],
            "peak_rss": row["peak_rss"],
            "resident": row["resident"],
            "rss_before_load": baseline,
            "staging": None if mapped else row["peak_load_rss"] - row["resident"] - baseline,
            "max_anon": row.get("watchdog_max_anon"),
        }
        for recipe in row.get("recipes", ()):
            table.setdefault(recipe, []).append(entry)
    return table


def system_ram_markdown(result: dict) -> str:
    """Each stage that loaded: peak RSS while loading and while running, resident weights, staging overhead, and the
    card recipes it belongs to; then each recipe's largest peak."""
    lines = [
        "| Stage | Recipes | Peak RSS, load (GiB) | Peak RSS, load + pass (GiB) | Resident weights (GiB) | "
        "Staging overhead (GiB) | Peak anonymous RSS (GiB) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {row["stage"]: row.get("label", row["stage"]) for row in result["stages"]}
    entries: dict = {}
    for recipe, stages in result["system_ram"].items():
        for entry in stages:
            entries.setdefault(entry["stage"], (entry, []))[1].append(recipe)
    for name, (entry, recipes) in entries.items():
        staging = "mapped lazily" if entry["staging"] is None else _gib(entry["staging"])
        lines.append(
            f"| {labels[name]} | {', '.join(recipes)} | {_gib(entry['peak_load_rss'])} | {_gib(entry['peak_rss'])} | "
            f"{_gib(entry['resident'])} | {staging} | {_gib(entry.get('max_anon'))} |"
        )
    lines += ["", "| Card recipe | Largest peak RSS (GiB) | In stage | Not measured |", "| --- | ---: | --- | --- |"]
    for recipe in ("8 GB", "8 GB (SDNQ)", "12 GB", "16 GB", "24 GB"):
        measured = result["system_ram"].get(recipe, [])
        missing = [
            f"{labels[row['stage']]} ({row.get('status')})"
            for row in result["stages"]
            if recipe in row.get("recipes", ()) and not row.get("load_s")
        ]
        top = max(measured, key=lambda e: e["peak_rss"]) if measured else None
        lines.append(
            f"| {recipe} | {_gib(top['peak_rss']) if top else '-'} | {labels[top['stage']] if top else '-'} | "
            f"{'; '.join(missing) or '-'} |"
        )
    return "\n".join(lines)


def markdown(result: dict) -> str:
    lines = [
        f"CPU, {result['machine']['cpus']} cores, {_gib(result['machine']['mem_total'])} GiB RAM, torch threads "
        f"{result['machine']['threads']}; {result['machine']['versions']}",
        "",
        "| Stage | Load s | Peak RSS while loading GiB | Peak RSS GiB | Resident GiB | Computed GiB | Pass | Pass s | Status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for row in result["stages"]:
        passes = row.get("passes") or {"-": {}}
        for i, (name, p) in enumerate(passes.items()):
            first = i == 0
            status = row.get("status", "") + (
                f": {row.get('error') or row.get('reason')}" if row.get("status") != "verified" else ""
            )
            load = f"{row['load_s']:.1f}" if first and row.get("load_s") else ""
            seconds = f"{p['seconds']:.2f}" if p.get("seconds") is not None else "-"
            cells = [row.get("label", row["stage"]), load, _gib(row.get("peak_load_rss")), _gib(row.get("peak_rss"))]
            cells += [_gib(row.get("resident")), _gib(row.get("computed"))]
            cells = cells if first else ["", "", "", "", "", ""]
            lines.append(f"| {' | '.join(cells)} | {name} | {seconds} | {status if first else ''} |")
    lines += ["", system_ram_markdown(result)]
    ratios = (result.get("ratios") or {}).get("ratios")
    if ratios:
        lines += [
            "",
            "| Ratio (CPU, real width, 4 layers) | Ours s | Reference s | Ours ÷ ref. |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, r in ratios.items():
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            lines.append(f"| {name} | {r['ours_s']:.3f} | {r['reference_s']:.3f} | {ratio} |")
    return "\n".join(lines) + "\n"


def merged(earlier: dict, later: dict) -> dict:
    """``later``'s results over ``earlier``'s: stage rows replaced by name, derived sets added, ratios replaced."""
    rows = {row["stage"]: row for row in earlier.get("stages", [])}
    rows.update({row["stage"]: row for row in later["stages"]})
    order = [name for name in STAGES if name in rows]
    out = {**earlier, **{k: v for k, v in later.items() if k not in ("stages", "derived", "ratios")}}
    out["stages"] = [rows[name] for name in order]
    out["derived"] = earlier.get("derived", []) + later.get("derived", [])
    out["ratios"] = later.get("ratios") or earlier.get("ratios")
    out["system_ram"] = system_ram(out["stages"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the folder and the derived files are written")
    parser.add_argument("--quick", action="store_true", help=f"only the quick stages ({', '.join(QUICK)})")
    parser.add_argument("--dry-run", action="store_true", help="everything on the tiny model in a temporary folder")
    parser.add_argument("--stages", nargs="+", choices=[*STAGES, "ratios"], help="these stages only (in this order)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a stage may run before it is killed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-w4", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-sdnq", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    if args.child:
        names = args.child.split(",")
        if args.out.suffix == ".json":  # one stage, its result file named
            args.out = args.out.parent
        for name in names:
            if name == "ratios":
                print(f"ratios: torch threads {torch.get_num_threads()}", flush=True)
                ratios = stage_ratios(args.workdir, full=not args.tiny)
                result = {"status": "verified", "threads": torch.get_num_threads(), "ratios": ratios}
                (args.out / "ratios.json").write_text(json.dumps(result))
            else:
                run_child(name, args.workdir, args.out / f"{name}.json")
        return 0
    if args.write_w4:
        write_w4_folder(args.workdir, args.workdir / FOLDER, SHARD_BYTES if not args.tiny else 2**20)
        return 0
    if args.write_sdnq:
        write_sdnq_folder(args.workdir, args.workdir / FOLDER, SHARD_BYTES if not args.tiny else 2**20)
        return 0
    print(f"torch threads: {torch.get_num_threads()}", flush=True)
    names = args.stages or (list(QUICK) if args.quick else [*STAGES, "ratios"])
    with tempfile.TemporaryDirectory(prefix="glm-fullsize-dry-") as scratch:
        work = Path(scratch) if args.dry_run else args.workdir
        if work is None:
            parser.error("--workdir is required (or --dry-run)")
        result = run(work, not args.dry_run, names, 2**20 if args.dry_run else SHARD_BYTES, args.timeout)
    if args.json and args.json.is_file():  # runs of some stages each: the file keeps every stage's latest row
        result = merged(json.loads(args.json.read_text()), result)
    print(markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    failed = [row["stage"] for row in result["stages"] if row.get("status") == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
