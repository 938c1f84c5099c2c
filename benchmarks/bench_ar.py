"""AR stage: our fast decoder (glm_image_core.fast_ar) against transformers' ``generate``, milliseconds per token.

    python benchmarks/bench_ar.py [--tiny] [--compile]

Ours runs the whole grid (1280 tokens at 1024x1024, 4352 at 2048x2048, batch 1, the published sampling settings);
its steady decode rate is read from the progress callback (after the first 32 tokens, so the CUDA graph capture is
out of it). transformers' generate is timed for 1 and for 1 + N new tokens (N = 64; the full grid would take minutes):
its rate is the difference over N, and its stage time is estimated as prefill + rate x tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import PROMPT, Row, Setup, build_ar_model, failed_row, peak_gib, reset_peak, synchronize, wall

from glm_image_core.defaults import TEMPERATURE, TOP_P

NON_GRID_IDS = list(range(16384, 16512))  # what our decoder can never sample; suppressed for the reference too


def run(setup: Setup) -> list[Row]:
    from glm_image_core import ar, fast_ar
    from glm_image_core.loading import load_ar_processor

    model = build_ar_model(setup)
    processor = load_ar_processor(setup.folder)
    reason = fast_ar.unsupported_reason(model)
    sizes = [(256, 256)] if setup.tiny else [(1024, 1024), (2048, 2048)]  # tiny: 16x16 preview + 8x8 grid
    rows: list[Row] = []
    if not setup.tiny:  # CUDA/cuBLAS start-up stays out of the numbers
        warm = ar.build_ar_inputs(processor, PROMPT, 512, 512)
        ar.generate_prior_tokens(model, warm, [torch.Generator(setup.device).manual_seed(0)], fast=True)
    for height, width in sizes:
        inputs = ar.build_ar_inputs(processor, PROMPT, height, width)
        label = f"{height}x{width}"
        try:
            ours = measure_ours(model, inputs, setup)
            reference = measure_reference(model, inputs, setup, new_tokens=16 if setup.tiny else 64)
            total = inputs.geometry.num_grid_tokens
            note = "ours: fast decoder, CUDA graph" if setup.device.type == "cuda" else "ours: fast decoder, eager"
            if reason:
                note = f"ours fell back to transformers: {reason}"
            rows.append(
                Row(f"AR decode {label}", "ms/token", ours["ms_per_token"], reference["ms_per_token"], 6.0, note)
            )
            rows.append(
                Row(
                    f"AR stage {label} ({total} tokens, prefill included)",
                    "s",
                    ours["seconds"],
                    reference["prefill_s"] + reference["ms_per_token"] / 1000 * (total - 1),
                    None,
                    f"ref. = prefill + {reference['new_tokens']}-token rate x tokens; ours peak "
                    f"{_gib(ours['peak_gib'])}",
                )
            )
        except Exception as e:  # one failed measurement must not cost the others
            rows.append(failed_row(f"AR {label}", e))
    if setup.compile:
        height, width = sizes[0]
        inputs = ar.build_ar_inputs(processor, PROMPT, height, width)
        try:
            start = time.perf_counter()
            measure_ours(model, inputs, setup, compile_decoder=True)  # compiles
            compile_s = time.perf_counter() - start
            ours = measure_ours(model, inputs, setup, compile_decoder=True)
            rows.append(
                Row(
                    f"AR decode {height}x{width}, torch.compile layers",
                    "ms/token",
                    ours["ms_per_token"],
                    None,
                    6.0,
                    f"first call (compiling) {compile_s:.0f} s; stage {ours['seconds']:.2f} s",
                )
            )
        except Exception as e:
            rows.append(failed_row("AR decode, torch.compile layers", e))
    return rows


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} GiB"


@torch.inference_mode()
def measure_ours(model, inputs, setup: Setup, compile_decoder: bool = False) -> dict:
    from glm_image_core import ar

    marks: list[tuple[int, float]] = []

    def on_token(step, total, ids):
        marks.append((step, time.perf_counter()))

    generator = torch.Generator(setup.device).manual_seed(0)
    reset_peak(setup.device)
    seconds, _ = wall(
        lambda: ar.generate_prior_tokens(
            model, inputs, [generator], fast=True, callback=on_token, compile_decoder=compile_decoder
        ),
        setup.device,
    )
    steady = [(step, t) for step, t in marks if step >= 32]
    (first_step, first_t), (last_step, last_t) = steady[0], steady[-1]
    return {
        "seconds": seconds,
        "ms_per_token": (last_t - first_t) * 1000 / (last_step - first_step),
        "peak_gib": peak_gib(setup.device),
    }


@torch.inference_mode()
def measure_reference(model, inputs, setup: Setup, new_tokens: int) -> dict:
    kwargs = dict(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        image_grid_thw=inputs.image_grid_thw,
        images_per_sample=inputs.images_per_sample,
    )
    kwargs = {k: v.to(setup.device) for k, v in kwargs.items()}

    def generate(n):
        torch.manual_seed(0)
        return model.generate(
            **kwargs,
            max_new_tokens=n,
            do_sample=True,
            temperature=TEMPERATURE,
            top_p=TOP_P,
            top_k=None,
            suppress_tokens=NON_GRID_IDS,
        )

    generate(2)  # warm-up
    synchronize(setup.device)
    prefill_s, _ = wall(lambda: generate(1), setup.device)
    seconds, out = wall(lambda: generate(new_tokens + 1), setup.device)
    produced = out.shape[1] - inputs.input_ids.shape[1]
    assert produced == new_tokens + 1, f"generate stopped after {produced} tokens"
    return {"prefill_s": prefill_s, "ms_per_token": (seconds - prefill_s) * 1000 / new_tokens, "new_tokens": new_tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (CI smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd decode layer")
    args = parser.parse_args()
    setup = Setup.create(args.tiny, compile=args.compile)
    for row in run(setup):
        print(row)


if __name__ == "__main__":
    main()
