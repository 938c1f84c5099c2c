"""Computed peak device memory per stage of a 1024x1024 text-to-image and of a 1024x1024 edit with one 1024x1024
reference, for the recipes of the README's memory table. No GPU and no download: weights are counted on models
built on the meta device from the published configs (``GLM_IMAGE_CONFIGS``, see common.py), activations from the
shapes with the formulas below. Prints the markdown table (``--json`` also writes the numbers).

    python benchmarks/memory_table.py [--json memory.json]

What a stage holds on the device (ComfyUI evicts the other stages' models when they do not fit beside it):
- AR vision (edits): the ViT + VQ weights, and what encoding the reference allocates beside them
  (``glm_image_core.memory.ar_vision_working_memory``: the ViT's MLP on its 32x32 patches or the VQ's distances of
  each patch to the 16384 codes, the larger).
- AR decode: the text decoder (int8 projections or bf16), the 16384 code rows of the embedding, the lm_head, and
  what fast_ar allocates beside them (``glm_image_core.memory.ar_working_memory``: the bf16 K/V cache, the fused k/v
  projections, and the largest moment of the prefill or of a decode step; listed buffer by buffer after the table).
- glyph: the glyph encoder in bf16 and its activations for ``GLYPH_TOKENS`` of quoted text
  (``glm_image_core.memory.glyph_working_memory``; with spans encoded in length batches, at most those of one
  2048-byte span per call, ``GLYPH_WORST_CASE``, plus every span's embedding).
- DiT: the DiT's weights (fp8: every Linear weight 1 byte, the rest bf16; bf16: as published, or what fits under the
  cap with ComfyUI's partial loading) and one block's activations for cond + uncond in one batch of 2 x (4096
  image + 256 glyph tokens), plus for edits the reference K/V of all 30 layers (4096 tokens, bf16), plus with fp8
  the bf16 copy of the largest weight that ComfyUI's manual cast makes per call.
- VAE decode: VAE weights, and what the decode allocates beside them at its peak, scaled by pixels from the one
  measurement there is (``VAE_DECODE_BYTES_PER_PIXEL``): the live set of the 512-channel upsampler at 1024x1024
  (input, output and the next GroupNorm's output, 3 x 512 x 1024 x 1024 x 2 bytes = 3.0 GiB) accounts for 62% of it.
Every stage adds ``CONTEXT`` for the CUDA context and the allocator's slack (an assumption, not computed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import CONFIGS, GLYPH_ENCODER_CONFIG

from glm_image_core import memory
from glm_image_core.defaults import AR_GRID_STRIDE, NUM_VQ_CODES
from glm_image_core.formats import int8, sdnq, w4a16

GiB = 2**30
CONTEXT = int(0.75 * GiB)  # CUDA context (~0.3-0.5 GiB) + caching-allocator slack: assumed
HEIGHT = WIDTH = 1024
# Measured on an H200 (benchmarks/results/gpu_check_h200_2026-12-04_run2.json, core pipeline's VAE decode stage, bf16):
# allocated peak 5.61 GiB less the VAE's 0.76 GiB of weights, at 1024x1024.
VAE_DECODE_BYTES_PER_PIXEL = int((5.612 - 0.756) * GiB / (1024 * 1024))
PROMPT_TOKENS = 128  # a long prompt with GLM-4's tokenizer (the chat template adds ~10)
GLYPH_TOKENS = 256  # quoted text, ByT5 bytes
GLYPH_WORST_CASE = [2048] + [8] * 7  # eight spans, one of the most bytes a span keeps (2047 + end of sequence)


BF16, INT8, FP8, W4, SDNQ = "bf16", "int8", "fp8", "4-bit", "SDNQ"  # the weight formats of the recipes
W4_GROUP_SIZE = 128  # Intel/GLM-Image-int4-AutoRound's
# Disty0/GLM-Image-SDNQ-4bit-dynamic's layers are uint4 (groups of 64), int5 or float5_e3m1fn (groups of 128), with
# bf16 scales; which layer is which is in its config, not here: it is counted as all uint4 and as all 5-bit, the
# bounds of its size, and its recipe as all 5-bit.
SDNQ_BOUNDS = ("uint4", "int5")
SDNQ_QUANTISED = {  # what sdnq quantises (its skip keys for these classes): ``(prefixes, skipped)``
    "ar": (("model.language_model.layers.", "model.visual.blocks."), ()),
    "dit": (("transformer_blocks.",), ("transformer_blocks.0.norm1.linear",)),
}


@dataclass(frozen=True)
class Recipe:
    name: str
    cap_gib: float
    ar_weights: str  # BF16, INT8 or W4
    dit_weights: str  # BF16, FP8 or W4
    options: str
    all_resident: bool = False  # every model stays on the device: each stage also holds the others' weights


RECIPES = [
    Recipe("8 GB", 7, W4, W4, "Intel/GLM-Image-int4-AutoRound: AR and DiT 4-bit (W4A16); stages take turns"),
    Recipe(
        "8 GB (SDNQ)",
        7,
        SDNQ,
        SDNQ,
        "Disty0/GLM-Image-SDNQ-4bit-dynamic: AR and DiT in SDNQ's 4- and 5-bit layers (counted as all 5-bit)",
    ),
    Recipe("12 GB", 11, INT8, FP8, "AR weights int8, DiT fp8 file with per-layer scales"),
    Recipe("16 GB", 15, INT8, BF16, "AR weights int8, DiT bf16 (ComfyUI loads what fits, streams the rest)"),
    Recipe("24 GB", 22, BF16, BF16, "AR weights full (bf16), DiT bf16; stages take turns"),
    Recipe("48 GB+", 46, BF16, BF16, "everything bf16, every model resident (no reloads)", all_resident=True),
]


def read_config(name: str) -> dict:
    for path in (CONFIGS / name.replace("__", "/"), CONFIGS / name):
        if path.is_file():
            return json.loads(path.read_text())
    raise SystemExit(f"{name} not found under {CONFIGS} (set GLM_IMAGE_CONFIGS)")


def w4_layers(model, prefix: str, group_size: int = W4_GROUP_SIZE) -> None:
    """The ``nn.Linear`` s under ``prefix`` as 4-bit layers (what a W4A16 checkpoint packs), biases in bf16."""
    keys = [
        f"{name}.{tensor}"
        for name, module in model.named_modules()
        if name.startswith(prefix) and isinstance(module, torch.nn.Linear)
        for tensor in ("qweight", "bias")
        if tensor == "qweight" or module.bias is not None
    ]
    w4a16.swap_linears(model, keys, w4a16.W4A16Settings(group_size), torch.bfloat16)


def sdnq_layers(model, part: str, dtype_name: str | Callable[[str], str]) -> None:
    """The ``nn.Linear`` s that sdnq quantises in ``part`` ("ar" or "dit") as SDNQ layers of ``dtype_name`` (or of
    ``dtype_name(layer name)``), in sdnq's groups for it (2^(bits + 2) inputs, one group for fewer), scales and zero
    points in bf16, as published."""
    prefixes, skipped = SDNQ_QUANTISED[part]
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.startswith(prefixes) and name not in skipped
    ]
    for name, linear in linears:
        layer_dtype = dtype_name(name) if callable(dtype_name) else dtype_name
        groups = max(1, linear.in_features // 2 ** (sdnq.code_dtype(layer_dtype).bits + 2))
        layer = sdnq.SDNQLinear(
            linear.in_features, linear.out_features, linear.bias is not None, layer_dtype, groups, dtype=torch.bfloat16
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.to("meta"))


def ar_meta_model(weights: str, sdnq_dtype: str = SDNQ_BOUNDS[1]):
    """GlmImageForConditionalGeneration at full size on the meta device, bf16, embedding trimmed to its code rows;
    INT8: the decoder projections int8; W4: 4-bit, as AutoRound quantises its text decoder's layers; SDNQ: the
    decoder's and the ViT's layers in ``sdnq_dtype``."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = read_config("vision_language_encoder__config.RECONSTRUCTED.json")
    with torch.device("meta"):
        model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(config)).to(torch.bfloat16)
        if weights == INT8:
            int8.replace_decoder_linears(model)
        elif weights == W4:
            w4_layers(model, "model.language_model.layers.")
        elif weights == SDNQ:
            sdnq_layers(model, "ar", sdnq_dtype)
        lm = model.model.language_model
        lm.embed_tokens.weight = torch.nn.Parameter(lm.embed_tokens.weight[:NUM_VQ_CODES], requires_grad=False)
    return model


