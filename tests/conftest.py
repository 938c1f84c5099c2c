"""Shared fixtures: the tiny GLM-Image folder in the published layout, built once per test session. Every test that
is not marked `host` is marked `core` here (`pytest -m core`: the part that needs no ComfyUI)."""

import os
import sys

import pytest
import torch

from tests import allocator


def pytest_configure(config):
    # Compiled bytecode is cached as Python does by default, also where the environment turns that off
    # (PYTHONDONTWRITEBYTECODE, set on some CI machines): the suite starts ~50 Python processes (workers, ComfyUI
    # servers, scripts), each importing the pack and ComfyUI from source otherwise. Set here, before pytest-xdist
    # starts its workers, so that they inherit it.
    sys.dont_write_bytecode = False
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    allocator.keep_freed_memory()
    # pytest-xdist (`-n 2 --dist loadfile`) hands out whole files in collection order, not by their number of tests
    # (its default): the `heavy` files come first, so no process is left with one of them when the others are done.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("host") is None:
            item.add_marker(pytest.mark.core)
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)  # stable: each file stays in one piece


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The tiny models gain nothing from threads: on small VMs multi-threaded CPU ops (SDPA above all) cost more
    than they compute, and the AR decode runs ~6x faster on one thread. The processes the tests start (ComfyUI
    servers, benchmark scripts) get one thread too: beside two test processes on two cores, their OpenMP threads
    waiting for a core took a tenth of the suite's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny, randomly initialised GLM-Image folder laid out exactly like the published download."""
    from glm_image_core.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny") / "GLM-Image"
    write_tiny_model(root, seed=0)
    return root


@pytest.fixture(scope="module")
def core_models(tiny_model_dir):
    """Every component of the tiny folder through our loaders (glm_image_core.pipeline.load_models), fp32."""
    from glm_image_core.pipeline import load_models

    return load_models(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference_pipeline(tiny_model_dir):
    """diffusers' GlmImagePipeline on the same tiny folder, fp32: the reference implementation."""
    from diffusers import GlmImagePipeline

    return GlmImagePipeline.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)


def made_by_library(tiny_model_dir, tmp_path_factory, library: str, script: str, *args: str):
    """The folder that ``tests/<script>`` writes from the tiny folder with the quantisation library ``library``
    (``python tests/<script> <tiny root> <folder> *args``). Making one takes up to ~30 s, so it is kept between test
    sessions (CI runs four, each with two workers) under GLM_IMAGE_TEST_CACHE (default ~/.cache/glm-image-tests),
    named by a hash of everything that decides its bytes: the code that writes the tiny folder and quantises it, the
    published configs, and the versions of the library and torch."""
    import hashlib
    import os
    import shutil
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    script_path = repo / "tests" / script
    inputs = [
        script_path,
        repo / "glm_image_core" / "tiny.py",
        *sorted((repo / "glm_image_core" / "published").iterdir()),
    ]
    key = hashlib.sha256(f"{version(library)} {torch.__version__} {args}".encode())
    for path in inputs:
        key.update(path.read_bytes())
    cache = Path(os.environ.get("GLM_IMAGE_TEST_CACHE", Path.home() / ".cache" / "glm-image-tests"))
    keyed = cache / f"{library}-{key.hexdigest()[:16]}"
    if not keyed.is_dir():
        made = tmp_path_factory.mktemp(library)
        done = subprocess.run(
            [sys.executable, str(script_path), str(tiny_model_dir), str(made), *args], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        staged = cache / f".{keyed.name}.{os.getpid()}"
        shutil.copytree(made, staged)
        try:  # complete or absent: another worker may have put its identical copy there first
            os.rename(staged, keyed)
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
    return keyed


@pytest.fixture(scope="session")
def autoround_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny folder with its DiT's transformer blocks and its AR's text decoder quantised to 4 bits (W4A16, group
    size 32) by the `auto-round` library itself, as Intel/GLM-Image-int4-AutoRound was made
    (tests/autoround_reference.py), named as its download is."""
    made = made_by_library(tiny_model_dir, tmp_path_factory, "auto-round", "autoround_reference.py", "32")
    return made / "GLM-Image-int4-AutoRound"


@pytest.fixture(scope="session")
def sdnq_dirs(tiny_model_dir, tmp_path_factory):
    """The tiny folder with its DiT and its AR quantised by the `sdnq` library itself, as
    Disty0/GLM-Image-SDNQ-4bit-dynamic was made (tests/sdnq_reference.py): GLM-Image-SDNQ-4bit-dynamic (the whole
    folder, named as its download is) and GLM-Image-SDNQ-4bit-dynamic-svd (a DiT with SVD factors)."""
    return made_by_library(tiny_model_dir, tmp_path_factory, "sdnq", "sdnq_reference.py")


@pytest.fixture(scope="session")
def sdnq_model_dir(sdnq_dirs):
    return sdnq_dirs / "GLM-Image-SDNQ-4bit-dynamic"
