"""The DiT as ComfyUI runs it: our ComfyUI MODEL (nodes/model.py, built by nodes/dit_loading.py) under ComfyUI's model management, with
``comfy.ops`` layers in bf16 and in fp8 (``fp8_e4m3fn_fast``: fp8 weights, ``torch._scaled_mm`` where the GPU has it).

    python benchmarks/bench_comfy.py --comfyui /path/to/ComfyUI [--tiny] [--json rows.json]

Needs a ComfyUI checkout (not installed: only its ``comfy`` package is imported, with this repo's nodes/).
Run it in its own process: importing ComfyUI changes global torch settings, and on CUDA the process is capped
(``set_per_process_memory_fraction``) at the memory goal of each weight dtype: 22 GiB for bf16, 14 GiB for fp8.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import sys
from pathlib import Path

import torch
from bench_dit import dit_inputs
from common import REPO, GiB, Row, Setup, build_dit, failed_row, free_device_memory, peak_gib, reset_peak, time_call

from glm_image_core.defaults import DEFAULT_SIDE

PACK = "glm_image_bench_pack"  # this repo as a package, so the nodes' relative imports resolve


def import_comfy(comfyui: Path, cpu: bool, extra: tuple[str, ...] = (), sdpa: bool = False):
    """ComfyUI's model management and our nodes/ package (its `dit_loading` and `model_sampling` imported), without
    the rest of ComfyUI (no server, no node packs); ``extra``: more ComfyUI modules to import while the stand-ins for
    missing packages are in place; ``sdpa``: ComfyUI's attention is torch's SDPA on a CPU too, as on CUDA (on a CPU
    ComfyUI picks its sub-quadratic attention)."""
    sys.path.insert(0, str(comfyui))
    sys.path.insert(0, str(REPO / "tests"))
    from comfy.cli_args import args

    args.cpu = cpu  # both read when comfy.model_management is first imported
    args.use_pytorch_cross_attention = args.use_pytorch_cross_attention or sdpa
    from comfy_host import _package_stubs  # stand-ins only where torchvision/torchaudio/av are not installed

    for name, location in ((PACK, REPO), (f"{PACK}.nodes", REPO / "nodes")):  # bare packages: no __init__ runs
        if name in sys.modules:  # imported by an earlier call in this process: its submodules hang on it
            continue
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(location)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    with _package_stubs():
        import comfy.model_management

        for name in ("dit_loading", "model_sampling"):
            importlib.import_module(f"{PACK}.nodes.{name}")
        for name in extra:
            importlib.import_module(name)
    return comfy.model_management, sys.modules[f"{PACK}.nodes"]


def run(setup: Setup) -> list[Row]:
    if setup.comfyui is None or not (setup.comfyui / "comfy" / "model_management.py").is_file():
        return [Row("DiT via ComfyUI", "", note=f"skipped: no ComfyUI at {setup.comfyui}")]
    try:
        mm, pack_nodes = import_comfy(setup.comfyui, cpu=setup.device.type == "cpu")
    except Exception as e:
        return [failed_row("DiT via ComfyUI (import)", e)]
    size = 512 if setup.tiny else DEFAULT_SIDE
    config = setup.config("transformer")
    ours, _ = build_dit(setup, with_reference=False)
    text_dim = ours.glyph_projector.net[0].proj.in_features
    state_dict = {k: v.to("cpu") for k, v in ours.state_dict().items()}
    del ours
    free_device_memory(setup.device)

    rows: list[Row] = []
    for weight_dtype, goal, cap_gib in (("default", 0.10, 22.0), ("fp8_e4m3fn_fast", 0.075, 14.0)):
        label = "bf16" if weight_dtype == "default" and not setup.tiny else weight_dtype
        if setup.device.type == "cuda":  # the memory goal of that weight dtype, as a card of that size would have
            total = torch.cuda.get_device_properties(setup.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GiB / total), setup.device)
        try:
            rows.extend(measure(setup, mm, pack_nodes, state_dict, config, weight_dtype, label, goal, size, text_dim))
        except torch.OutOfMemoryError as e:
            rows.append(Row(f"DiT via ComfyUI {label}", "", note=f"out of memory under {cap_gib:g} GiB: {e}"[:160]))
        except Exception as e:
            rows.append(failed_row(f"DiT via ComfyUI {label}", e))
        mm.unload_all_models()
        free_device_memory(setup.device)
    return rows


def measure(setup, mm, pack_nodes, state_dict, config, weight_dtype, label, goal, size, text_dim) -> list[Row]:
    """Load the DiT as the DiT loader node does (``weight_dtype``), full-load it on the GPU, time batch 1 and 2."""
    patcher = pack_nodes.dit_loading.load_dit_patcher(state_dict, config, weight_dtype)
    mm.load_models_gpu([patcher], force_full_load=True)
    forward = dit_forwards(setup, patcher.model, mm.get_torch_device(), size, text_dim)

    with torch.inference_mode():
        b1 = time_call(forward(1), setup.device, setup.repeats)
        reset_peak(setup.device)
        b2 = time_call(forward(2), setup.device, setup.repeats)
        peak = peak_gib(setup.device)
    return [
        Row(
            f"DiT forward {size}x{size}, batch 1, ComfyUI {label}",
            "s",
            b1,
            None,
            goal,
            f"comfy.ops, weights {weight_dtype}",
        ),
        Row(
            f"DiT forward {size}x{size}, batch 2 (cond + uncond), ComfyUI {label}",
            "s",
            b2,
            None,
            None,
            "ComfyUI batches cond + uncond (GlyphCond padding)",
        ),
        Row(
            f"Peak GPU memory, DiT stage via ComfyUI {label} (batch 2)",
            "GiB",
            peak,
            None,
            14.0 if "fp8" in weight_dtype else 22.0,
            "DiT weights + activations, process capped at the goal",
        ),
    ]


def dit_forwards(setup: Setup, model, device: torch.device, size: int, text_dim: int):
    """forward(batch) -> a call of the loaded ComfyUI model's DiT on batch 1 (cond) or 2 (cond + uncond)."""
    from glm_image_core.sampling import pad_glyphs

    dtype = model.manual_cast_dtype or model.get_dtype()
    latent, cond, uncond, prior, timestep = dit_inputs(setup, size, text_dim)
    latent, cond, uncond = latent.to(device, dtype), cond.to(device, dtype), uncond.to(device, dtype)
    glyphs = {1: (cond, torch.ones(1, cond.shape[1], dtype=torch.long, device=device))}
    pair, mask = pad_glyphs([cond, uncond])  # what GlyphCond.concat builds for a cond + uncond batch
    glyphs[2] = (pair, mask.long())

    def forward(batch):
        return lambda: model.diffusion_model(
            latent.repeat(batch, 1, 1, 1),
            timestep.repeat(batch).to(device),
            glyph=glyphs[batch],
            prior_token_id=prior.repeat(batch, 1).to(device),
            prior_token_drop=torch.tensor([[0], [1]][:batch], device=device),
            transformer_options={},
        )

    return forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (CI smoke run)")
    parser.add_argument("--comfyui", required=True, help="path of a ComfyUI checkout")
    parser.add_argument("--json", help="write the rows here (for run_all.py)")
    args = parser.parse_args()
    setup = Setup.create(args.tiny, comfyui=args.comfyui)
    rows = run(setup)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row.__dict__ for row in rows], f)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
