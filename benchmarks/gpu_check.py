"""The one command for the first minutes on a GPU: every claim of this pack that no CPU can check, then the speed rows.

    python benchmarks/gpu_check.py --json gpu_check.json [--comfyui /path/to/ComfyUI]   # one H100/H200: < 8 minutes
    python benchmarks/gpu_check.py --dry-run --json gpu_check.json                      # the same code, CPU, tiny models

Full-size models with random bf16 weights are built on the GPU from the published configs (common.py). Each row is a
claim with its status and numbers:
- verified: the claim holds on this machine; broken: it does not, or the check raised (the exception is the detail);
  skipped: it could not be checked here (the detail says why: no CUDA in a dry run, one GPU, no ComfyUI, out of time);
  measured: a speed row (a number next to its goal; a goal missed is a number, not a broken claim).
- the AR's CUDA graph: captured on cuda:0 (and cuda:1 when there are two GPUs), the reason when not (the log line of
  ``StepGraph``), replays counted, the tokens compared with the eager decoder's;
- the int8 decode kernel (``int8_kernel.FUSED_KERNEL``): used, equal to the eager path on the AR's projection shapes, its
  scratch memory and time; then inside the AR's graph with int8 weights;
- 4-bit layers (``w4a16``, as in Intel/GLM-Image-int4-AutoRound, packed here by round-to-nearest): torch's int4 matmul
  against the dequantising path on the AR's projection shapes, its scratch memory and time; the AR decode with 4-bit
  projections (ms/token, the int4 matmul inside the CUDA graph); the 8 GB recipe's staged peaks (AR and DiT 4-bit);
- fp8 ``_fast`` matmuls: the DiT through ComfyUI's loader with ``fp8_e4m3fn_fast`` calls ``torch._scaled_mm``; its
  output against the bf16 DiT's;
- ComfyUI's TorchCompileModel with inductor on our MODEL: recompilations over sampling runs at two sizes (a DiT of 2
  of its 30 layers at full width, so that compiling fits in the time: recompilations do not depend on depth);
- peak memory per stage (core pipeline, staged offload; the DiT through ComfyUI) against the README's computed
  table (memory_table.py): the measured peak is the allocator's reserved peak plus this process's CUDA context;
  verified while it stays within 5% of the computed peak;
- the speed rows of run_all.py's parts, at 1024x1024: AR decode bf16 and int8, DiT and VAE, end to end.

On a GPU each part (AR, ComfyUI, memory, speed, compile, probe) runs in a process of its own, so a failure that
poisons a CUDA context costs only its own part and each stage's peak is its own; a part writes its rows as it goes,
and a crash or a timeout becomes a broken row with the end of its log. The whole run is held under ``--budget-s``
(450 s): a part that cannot start in time is reported as skipped. ``--dry-run`` runs every part on the CPU with the
tiny models (CI: tests/test_gpu_check.py), all in one child process (on the CPU there is nothing to isolate, and the
imports were most of each part's time): the GPU-only checks report "skipped" but still execute what a CPU can (the
int8 kernel's math, the eager decoder, ComfyUI's fp8 loader, Dynamo's recompilation count with the eager backend,
the staged pipeline's stage boundaries). Missing packages are listed first; on a GPU machine without them, see
benchmarks/gpu_run.sh.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import PROMPT, GiB, Row, Setup, free_device_memory, reset_peak, time_call

BUDGET_S = 450.0  # the whole run, under the 8 minutes a GPU session plans for it
# each part's own time limit, seconds; compile last: its recompilations (minutes each with inductor) can eat any budget
PARTS = {"ar": 170, "comfyui": 120, "memory": 150, "speed": 140, "compile": 150, "probe": 120}
# A dry run's order in its one process: ComfyUI is imported once there, by the first part that needs it, so the
# compile check (which asks for SDPA on the CPU, as on CUDA) imports it before the fp8 check.
DRY_RUN_ORDER = ("ar", "memory", "speed", "probe", "compile", "comfyui")
MEMORY_TOLERANCE = 1.05  # a measured peak above 105% of the computed one means the README's table misleads
NO_CUDA = "no CUDA (dry run)"


# --- rows ----------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    status: str  # verified | broken | skipped | measured
    detail: str = ""
    numbers: dict = field(default_factory=dict)


def from_row(row: Row) -> Check:
    """A speed row of the benchmark scripts as a check row."""
    status = "broken" if row.note.startswith("FAILED") else "skipped" if row.note.startswith("skipped") else "measured"
    numbers = {k: v for k, v in row.as_dict().items() if k not in ("name", "note") and v not in (None, "")}
    return Check(row.name, status, row.note, numbers)


def error_text(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    place = f" (at {Path(where.filename).name}:{where.lineno})" if where else ""
    return f"{type(e).__name__}: {e}"[:400] + place


class Rows:
    """A part's rows, written to its file after each one: a crash later in the part keeps what was found."""

    def __init__(self, path: Path):
        self.path, self.rows = path, []

    def add(self, *checks: Check) -> None:
        self.rows.extend(checks)
        self.path.write_text(json.dumps([asdict(c) for c in self.rows], indent=1))

    def run(self, name: str, fn) -> None:
        """Add what ``fn()`` returns (a Check, Checks, benchmark Rows or None: a whole part, which adds its own); an
        exception becomes a broken row."""
        try:
            result = fn()
        except Exception as e:
            logging.exception("check %r raised", name)
            self.add(Check(name, "broken", error_text(e)))
            return
        if result is None:  # a whole part, which added its own rows
            return
        result = result if isinstance(result, list) else [result]
        self.add(*(from_row(r) if isinstance(r, Row) else r for r in result))


def gpu_status(setup: Setup, holds: bool) -> str:
    if setup.device.type != "cuda":
        return "skipped"
    return "verified" if holds else "broken"


