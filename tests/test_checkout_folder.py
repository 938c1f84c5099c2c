"""The suite passes from the folder users clone into: `git clone` and ComfyUI-Manager name it `glm-image-nodes`, not a
Python identifier, and ComfyUI keeps it in `ComfyUI/custom_nodes/`. A clone of this repo in such folders runs a core
test and a host test in a fresh pytest process."""

import os
import shutil
import subprocess
import sys

import pytest

from tests import comfy_host

CORE_TEST = "tests/test_schedule.py"
HOST_TEST = "tests/test_comfy_lora.py::test_strength_zero_gives_the_unpatched_output_bit_for_bit"  # imports ComfyUI, the pack, runs its DiT


def clone_into(folder) -> None:
    """This working tree as it is (tracked and new files, not what git ignores), in `folder`."""
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=comfy_host.REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source = comfy_host.REPO_ROOT / name
        if source.is_file():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, folder / name)


@pytest.mark.parametrize("where", ["glm-image-nodes", "ComfyUI/custom_nodes/glm-image-nodes"])
def test_the_suite_runs_from_a_folder_whose_name_is_not_an_identifier(tmp_path, where):
    if not (comfy_host.REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    checkout = tmp_path / where
    clone_into(checkout)
    env = dict(os.environ, COMFYUI_PATH=str(comfy_host.COMFYUI_PATH))
    env.pop("PYTEST_XDIST_WORKER", None)
    tests = [CORE_TEST]
    if (comfy_host.COMFYUI_PATH / "comfy" / "sd.py").is_file():
        tests.append(HOST_TEST)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1] and "skipped" not in done.stdout.splitlines()[-1]
