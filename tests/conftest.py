"""Shared fixtures: the tiny GLM-Image folder in the published layout, built once per test session."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """The tiny models gain nothing from threads: on small VMs multi-threaded CPU ops (SDPA above all) cost more
    than they compute, and the AR decode runs ~6x faster on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny, randomly initialised GLM-Image folder laid out exactly like the published download."""
    from glm_image_core.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny") / "GLM-Image"
    write_tiny_model(root, seed=0)
    return root
