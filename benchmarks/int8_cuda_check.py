"""The CUDA int8 decode kernel (``glm_image_core.quant``), checked on the AR's full-size projection shapes: does the
compiled path agree with the eager one, does it avoid a bf16 copy of the matrix, and how fast is it next to a bf16
matmul (the decode is bandwidth-bound: int8 should approach half the bf16 time). About a minute on one GPU.

    python benchmarks/int8_cuda_check.py [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from common import Row, failed_row

from glm_image_core import int8_kernel, quant

SHAPES = {"q/o": (4096, 4096), "k+v": (512, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}


def check(name: str, out_features: int, in_features: int, rows: int) -> list[Row]:
    device = torch.device("cuda")
    generator = torch.Generator(device).manual_seed(0)
    weight = torch.randn(out_features, in_features, device=device, generator=generator, dtype=torch.bfloat16) * 0.02
    q, scale = quant.quantize_int8(weight)
    x = torch.randn(rows, in_features, device=device, generator=generator, dtype=torch.bfloat16)
    eager = quant.int8_linear(x, q, scale, fused=False)
    fused = quant.int8_linear(x, q, scale)  # compiles on first use
    error = ((fused.float() - eager.float()).norm() / eager.float().norm()).item()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    quant.int8_linear(x, q, scale)
    torch.cuda.synchronize()
    scratch = torch.cuda.max_memory_allocated() - base

    def timed(fn, repeats=50):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats / 1000

    t_int8 = timed(lambda: quant.int8_linear(x, q, scale))
    t_bf16 = timed(lambda: torch.nn.functional.linear(x, weight))
    label = f"int8 decode matmul {name} [{out_features}x{in_features}], {rows} row(s)"
    return [
        Row(f"{label}: fused vs eager", "rel. L2", error, None, 1e-2, "bf16 accumulation order differs"),
        Row(
            f"{label}: scratch memory",
            "MiB",
            scratch / 2**20,
            None,
            weight.numel() * 2 / 2**20 / 4,
            "goal: far below the bf16 copy of the matrix",
        ),  # fmt: skip
        Row(f"{label}: time", "s", t_int8, t_bf16, None, "reference: bf16 F.linear on the same shape"),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("int8_cuda_check needs a CUDA GPU (the CPU path is tested by tests/test_quant.py).")
    rows = []
    for name, (out_features, in_features) in SHAPES.items():
        for batch in (1, 4):
            try:
                rows += check(name, out_features, in_features, batch)
            except Exception as e:
                rows.append(failed_row(f"int8 decode matmul {name}, {batch} row(s)", e))
    for row in rows:
        print(row)
    if int8_kernel.FUSED_KERNEL.unavailable:
        print(
            f"the fused kernel was not used ({int8_kernel.FUSED_KERNEL.unavailable}): rows measured the eager fallback",
            file=sys.stderr,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.__dict__ for row in rows], f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
