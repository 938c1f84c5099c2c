"""The benchmark scripts keep working: ``benchmarks/run_all.py --tiny`` runs every part on the CPU with the tiny
models (~30 s) and prints its table. The numbers mean nothing here; that the code paths run does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import comfy_host

REPO = Path(__file__).resolve().parents[1]
SPEED_ROWS = [
    "AR decode 256x256",
    "AR stage 256x256 (320 tokens, prefill included)",
    "DiT forward 512x512, batch 1",
    "DiT forward 512x512, batch 2 (cond + uncond)",
    "VAE decode 256x256",
    "Text-to-image 512x512, 2 steps, CFG 1.5, models resident",
    "Text-to-image 512x512, 2 steps, staged offload, no cap on the CPU",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    comfyui = comfy_host.COMFYUI_PATH
    args = ["--comfyui", str(comfyui)] if (comfyui / "comfy" / "model_management.py").is_file() else []
    command = [sys.executable, "benchmarks/run_all.py", "--tiny", "--out", str(out / "bench.md"),
               "--json", str(out / "bench.json"), *args]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, (out / "bench.md").read_text(), json.loads((out / "bench.json").read_text()), bool(args)


def test_run_all_tiny_prints_and_writes_the_markdown_table(tiny_run):
    stdout, table, _, _ = tiny_run
    assert table in stdout
    lines = table.splitlines()
    assert lines[0].startswith("Device: **CPU") and "tiny models" in lines[0]
    assert "| Measurement | Unit | Ours | Reference | Ours / ref. | Goal | Met | Notes |" in lines
    for name in SPEED_ROWS:
        assert any(line.startswith(f"| {name} |") for line in lines), name


def test_every_part_ran_and_timed_ours_and_the_reference(tiny_run):
    _, _, rows, with_comfyui = tiny_run
    by_name = {row["name"]: row for row in rows}
    assert not [row for row in rows if "FAILED" in row["note"]]
    for name in SPEED_ROWS:
        assert by_name[name]["ours"] > 0, name
    for name in SPEED_ROWS[:5]:  # transformers / diffusers beside ours
        assert by_name[name]["reference"] > 0 and by_name[name]["ratio"] > 0, name
    if with_comfyui:
        assert by_name["DiT forward 512x512, batch 1, ComfyUI fp8_e4m3fn_fast"]["ours"] > 0