def dry_note(setup: Setup, detail: str) -> str:
    return f"{NO_CUDA}; {detail}" if setup.device.type != "cuda" else detail


# --- memory --------------------------------------------------------------------------------------------------------


def cuda_context_bytes(device: torch.device) -> int:
    """What this process holds on the GPU beyond its allocator: the CUDA context (and any other process's memory)."""
    if device.type != "cuda":
        return 0
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def peak_numbers(device: torch.device, context: int) -> dict:
    if device.type != "cuda":
        return {}
    allocated, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return {
        "allocated_gib": allocated / GiB,
        "reserved_gib": reserved / GiB,
        "context_gib": context / GiB,
        "measured_gib": (reserved + context) / GiB,
    }


def memory_check(name: str, setup: Setup, measured: dict | None, computed_bytes: float, note: str) -> Check:
    numbers = {"computed_gib": computed_bytes / GiB, **(measured or {})}
    if setup.device.type != "cuda":
        return Check(name, "skipped", dry_note(setup, note), numbers)
    if not measured:
        return Check(name, "broken", f"the stage was not observed; {note}", numbers)
    numbers["ratio"] = numbers["measured_gib"] / numbers["computed_gib"]
    return Check(name, "verified" if numbers["ratio"] <= MEMORY_TOLERANCE else "broken", note, numbers)


def computed_stages(path: Path | None) -> dict:
    """The README's computed table (memory_table.stage_table), read from the file the parent wrote."""
    if path is None or not path.is_file():
        raise RuntimeError("the computed memory table is missing (memory_table.stage_table failed in the parent)")
    return json.loads(path.read_text())["stages"]


# --- observers (the product code keeps no record of these outcomes) ---------------------------------------------------


