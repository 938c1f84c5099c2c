"""Files named inside a model folder stay inside it, and every file the pack writes appears complete or not at all.

- A shard index or a tokenizer/processor config is a downloaded file: the names it gives must be plain relative
  names inside its own folder (no absolute path, no ".."); the error names the file and the entry. Symlinks on disk
  are the machine owner's and are followed (the Hugging Face cache links every file to a blob elsewhere).
- Writers go through glm_image_core.files.written_to: a write that fails half way leaves no file under the final
  name (and no temporary file behind), and an older file of that name stays as it was.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import glm_image_core.files
from glm_image_core.ar_loading import write_ar_int8_file
from glm_image_core.errors import ModelFilesError
from glm_image_core.loading import (
    TRANSFORMER,
    check_files,
    load_ar_processor,
    load_glyph_tokenizer,
    read_state_dict,
    save_single_file,
)
from glm_image_core.tokens import write_tokens
from tests.test_tokens import valid_tokens

INDEX = "diffusion_pytorch_model.safetensors.index.json"
SHARD = "diffusion_pytorch_model-00002-of-00003.safetensors"


@pytest.fixture
def transformer(tiny_model_dir, tmp_path) -> Path:
    """A copy of the tiny transformer/ folder, and next to it an unregistered `outside/` holding one of its shards."""
    folder = tmp_path / "GLM-Image" / "transformer"
    shutil.copytree(tiny_model_dir / "transformer", folder)
    (tmp_path / "outside").mkdir()
    shutil.copy(folder / SHARD, tmp_path / "outside" / SHARD)
    return folder


def name_shard(folder: Path, name: str) -> str:
    """Make the index put every tensor of SHARD under `name`; returns one such tensor's key."""
    index = json.loads((folder / INDEX).read_text())
    keys = [k for k, file in index["weight_map"].items() if file == SHARD]
    index["weight_map"].update(dict.fromkeys(keys, name))
    (folder / INDEX).write_text(json.dumps(index))
    return keys[0]


@pytest.mark.parametrize(
    "name, reason",
    [
        ("{outside}/" + SHARD, "is an absolute path"),
        ("../../outside/" + SHARD, "climbs out of the folder with '..'"),
        ("sub/../../../outside/" + SHARD, "climbs out of the folder with '..'"),
        ("C:\\weights\\" + SHARD, "is an absolute path"),
        ("\\\\server\\share\\" + SHARD, "is an absolute path"),
        ("", "is not a file name"),
    ],
)
def test_an_index_naming_a_shard_outside_its_folder_is_refused_naming_the_index_and_the_entry(
    transformer, name, reason
):
    key = name_shard(transformer, name.format(outside=transformer.parents[1] / "outside"))

    with pytest.raises(ModelFilesError) as refused:
        check_files(transformer, TRANSFORMER)

    message = str(refused.value)
    assert message.startswith(f"transformer/{INDEX} is refused: its entry {key!r} names a shard outside transformer/")
    assert reason in message and "delete it and re-download it from zai-org/GLM-Image" in message


def test_an_index_entry_that_is_not_text_is_refused(transformer):
    key = name_shard(transformer, 3)
    with pytest.raises(ModelFilesError, match=f"its entry '{key}' names a shard outside .*3 is not a file name"):
        check_files(transformer, TRANSFORMER)


def test_a_shard_that_is_a_symlink_inside_the_folder_is_followed(transformer, tiny_model_dir):
    (transformer / SHARD).unlink()
    (transformer / SHARD).symlink_to(transformer.parents[1] / "outside" / SHARD)  # as the Hugging Face cache does

    check_files(transformer, TRANSFORMER)
    loaded = read_state_dict(transformer)

    assert all(torch.equal(t, read_state_dict(tiny_model_dir / "transformer")[k]) for k, t in loaded.items())


@pytest.mark.parametrize(
    "entry",
    [
        {"tokenizer_file": "/etc/passwd"},
        {"fast_tokenizer_files": ["../../tokenizer.x.json"]},
        {"image_processor": {"vocab_file": "../vocab.txt"}},
    ],
)
def test_a_processor_config_naming_a_file_outside_its_folder_is_refused(tiny_model_dir, tmp_path, entry):
    root = tmp_path / "GLM-Image"
    shutil.copytree(tiny_model_dir / "processor", root / "processor")
    config = root / "processor" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **entry}))

    with pytest.raises(
        ModelFilesError,
        match=r"processor/tokenizer_config.json is refused: its entry '\w+' names a file outside processor/",
    ):
        load_ar_processor(root)


def test_a_glyph_tokenizer_config_naming_a_file_outside_its_folder_is_refused(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir / "tokenizer", tmp_path / "tokenizer")
    config = tmp_path / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_file": "../../secret"}))

    with pytest.raises(ModelFilesError, match="its entry 'vocab_file' names a file outside tokenizer/"):
        load_glyph_tokenizer(tmp_path)


# --- writes ---------------------------------------------------------------------------------------------------------


def half_then_fail(monkeypatch):
    """safetensors' save_file as a full disk or a killed process leaves it: half the bytes written, then an error."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 4096)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(glm_image_core.files, "save_file", save_file)


WRITERS = {
    "save_single_file": lambda tiny, out: save_single_file(tiny / "vae", out),
    "write_ar_int8_file": lambda tiny, out: write_ar_int8_file({"w": torch.zeros(2, 2)}, {}, {}, out),
    "write_tokens": lambda tiny, out: write_tokens(valid_tokens(), out),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_that_fails_half_way_leaves_no_file_under_the_final_name(tiny_model_dir, tmp_path, monkeypatch, writer):
    half_then_fail(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        WRITERS[writer](tiny_model_dir, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_a_write_that_fails_half_way_keeps_the_previous_file(tiny_model_dir, tmp_path, monkeypatch, writer):
    (tmp_path / "out.safetensors").write_bytes(b"the previous export")
    half_then_fail(monkeypatch)
    with pytest.raises(OSError):
        WRITERS[writer](tiny_model_dir, tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
    assert (tmp_path / "out.safetensors").read_bytes() == b"the previous export"


@pytest.mark.parametrize("writer", WRITERS)
def test_a_complete_write_appears_under_the_final_name_only(tiny_model_dir, tmp_path, writer):
    WRITERS[writer](tiny_model_dir, tmp_path / "out.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]
