"""`python custom_nodes/glm-image-nodes/check_install.py` (the README's install check) prints the versions and the
nodes ComfyUI loads from the pack, and exits 0; on transformers 4 (tests/transformers4.py) it prints the upgrade
message and exits 1. Run as a user runs it, in a subprocess from the ComfyUI folder (with the host tests' torchvision
stub while ComfyUI imports, as everywhere in these tests)."""

import subprocess
import sys

import pytest

from tests import comfy_host, transformers4

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

RUN = """
import runpy, sys
sys.path.insert(0, {tests!r})
if {standin}:
    import transformers4
    transformers4.install()
import comfy_host
sys.argv = [{script!r}, "--comfyui", {comfyui!r}]
with comfy_host._package_stubs():
    runpy.run_path({script!r}, run_name="__main__")
"""


def check_install(standin: bool) -> subprocess.CompletedProcess:
    code = RUN.format(
        tests=str(comfy_host.REPO_ROOT / "tests"),
        standin=standin,
        script=str(comfy_host.REPO_ROOT / "check_install.py"),
        comfyui=str(comfy_host.COMFYUI_PATH),
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=comfy_host.COMFYUI_PATH, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def report():
    return check_install(standin=False)


def test_prints_versions(report):
    import transformers

    assert f"ComfyUI {'.'.join(map(str, comfy_host.comfyui_version()))}" in report.stdout
    assert f"transformers {transformers.__version__}" in report.stdout


def test_lists_every_node_of_the_pack_and_passes(report):
    assert report.returncode == 0, report.stdout + report.stderr[-3000:]
    assert f"{len(comfy_host.load_pack())} GLM-Image nodes loaded: {', '.join(sorted(comfy_host.load_pack()))}" in (
        report.stdout
    )


def test_on_transformers4_prints_the_upgrade_message_and_fails():
    run = check_install(standin=True)
    assert run.returncode == 1
    assert f"this Python has transformers {transformers4.VERSION}" in run.stdout
    loaded = next(line for line in run.stdout.splitlines() if "GLM-Image nodes loaded:" in line)
    assert "GLMImageARModelLoader" in loaded  # the nodes load all the same
