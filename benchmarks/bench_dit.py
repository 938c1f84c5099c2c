"""DiT and VAE: our core models against diffusers' GlmImageTransformer2DModel and AutoencoderKL (same weights).

    python benchmarks/bench_dit.py [--tiny] [--compile]

DiT seconds per forward at 1024x1024 (4096 image tokens): batch 1 (the conditional branch), and batch 2 = cond + uncond
in one pass. Ours batches the two branches as the sampler does (glyphs of 14 and 1 tokens, right-padded: each branch
attends to its own real tokens without a mask); diffusers has no working text mask (issue 13587), so its batch of
2 gets two glyph sequences of the same length. VAE: decode of one 1024x1024 latent.
"""

from __future__ import annotations

import argparse

import torch
from common import PROMPT, Row, Setup, build_dit, build_vae, failed_row, free_device_memory, time_call

from glm_image_core.defaults import DEFAULT_SIDE, LATENT_CHANNELS, PATCH_STRIDE, VAE_SCALE


def dit_inputs(setup: Setup, size: int, text_dim: int):
    """latent [1, 16, s/8, s/8], cond/uncond glyphs (the prompt's quoted text and ""), prior ids, timestep."""
    from glm_image_core import glyph

    g = torch.Generator(setup.device).manual_seed(0)
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    cond_len = int(glyph.tokenize_glyph_texts(glyph.glyph_texts_for(PROMPT), tokenizer)[1].sum())  # 14
    uncond_len = int(glyph.tokenize_glyph_texts(glyph.glyph_texts_for(""), tokenizer)[1].sum())  # 1
    latent_shape = (1, LATENT_CHANNELS, size // VAE_SCALE, size // VAE_SCALE)
    latent = torch.randn(latent_shape, generator=g, device=setup.device, dtype=setup.dtype)
    cond = torch.randn(1, cond_len, text_dim, generator=g, device=setup.device, dtype=setup.dtype)
    uncond = torch.randn(1, uncond_len, text_dim, generator=g, device=setup.device, dtype=setup.dtype)
    prior = torch.randint(0, 16384, (1, (size // PATCH_STRIDE) ** 2), generator=g, device=setup.device)
    timestep = torch.full((1,), 499.0, device=setup.device)
    return latent, cond, uncond, prior, timestep


def run(setup: Setup) -> list[Row]:
    size = 512 if setup.tiny else DEFAULT_SIDE
    rows = run_dit(setup, size)
    free_device_memory(setup.device)
    rows.append(run_vae(setup, 256 if setup.tiny else size))  # tiny: a CPU decodes 512x512 in seconds
    return rows


def run_dit(setup: Setup, size: int) -> list[Row]:
    from glm_image_core.sampling import DitCondition, predict_velocity, stack_conditions

    rows: list[Row] = []
    ours, reference = build_dit(setup)
    text_dim = ours.glyph_projector.net[0].proj.in_features
    latent, cond_glyph, uncond_glyph, prior, timestep = dit_inputs(setup, size, text_dim)
    cond = DitCondition(cond_glyph, prior)
    pair = stack_conditions([cond, DitCondition(uncond_glyph, prior, drop_prior=True)], 1)
    latent2, timestep2 = latent.repeat(2, 1, 1, 1), timestep.repeat(2)
    repeats = setup.repeats

    def ours_b1():
        return predict_velocity(ours, latent, timestep, cond, (size, size))

    def ours_b2():
        return predict_velocity(ours, latent2, timestep2, pair, (size, size))

    def reference_call(batch):
        target = torch.tensor([[size, size]] * batch, dtype=torch.float32, device=setup.device)
        drop = torch.tensor([[False], [True]][:batch], device=setup.device).expand(batch, prior.shape[1])
        args = (latent.repeat(batch, 1, 1, 1), cond_glyph.repeat(batch, 1, 1), prior.repeat(batch, 1))
        return lambda: reference(
            *args, drop, timestep.repeat(batch), target, torch.zeros_like(target), return_dict=False
        )

    with torch.inference_mode():
        for batch, fn in ((1, ours_b1), (2, ours_b2)):
            name = f"DiT forward {size}x{size}, batch {batch}" + (" (cond + uncond)" if batch == 2 else "")
            try:
                mine = time_call(fn, setup.device, repeats)
                theirs = None if reference is None else time_call(reference_call(batch), setup.device, repeats)
                goal = 0.10 if batch == 1 else None
                note = "ours: core DiT, SDPA" + ("; diffusers not installed" if reference is None else "")
                rows.append(Row(name, "s", mine, theirs, goal, note))
            except Exception as e:
                rows.append(failed_row(name, e))
        if setup.compile:
            try:
                for block in ours.transformer_blocks:
                    block.compile(dynamic=False)
                for batch, fn in ((1, ours_b1), (2, ours_b2)):
                    mine = time_call(fn, setup.device, repeats, warmup=2)
                    rows.append(
                        Row(
                            f"DiT forward {size}x{size}, batch {batch}, torch.compile blocks",
                            "s",
                            mine,
                            None,
                            0.10 if batch == 1 else None,
                            "regional compile (each transformer block)",
                        )
                    )
            except Exception as e:
                rows.append(failed_row("DiT forward, torch.compile blocks", e))
    return rows


def run_vae(setup: Setup, size: int) -> Row:
    name = f"VAE decode {size}x{size}"
    try:
        ours, reference = build_vae(setup)
        g = torch.Generator(setup.device).manual_seed(1)
        latent_shape = (1, LATENT_CHANNELS, size // VAE_SCALE, size // VAE_SCALE)
        latent = torch.randn(latent_shape, generator=g, device=setup.device, dtype=setup.dtype)
        repeats = 1 if setup.tiny else setup.repeats
        with torch.inference_mode():
            mine = time_call(lambda: ours.decode(latent), setup.device, repeats)
            theirs = None
            if reference is not None:
                theirs = time_call(lambda: reference.decode(latent).sample, setup.device, repeats)
        return Row(name, "s", mine, theirs, None, "")
    except Exception as e:
        return failed_row(name, e)
    finally:
        free_device_memory(setup.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (CI smoke run)")
    parser.add_argument("--compile", action="store_true", help="also time the DiT with torch.compile'd blocks")
    args = parser.parse_args()
    setup = Setup.create(args.tiny, compile=args.compile)
    for row in run(setup):
        print(row)


if __name__ == "__main__":
    main()
