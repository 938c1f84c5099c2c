"""End to end: our core pipeline (glm_image_core.pipeline.generate), text-to-image 1024x1024, 50 steps, CFG 1.5.

    python benchmarks/bench_pipeline.py [--tiny] [--reference-e2e]        # all models resident on the GPU
    python benchmarks/bench_pipeline.py --staged --cap-gib 22 [--tiny]    # models on the CPU, one stage at a time

Resident: every model on the GPU, peak memory = weights of all models + activations. Staged: ``offload=True`` (the
AR, then the glyph encoder, the DiT and the VAE borrow the GPU in turn) with the process capped by
``torch.cuda.set_per_process_memory_fraction`` at ``--cap-gib``, as a card of that size would be; the peaks of the
AR stage and of the rest are reported separately. Use a fresh process for the staged run (the cap is per process).
--reference-e2e also runs diffusers' GlmImagePipeline on the same weights (its AR alone takes over a minute).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from common import (
    PROMPT,
    GiB,
    Row,
    Setup,
    build_ar_model,
    build_dit,
    build_glyph_encoder,
    build_vae,
    failed_row,
    free_device_memory,
    peak_gib,
    reset_peak,
    wall,
)

from glm_image_core.defaults import DEFAULT_SIDE, GUIDANCE, STEPS

E2E_GOAL_S = 15.0


def size_and_steps(setup: Setup) -> tuple[int, int]:
    return (512, 2) if setup.tiny else (DEFAULT_SIDE, STEPS)


def build_models(setup: Setup, offload: bool, with_reference: bool):
    """Our GlmImageModels with random weights (and the diffusers DiT/VAE sharing their tensors, if asked). Offloaded
    models are built on the device one by one and moved to the CPU, so building stays under a memory cap."""
    from transformers import ByT5Tokenizer

    from glm_image_core.loading import load_ar_processor
    from glm_image_core.pipeline import GlmImageModels

    def placed(module):
        if offload and setup.device.type == "cuda":
            module = module.to("cpu")
            free_device_memory(setup.device)
        return module

    ar_model = placed(build_ar_model(setup))
    glyph_encoder = placed(build_glyph_encoder(setup))
    dit, dit_reference = build_dit(setup, with_reference=with_reference)
    dit = placed(dit)
    vae, vae_reference = build_vae(setup, with_reference=with_reference)
    vae = placed(vae)
    models = GlmImageModels(
        ar_model=ar_model,
        processor=load_ar_processor(setup.folder),
        glyph_encoder=glyph_encoder,
        glyph_tokenizer=ByT5Tokenizer(),
        dit=dit,
        vae=vae,
        device=setup.device,
        offload=offload,
    )
    return models, (dit_reference, vae_reference)


def run(setup: Setup, with_reference: bool = False) -> list[Row]:
    """Resident models: e2e time and peak memory, ours (and diffusers' pipeline with --reference-e2e)."""
    from glm_image_core.pipeline import generate

    size, steps = size_and_steps(setup)
    name = f"Text-to-image {size}x{size}, {steps} steps, CFG {GUIDANCE}, models resident"
    rows: list[Row] = []
    try:
        models, (dit_reference, vae_reference) = build_models(setup, offload=False, with_reference=with_reference)
        if not setup.tiny:  # start-up costs (cuBLAS, first graph capture) stay out of the number
            generate(models, PROMPT, 512, 512, steps=2, seed=1)
        reset_peak(setup.device)
        seconds, _ = wall(lambda: generate(models, PROMPT, size, size, steps=steps, guidance=GUIDANCE), setup.device)
        peak = peak_gib(setup.device)
        reference_s = reference_peak = None
        if with_reference and dit_reference is not None:
            pipe = reference_pipeline(setup, models, dit_reference, vae_reference)
            # random weights sample ids outside the VQ codebook (and EOS) at will; the trained model does not.
            # Suppressed here so that the reference decodes the full grid and its DiT gets valid ids.
            models.ar_model.generation_config.suppress_tokens = list(range(16384, 16512))
            reset_peak(setup.device)
            reference_s, _ = wall(
                lambda: pipe(
                    PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=1.5, output_type="pt"
                ),
                setup.device,
            )
            reference_peak = peak_gib(setup.device)
        goal = None if setup.tiny else E2E_GOAL_S
        note = "ref.: diffusers GlmImagePipeline, same weights" if reference_s else "ref.: see the estimate note"
        rows.append(Row(name, "s", seconds, reference_s, goal, note))
        rows.append(
            Row(
                "Peak GPU memory, models resident",
                "GiB",
                peak,
                reference_peak,
                None,
                "max_memory_allocated; model card: diffusers 37.8 GB on an H100",
            )
        )
    except Exception as e:
        rows.append(failed_row(name, e))
    return rows


def reference_pipeline(setup: Setup, models, dit_reference, vae_reference):
    from diffusers import FlowMatchEulerDiscreteScheduler, GlmImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(setup.folder / "scheduler")
    return GlmImagePipeline(
        tokenizer=models.glyph_tokenizer,
        processor=models.processor,
        text_encoder=models.glyph_encoder,
        vision_language_encoder=models.ar_model,
        vae=vae_reference,
        transformer=dit_reference,
        scheduler=scheduler,
    )


def run_staged(setup: Setup, cap_gib: float) -> list[Row]:
    """Staged offload under a memory cap (call in a fresh process): e2e time and the peak of each stage."""
    from glm_image_core.pipeline import generate

    size, steps = size_and_steps(setup)
    capped = setup.device.type == "cuda"
    if capped:
        total = torch.cuda.get_device_properties(setup.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), setup.device)
    label = f"capped at {cap_gib:g} GiB" if capped else "no cap on the CPU"
    name = f"Text-to-image {size}x{size}, {steps} steps, staged offload, {label}"
    peaks = {}

    def on_token(step, total, ids):
        if step == total:  # the AR stage is done, its model still on the device
            peaks["ar"] = peak_gib(setup.device)
            reset_peak(setup.device)

    try:
        models, _ = build_models(setup, offload=True, with_reference=False)
        reset_peak(setup.device)
        seconds, _ = wall(
            lambda: generate(models, PROMPT, size, size, steps=steps, guidance=GUIDANCE, on_token=on_token),
            setup.device,
        )
        peaks["dit"] = peak_gib(setup.device)
    except torch.OutOfMemoryError as e:
        return [Row(name, "s", None, None, None, f"out of memory under the cap: {str(e)[:120]}")]
    except Exception as e:
        return [failed_row(name, e)]
    goal = None if setup.tiny else cap_gib
    return [
        Row(name, "s", seconds, None, None, "includes copying each stage's weights to the GPU"),
        Row("Peak GPU memory, staged: AR stage", "GiB", peaks.get("ar"), None, goal, "AR bf16 weights ~18.8 GiB"),
        Row(
            "Peak GPU memory, staged: glyph + DiT + VAE stages",
            "GiB",
            peaks.get("dit"),
            None,
            goal,
            "core DiT in bf16 (the fp8 DiT is measured through ComfyUI)",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (CI smoke run)")
    parser.add_argument("--staged", action="store_true", help="offload + memory cap (run in a fresh process)")
    parser.add_argument("--cap-gib", type=float, default=22.0)
    parser.add_argument("--reference-e2e", action="store_true", help="also run diffusers' GlmImagePipeline")
    parser.add_argument("--json", help="write the rows here (for run_all.py)")
    args = parser.parse_args()
    start = time.perf_counter()
    setup = Setup.create(args.tiny)
    rows = run_staged(setup, args.cap_gib) if args.staged else run(setup, args.reference_e2e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.__dict__ for row in rows], f)
    for row in rows:
        print(row)
    print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
