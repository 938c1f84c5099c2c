"""The weight formats' registry (glm_image_core.formats): a format registered from outside (here a test-only one, as
docs/how-it-works.md's "Adding a weight format" describes) is recognised from headers, checked and read by the same
loaders as the pack's own; every layer's format is found without the caller testing its class."""

import json

import pytest
import torch
from safetensors.torch import save_file

from glm_image_core import formats
from glm_image_core.checkpoint import ComponentFiles, load_tensors
from glm_image_core.errors import ModelFilesError
from glm_image_core.loading import TRANSFORMER, check_files, load_ar_model, load_transformer, read_state_dict
from tests.test_scaled_fp8 import dit_inputs, relative_error

ROW_SCALE = ".weight_row_scale"


class RowInt8(formats.WeightFormat):
    """A test-only format: each Linear weight of the DiT in int8 with a float32 scale per row (`<layer>.weight_row_scale`),
    named by the file's metadata."""

    name = "test_row_int8"
    label = "test-only int8 rows"
    components = ("transformer",)

    def recognise(self, files: ComponentFiles) -> bool:
        return files.weights.metadata.get("test_format") == self.name

    def extra_key(self, key: str, expected) -> bool:
        return key.endswith(ROW_SCALE) and key.removesuffix(ROW_SCALE) + ".weight" in expected

    def integer_keys(self, files: ComponentFiles) -> set[str]:
        return {k.removesuffix(ROW_SCALE) + ".weight" for k in files.weights.shapes if k.endswith(ROW_SCALE)}

    def read(self, files, dtype, device="cpu"):
        stored = load_tensors(files.weights, None, device)
        out = {}
        for key, tensor in stored.items():
            scale = stored.get(key.removesuffix(".weight") + ROW_SCALE)
            if key.endswith(ROW_SCALE):
                continue
            if scale is not None:
                tensor = tensor.float() * scale[:, None]
            out[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return out


@pytest.fixture
def row_int8():
    fmt = formats.register(RowInt8())
    yield fmt
    formats.FORMATS.remove(fmt)


def write_row_int8(tiny_model_dir, path):
    folder = tiny_model_dir / "transformer"
    state = read_state_dict(folder)
    for key in [k for k, v in state.items() if k.endswith(".weight") and v.ndim == 2 and "embedding" not in k]:
        weight = state[key].float()
        scale = weight.abs().amax(dim=1) / 127
        state[key] = (weight / scale[:, None]).round().to(torch.int8)
        state[key.removesuffix(".weight") + ROW_SCALE] = scale
    metadata = {"config": (folder / "config.json").read_text(), "test_format": RowInt8.name}
    save_file(state, path, metadata=metadata)
    return path


def test_a_registered_format_is_recognised_checked_and_read_by_the_loaders(tiny_model_dir, tmp_path, row_int8):
    path = write_row_int8(tiny_model_dir, tmp_path / "dit_rows.safetensors")
    check_files(path, TRANSFORMER)  # headers only: recognised, its scales allowed beside the model's tensors
    loaded = load_transformer(path, dtype=torch.float32)
    full = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)
    with torch.no_grad():
        error = relative_error(loaded(*dit_inputs()), full(*dit_inputs()))
    assert 0 < error <= 0.02  # int8 rows: ~0.5% weight error


def test_without_its_format_such_a_file_is_refused(tiny_model_dir, tmp_path):
    path = write_row_int8(tiny_model_dir, tmp_path / "dit_rows.safetensors")
    with pytest.raises(ModelFilesError, match=r"\.weight is I8 in .*dit_rows.safetensors; .* is a floating dtype"):
        load_transformer(path)


def test_a_format_is_refused_for_a_component_it_is_not_for(tiny_model_dir, tmp_path):
    """An AR folder that says it is in ComfyUI's scaled fp8 (a DiT format) is refused by name."""
    import shutil

    folder = tmp_path / "vision_language_encoder"
    shutil.copytree(tiny_model_dir / "vision_language_encoder", folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    tensors = read_state_dict(shard)
    tensors["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(tensors, shard)
    index["weight_map"]["scaled_fp8"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFilesError, match="ComfyUI scaled fp8, which the vision_language_encoder loader"):
        load_ar_model(folder)


def test_every_layer_finds_its_format(tiny_model_dir):
    """The registry's one class test: plain Linear (and its host subclasses), int8, 4-bit."""
    model = load_ar_model(tiny_model_dir, dtype=torch.float32, quantisation="int8")
    layer = model.model.language_model.layers[0]
    assert formats.of_layer(layer.self_attn.q_proj) is formats.INT8
    assert formats.of_layer(model.lm_head) is formats.PLAIN
    packed = formats.w4a16.W4A16Linear(64, 64, False, 32)
    assert formats.of_layer(packed) is formats.W4A16
    assert formats.dequantised_weight(layer.self_attn.q_proj).dtype == torch.float32
