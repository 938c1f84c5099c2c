"""Every GLM-Image speed and memory measurement in one run, printed as a README-ready markdown table.

    python benchmarks/run_all.py --out bench.md          # a CUDA GPU, full-size models with random weights
    python benchmarks/run_all.py --tiny                  # the tiny models on the CPU (CI smoke run, ~1 min)

Parts, in this order: AR decode (bench_ar), DiT and VAE (bench_dit), end to end with every model resident
(bench_pipeline), end to end with staged offload under a memory cap (bench_pipeline --staged, its own process), the
DiT through ComfyUI's model management in bf16 and fp8 (bench_comfy, its own process; needs --comfyui or
COMFYUI_PATH). A part that fails becomes a FAILED row; the others still run. About 5 minutes on an H100; --compile
(torch.compile'd AR decode layer and DiT blocks) adds 2-4 minutes, --reference-e2e (diffusers' whole pipeline) ~1.5.
Where the reference end to end is not run, it is estimated from the reference rows (AR stage + 2 x steps x DiT
batch 1 + VAE: diffusers runs the two CFG branches as two passes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Row, Setup, failed_row, free_device_memory, markdown_table

HERE = Path(__file__).resolve().parent


def in_subprocess(script: str, args: list[str]) -> list[Row]:
    """Run a benchmark script in a fresh process (a memory cap, or ComfyUI's global settings) and read its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        done = subprocess.run([sys.executable, str(HERE / script), *args, "--json", str(out)], check=False)
        if not out.is_file():
            return [failed_row(script, RuntimeError(f"exited with code {done.returncode} and wrote no rows"))]
        return [Row(**row) for row in json.loads(out.read_text())]


def estimate_reference_e2e(rows: list[Row], size: int, steps: int) -> None:
    """Fill the reference of the resident end-to-end row from the reference component rows, when not measured."""
    by_name = {row.name: row for row in rows}
    e2e = next((r for r in rows if r.name.startswith(f"Text-to-image {size}x{size}") and "resident" in r.name), None)
    ar = next((r for r in rows if r.name.startswith(f"AR stage {size}x{size}")), None)
    dit = by_name.get(f"DiT forward {size}x{size}, batch 1")
    vae = by_name.get(f"VAE decode {size}x{size}")
    parts = [ar and ar.reference, dit and dit.reference, vae and vae.reference]
    if e2e is None or e2e.reference is not None or None in parts:
        return
    e2e.reference = parts[0] + 2 * steps * parts[1] + parts[2]
    e2e.note = f"ref. estimated: AR stage + {2 * steps} x DiT batch 1 + VAE (diffusers: 2 passes per step)"


def compare_comfy_to_diffusers(rows: list[Row]) -> None:
    """ComfyUI rows get the diffusers DiT of the same batch as their reference."""
    for row in rows:
        if ", ComfyUI" in row.name and row.name.startswith("DiT forward") and row.reference is None:
            plain = row.name.split(", ComfyUI")[0]
            match = next((r for r in rows if r.name == plain or r.name == plain.replace(" (cond + uncond)", "")), None)
            if match is not None and match.reference is not None:
                row.reference = match.reference
                row.note += "; ref.: diffusers, same batch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (CI smoke run)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd AR decode and DiT")
    parser.add_argument("--reference-e2e", action="store_true", help="run diffusers' pipeline end to end too")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout for the fp8 rows")
    parser.add_argument("--cap-gib", type=float, default=22.0, help="memory cap of the staged run")
    parser.add_argument("--skip", nargs="*", default=[], choices=["ar", "dit", "e2e", "staged", "comfyui"])
    args = parser.parse_args()

    start = time.perf_counter()
    setup = Setup.create(args.tiny, compile=args.compile, comfyui=args.comfyui)
    tiny = ["--tiny"] if args.tiny else []
    rows: list[Row] = []

    def part(name: str, fn) -> None:
        if name in args.skip:
            return
        print(f"--- {name} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        try:
            rows.extend(fn())
        except Exception as e:  # a part that breaks outright (e.g. building its models)
            rows.append(failed_row(name, e))
        free_device_memory(setup.device)

    import bench_ar
    import bench_dit
    import bench_pipeline

    part("ar", lambda: bench_ar.run(setup))
    part("dit", lambda: bench_dit.run(setup))
    part("e2e", lambda: bench_pipeline.run(setup, with_reference=args.reference_e2e))
    if args.tiny:  # no memory cap on a CPU: the staged path runs in this process
        part("staged", lambda: bench_pipeline.run_staged(setup, args.cap_gib))
    else:
        part("staged", lambda: in_subprocess("bench_pipeline.py", ["--staged", "--cap-gib", str(args.cap_gib)]))
    if args.comfyui:
        if args.tiny:
            import bench_comfy

            part("comfyui", lambda: bench_comfy.run(setup))
        else:
            part("comfyui", lambda: in_subprocess("bench_comfy.py", ["--comfyui", args.comfyui, *tiny]))
    else:
        rows.append(Row("DiT via ComfyUI (bf16, fp8)", "", note="skipped: pass --comfyui or set COMFYUI_PATH"))

    size, steps = bench_pipeline.size_and_steps(setup)
    estimate_reference_e2e(rows, size, steps)
    compare_comfy_to_diffusers(rows)
    table = markdown_table(rows, setup, time.perf_counter() - start)
    print(table)
    if args.out:
        args.out.write_text(table)
    if args.json:
        args.json.write_text(json.dumps([row.as_dict() for row in rows], indent=1))


if __name__ == "__main__":
    main()
