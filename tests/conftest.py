"""Shared fixtures: the tiny GLM-Image folder in the published layout, built once per test session."""

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete tiny, randomly initialised GLM-Image folder laid out exactly like the published download."""
    from glm_image_core.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("tiny") / "GLM-Image"
    write_tiny_model(root, seed=0)
    return root