@contextlib.contextmanager
def logged_warnings():
    """The messages logged at WARNING or above while the block runs."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        yield messages
    finally:
        logging.getLogger().removeHandler(handler)


def observed_step_graph():
    """A ``cuda_graph.StepGraph`` that records its device, its capture's outcome and the log line of a failed
    capture, and its calls; installed as ``fast_ar.StepGraph``."""
    from glm_image_core import cuda_graph

    class ObservedStepGraph(cuda_graph.StepGraph):
        records: list[dict] = []

        def __init__(self, step, device):
            super().__init__(step, device)
            self.record = {
                "device": str(self.device),
                "side_stream_device": str(self.side.device),
                "host_current_device": torch.cuda.current_device(),
                "captured": None,
                "reason": None,
            }
            ObservedStepGraph.records.append(self.record)

        def _capture(self):
            cuda_graph._warn_once.cache_clear()  # a repeated reason is logged (and seen) again
            with logged_warnings() as messages:
                graph = super()._capture()
            self.record.update(captured=graph is not None, reason=" ".join(messages) or None)
            return graph

        def release(self) -> None:
            self.record.update(calls=self.calls, replays=self.calls - self.WARMUP if self.record["captured"] else 0)
            super().release()

    return ObservedStepGraph


def observed_kernel():
    """An ``int8_kernel.FusedInt8Kernel`` that counts its calls and how many the compiled kernel served."""
    from glm_image_core.formats import int8_kernel

    class ObservedKernel(int8_kernel.FusedInt8Kernel):
        def __init__(self):
            super().__init__()
            self.calls = self.fused = 0

        def __call__(self, x, q, scale):
            out = super().__call__(x, q, scale)
            self.calls += 1
            self.fused += out is not None
            return out

    return ObservedKernel()


@contextlib.contextmanager
def recompile_log():
    """The reasons Dynamo logs for each recompilation while the block runs (its ``recompiles`` log; the counter
    ``counters["recompiles"]`` is not kept by current torch)."""
    import torch._logging

    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    torch._logging.set_logs(recompiles=True)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        torch._logging.set_logs()


@contextlib.contextmanager
def counted(module, name: str):
    """Count the calls of ``module.name`` (e.g. torch._scaled_mm) while the block runs: yields [count]."""
    original, calls = getattr(module, name), [0]

    def counting(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(module, name, counting)
    try:
        yield calls
    finally:
        setattr(module, name, original)


# --- part: the AR (CUDA graph on cuda:0 / cuda:1, the int8 kernel, AR speed) --------------------------------------------


def part_ar(setup: Setup, rows: Rows, args) -> None:
    import bench_ar
    from common import build_ar_model

    from glm_image_core import ar, fast_ar
    from glm_image_core.formats import int8, int8_kernel
    from glm_image_core.loading import load_ar_processor

    graphs = fast_ar.StepGraph = observed_step_graph()
    kernel = int8_kernel.FUSED_KERNEL = observed_kernel()
    model = build_ar_model(setup)
    processor = load_ar_processor(setup.folder)
    small, big = (256, 256) if setup.tiny else (512, 512), (256, 256) if setup.tiny else (1024, 1024)

    def graph_check(device: torch.device, name: str) -> Check:
        graphs.records.clear()
        inputs = ar.build_ar_inputs(processor, PROMPT, *small)

        def tokens(cuda_graph):
            generator = torch.Generator(device).manual_seed(0)
            result = ar.generate_prior_tokens(model, inputs, [generator], fast=True, cuda_graph=cuda_graph)
            return result.target_ids

        with_graph, eager = tokens(None), tokens(False)
        numbers = {
            "size": f"{small[0]}x{small[1]}",
            "tokens": with_graph.numel(),
            "tokens_equal_to_eager": (with_graph == eager).float().mean().item(),
        }
        if device.type != "cuda":
            return Check(name, "skipped", dry_note(setup, "the fast decoder ran its step eagerly"), numbers)
        if not graphs.records:
            return Check(name, "broken", "the fast decoder built no StepGraph", numbers)
        record = graphs.records[0]
        numbers.update(record)
        on_device = record["device"] == record["side_stream_device"] == str(device)
        holds = bool(record["captured"]) and on_device
        return Check(name, "verified" if holds else "broken", record["reason"] or "", numbers)

    first = torch.device("cuda", 0) if setup.device.type == "cuda" else setup.device
    rows.run("AR CUDA graph captured on cuda:0", lambda: graph_check(first, "AR CUDA graph captured on cuda:0"))

    def speed(label: str, goal: float) -> list[Row]:
        inputs = ar.build_ar_inputs(processor, PROMPT, *big)
        ours = bench_ar.measure_ours(model, inputs, setup)
        size = f"{big[0]}x{big[1]}"
        result = [
            Row(
                f"AR decode {size}, {label}",
                "ms/token",
                ours["ms_per_token"],
                None,
                goal,
                f"fast decoder{', CUDA graph' if setup.device.type == 'cuda' else ', eager'}",
            ),
            Row(
                f"AR stage {size}, {label} ({inputs.geometry.num_grid_tokens} tokens, prefill included)",
                "s",
                ours["seconds"],
                None,
                None,
                "",
            ),
        ]
        if label == "bf16":  # transformers' generate on the same weights, as bench_ar measures it
            reference = bench_ar.measure_reference(model, inputs, setup, new_tokens=16 if setup.tiny else 64)
            result[0].reference = reference["ms_per_token"]
            result[0].note += f"; ref.: transformers generate, {reference['new_tokens']} tokens"
        return result

    rows.run("AR decode, bf16", lambda: speed("bf16", 6.0))

    second = torch.device("cuda:1")
    if setup.device.type == "cuda" and torch.cuda.device_count() >= 2:
        try:
            model.to(second)  # the host's current device stays cuda:0, as in a ComfyUI whose AR is on cuda:1
            rows.run(
                "AR CUDA graph captured on cuda:1", lambda: graph_check(second, "AR CUDA graph captured on cuda:1")
            )
        finally:
            model.to(setup.device)
            free_device_memory(second)
    else:
        why = NO_CUDA if setup.device.type != "cuda" else f"one GPU ({torch.cuda.device_count()})"
        rows.add(Check("AR CUDA graph captured on cuda:1", "skipped", why))

    layer = model.model.language_model.layers[0]
    shapes = {
        "q/o": layer.self_attn.q_proj.weight,
        "gate_up": layer.mlp.gate_up_proj.weight,
        "down": layer.mlp.down_proj.weight,
        "k+v": torch.cat([layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
    }
    for label, weight in shapes.items():
        rows.run(f"int8 fused matmul equals the eager path, {label}", lambda w=weight, n=label: int8_shape(setup, w, n))
    rows.run("int8 fused decode kernel used", lambda: int8_used(setup, kernel))
    for label, weight in shapes.items():
        rows.run(
            f"4-bit int4 matmul equals the dequantising path, {label}", lambda w=weight, n=label: w4_shape(setup, w, n)
        )

    def w4_ar() -> list:
        from common import restore_modules_, swap_w4a16_

        from glm_image_core import formats
        from glm_image_core.formats import w4a16

        replaced = swap_w4a16_(model, "model.language_model.layers.")
        try:
            free_device_memory(setup.device)
            graphs.records.clear()
            result = speed("4-bit", 4.0)
            # the layers that ran: fast_ar reads k_proj and v_proj through one joined layer of its own
            layers = [m for m in model.modules() if formats.of_layer(m) is formats.W4A16 and m.kernel is not None]
            kernels = {k: sum(m.kernel == k for m in layers) for k in {m.kernel for m in layers}}
            record = graphs.records[-1] if graphs.records else {}
            numbers = {"layers_run": len(layers), "last_kernel": kernels, "graph": record}
            name = "4-bit AR decode: int4 matmul inside the CUDA graph"
            if setup.device.type != "cuda":
                return [*result, Check(name, "skipped", dry_note(setup, "decoded with the dequantising path"), numbers)]
            holds = (
                bool(layers) and kernels == {w4a16.W4A16Linear.INT4PACK: len(layers)} and bool(record.get("captured"))
            )
            return [*result, Check(name, "verified" if holds else "broken", record.get("reason") or "", numbers)]
        finally:
            restore_modules_(model, replaced)

    rows.run("4-bit AR decode", w4_ar)

    def int8_ar() -> list:
        int8.quantise_model_(model)
        free_device_memory(setup.device)
        kernel.calls = kernel.fused = 0
        graphs.records.clear()
        result = speed("int8", 4.0)
        record = graphs.records[-1] if graphs.records else {}
        numbers = {
            "kernel_calls": kernel.calls,
            "fused_calls": kernel.fused,
            "unavailable": kernel.unavailable,
            "graph": record,
        }
        name = "int8 AR decode: fused kernel inside the CUDA graph"
        if setup.device.type != "cuda":
            return [*result, Check(name, "skipped", dry_note(setup, "decoded with the eager int8 path"), numbers)]
        holds = kernel.calls > 0 and kernel.fused == kernel.calls and bool(record.get("captured"))
        return [*result, Check(name, "verified" if holds else "broken", kernel.unavailable or "", numbers)]

    rows.run("int8 AR decode", int8_ar)


def scratch_mib(call) -> float:
    """MiB that one ``call()`` allocates on the current CUDA device beyond what was allocated before (its scratch and
    output)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def int8_shape(setup: Setup, weight: torch.Tensor, label: str) -> Check:
    """The fused kernel against the eager int8 path (float32 scale) on one projection's shape, rows 1 and 4."""
    from glm_image_core.formats import int8, int8_kernel

    q, scale = int8.quantise_int8(weight)
    generator = torch.Generator(weight.device).manual_seed(0)
    numbers = {"shape": list(weight.shape)}
    worst = 0.0
    for batch in (1, 4):
        x = torch.randn(batch, weight.shape[1], device=weight.device, generator=generator, dtype=weight.dtype)
        eager = int8.int8_linear(x, q, scale, fused=False).float()
        # on the CPU: the kernel's math, eagerly (what torch.compile fuses on CUDA)
        fused = int8.int8_linear(x, q, scale) if x.is_cuda else int8_kernel.fused_int8_linear(x, q, scale)
        error = ((fused.float() - eager).norm() / eager.norm()).item()
        numbers[f"rel_l2_{batch}_rows"] = error
        worst = max(worst, error)
    if setup.device.type == "cuda":
        x = x[:1]
        numbers["scratch_mib"] = scratch_mib(lambda: int8.int8_linear(x, q, scale))
        numbers["fused_s"] = time_call(lambda: int8.int8_linear(x, q, scale), setup.device, 50)
        numbers["eager_s"] = time_call(lambda: int8.int8_linear(x, q, scale, fused=False), setup.device, 50)
        numbers["bf16_s"] = time_call(lambda: torch.nn.functional.linear(x, weight), setup.device, 50)
    # float32 accumulation in both; the orders differ. No bf16 copy of the matrix: scratch far below its 2 bytes/weight
    holds = worst < 1e-2 and numbers.get("scratch_mib", 0) < weight.numel() * 2 / 2**20 / 4
    return Check(
        f"int8 fused matmul equals the eager path, {label}",
        gpu_status(setup, holds),
        dry_note(setup, "the kernel's math ran eagerly on the CPU"),
        numbers,
    )


