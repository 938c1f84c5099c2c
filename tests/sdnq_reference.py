"""Quantise a tiny GLM-Image folder with the `sdnq` library itself: the SDNQ reference files.

    python tests/sdnq_reference.py <tiny GLM-Image root> <output folder>

Writes two folders under the output folder:

- GLM-Image-SDNQ-4bit-dynamic: a copy of the root whose transformer/ and vision_language_encoder/ are what sdnq
  writes for them (``save_sdnq_model``: config.json with its quantization_config, quantization_config.json beside it,
  the weights: one file for the DiT, shards and their index for the AR), with the settings of
  Disty0/GLM-Image-SDNQ-4bit-dynamic's model card: dynamic per-layer dtypes from uint4 up, no SVD, and the scales in
  the model's dtype (``dequantize_fp32`` False, sdnq's default before 0.1.7). The model card lists uint4, int5 and
  float5_e3m1fn layers; on the tiny model's Gaussian weights every layer passes at uint4, so a few layers start their
  dynamic search at int5 or float5_e3m1fn (``SEEDS``, sdnq's ``modules_dtype_dict``), and the threshold is the one
  at which float5_e3m1fn passes on them.
- GLM-Image-SDNQ-4bit-dynamic-svd/transformer: the DiT with SVD (rank 8) and float32 scales (sdnq 0.2.8's defaults).

sdnq skips layers of fewer than 16384 weights by default; the tiny model's have 1024 to 24576, so the limit is
lowered to 1024. Run in a subprocess: sdnq registers itself with transformers and compiles its kernels at import
(SDNQ_USE_TORCH_COMPILE=0 here: its eager functions).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PUBLISHED = dict(
    weights_dtype="uint4", use_dynamic_quantization=True, group_size=0, use_svd=False, dequantize_fp32=False
)
DYNAMIC_LOSS_THRESHOLD = 2e-2  # the published 1e-2 turns the seeded float5_e3m1fn layers of the tiny model into uint5
TINY = dict(minimum_allowed_numel=1024)
AR_SHARD = "8MB"  # the published AR (~6.5 GB) is over sdnq's 5 GB shards: the tiny one (~25 MB) in shards too
SEEDS = {  # layer -> the dtype its dynamic search starts at (and, the threshold being met, keeps)
    "transformer": {
        "int5": ["transformer_blocks.0.attn1.to_v.weight", "transformer_blocks.1.ff.net.2.weight"],
        "float5_e3m1fn": ["transformer_blocks.0.ff.net.0.proj.weight", "transformer_blocks.1.attn1.to_out.0.weight"],
    },
    "vision_language_encoder": {  # k int5 beside v uint4: the fast decoder's joined k/v of two dtypes
        "int5": [
            "model.language_model.layers.0.self_attn.k_proj.weight",
            "model.language_model.layers.1.mlp.down_proj.weight",
        ],
        "float5_e3m1fn": [
            "model.language_model.layers.0.mlp.gate_up_proj.weight",
            "model.visual.blocks.0.mlp.fc1.weight",
        ],
    },
}


def sdnq_config(component: str, **changes):
    """The published settings (with ``changes``) for the tiny ``component``."""
    from sdnq import SDNQConfig

    seeds = {dtype: list(names) for dtype, names in SEEDS[component].items()}
    settings = dict(PUBLISHED, dynamic_loss_threshold=DYNAMIC_LOSS_THRESHOLD, modules_dtype_dict=seeds, **TINY)
    return SDNQConfig(**{**settings, **changes})


def check_seeds(model, component: str) -> None:
    """Every seeded layer kept its seed: a layer that failed the threshold there would be listed under two dtypes,
    and sdnq's loader would read it as the first."""
    dtypes = {
        f"{name}.weight": m.sdnq_dequantizer.weights_dtype
        for name, m in model.named_modules()
        if hasattr(m, "sdnq_dequantizer")
    }
    for dtype, names in SEEDS[component].items():
        for name in names:
            assert dtypes[name] == dtype, f"{name} was quantised as {dtypes[name]}, not its seed {dtype}"


def quantise_dit(source: Path, out: Path, **changes) -> None:
    import torch
    from diffusers import GlmImageTransformer2DModel
    from sdnq.loader import save_sdnq_model

    model = GlmImageTransformer2DModel.from_pretrained(
        source, quantization_config=sdnq_config("transformer", **changes), torch_dtype=torch.bfloat16
    )
    check_seeds(model, "transformer")
    save_sdnq_model(model, str(out))


def quantise_ar(source: Path, out: Path) -> None:
    import torch
    from sdnq.loader import save_sdnq_model
    from transformers import GlmImageForConditionalGeneration

    config = sdnq_config("vision_language_encoder")
    model = GlmImageForConditionalGeneration.from_pretrained(source, quantization_config=config, dtype=torch.bfloat16)
    check_seeds(model, "vision_language_encoder")
    save_sdnq_model(model, str(out), max_shard_size=AR_SHARD)


def quantise(source: Path, out: Path) -> None:
    published = out / "GLM-Image-SDNQ-4bit-dynamic"
    shutil.copytree(source, published)
    for component in ("transformer", "vision_language_encoder"):
        shutil.rmtree(published / component)
    quantise_dit(source / "transformer", published / "transformer")
    quantise_ar(source / "vision_language_encoder", published / "vision_language_encoder")
    svd = out / "GLM-Image-SDNQ-4bit-dynamic-svd" / "transformer"
    quantise_dit(source / "transformer", svd, use_svd=True, svd_rank=8, dequantize_fp32=True)


if __name__ == "__main__":
    os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")  # before sdnq is imported
    quantise(Path(sys.argv[1]), Path(sys.argv[2]))