def dit_meta_model(weights: str = BF16, sdnq_dtype: str = SDNQ_BOUNDS[1]):
    """The DiT on the meta device in bf16; W4: its transformer blocks' layers 4-bit, as in
    Intel/GLM-Image-int4-AutoRound (``block_name_to_quantize: transformer_blocks``); SDNQ: its blocks' layers but the
    first block's adaLN in ``sdnq_dtype``."""
    from glm_image_core.dit import GlmImageTransformer2DModel
    from glm_image_core.loading import constructor_kwargs

    config = read_config("transformer__config.json")
    kwargs = {k: v for k, v in constructor_kwargs(GlmImageTransformer2DModel, config).items()}
    model = GlmImageTransformer2DModel(**kwargs, dtype=torch.bfloat16, device="meta")
    if weights == W4:
        w4_layers(model, "transformer_blocks.")
    elif weights == SDNQ:
        sdnq_layers(model, "dit", sdnq_dtype)
    return model, config


def vae_meta_model():
    from glm_image_core.loading import constructor_kwargs
    from glm_image_core.vae import AutoencoderKL

    config = read_config("vae__config.json")
    return AutoencoderKL(**constructor_kwargs(AutoencoderKL, config), dtype=torch.bfloat16, device="meta")


def glyph_bytes() -> tuple[int, int, int]:
    """(weights, activations for GLYPH_TOKENS, activations for GLYPH_WORST_CASE) in bf16, bytes."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config.from_dict(GLYPH_ENCODER_CONFIG)
    with torch.device("meta"):
        model = T5EncoderModel(config).to(torch.bfloat16)
    typical = memory.glyph_working_memory(config, [GLYPH_TOKENS], dtype_bytes=2)
    worst = memory.glyph_working_memory(config, GLYPH_WORST_CASE, dtype_bytes=2)
    return memory.module_bytes(model), typical, worst


def dit_fp8_bytes(dit) -> int:
    """Linear weights in 1 byte, everything else in bf16 (ComfyUI's fp8_e4m3fn weight dtype for this model)."""
    linear = [m.weight for m in dit.modules() if isinstance(m, torch.nn.Linear)]
    return memory.module_bytes(dit) - memory.tensor_bytes(linear) // 2


def stage_table() -> dict:
    """{recipe: {"t2i"|"edit": {stage: {"weights": B, "activations": B, "peak": B}}}} and the components' bytes."""
    dit, dit_config = dit_meta_model()
    heads, head_dim = dit_config["num_attention_heads"], dit_config["attention_head_dim"]
    dim, layers = heads * head_dim, dit_config["num_layers"]
    largest_linear = max(m.weight.numel() for m in dit.modules() if isinstance(m, torch.nn.Linear))
    ff = 4 * dim  # the blocks' FeedForward width (glm_image_core.dit)
    image_tokens = (HEIGHT // 16) * (WIDTH // 16)
    tokens = 2 * (image_tokens + GLYPH_TOKENS)  # cond + uncond in one batch
    dit_block = tokens * (6 * dim + 2 * ff) * 2  # residual, norm, q, k, v, attention out; the MLP's two widths
    reference_kv = layers * 2 * image_tokens * dim * 2
    vae = vae_meta_model()
    vae_activations = VAE_DECODE_BYTES_PER_PIXEL * HEIGHT * WIDTH
    glyph, glyph_activations, glyph_worst = glyph_bytes()

    dit_w4, _ = dit_meta_model(W4)
    dit_sdnq = {dtype: memory.module_bytes(dit_meta_model(SDNQ, dtype)[0]) for dtype in SDNQ_BOUNDS}
    dit_bytes = {BF16: memory.module_bytes(dit), FP8: dit_fp8_bytes(dit), W4: memory.module_bytes(dit_w4)}
    dit_bytes[SDNQ] = dit_sdnq[SDNQ_BOUNDS[1]]
    ar_models = {weights: ar_meta_model(weights) for weights in (BF16, INT8, W4, SDNQ)}
    ar_sdnq = {dtype: memory.ar_decode_bytes(ar_meta_model(SDNQ, dtype)) for dtype in SDNQ_BOUNDS}
    ar_full = ar_models[BF16]
    vision = memory.module_bytes(*memory.ar_vision_modules(ar_full))
    vit = ar_full.config.vision_config
    patches = (HEIGHT // AR_GRID_STRIDE) * (WIDTH // AR_GRID_STRIDE)  # the processor's grid: one patch per 32 px
    vision_activations = memory.ar_vision_working_memory(vit, ar_full.config.vq_config, [patches], dtype_bytes=2)
    grid = (HEIGHT // 32) * (WIDTH // 32)
    components = {
        "AR decoder, bf16 (code rows of the embedding)": memory.ar_decode_bytes(ar_full),
        "AR decoder, int8 projections": memory.ar_decode_bytes(ar_models[INT8]),
        "AR decoder, 4-bit projections (W4A16, group size 128)": memory.ar_decode_bytes(ar_models[W4]),
        "AR decoder, SDNQ projections, all uint4 (groups of 64)": ar_sdnq["uint4"],
        "AR decoder, SDNQ projections, all 5-bit (groups of 128)": ar_sdnq["int5"],
        "AR vision encoder + VQ": vision,
        "DiT bf16": dit_bytes[BF16],
        "DiT fp8": dit_bytes[FP8],
        "DiT 4-bit transformer blocks (W4A16, group size 128)": dit_bytes[W4],
        "DiT SDNQ transformer blocks, all uint4 (groups of 64)": dit_sdnq["uint4"],
        "DiT SDNQ transformer blocks, all 5-bit (groups of 128)": dit_sdnq["int5"],
        "glyph encoder bf16": glyph,
        f"glyph encoder activations, {GLYPH_TOKENS} bytes of quoted text": glyph_activations,
        "glyph encoder activations, eight spans, one of 2048 bytes": glyph_worst,
        "AR vision activations, one 1024x1024 reference": vision_activations,
        "VAE bf16": memory.module_bytes(vae),
    }

    table = {}
    for recipe in RECIPES:
        cap = int(recipe.cap_gib * GiB)
        ar_model = ar_models[recipe.ar_weights]
        ar_weights = memory.ar_decode_bytes(ar_model)
        per_task = {}
        for task, prompt, new, refs in (("t2i", PROMPT_TOKENS, 256 + grid, 0), ("edit", PROMPT_TOKENS + grid, grid, 1)):
            working = memory.ar_model_working_bytes(ar_model, 1, prompt, new)
            # fp8 (ComfyUI's manual cast), 4-bit and SDNQ (dequantised per call) make a bf16 copy of a weight at a time
            dit_copy = largest_linear * 2 if recipe.dit_weights in (FP8, W4, SDNQ) else 0
            dit_activations = dit_block + refs * reference_kv + dit_copy
            dit_weights = dit_bytes[recipe.dit_weights]
            partial = dit_weights + dit_activations + CONTEXT > cap
            if partial:  # ComfyUI's partial load: what fits beside the activations, the rest streamed per call
                dit_weights = cap - dit_activations - CONTEXT
            stages = {
                "AR decode": (ar_weights, working),
                "glyph": (glyph, glyph_activations),
                "DiT": (dit_weights, dit_activations),
                "VAE decode": (memory.module_bytes(vae), vae_activations),
            }
            if refs:
                stages = {"AR vision": (vision, vision_activations), **stages}
            all_weights = sum(w for w, _ in stages.values())
            per_task[task] = {
                name: {
                    "weights": all_weights if recipe.all_resident else w,
                    "activations": a,
                    "peak": (all_weights if recipe.all_resident else w) + a + CONTEXT,
                    "partial": name == "DiT" and partial,
                }
                for name, (w, a) in stages.items()
            }
        table[recipe.name] = per_task
    return {"components": components, "stages": table, "ar_working": ar_working_table(ar_full.config.text_config)}


def ar_working_table(text_config) -> dict:
    """{"batch N": ar_working_memory's buffers for a 1024x1024 text-to-image in bf16 (bytes)}: the persistent ones,
    each moment's sum (the largest is the peak) and the total."""
    grid = (HEIGHT // 32) * (WIDTH // 32)
    table = {}
    for batch in (1, 4):
        working = memory.ar_working_memory(text_config, batch, PROMPT_TOKENS, 256 + grid, dtype_bytes=2)
        moments = {f"moment: {name}": sum(buffers.values()) for name, buffers in working.moments.items()}
        table[f"batch {batch}"] = {**working.persistent, **moments, "total": working.total}
    return table


def markdown(result: dict) -> str:
    def gib(b):
        return f"{b / GiB:.1f}"

    lines = [
        f"Computed (not measured) from the published configs' shapes, {WIDTH}x{HEIGHT}, bf16 activations, "
        f"+{gib(CONTEXT)} GiB assumed per stage for the CUDA context and allocator slack. Each cell: the stage's "
        "peak in GiB (the weights resident during it, w).",
        "",
        "| Card | Cap | Options | Task | AR vision | AR decode | Glyph | DiT | VAE decode | Largest |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for recipe in RECIPES:
        for task, stages in result["stages"][recipe.name].items():
            cells = []
            for name in ("AR vision", "AR decode", "glyph", "DiT", "VAE decode"):
                s = stages.get(name)
                if s is None:
                    cells.append("-")
                    continue
                note = " (partial load)" if s["partial"] else ""
                cells.append(f"{gib(s['peak'])} ({gib(s['weights'])} w){note}")
            largest = max(s["peak"] for s in stages.values())
            task_name = "text-to-image" if task == "t2i" else "edit, 1 reference"
            lines.append(
                f"| {recipe.name} | {recipe.cap_gib:g} GiB | {recipe.options} | {task_name} | {' | '.join(cells)} | "
                f"{gib(largest)} GiB |"
            )
    lines += ["", "| Component | GiB |", "| --- | --- |"]
    lines += [f"| {name} | {gib(b)} |" for name, b in result["components"].items()]
    columns = result["ar_working"]
    lines += [
        "",
        f"AR decode working memory, {WIDTH}x{HEIGHT} text-to-image, bf16, {PROMPT_TOKENS}-token prompt (MiB; the "
        "peak is the persistent buffers plus the largest moment):",
        "",
        f"| Buffer | {' | '.join(columns)} |",
        f"| --- |{' ---: |' * len(columns)}",
    ]
    for name in next(iter(columns.values())):
        lines.append(f"| {name} | {' | '.join(f'{column[name] / 2**20:.1f}' for column in columns.values())} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers (bytes) here")
    args = parser.parse_args(argv)
    result = stage_table()
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
