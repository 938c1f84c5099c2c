"""``benchmarks/gpu_check.py --dry-run``: the one command for the first minutes on a GPU runs every part on the CPU
with the tiny models, writes every row, breaks none, and runs the CPU side of each GPU claim. (Its own file so that
pytest-xdist runs it beside the other benchmark scripts: together they take minutes.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import comfy_host

pytestmark = pytest.mark.heavy  # a child process that runs every part: ~40 s

REPO = Path(__file__).resolve().parents[1]

GPU_CHECK_ROWS = [
    "environment",
    "AR CUDA graph captured on cuda:0",
    "AR CUDA graph captured on cuda:1",
    "int8 fused matmul equals the eager path, q/o",
    "int8 fused matmul equals the eager path, k+v",
    "int8 fused matmul equals the eager path, gate_up",
    "int8 fused matmul equals the eager path, down",
    "int8 fused decode kernel used",
    "int8 AR decode: fused kernel inside the CUDA graph",
    "AR decode 256x256, bf16",
    "AR decode 256x256, int8",
    "Peak memory, AR decode stage (AR bf16, DiT bf16) vs computed 24 GB",
    "Peak memory, glyph stage (AR bf16, DiT bf16) vs computed 24 GB",
    "Peak memory, DiT stage (AR bf16, DiT bf16) vs computed 24 GB",
    "Peak memory, VAE decode stage (AR bf16, DiT bf16) vs computed 24 GB",
    "Peak memory, AR decode stage (AR int8) vs computed 12 GB",
    "DiT forward 512x512, batch 1",
    "VAE decode 256x256",
    "Text-to-image 512x512, 2 steps, CFG 1.5, models resident",
    "4-bit int4 matmul equals the dequantising path, q/o",
    "4-bit int4 matmul equals the dequantising path, k+v",
    "4-bit int4 matmul equals the dequantising path, gate_up",
    "4-bit int4 matmul equals the dequantising path, down",
    "4-bit AR decode: int4 matmul inside the CUDA graph",
    "AR decode 256x256, 4-bit",
    "Peak memory, AR decode stage (AR 4-bit, DiT 4-bit) vs computed 8 GB",
    "Peak memory, glyph stage (AR 4-bit, DiT 4-bit) vs computed 8 GB",
    "Peak memory, DiT stage (AR 4-bit, DiT 4-bit) vs computed 8 GB",
    "Peak memory, VAE decode stage (AR 4-bit, DiT 4-bit) vs computed 8 GB",
]
GPU_CHECK_COMFYUI_ROWS = [
    "fp8_e4m3fn_fast DiT runs torch._scaled_mm",
    "DiT forward 512x512, batch 1, ComfyUI fp8_e4m3fn_fast",
    "Peak memory, DiT stage via ComfyUI fp8_e4m3fn_fast (batch 2) vs computed 12 GB",
    "TorchCompileModel (inductor) recompilations: size A",
    "TorchCompileModel (inductor) recompilations: size A again",
    "TorchCompileModel (inductor) recompilations: size B",
    "TorchCompileModel (inductor) recompilations: size B again",
]


@pytest.fixture(scope="module")
def gpu_check_dry_run(tmp_path_factory):
    """``gpu_check.py --dry-run``: every part in one child process, on the CPU with the tiny models (with ComfyUI when
    COMFYUI_PATH has one)."""
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    comfyui = comfy_host.COMFYUI_PATH
    args = ["--comfyui", str(comfyui)] if (comfyui / "comfy" / "model_management.py").is_file() else []
    command = [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out), *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    return done.stdout, result, {row["name"]: row for row in result["rows"]}, bool(args)


def test_gpu_check_dry_run_writes_every_row_and_none_is_broken(gpu_check_dry_run):
    stdout, result, rows, with_comfyui = gpu_check_dry_run
    assert result["dry_run"] and "| Check | Status | Numbers | Detail |" in stdout
    expected = GPU_CHECK_ROWS + (GPU_CHECK_COMFYUI_ROWS if with_comfyui else [])
    assert [name for name in expected if name not in rows] == []
    assert {name: row["detail"] for name, row in rows.items() if row["status"] == "broken"} == {}
    assert {row["status"] for row in rows.values()} <= {"verified", "skipped", "measured"}


def test_gpu_check_dry_run_skips_the_gpu_claims_but_runs_their_cpu_side(gpu_check_dry_run):
    _, _, rows, _ = gpu_check_dry_run
    graph = rows["AR CUDA graph captured on cuda:0"]
    assert graph["status"] == "skipped" and graph["detail"].startswith("no CUDA (dry run)")
    assert graph["numbers"]["tokens_equal_to_eager"] == 1.0  # the decoder ran, with and without a graph request
    for name in GPU_CHECK_ROWS[3:7]:  # the fused kernel's math against the eager int8 path (float32 scales)
        assert rows[name]["status"] == "skipped"
        assert rows[name]["numbers"]["rel_l2_1_rows"] < 1e-5 and rows[name]["numbers"]["rel_l2_4_rows"] < 1e-5
    for name in GPU_CHECK_ROWS[11:16]:  # the stage was observed; only the GPU measures it
        assert rows[name]["status"] == "skipped" and rows[name]["numbers"]["computed_gib"] > 0
    assert rows["AR decode 256x256, int8"]["numbers"]["ours"] > 0


def test_gpu_check_dry_run_runs_the_4bit_paths_on_the_cpu(gpu_check_dry_run):
    _, _, rows, _ = gpu_check_dry_run
    down = rows["4-bit int4 matmul equals the dequantising path, down"]["numbers"]  # the tiny layer with 128 inputs
    assert down["kernel_1_rows"] == "int4pack" and down["rel_l2_1_rows"] < 1e-2  # torch's CPU twin stood in
    assert rows["AR decode 256x256, 4-bit"]["numbers"]["ours"] > 0
    assert rows["Peak memory, DiT stage (AR 4-bit, DiT 4-bit) vs computed 8 GB"]["numbers"]["computed_gib"] > 0


def carried_to_the_gpu_machine(comfyui) -> bool:
    """Whether gpu_prepare.sh can carry this ComfyUI to the GPU machine: not one that needs comfy-kitchen (0.33+, a
    58 MB wheel beyond the transfer limit). The GPU check's ComfyUI part is tested with the ComfyUI it runs with."""
    requirements = comfyui / "requirements.txt"
    return requirements.is_file() and "comfy-kitchen" not in requirements.read_text()


@pytest.mark.host
@pytest.mark.skipif(
    not carried_to_the_gpu_machine(comfy_host.COMFYUI_PATH),
    reason="the GPU check runs with the ComfyUI gpu_prepare.sh carries (0.3.x); this one needs comfy-kitchen",
)
def test_gpu_check_dry_run_loads_the_fp8_dit_and_counts_compilations_through_comfyui(gpu_check_dry_run):
    _, _, rows, with_comfyui = gpu_check_dry_run
    if not with_comfyui:
        pytest.skip("needs ComfyUI (COMFYUI_PATH)")
    fp8 = rows["fp8_e4m3fn_fast DiT runs torch._scaled_mm"]["numbers"]
    assert fp8["finite"] and 0 < fp8["rel_l2_vs_bf16"] < 0.2  # fp8 weights really used, output still close
    first = rows["TorchCompileModel (inductor) recompilations: size A"]["numbers"]
    assert first["backend"] == "eager" and first["new_graphs"] > 0
    assert rows["TorchCompileModel (inductor) recompilations: size A again"]["numbers"]["new_graphs"] == 0
