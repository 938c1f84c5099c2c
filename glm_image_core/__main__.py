"""Command line: `python -m glm_image_core generate --model DIR --prompt "..." -o out.png` (see --help).

`python -m glm_image_core export-ar-int8 --model DIR -o GLM-Image.ar_int8.safetensors` writes the AR model with
8-bit decoder weights as one file (about 11 GB instead of 20 GB), which the loaders read directly.

`python -m glm_image_core export-dit --model DIR --quant float8_e4m3fn -o glm_image_dit_fp8.safetensors` writes the DiT
as one file with 8-bit Linear weights (about 7 GB instead of 13 GB) in ComfyUI's per-layer format, or in the older
scaled-fp8 format (`--quant scaled_fp8`) that ComfyUI 0.3.x also reads.

`--tiny` builds a tiny random model in the published layout first, so the whole path can be smoke-tested right after
install without the 36 GB download (the picture is noise-like: the weights are random).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from .ar_loading import AR_INT8_SUFFIX
from .defaults import AR_GRID_STRIDE, DEFAULT_SIDE, GUIDANCE, MAX_SIDE, MIN_SIDE, STEPS
from .errors import GlmImageError
from .files import written_to
from .formats import comfy_quant
from .sizes import check_image_size

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m glm_image_core", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="text-to-image, or editing with --image")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="the GLM-Image folder as downloaded (zai-org/GLM-Image)")
    source.add_argument("--tiny", action="store_true", help="build and use a tiny random model (smoke run)")
    gen.add_argument("--prompt", required=True, help="text; quoted spans (\"...\", '...', “...”, 「...」) are rendered")
    side = f"multiple of {AR_GRID_STRIDE}, {MIN_SIDE}..{MAX_SIDE}"
    gen.add_argument("--width", type=int, default=DEFAULT_SIDE, help=side)
    gen.add_argument("--height", type=int, default=DEFAULT_SIDE, help=side)
    gen.add_argument("--steps", type=int, default=STEPS)
    gen.add_argument("--cfg", type=float, default=GUIDANCE, help="guidance scale; 1 disables CFG")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--image", type=Path, action="append", default=[], help="reference image (repeatable)")
    gen.add_argument("--temperature", type=float, default=None, help="AR sampling (default: generation_config)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("-o", "--output", type=Path, required=True, help="PNG file to write")
    gen.add_argument("--ar-int8", action="store_true", help="quantise the AR decoder's weights to int8 while loading")
    gen.add_argument(
        "--lora",
        type=lora_choice,
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a LoRA for the DiT (.safetensors, diffusers/PEFT, ComfyUI or kohya key names); strength 1 when not given "
        "(repeatable)",
    )
    gen.add_argument(
        "--ar-lora",
        type=lora_choice,
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a PEFT adapter for the AR model (its folder or .safetensors); strength 1 when not given (repeatable)",
    )
    export = commands.add_parser("export-ar-int8", help="write the AR with int8 decoder weights as one file")
    export.add_argument("--model", type=Path, required=True, help="the GLM-Image folder (or vision_language_encoder/)")
    export.add_argument(
        "-o", "--output", type=Path, required=True, help=f"the file to write (name it *{AR_INT8_SUFFIX})"
    )
    dit = commands.add_parser("export-dit", help="write the DiT with 8-bit Linear weights as one file")
    dit.add_argument("--model", type=Path, required=True, help="the GLM-Image folder (or transformer/)")
    dit.add_argument(
        "--quant", choices=[*comfy_quant.WRITABLE, "scaled_fp8"], required=True, help="see README, Weight formats"
    )
    dit.add_argument("-o", "--output", type=Path, required=True, help="the .safetensors file to write")
    return parser.parse_args(argv)


def lora_choice(text: str) -> tuple[Path, float]:
    """``PATH[:STRENGTH]`` -> (path, strength); a colon that belongs to the path (``C:\\loras\\x``) stays in it."""
    path, _, strength = text.rpartition(":")
    try:
        return (Path(path), float(strength)) if path else (Path(text), 1.0)
    except ValueError:
        return Path(text), 1.0


def progress(label: str):
    """A one-line progress report on stderr, updated at most every ~2%."""

    def report(step: int, total: int, _tensor) -> None:
        if step == total or step % max(1, total // 50) == 0:
            print(f"\r{label} {step}/{total}", end="\n" if step == total else "", file=sys.stderr, flush=True)

    return report


def main(argv=None) -> int:
    from .pipeline import generate, load_models

    args = parse_args(argv)
    if args.command == "export-ar-int8":
        return export_ar_int8(args)
    if args.command == "export-dit":
        return export_dit(args)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float32 if args.device == "cpu" else torch.bfloat16)
    try:
        check_image_size(args.height, args.width)  # before minutes of loading
        with tempfile.TemporaryDirectory() as scratch:
            folder = args.model
            if args.tiny:
                from .tiny import write_tiny_model

                folder = write_tiny_model(Path(scratch) / "GLM-Image")
            start = time.perf_counter()
            models = load_models(
                folder,
                dtype=dtype,
                device=args.device,
                ar_quantisation="int8" if args.ar_int8 else None,
                loras=args.lora,
                ar_loras=args.ar_lora,
            )
            print(f"loaded {folder} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            references = [Image.open(path) for path in args.image]
            image = generate(
                models,
                args.prompt,
                args.height,
                args.width,
                steps=args.steps,
                guidance=args.cfg,
                seed=args.seed,
                references=references,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                on_token=progress("AR tokens"),
                on_step=progress("DiT steps"),
            )
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with written_to(args.output) as partial:  # the format comes from the final name's suffix
            image.save(partial, format=Image.registered_extensions().get(args.output.suffix.lower()))
        print(
            f"wrote {args.output} ({image.width}x{image.height}) in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    except (GlmImageError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def export_ar_int8(args: argparse.Namespace) -> int:
    from .loading import export_ar_int8

    start = time.perf_counter()
    try:
        out = export_ar_int8(args.model, args.output)
    except GlmImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 2**30
    print(f"wrote {out} ({size:.2f} GiB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


def export_dit(args: argparse.Namespace) -> int:
    from .components import TRANSFORMER, component_location
    from .loading import save_single_file

    start = time.perf_counter()
    scaled_fp8 = args.quant == "scaled_fp8"
    try:
        folder = component_location(args.model, TRANSFORMER)
        out = save_single_file(folder, args.output, scaled_fp8=scaled_fp8, quant=None if scaled_fp8 else args.quant)
    except GlmImageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = out.stat().st_size / 2**30
    print(f"wrote {out} ({size:.2f} GiB) in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