def w4_shape(setup: Setup, weight: torch.Tensor, label: str) -> Check:
    """A 4-bit layer of one projection's shape: torch's int4 matmul (CUDA; its CPU twin in a dry run) against the
    dequantising path, rows 1 and 4; on CUDA its scratch memory and time next to both other paths."""
    from types import SimpleNamespace

    from common import w4a16_layer

    from glm_image_core.formats import w4a16

    name = f"4-bit int4 matmul equals the dequantising path, {label}"
    source = SimpleNamespace(weight=weight, bias=None)
    fast, dequantising = w4a16_layer(source), w4a16_layer(source)  # the first one's packed tensors move once repacked
    dequantising.use_int4pack = False
    supported = w4a16.int4pack_supported(fast.in_features, fast.out_features, fast.group_size, None)
    numbers = {"shape": list(weight.shape), "group_size": fast.group_size, "int4pack_supported": supported}
    generator = torch.Generator(weight.device).manual_seed(0)
    devices, w4a16.INT4PACK_DEVICES = w4a16.INT4PACK_DEVICES, (weight.device.type,)  # dry run: the CPU twin
    try:
        worst = 0.0
        for batch in (1, 4):
            x = torch.randn(batch, weight.shape[1], device=weight.device, generator=generator, dtype=torch.bfloat16)
            got, expected = fast(x).float(), dequantising(x).float()
            numbers[f"kernel_{batch}_rows"] = fast.kernel
            error = ((got - expected).norm() / expected.norm()).item()
            numbers[f"rel_l2_{batch}_rows"] = error
            worst = max(worst, error)
        if setup.device.type == "cuda":
            x = x[:1]
            numbers["scratch_mib"] = scratch_mib(lambda: fast(x))
            numbers["int4pack_s"] = time_call(lambda: fast(x), setup.device, 50)
            numbers["dequantize_s"] = time_call(lambda: dequantising(x), setup.device, 50)
            numbers["bf16_s"] = time_call(lambda: torch.nn.functional.linear(x, weight), setup.device, 50)
    finally:
        w4a16.INT4PACK_DEVICES = devices
    used = numbers["kernel_1_rows"] == w4a16.W4A16Linear.INT4PACK or not supported
    holds = worst < 2e-2 and used and numbers.get("scratch_mib", 0) < weight.numel() * 2 / 2**20 / 4
    return Check(name, gpu_status(setup, holds), dry_note(setup, "torch's CPU int4 matmul stood in"), numbers)


def int8_used(setup: Setup, kernel) -> Check:
    numbers = {"calls": kernel.calls, "fused_calls": kernel.fused, "compiled": kernel.compiled is not None}
    if setup.device.type != "cuda":
        return Check("int8 fused decode kernel used", "skipped", dry_note(setup, "the kernel is CUDA-only"), numbers)
    holds = kernel.calls > 0 and kernel.fused == kernel.calls and kernel.unavailable is None
    return Check("int8 fused decode kernel used", "verified" if holds else "broken", kernel.unavailable or "", numbers)


# --- part: ComfyUI (fp8 _fast matmuls, TorchCompileModel, the DiT's speed and memory through ComfyUI) -------------------


COMPILE_RUNS = ("size A", "size A again", "size B", "size B again")


def comfy_modules(setup: Setup, rows: Rows, args, names: list[str], sdpa: bool = False):
    """(comfy.model_management, our nodes package), or None with a skipped row per name when there is no ComfyUI."""
    comfyui = Path(args.comfyui) if args.comfyui else None
    if comfyui is None or not (comfyui / "comfy" / "model_management.py").is_file():
        why = f"no ComfyUI at {comfyui}" if comfyui else "no ComfyUI: pass --comfyui or set COMFYUI_PATH"
        rows.add(*(Check(name, "skipped", why) for name in names))
        return None
    import bench_comfy

    extra = ("comfy.sample", "comfy_extras.nodes_torch_compile")
    return bench_comfy.import_comfy(comfyui, cpu=setup.device.type == "cpu", extra=extra, sdpa=sdpa)


def part_comfyui(setup: Setup, rows: Rows, args) -> None:
    name = "fp8_e4m3fn_fast DiT runs torch._scaled_mm"
    if (modules := comfy_modules(setup, rows, args, [name])) is not None:
        rows.run(name, lambda: fp8_check(setup, *modules, computed_stages(args.computed)))


