"""``benchmarks/full_size.py``: the dry run writes the tiny model's folder and derived files as the full-size run
does and runs the stages through the loaders the nodes call, each in a watched child process (CI; the numbers mean
nothing here); ``-m fullsize`` with ``GLM_IMAGE_FULLSIZE_DIR`` set runs the quick stages on a real full-size workdir
(opt-in: it writes ~33 GB there the first time)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import allocator, comfy_host

pytestmark = pytest.mark.heavy  # a child process per stage

REPO = Path(__file__).resolve().parents[1]
# the writers (the folder, the SDNQ folder), both export commands, the AR loader and ComfyUI's DiT loader
DRY_RUN_STAGES = ["glyph", "ar_int8_file", "dit_scaled_fp8", "ar_sdnq", "dit_sdnq"]


def run_script(*args: str, timeout: float) -> dict:
    out = Path(args[args.index("--json") + 1])
    env = {**allocator.measuring_env(), "COMFYUI_PATH": str(comfy_host.COMFYUI_PATH)}  # it measures peaks
    done = subprocess.run(
        [sys.executable, "benchmarks/full_size.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_verifies_each_stage_in_a_child_process(tmp_path):
    if not (comfy_host.COMFYUI_PATH / "comfy" / "sd.py").is_file():
        pytest.skip(f"the DiT stage loads through ComfyUI, not found at {comfy_host.COMFYUI_PATH}: set COMFYUI_PATH")
    result = run_script("--dry-run", "--stages", *DRY_RUN_STAGES, "--json", str(tmp_path / "r.json"), timeout=300)
    rows = {row["stage"]: row for row in result["stages"]}
    assert list(rows) == DRY_RUN_STAGES
    assert {name: row["status"] for name, row in rows.items()} == dict.fromkeys(DRY_RUN_STAGES, "verified")
    assert all(row["threads"] == 2 and row["peak_rss"] > 0 and row["passes"] for row in rows.values())
    assert [d["status"] for d in result["derived"]] == ["written", "written", "written"]


@pytest.mark.fullsize
@pytest.mark.skipif(not os.environ.get("GLM_IMAGE_FULLSIZE_DIR"), reason="set GLM_IMAGE_FULLSIZE_DIR to a workdir")
def test_quick_run_on_the_full_size_folder(tmp_path):
    work = os.environ["GLM_IMAGE_FULLSIZE_DIR"]
    result = run_script("--workdir", work, "--quick", "--json", str(tmp_path / "r.json"), timeout=7200)
    assert all(row["status"] in ("verified", "skipped") for row in result["stages"]), result["stages"]
