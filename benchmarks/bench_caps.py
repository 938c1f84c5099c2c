"""The small-card recipes, measured: the whole 1024x1024 text-to-image and a 1024x1024 edit with one reference,
run as ComfyUI graphs (the pack's nodes, ComfyUI's executor and model management) in a process capped at

- 11 GiB: AR weights int8 (an exported ``*.ar_int8.safetensors``) + DiT ``fp8_e4m3fn``;
- 15 GiB: AR weights int8 + DiT bf16, loaded partially by ComfyUI where it does not fit.

    python benchmarks/bench_caps.py --comfyui /path/to/ComfyUI [--workdir DIR] [--json rows.json]
    python benchmarks/bench_caps.py --comfyui /path/to/ComfyUI --tiny     # the same graphs, tiny models, CPU

Full size: a GLM-Image folder with random weights is written once to ``--workdir`` (~26 GB: the int8 AR file, the
DiT, the VAE and the glyph encoder; the tiny model's processor, which keeps every published token id). Each recipe
runs in its own process: ``torch.cuda.set_per_process_memory_fraction`` caps PyTorch, and ComfyUI's
``--reserve-vram`` is set to the rest of the card so that its model management plans for a card of the cap's size.
Rows: seconds and peak ``max_memory_allocated`` per stage (AR tokens, glyph encode, sampling, VAE decode) and for
the whole graph. Not run yet on a GPU (see README, Memory).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import GiB, Row, failed_row, published_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"11": ("fp8_e4m3fn", 11.0), "15": ("default", 15.0)}  # cap name -> DiT weight_dtype, cap in GiB
AR_FILE = "GLM-Image.ar_int8.safetensors"
TASKS = {"t2i": "text-to-image", "edit": "edit, 1 reference"}
STAGES = {  # what each timed call is
    "GLMImageGenerateTokens": "AR tokens (vision encoder for edits, then decode)",
    "GLMImageEncode": "glyph encode (and the reference's VAE encode)",
    "sample": "DiT sampling (KSampler)",
    "decode": "VAE decode",
}


# --- the model folder ----------------------------------------------------------------------------------------------


def write_full_size_folder(root: Path) -> None:
    """Random full-size weights in the published layout (bf16; the AR as one int8 export beside the folder)."""
    from common import Setup, build_ar_model, build_dit, build_glyph_encoder, build_vae

    from glm_image_core.ar_loading import write_ar_int8_file
    from glm_image_core.formats import int8
    from glm_image_core.tiny import write_tiny_model

    if (root / "GLM-Image" / "transformer" / "diffusion_pytorch_model.safetensors").is_file():
        return
    folder = write_tiny_model(root / "GLM-Image")  # processor, tokenizer and configs; weights replaced below
    setup = Setup.create(tiny=False)
    from safetensors.torch import save_file

    ar = build_ar_model(setup)
    int8.quantise_model_(ar)
    tensors = {k: v.cpu() for k, v in ar.state_dict().items()}
    write_ar_int8_file(
        tensors,
        published_config("vision_language_encoder"),
        {"temperature": 0.9, "top_p": 0.75, "top_k": 16512, "do_sample": True, "eos_token_id": 16385},
        root / AR_FILE,
    )
    del ar, tensors
    for component, build in (("transformer", build_dit), ("vae", build_vae)):
        model, _ = build(setup, with_reference=False)
        name = "diffusion_pytorch_model.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in model.state_dict().items()}, folder / component / name)
        (folder / component / "config.json").write_text(json.dumps(published_config(component)))
        for shard in (folder / component).glob("*-of-*.safetensors"):
            shard.unlink()
        (folder / component / f"{name}.index.json").unlink(missing_ok=True)
        del model
    glyph = build_glyph_encoder(setup)
    state = {k: v.cpu().contiguous() for k, v in glyph.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, folder / "text_encoder" / "model.safetensors")
    (folder / "text_encoder" / "config.json").write_text(json.dumps(published_config("text_encoder")))


def write_tiny_folder(root: Path) -> None:
    from glm_image_core.loading import export_ar_int8
    from glm_image_core.tiny import write_tiny_model

    if not (root / AR_FILE).is_file():
        export_ar_int8(write_tiny_model(root / "GLM-Image"), root / AR_FILE)


# --- one recipe, in its own process ---------------------------------------------------------------------------------


def import_comfyui(comfyui: Path, cpu: bool, reserve_gib: float) -> None:
    """ComfyUI with its nodes and this pack, before anything imports comfy.model_management."""
    sys.path.insert(0, str(comfyui))
    sys.path.insert(0, str(REPO / "tests"))
    from comfy.cli_args import args

    args.cpu = cpu
    args.reserve_vram = reserve_gib
    from comfy_host import _package_stubs, load_pack

    with _package_stubs():
        import importlib

        importlib.import_module("utils.extra_config")
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    load_pack()


def graph(task: str, weight_dtype: str, size: int, steps: int) -> dict:
    name = "text_to_image" if task == "t2i" else "edit_single_reference"
    prompt = json.loads((REPO / "tests" / "workflows" / f"{name}.json").read_text())
    prompt["1"]["inputs"].update(weights=AR_FILE, dtype="auto" if size == 1024 else "fp32", device="default")
    prompt["2"]["inputs"].update(width=size, height=size)
    prompt["5"]["inputs"].update(weight_dtype=weight_dtype)
    for node in ("6", "7"):
        prompt[node]["inputs"].update(width=size, height=size)
    prompt["8"]["inputs"].update(steps=steps)
    if size != 1024:
        prompt["3"]["inputs"].update(dtype="fp32")
    return prompt


class StageClock:
    """Seconds and peak allocated GiB of every call of the stage functions (our nodes' execute, comfy.sample.sample,
    comfy.sd.VAE.decode), recorded while a prompt runs."""

    def __init__(self, device: torch.device):
        self.device, self.calls = device, []

    def wrap(self, owner, attribute: str, label: str, classmethod_: bool = False) -> None:
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / GiB if self.device.type == "cuda" else None
            self.calls.append((label, time.perf_counter() - start, peak))
            return result

        setattr(owner, attribute, classmethod(lambda cls, *a, **k: timed(*a, **k)) if classmethod_ else timed)


def run_recipe(args) -> list[Row]:
    weight_dtype, cap = RECIPES[args.recipe]
    cpu = args.tiny
    if cpu:
        torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    total = 0.0 if cpu else torch.cuda.get_device_properties(0).total_memory / GiB
    if not cpu:
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total))
    import_comfyui(Path(args.comfyui), cpu, 0.0 if cpu else max(0.0, total - cap))
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import folder_paths
    from comfy_host import run_prompt
    from PIL import Image

    import nodes

    workdir = Path(args.workdir)
    folder_paths.add_model_folder_path("glm_image", str(workdir))
    with tempfile.TemporaryDirectory() as tmp:
        folder_paths.set_output_directory(tmp)
        folder_paths.set_input_directory(tmp)
        size, steps = (512, 2) if args.tiny else (1024, 50)
        Image.new("RGB", (size, size), (120, 160, 200)).save(Path(tmp) / "example.png")
        clock = StageClock(torch.device("cpu" if cpu else "cuda"))
        for node_id in ("GLMImageGenerateTokens", "GLMImageEncode"):
            cls = nodes.NODE_CLASS_MAPPINGS[node_id]
            clock.wrap(cls, "execute", node_id, classmethod_=True)
        clock.wrap(comfy.sample, "sample", "sample")
        clock.wrap(comfy.sd.VAE, "decode", "decode")
        rows = []
        label = f"{cap:g} GiB cap, AR int8 + DiT {'fp8' if 'fp8' in weight_dtype else 'bf16'}"
        for task in args.tasks:
            task_name = TASKS[task]
            clock.calls.clear()
            start = time.perf_counter()
            try:
                run = run_prompt(graph(task, weight_dtype, size, steps))
                ok = run.success
                error = run.execution_error() or run.error
            except Exception as e:  # an OOM inside a node ends up here or in execution_error
                ok, error = False, e
            seconds = time.perf_counter() - start
            if not ok:
                rows.append(failed_row(f"{label}: {task_name} {size}x{size}", RuntimeError(str(error)[:300])))
                mm.unload_all_models()
                continue
            for name, elapsed, peak in clock.calls:
                rows.append(
                    Row(
                        f"{label}: {task_name}, {STAGES[name]}",
                        "s",
                        elapsed,
                        None,
                        None,
                        "" if peak is None else f"peak {peak:.2f} GiB allocated",
                    )
                )
            peaks = [p for _, _, p in clock.calls if p is not None]
            note = f"peak {max(peaks):.2f} GiB allocated (cap {cap:g})" if peaks else "CPU: no cap"
            rows.append(
                Row(f"{label}: {task_name} {size}x{size}, {steps} steps, whole graph", "s", seconds, None, None, note)
            )
            mm.unload_all_models()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="path of a ComfyUI checkout")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (no cap): the code path only")
    parser.add_argument("--workdir", help="where the model folder is written / reused (default: a temp folder)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), help="run one recipe in this process (internal)")
    parser.add_argument("--prepare", action="store_true", help="only write the model folder (internal)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=sorted(RECIPES), help="caps to run")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="graphs to run")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("The capped runs need a CUDA GPU; use --tiny on a CPU.")

    if args.prepare:  # its own process, so that no CUDA memory of the build stays reserved during the runs
        write_full_size_folder(Path(args.workdir))
        return 0
    if args.recipe:  # the child: one cap per process
        try:
            rows = run_recipe(args)
        except Exception as e:
            rows = [failed_row(f"{args.recipe} GiB recipe", e)]
        if args.json:
            Path(args.json).write_text(json.dumps([row.__dict__ for row in rows]))
        for row in rows:
            print(row)
        return 0

    with tempfile.TemporaryDirectory(prefix="glm-caps-") as tmp:
        workdir = Path(args.workdir or tmp)
        if args.tiny:
            write_tiny_folder(workdir)
        else:
            subprocess.run(
                [sys.executable, __file__, "--comfyui", args.comfyui, "--workdir", str(workdir), "--prepare"],
                check=True,
            )
        rows = []
        for recipe in args.recipes:
            out = Path(tmp) / f"rows-{recipe}.json"
            command = [
                sys.executable,
                __file__,
                "--comfyui",
                args.comfyui,
                "--workdir",
                str(workdir),
                "--recipe",
                recipe,
                "--json",
                str(out),
                "--tasks",
                *args.tasks,
                *(["--tiny"] if args.tiny else []),
            ]
            subprocess.run(command, check=False)
            if out.is_file():
                rows += [Row(**row) for row in json.loads(out.read_text())]
            else:
                rows.append(failed_row(f"{recipe} GiB recipe", RuntimeError("the process wrote no rows")))
    for row in rows:
        print(row)
    if args.json:
        Path(args.json).write_text(json.dumps([row.__dict__ for row in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