def part_compile(setup: Setup, rows: Rows, args) -> None:
    names = [f"TorchCompileModel (inductor) recompilations: {run}" for run in COMPILE_RUNS]
    # On a CPU, SDPA as on CUDA: ComfyUI's CPU default (sub-quadratic attention) breaks the graph and triples the
    # traces. On a GPU, the attention ComfyUI picks for its users (SDPA, or xformers/sage when installed).
    sdpa = setup.device.type == "cpu"
    if (modules := comfy_modules(setup, rows, args, names, sdpa=sdpa)) is not None:
        rows.run(names[0], lambda: compile_check(setup, *modules, rows))


def comfy_dit_state(setup: Setup, config: dict) -> tuple[dict, int]:
    """A DiT of ``config`` with random weights, as a CPU state dict (what the loader node reads), and its text dim."""
    from common import _materialize

    from glm_image_core.dit import GlmImageTransformer2DModel

    dit = _materialize(GlmImageTransformer2DModel(**config, dtype=setup.dtype, device="meta"), setup)
    text_dim = dit.glyph_projector.net[0].proj.in_features
    state = {k: v.to("cpu") for k, v in dit.state_dict().items()}
    del dit
    free_device_memory(setup.device)
    return state, text_dim


def fp8_check(setup: Setup, mm, pack_nodes, stages: dict) -> list:
    from bench_comfy import dit_forwards

    from glm_image_core.defaults import DEFAULT_SIDE

    size = 512 if setup.tiny else DEFAULT_SIDE
    config = {k: v for k, v in setup.config("transformer").items() if not k.startswith("_")}
    state, text_dim = comfy_dit_state(setup, config)
    context = cuda_context_bytes(setup.device)
    outputs, numbers, result = {}, {}, []
    for weight_dtype, label, recipe in (("default", "bf16", "24 GB"), ("fp8_e4m3fn_fast", "fp8_e4m3fn_fast", "12 GB")):
        reset_peak(setup.device)
        patcher = pack_nodes.dit_loading.load_dit_patcher(state, config, weight_dtype)
        mm.load_models_gpu([patcher], force_full_load=True)
        forward = dit_forwards(setup, patcher.model, mm.get_torch_device(), size, text_dim)
        with torch.inference_mode():
            with counted(torch, "_scaled_mm") as calls:
                outputs[label] = forward(2)().float().cpu()
            numbers[f"scaled_mm_calls_{label}"] = calls[0]
            b1 = time_call(forward(1), setup.device, setup.repeats)
            b2 = time_call(forward(2), setup.device, setup.repeats)
        peak = peak_numbers(setup.device, context)
        result += [
            Row(
                f"DiT forward {size}x{size}, batch 1, ComfyUI {label}",
                "s",
                b1,
                None,
                0.10 if label == "bf16" else 0.075,
                f"comfy.ops, weights {weight_dtype}",
            ),
            Row(f"DiT forward {size}x{size}, batch 2 (cond + uncond), ComfyUI {label}", "s", b2, None, None, ""),
            memory_check(
                f"Peak memory, DiT stage via ComfyUI {label} (batch 2) vs computed {recipe}",
                setup,
                peak,
                stages[recipe]["t2i"]["DiT"]["peak"],
                "load + forwards, no cap; computed: 1024x1024, 256 glyph tokens (here the prompt's 14)",
            ),
        ]
        mm.unload_all_models()
        del patcher, forward
        free_device_memory(setup.device)
    bf16, fp8 = outputs["bf16"], outputs["fp8_e4m3fn_fast"]
    numbers["rel_l2_vs_bf16"] = ((fp8 - bf16).norm() / bf16.norm()).item()
    numbers["finite"] = bool(fp8.isfinite().all())
    name = "fp8_e4m3fn_fast DiT runs torch._scaled_mm"
    if setup.device.type != "cuda":
        note = "ComfyUI's fp8 weights with manual cast (torch._scaled_mm needs an Ada/Hopper GPU)"
        return [Check(name, "skipped", dry_note(setup, note), numbers), *result]
    holds = numbers["scaled_mm_calls_fp8_e4m3fn_fast"] > 0 and numbers["finite"]
    return [
        Check(name, "verified" if holds else "broken", "one batch-2 forward; error: fp8 vs bf16 output", numbers),
        *result,
    ]


