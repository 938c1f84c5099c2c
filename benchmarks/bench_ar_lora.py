"""What an AR LoRA costs a decode step: the fast decoder's ms/token with and without an adapter (rank 16 on every
projection of the text decoder), in the same run, on the CPU.

    python benchmarks/bench_ar_lora.py [--layers 2] [--rank 16] [--tokens 24] [--tiny]

The model has the published AR's widths (hidden 4096, MLP 13696, 32 heads, 2 K/V heads) with ``--layers`` of its 40
decoder layers (a decode step reads the lm_head's 16384 code rows beside them): what a decode step costs per layer is
what the ratio needs, and the full depth would not fit this machine's time. Random weights, float32 on
the CPU, one generator per run; a CPU ratio, not a GPU timing (a GPU decode step is bound by reading the weights
too, and the adapter adds rank x (in + out) numbers to each projection's in x out). ``--tiny``: the tiny model (CI).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from common import PROMPT, Setup, randomize_

from glm_image_core import ar, lora
from glm_image_core.defaults import AR_DECODER_LAYERS_PREFIX, AR_DECODER_PROJECTIONS
from glm_image_core.loading import load_ar_processor


def build_model(setup: Setup, layers: int):
    """GlmImageForConditionalGeneration at the published widths with ``layers`` decoder layers (tiny: as is)."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = setup.config("vision_language_encoder")
    if not setup.tiny:
        text = config["text_config"]
        text.update(num_hidden_layers=layers)
        vision = config["vision_config"]
        vision.update(depth=1)  # not run by a decode step
    model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(config)).float().eval()
    return randomize_(model)


def random_adapter(model, rank: int) -> list[lora.Lora]:
    """An adapter of ``rank`` on every projection of the decoder, random (its cost does not depend on the values)."""
    g = torch.Generator().manual_seed(1)
    layers = {}
    for i in range(len(model.model.language_model.layers)):
        for projection in AR_DECODER_PROJECTIONS:
            name = f"{AR_DECODER_LAYERS_PREFIX}{i}.{projection}"
            module = model.get_submodule(name)
            down = torch.randn(rank, module.in_features, generator=g) * 0.01
            up = torch.randn(module.out_features, rank, generator=g) * 0.01
            layers[name] = lora.LayerLora(down, up, 1.0)
    return [lora.Lora(layers, 1.0, "random")]


def ms_per_token(model, inputs, loras, tokens: int) -> float:
    """The fast decoder's steady rate: from its first reported token to the ``tokens``-th."""
    marks = []

    def on_token(step, total, ids):
        marks.append((step, time.perf_counter()))
        if step >= tokens:
            raise StopIteration

    try:
        ar.generate_prior_tokens(
            model,
            inputs,
            [torch.Generator().manual_seed(0)],
            fast=True,
            callback=on_token,
            callback_every=1,
            loras=loras,
        )
    except StopIteration:
        pass
    (first, t0), (last, t1) = marks[1], marks[-1]  # the first step after the prefill starts the clock
    return (t1 - t0) * 1000 / (last - first)


def run(setup: Setup, layers: int, rank: int, tokens: int) -> dict:
    model = build_model(setup, layers)
    inputs = ar.build_ar_inputs(load_ar_processor(setup.folder), PROMPT, 512, 512)
    adapter = random_adapter(model, rank)
    with torch.inference_mode():
        ms_per_token(model, inputs, adapter, 4)  # warm-up: allocations, the first kernels
        plain, adapted = [], []
        for _ in range(3):  # interleaved, so a busy moment of the machine hits both
            plain.append(ms_per_token(model, inputs, [], tokens))
            adapted.append(ms_per_token(model, inputs, adapter, tokens))
    text = model.config.text_config
    return {
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "rank": rank,
        "threads": torch.get_num_threads(),
        "ms_per_token": min(plain),
        "ms_per_token_with_lora": min(adapted),
        "ratio": min(adapted) / min(plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CI smoke run)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    setup = Setup.create(tiny=True)  # the CPU, and the tiny folder's processor
    if not args.tiny:
        setup.tiny = False  # published widths, on the CPU all the same, with every core
        torch.set_num_threads(os.cpu_count() or 1)
    result = run(setup, args.layers, args.rank, args.tokens)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
