"""What the live AR preview costs the decode loop: the tiny random model on the CPU, 1024x1024 text-to-image.

    PYTHONPATH=. python benchmarks/ar_preview_cost.py [--repeats 5]

Prints the decode time per token, the time spent inside the node's preview hook during a decode (polls, images and
their JPEG encoding, which ComfyUI's server does) with an image every 0.25 s and after every token (the worst case),
the pieces (a poll that is not due, one 512x512 image, its JPEG), and the codebook colours at the published size.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from glm_image_core import ar, preview
from glm_image_core.loading import load_ar_model, load_ar_processor
from glm_image_core.tiny import write_tiny_model


def per_call(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add overhead

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_model(Path(tmp) / "GLM-Image", seed=0)
        model = load_ar_model(Path(tmp) / "GLM-Image", dtype=torch.float32)
        inputs = ar.build_ar_inputs(load_ar_processor(Path(tmp) / "GLM-Image"), "A sign 'OPEN'", 1024, 1024)
    geometry = inputs.geometry
    palette = preview.model_palette(model)

    def timed_hook(interval_s: float):
        """The node's hook (poll, and for each image the server's JPEG encoding), timing itself."""
        live = preview.LivePreview(geometry, palette, interval_s=interval_s)
        spent = {"seconds": 0.0, "images": 0}

        def on_token(step, total, tokens):
            start = time.perf_counter()
            image = live.poll(step, tokens)
            if image is not None:
                image.save(io.BytesIO(), format="JPEG", quality=95)
                spent["images"] += 1
            spent["seconds"] += time.perf_counter() - start

        return on_token, spent

    hooks = {}
    decode_s = float("inf")
    for _ in range(args.repeats):  # the time spent inside the hook, measured in the loop: immune to machine load
        start = time.perf_counter()
        ar.generate_prior_tokens(model, inputs, [torch.Generator().manual_seed(0)])
        decode_s = min(decode_s, (time.perf_counter() - start) / geometry.num_grid_tokens)
        for name, interval_s in (("every 0.25 s", preview.PREVIEW_INTERVAL_S), ("every token", 0.0)):
            hook, spent = timed_hook(interval_s)
            ar.generate_prior_tokens(model, inputs, [torch.Generator().manual_seed(0)], callback=hook)
            if name not in hooks or spent["seconds"] < hooks[name]["seconds"]:
                hooks[name] = spent

    live = preview.LivePreview(geometry, palette, interval_s=3600)
    tokens = torch.zeros(1, geometry.num_grid_tokens, dtype=torch.long)
    live.poll(1, tokens)
    not_due = per_call(lambda: live.poll(2, tokens), 100_000)
    ids = np.random.default_rng(0).integers(0, 16384, geometry.num_grid_tokens)
    build = per_call(lambda: preview.grid_image(ids, geometry, palette.numpy()), 200)
    image = preview.grid_image(ids, geometry, palette.numpy())
    jpeg = per_call(lambda: image.save(io.BytesIO(), format="JPEG", quality=95), 200)
    torch.set_num_threads(threads)
    codebook = torch.randn(16384, 2048, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    preview.codebook_palette(codebook)
    palette_s = time.perf_counter() - start

    tokens_n = geometry.num_grid_tokens
    print(f"1024x1024 text-to-image: {tokens_n} grid tokens, tiny model, fp32, 1 CPU thread (best of {args.repeats})")
    print(f"decode without a hook:            {decode_s * 1e3:8.3f} ms/token")
    for name, spent in hooks.items():
        per_token = spent["seconds"] / tokens_n
        print(
            f"preview hook, image {name + ':':14s}{per_token * 1e6:8.1f} us/token ({per_token / decode_s:.2%} of a "
            f"token; {spent['images']} images, {spent['seconds'] * 1e3:.1f} ms in all)"
        )
    print(f"poll, not due:                    {not_due * 1e6:8.3f} us")
    print(f"one 512x512 image (32x32 grid):   {build * 1e3:8.3f} ms")
    print(f"its JPEG encoding (server side):  {jpeg * 1e3:8.3f} ms")
    print(f"codebook colours, 16384 x 2048:   {palette_s:8.3f} s on the CPU ({torch.get_num_threads()} threads), once")


if __name__ == "__main__":
    main()