def comfy_conditionings(width: int, height: int, text_dim: int, seed: int):
    """(positive, negative) as GLM-Image Encode makes them: glyph embeddings and visual tokens (random here)."""
    g = torch.Generator().manual_seed(seed)
    glyph, empty = torch.randn(1, 14, text_dim, generator=g), torch.randn(1, 1, text_dim, generator=g)
    prior = torch.randint(0, 16384, (1, (height // 16) * (width // 16)), generator=g)
    extras = {"glm_prior_token_ids": prior, "glm_empty_glyph": empty}
    return [[glyph, dict(extras)]], [[empty, extras]]


def compile_check(setup: Setup, mm, pack_nodes, rows: Rows) -> list:
    """TorchCompileModel's execute on our MODEL, then KSampler's path (3 euler steps, cfg 1.5) at size A, A again,
    B, B again; one row per run, added as it ends (an inductor recompilation can take a minute)."""
    import comfy.sample
    import torch._dynamo
    from comfy_extras.nodes_torch_compile import TorchCompileModel
    from torch._dynamo.utils import counters

    backend = "inductor" if setup.device.type == "cuda" else "eager"  # inductor's C++ build takes minutes on a CPU
    config = {k: v for k, v in setup.config("transformer").items() if not k.startswith("_")}
    config["num_layers"] = 1  # full width, 1 of 30 layers: compile time, not recompilations, grows with depth
    state, text_dim = comfy_dit_state(setup, config)
    patcher = pack_nodes.dit_loading.load_dit_patcher(state, config, "default")
    compiled = TorchCompileModel.execute(patcher, backend)[0]
    a, b = (256, 320) if setup.tiny else (1024, 768)
    torch._dynamo.reset()
    counters.clear()
    for run, side, seed in zip(COMPILE_RUNS, (a, a, b, b), (0, 1, 0, 1)):
        graphs = counters["stats"]["unique_graphs"]
        model = compiled.clone()
        model.add_object_patch("model_sampling", pack_nodes.model_sampling.model_sampling_for_size(side, side))
        positive, negative = comfy_conditionings(side, side, text_dim, seed)
        noise = torch.randn(1, 16, side // 8, side // 8, generator=torch.Generator().manual_seed(seed))
        start = time.perf_counter()
        with recompile_log() as reasons:
            comfy.sample.sample(
                model, noise, 3, 1.5, "euler", "simple", positive, negative, torch.zeros_like(noise), seed=seed
            )
        new_graphs = counters["stats"]["unique_graphs"] - graphs
        numbers = {
            "size": f"{side}x{side}",
            "recompiles": len(reasons),
            "new_graphs": new_graphs,
            "seconds": time.perf_counter() - start,
            "backend": backend,
            "dit_layers": config["num_layers"],
        }
        detail = " || ".join(" ".join(reason.split())[:240] for reason in reasons[:3])
        # the first run compiles, once; a rerun (new noise, sigmas, uuids) reuses it; a new size may recompile
        holds = (new_graphs > 0 if run == "size A" else new_graphs == 0) and not reasons
        status = "measured" if run == "size B" else gpu_status(setup, holds)
        if status == "skipped":
            detail = dry_note(setup, f"Dynamo with the eager backend; {detail}")
        rows.add(Check(f"TorchCompileModel (inductor) recompilations: {run}", status, detail, numbers))
    return []


# --- part: memory per stage (core pipeline, staged offload) -------------------------------------------------------------


def part_memory(setup: Setup, rows: Rows, args) -> None:
    import bench_pipeline

    from glm_image_core import ar, memory, pipeline
    from glm_image_core.formats import int8

    stages = computed_stages(args.computed)
    context = cuda_context_bytes(setup.device)
    size = 512 if setup.tiny else 1024
    models, _ = bench_pipeline.build_models(setup, offload=True, with_reference=False)
    original_stage = pipeline.stage
    peaks: dict[str, dict] = {}

    @contextlib.contextmanager
    def observed_stage(models, *modules):
        labels = {id(models.glyph_encoder): "glyph", id(models.dit): "DiT", id(models.vae): "VAE decode"}
        label = labels.get(id(modules[0]), "AR decode")
        if modules[0] is memory.ar_vision_modules(models.ar_model)[0]:
            label = "AR vision"
        with original_stage(models, *modules):
            reset_peak(setup.device)
            yield
            peaks[label] = peak_numbers(setup.device, context)  # a text-to-image runs the VAE once: its decode

    pipeline.stage = observed_stage
    steps = 2  # the peaks do not depend on the number of steps
    label = f"core pipeline staged, {size}x{size}, {steps} steps"

    def staged(recipe: str, which: tuple[str, ...], what: str) -> list[Check]:
        peaks.clear()
        pipeline.generate(models, PROMPT, size, size, steps=steps, seed=0)
        note = f"{label}, {what}"
        return [
            memory_check(
                f"Peak memory, {stage} stage ({what}) vs computed {recipe}",
                setup,
                peaks.get(stage),
                stages[recipe]["t2i"][stage]["peak"],
                note,
            )
            for stage in which
        ]

    rows.run(
        "Peak memory per stage, bf16",
        lambda: staged("24 GB", ("AR decode", "glyph", "DiT", "VAE decode"), "AR bf16, DiT bf16"),
    )

    def w4() -> list[Check]:
        """The 8 GB recipe: the AR decoder's and the DiT blocks' layers 4-bit (packed on the device, kept on the
        CPU between stages like the others), the whole staged text-to-image."""
        from common import restore_modules_, swap_w4a16_

        swapped = []
        for holder, attribute, prefix in (
            (models, "ar_model", "model.language_model.layers."),
            (models, "dit", "transformer_blocks."),
        ):
            module = getattr(holder, attribute).to(setup.device)  # packed on the GPU (seconds)
            replaced = swap_w4a16_(module, prefix)
            for original in replaced.values():
                original.to("cpu")
            setattr(holder, attribute, module.to("cpu") if setup.device.type == "cuda" else module)
            swapped.append((module, replaced))
        free_device_memory(setup.device)
        try:
            return staged("8 GB", ("AR decode", "glyph", "DiT", "VAE decode"), "AR 4-bit, DiT 4-bit")
        finally:
            for module, replaced in swapped:
                restore_modules_(module, replaced)

    rows.run("Peak memory per stage, 4-bit", w4)

    def int8_ar() -> Check:
        ar_model = models.ar_model.to(setup.device)  # quantised on the GPU (seconds; minutes on the CPU)
        int8.quantise_model_(ar_model)
        models.ar_model = ar_model = ar_model.to("cpu") if setup.device.type == "cuda" else ar_model
        free_device_memory(setup.device)
        peaks.clear()
        inputs = ar.build_ar_inputs(models.processor, PROMPT, size, size)
        with pipeline.stage(models, *memory.ar_decode_modules(ar_model)):  # the AR stage alone, as generate runs it
            generator = torch.Generator(ar.decoder_device(ar_model)).manual_seed(0)
            ar.generate_prior_tokens(ar_model, inputs, [generator])
        return memory_check(
            "Peak memory, AR decode stage (AR int8) vs computed 12 GB",
            setup,
            peaks.get("AR decode"),
            stages["12 GB"]["t2i"]["AR decode"]["peak"],
            f"{label}, the AR stage alone",
        )

    rows.run("Peak memory, AR decode stage, int8", int8_ar)


# --- part: speed (run_all's DiT, VAE and end-to-end rows) ---------------------------------------------------------------


def part_speed(setup: Setup, rows: Rows, args) -> None:
    import bench_dit
    import bench_pipeline

    rows.run("DiT and VAE speed", lambda: bench_dit.run(setup))
    free_device_memory(setup.device)
    rows.run("Text-to-image end to end", lambda: bench_pipeline.run(setup))


# --- part: probes (where the AR's decode time goes; what a 4-bit prefill costs by path) -------------------------------


def part_probe(setup: Setup, rows: Rows, args) -> None:
    import bench_ar
    from common import build_ar_model, w4a16_layer

    from glm_image_core import ar
    from glm_image_core.loading import load_ar_processor

    model = build_ar_model(setup)
    processor = load_ar_processor(setup.folder)
    side = 256 if setup.tiny else 512
    inputs = ar.build_ar_inputs(processor, PROMPT, side, side)

    def decode_profile() -> Check:
        """The bf16 decode's kernels, eager steps (a CUDA graph replays the same kernels without the launches):
        CUDA time per token against the CUDA-graph wall time per token, and the kernels that take it."""
        from torch.profiler import ProfilerActivity, profile

        tokens = inputs.geometry.num_grid_tokens
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
        generator = torch.Generator(setup.device).manual_seed(0)
        with profile(activities=activities) as prof:
            ar.generate_prior_tokens(model, inputs, [generator], fast=True, cuda_graph=False)
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"] if activities[1:] else []
        per_token = sum(e.self_device_time_total for e in events) / 1000 / tokens
        top = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:12]
        numbers = {
            "tokens": tokens,
            "cuda_ms_per_token": per_token,
            "kernels_per_token": sum(e.count for e in events) / tokens,
            "graph_ms_per_token": bench_ar.measure_ours(model, inputs, setup)["ms_per_token"],
            "top": {e.key[:60]: round(e.self_device_time_total / 1000 / tokens, 4) for e in top},
        }
        return Check(
            f"AR decode {side}x{side} bf16: CUDA time by kernel",
            "measured" if events else "skipped",
            dry_note(setup, "ms per token, prefill included"),
            numbers,
        )

    rows.run("AR decode profile", decode_profile)

    def prefill_paths() -> Check:
        """One gate_up projection of the 4-bit AR at prefill sizes: torch's int4 matmul, the dequantising path with
        the packed tensors on the device, and with them in (pageable) CPU memory, where they are after a repack."""
        from glm_image_core.formats import w4a16

        weight = model.model.language_model.layers[0].mlp.gate_up_proj
        layer = w4a16_layer(weight)
        packed = None
        if setup.device.type == "cuda":
            packed = w4a16.int4pack(layer.qweight, layer.qzeros, layer.scales, layer.group_size)
        in_cpu_memory = [t.cpu() for t in (layer.qweight, layer.qzeros, layer.scales)]
        paths = {
            "int4pack": lambda x: w4a16.int4pack_mm(x, packed[0], layer.group_size, packed[1]),
            "dequantise_on_device": lambda x: torch.nn.functional.linear(x, layer.dequantise(x.dtype, x.device)),
            "dequantise_from_cpu": lambda x: torch.nn.functional.linear(
                x, w4a16.dequantise(*(t.to(x.device) for t in in_cpu_memory), layer.group_size, None, x.dtype)
            ),
            "bf16": weight,
        }
        numbers = {"shape": list(weight.weight.shape)}
        for count in (128, 1024):
            x = torch.randn(count, weight.in_features, device=setup.device, dtype=weight.weight.dtype)
            for path, call in paths.items():
                if path != "int4pack" or packed is not None:
                    numbers[f"{path}_ms_{count}"] = 1000 * time_call(lambda c=call, x=x: c(x), setup.device, 10)
        return Check("4-bit prefill paths, gate_up", "measured", dry_note(setup, "ms per call"), numbers)

    rows.run("4-bit prefill paths", prefill_paths)

    def compiled_decode() -> Check:
        """ms/token of the bf16 decode with each layer's small kernels fused by torch.compile, inside the CUDA graph."""
        if setup.device.type != "cuda":
            return Check("AR decode, compiled layer", "skipped", NO_CUDA)
        start = time.perf_counter()
        result = bench_ar.measure_ours(model, inputs, setup, compile_decoder=True)
        numbers = {"ms_per_token": result["ms_per_token"], "seconds_with_compile": time.perf_counter() - start}
        return Check(f"AR decode {side}x{side} bf16, compiled layer (CUDA graph)", "measured", "", numbers)

    rows.run("AR decode, compiled layer", compiled_decode)


PART_FUNCTIONS = {
    "ar": part_ar,
    "comfyui": part_comfyui,
    "memory": part_memory,
    "speed": part_speed,
    "compile": part_compile,
    "probe": part_probe,
}


# --- the parent: environment, parts in subprocesses, the table and the JSON ---------------------------------------------


def environment(dry_run: bool, comfyui: str | None) -> tuple[Check, list[str]]:
    """What this machine has, and what is missing with what it costs."""
    numbers = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": []}
    if torch.cuda.is_available():  # names from nvidia-smi: the parent holds no CUDA context beside the parts'
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        )
        numbers["gpus"] = smi.stdout.strip().splitlines() or [f"{torch.cuda.device_count()} CUDA device(s)"]
    missing = []
    if not torch.cuda.is_available() and not dry_run:
        missing.append("CUDA: torch sees no GPU (use --dry-run on a CPU)")
    for package, cost in (
        ("transformers", "every part (the AR model, the tokenizers)"),
        ("diffusers", "the reference columns of the DiT/VAE rows (optional)"),
        ("triton", "inductor and the fused int8 kernel"),
        ("torchsde", "ComfyUI's samplers (the TorchCompileModel check)"),
    ):
        if importlib.util.find_spec(package) is None:
            missing.append(f"{package}: {cost}")
        else:
            module = __import__(package)
            numbers[package] = getattr(module, "__version__", "?")
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        if not hasattr(transformers, "GlmImageForConditionalGeneration"):
            missing.append(f"transformers {transformers.__version__} has no GlmImage (>= 5.0 needed)")
    if comfyui and (Path(comfyui) / "comfy" / "model_management.py").is_file():
        version = (Path(comfyui) / "comfyui_version.py").read_text().split('"')[1]
        numbers["comfyui"] = f"{version} at {comfyui}"
    else:
        missing.append(f"ComfyUI ({comfyui or 'pass --comfyui or set COMFYUI_PATH'}): the fp8 and compile checks")
    if dry_run:
        status, detail = "skipped", NO_CUDA
    else:
        status, detail = ("verified", "") if not missing else ("skipped", "missing: " + "; ".join(missing))
    return Check("environment", status, detail, numbers), missing


def run_part(names: list[str], args, tmp: Path, timeout: float) -> list[Check]:
    """Parts in a process of their own, its output passed through; a crash or a timeout becomes a broken row."""
    name = ",".join(names)
    out = tmp / f"{name}.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--part",
        *names,
        "--rows",
        str(out),
        "--computed",
        str(tmp / "computed.json"),
        "--tiny-folder",
        str(tmp / "GLM-Image"),
        *(["--dry-run"] if args.dry_run else []),
        *(["--comfyui", args.comfyui] if args.comfyui else []),
    ]
    tail: deque[str] = deque(maxlen=20)
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )

    def relay():
        for line in process.stdout:
            print(f"  [{name}] {line}", end="", file=sys.stderr, flush=True)
            tail.append(line.rstrip())

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout=timeout)
        problem = None if code == 0 else f"exited with code {code}"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()
        problem = f"timed out after {timeout:.0f} s"
    reader.join(timeout=5)
    checks = [Check(**row) for row in json.loads(out.read_text())] if out.is_file() else []
    if problem:
        checks.append(Check(f"{name} part", "broken", f"{problem}; log: " + " | ".join(list(tail)[-8:])))
    return checks


