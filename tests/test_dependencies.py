"""On transformers 4 (stood in for by tests/transformers4.py) or a 5.x older than the pack needs, the AR stage refuses
with one message that names the found and needed versions, the pip command for this Python and what else the upgrade
changes; the other stages still load. With the installed transformers there is no message."""

import sys

import pytest
import torch

from glm_image_core import dependencies, loading
from glm_image_core.errors import InvalidInputError
from tests import transformers4

UPGRADE = f'{sys.executable} -m pip install "transformers>={dependencies.TRANSFORMERS_NEEDED}"'


@pytest.fixture
def on_transformers4(monkeypatch):
    """The stand-in in sys.modules for one test; the real transformers is back afterwards."""
    for name in ("transformers", "transformers.models.glm_image"):
        monkeypatch.setitem(sys.modules, name, sys.modules.get(name))
    return transformers4.install()


def test_installed_transformers_needs_no_upgrade():
    assert dependencies.transformers_problem() is None


def test_message_names_found_and_needed_versions(on_transformers4):
    message = dependencies.transformers_problem()
    assert f"needs transformers {dependencies.TRANSFORMERS_NEEDED} or newer" in message
    assert f"this Python has transformers {transformers4.VERSION}" in message


def test_message_gives_the_pip_command_for_this_python(on_transformers4):
    assert UPGRADE in dependencies.transformers_problem()


def test_message_names_what_the_upgrade_also_changes(on_transformers4):
    message = dependencies.transformers_problem()
    for name in dependencies.TRANSFORMERS_BRINGS:
        assert f"{name} (now {dependencies.installed_version(name)})" in message


def test_transformers_5_older_than_needed_gets_the_message(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "5.17.0")  # has GlmImage, fails on reference images
    assert "this Python has transformers 5.17.0" in dependencies.transformers_problem()


def test_message_without_any_transformers(monkeypatch):
    for name in ("transformers", "transformers.models.glm_image"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it raises ImportError
    assert "this Python has no transformers" in dependencies.transformers_problem()


def test_ar_model_refuses_with_the_message(tiny_model_dir, on_transformers4):
    with pytest.raises(InvalidInputError, match=transformers4.VERSION) as raised:
        loading.load_ar_model(tiny_model_dir, dtype=torch.float32)
    assert UPGRADE in str(raised.value)


def test_ar_processor_refuses_with_the_message(tiny_model_dir, on_transformers4):
    with pytest.raises(InvalidInputError, match=transformers4.VERSION):
        loading.load_ar_processor(tiny_model_dir)


def test_glyph_encoder_loads_without_glm_image(tiny_model_dir, on_transformers4):
    encoder = loading.load_glyph_encoder(tiny_model_dir, dtype=torch.float32)
    tokenizer = loading.load_glyph_tokenizer(tiny_model_dir)
    ids = tokenizer(["OPEN"], return_tensors="pt").input_ids
    assert encoder(input_ids=ids).last_hidden_state.shape[:2] == ids.shape
