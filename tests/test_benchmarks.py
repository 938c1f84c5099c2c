"""The benchmark scripts keep working: ``benchmarks/run_all.py --tiny`` runs every part on the CPU with the tiny
models (~30 s) and prints its table. The numbers mean nothing here; that the code paths run does."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import comfy_host
from tests.benchmark_scripts import import_script

pytestmark = pytest.mark.heavy  # the benchmark scripts in child processes

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
    command = [
        sys.executable,
        "benchmarks/run_all.py",
        "--tiny",
        "--out",
        str(out / "bench.md"),
        "--json",
        str(out / "bench.json"),
        *args,
    ]
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


# --- memory: the computed table and the capped runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_table(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/memory_table.py", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, json.loads(out.read_text())


def test_the_computed_memory_table_keeps_every_stage_of_the_small_card_recipes_under_their_caps(memory_table):
    stdout, result = memory_table
    assert stdout.startswith("Computed (not measured)")
    for card, cap_gib in (("8 GB", 7), ("8 GB (SDNQ)", 7), ("12 GB", 11), ("16 GB", 15)):
        for task in ("t2i", "edit"):
            stages = result["stages"][card][task]
            assert {"AR decode", "glyph", "DiT", "VAE decode"} <= set(stages)
            assert ("AR vision" in stages) == (task == "edit")
            for name, stage in stages.items():
                assert 0 < stage["peak"] <= cap_gib * 2**30, (card, task, name, stage["peak"] / 2**30)


def test_the_computed_int8_ar_decoder_is_about_half_the_bf16_one(memory_table):
    components = memory_table[1]["components"]
    bf16 = components["AR decoder, bf16 (code rows of the embedding)"]
    int8 = components["AR decoder, int8 projections"]
    assert 0.5 < int8 / bf16 < 0.55  # int8 projections + float32 scales; embedding rows, lm_head, norms in bf16


def test_the_computed_4bit_parts_are_about_a_quarter_of_bf16(memory_table):
    """4 bits per weight plus a float16 scale and a 4-bit zero per 128 weights: 0.27 of bf16 for the packed layers;
    the AR's code rows, lm_head and norms and the DiT's embedders and projections outside its blocks stay bf16."""
    components = memory_table[1]["components"]
    ar = components["AR decoder, 4-bit projections (W4A16, group size 128)"]
    dit = components["DiT 4-bit transformer blocks (W4A16, group size 128)"]
    assert 0.26 < ar / components["AR decoder, bf16 (code rows of the embedding)"] < 0.3
    assert 0.26 < dit / components["DiT bf16"] < 0.3


def test_the_computed_sdnq_parts_lie_between_their_uint4_and_5bit_bounds(memory_table):
    """SDNQ's uint4 layers keep 4 bits and a bf16 scale and zero point per 64 weights (4.5 bits), its 5-bit ones 5
    bits and a bf16 scale per 128 (5.125): 0.28 and 0.32 of bf16 for the quantised layers, with the parts sdnq keeps
    in bf16 around them; the published checkpoint, a mix, lies between."""
    components = memory_table[1]["components"]
    for part, bf16 in (
        ("AR decoder, SDNQ projections", components["AR decoder, bf16 (code rows of the embedding)"]),
        ("DiT SDNQ transformer blocks", components["DiT bf16"]),
    ):
        uint4 = components[f"{part}, all uint4 (groups of 64)"] / bf16
        five_bit = components[f"{part}, all 5-bit (groups of 128)"] / bf16
        assert 0.28 < uint4 < 0.31 < five_bit < 0.35, (part, uint4, five_bit)


def test_bench_caps_runs_its_graphs_on_the_cpu_with_the_tiny_models(tmp_path):
    """The capped recipes' code path (the int8 export, the graph, the stage clock) on the CPU; no cap applies."""
    if not (comfy_host.COMFYUI_PATH / "comfy" / "model_management.py").is_file():
        pytest.skip("needs ComfyUI (COMFYUI_PATH)")
    out = tmp_path / "rows.json"
    command = [
        sys.executable,
        "benchmarks/bench_caps.py",
        "--comfyui",
        str(comfy_host.COMFYUI_PATH),
        "--tiny",
        "--recipes",
        "11",
        "--tasks",
        "t2i",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())}
    assert not [name for name, row in rows.items() if "FAILED" in row["note"]], rows
    prefix = "11 GiB cap, AR int8 + DiT fp8: text-to-image"
    for stage in ("AR tokens", "glyph encode", "DiT sampling", "VAE decode", "whole graph"):
        assert any(name.startswith(prefix) and stage in name and row["ours"] > 0 for name, row in rows.items()), stage


# --- the GPU check: its dry run on the CPU -------------------------------------------------------------------------


def test_the_benchmarks_4bit_packing_is_auto_rounds(tmp_path):
    """The GPU check packs full-size random layers itself (benchmarks/common.py): auto-round's own layer reads the
    same tensors as the same weight, and that weight is the original one rounded to 4 bits."""
    w4a16_layer = import_script("common").w4a16_layer
    from auto_round_extension.torch.qlinear_torch_zp import QuantLinear

    linear = torch.nn.Linear(256, 64, bias=False)
    ours = w4a16_layer(linear)
    library = QuantLinear(4, ours.group_size, 256, 64, False)
    for name in ("qweight", "qzeros", "scales"):
        getattr(library, name).copy_(getattr(ours, name))
    with torch.no_grad():
        library_weight = library.float()(torch.eye(256)).t()
    assert torch.equal(ours.dequantise(torch.float32), library_weight)
    assert ((library_weight - linear.weight).norm() / linear.weight.norm()).item() < 0.15


def test_the_ar_lora_cost_script_measures_both_decoders_in_one_run(tmp_path):
    """benchmarks/bench_ar_lora.py on the tiny model (its numbers say nothing: the tiny decode step is all overhead;
    the README's ratio comes from the published widths)."""
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_ar_lora.py",
            "--tiny",
            "--tokens",
            "8",
            "--json",
            str(tmp_path / "lora.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "lora.json").read_text())
    assert result["ms_per_token"] > 0 and result["ms_per_token_with_lora"] > 0 and result["rank"] == 16