def table(checks: list[Check]) -> str:
    def numbers(values: dict) -> str:
        parts = []
        for key, value in values.items():
            if isinstance(value, float):
                value = f"{value:.4g}"
            elif isinstance(value, dict):
                value = "{" + numbers(value) + "}"
            parts.append(f"{key}={value}")
        return ", ".join(parts)

    lines = ["| Check | Status | Numbers | Detail |", "| --- | --- | --- | --- |"]
    for c in checks:
        detail = c.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {c.name} | {c.status} | {numbers(c.numbers).replace('|', '/')} | {detail} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with the tiny models (CI)")
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (fp8, compile)")
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS), help="run only these parts")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="time for the whole run")
    parser.add_argument("--part", nargs="+", choices=list(PARTS), help=argparse.SUPPRESS)  # in a child process
    parser.add_argument("--rows", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--computed", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tiny-folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.part:  # a child: run these parts, their rows to --rows
        setup = Setup.create(tiny=args.dry_run, folder=args.tiny_folder)
        rows = Rows(args.rows)
        for name in args.part:
            if len(args.part) > 1:
                print(f"--- {name}", file=sys.stderr, flush=True)
            rows.run(f"{name} part", lambda name=name: PART_FUNCTIONS[name](setup, rows, args))
        return 0

    start = time.perf_counter()
    env, missing = environment(args.dry_run, args.comfyui)
    print("GPU check: " + ("dry run on the CPU, tiny models" if args.dry_run else "full-size models, random weights"))
    for line in missing:
        print(f"MISSING  {line}")
    if not torch.cuda.is_available() and not args.dry_run:
        raise SystemExit("No CUDA GPU: run with --dry-run on a CPU.")
    checks = [env]
    result = {"dry_run": args.dry_run, "device": env.numbers["gpus"] or ["CPU"], "rows": checks}

    def write() -> None:
        result["seconds"] = time.perf_counter() - start
        if args.json:
            args.json.write_text(json.dumps({**result, "rows": [asdict(c) for c in checks]}, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        from glm_image_core.tiny import write_tiny_model

        write_tiny_model(Path(tmp) / "GLM-Image", seed=0)  # once: its processor and tokenizers serve every part

        def computed() -> None:  # the README's computed memory table, once for every part that compares against it
            try:
                import memory_table

                (Path(tmp) / "computed.json").write_text(json.dumps(memory_table.stage_table()))
            except Exception as e:
                checks.append(Check("computed memory table", "broken", error_text(e)))

        table_thread = threading.Thread(target=computed)
        table_thread.start()  # beside the AR part, which does not need it
        if args.dry_run:
            groups = [[name for name in DRY_RUN_ORDER if name in args.parts]]
        else:
            groups = [[name] for name in args.parts]
        for names in groups:
            if names != ["ar"]:
                table_thread.join()
            left = args.budget_s - (time.perf_counter() - start)
            print(f"--- {', '.join(names)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            if left < 30:
                why = f"not started: the {args.budget_s:.0f} s budget is spent"
                checks.extend(Check(f"{name} part", "skipped", why) for name in names)
            else:
                checks.extend(run_part(names, args, Path(tmp), min(sum(PARTS[name] for name in names), left)))
            write()
        table_thread.join()
    write()
    print(table(checks))
    print(f"{time.perf_counter() - start:.0f} s" + (f"; rows in {args.json}" if args.json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
