"""The SDNQ checkpoint (as Disty0/GLM-Image-SDNQ-4bit-dynamic) through ComfyUI: the tiny folder that the `sdnq`
library itself writes (tests/sdnq_reference.py), under a glm_image root and in diffusion_models, through the pack's
loaders and the stock samplers, against the core (itself checked against diffusers/transformers with sdnq's layers in
tests/test_sdnq.py)."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402

from glm_image_core.loading import load_transformer  # noqa: E402
from glm_image_core.pipeline import load_models  # noqa: E402
from tests.comfy_glm import (  # noqa: E402
    core_text_to_image,
    folder_text_to_image,
    pack_with_downloaded_folder,
    refusal_of_edited_quantisation,
)
from tests.test_comfy_weight_formats import velocity  # noqa: E402
from tests.test_nodes_edit import CAPTURED  # noqa: E402
from tests.test_scaled_fp8 import dit_inputs, relative_error  # noqa: E402

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")
paths = comfy_host.import_pack_module("nodes.paths")
sdnq = comfy_host.import_pack_module("glm_image_core.formats.sdnq")  # the pack's copy: the class its layers are

FOLDER = "GLM-Image-SDNQ-4bit-dynamic"  # under a glm_image root, as downloaded
SIZE, STEPS, SEED = 256, 3, 5


@pytest.fixture(scope="module")
def glm(sdnq_model_dir, tmp_path_factory):
    """The pack in ComfyUI; the SDNQ folder under a glm_image root and, linked in, under a diffusion_models root."""
    links = {"sdnq-transformer": sdnq_model_dir / "transformer"}
    with pack_with_downloaded_folder(sdnq_model_dir, tmp_path_factory.mktemp("diffusion_models"), links) as glm:
        yield glm


def load_dit(glm, dit="sdnq-transformer"):
    (patcher,) = glm["GLMImageDiTLoader"].execute(dit=dit, weight_dtype="default")
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(SIZE, SIZE))
    return patcher


def packed_layers(patcher) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in patcher.model.diffusion_model.named_modules() if isinstance(m, sdnq.SDNQLinear)}


def test_the_dit_loader_lists_and_loads_the_sdnq_folder_as_the_core_does(glm, sdnq_model_dir):
    assert "sdnq-transformer" in paths.DIT.options() and paths.validate(paths.DIT, "sdnq-transformer") is True
    patcher = load_dit(glm)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    core = load_transformer(sdnq_model_dir, dtype=torch.float32)
    layers = packed_layers(patcher)
    assert set(layers) == {n for n, m in core.named_modules() if type(m).__name__ == "SDNQLinear"}
    assert all(type(m) is dit_loading.ComfySdnqLinear for m in layers.values())
    with torch.no_grad():
        expected = core(*dit_inputs())
    assert relative_error(velocity(patcher), expected) <= 1e-6


def test_comfyui_sees_the_packed_bytes_and_no_weight_to_patch(glm):
    """ComfyUI counts the codes, scales and zero points as the model's size, and its patchers find no `.weight` on a
    packed layer (its codes are no weight to cast or patch): the stock LoRA loaders leave it to Load GLM-Image LoRA."""
    patcher = load_dit(glm)
    name, layer = next(iter(packed_layers(patcher).items()))
    weight, *_ = comfy.model_patcher.get_key_weight(patcher.model, f"diffusion_model.{name}.weight")
    assert weight is None and f"diffusion_model.{name}.weight" not in patcher.model_state_dict()
    layers = packed_layers(patcher).values()
    packed = sum(t.nbytes for m in layers for n, t in m.named_parameters() if n != "bias")
    as_float32 = sum(m.in_features * m.out_features * 4 for m in layers)
    others = sum(t.nbytes for t in patcher.model.state_dict().values()) - packed
    assert packed < as_float32 / 4 and patcher.model_size() == others + packed


def test_a_low_vram_load_streams_the_packed_layers_and_computes_the_same(glm):
    patcher = load_dit(glm)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    expected = velocity(patcher)
    comfy.model_management.unload_all_models()
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        assert patcher.model.model_lowvram
        assert torch.equal(velocity(patcher), expected)
    finally:
        patcher.unpatch_model()


def test_the_text_to_image_graph_on_the_sdnq_checkpoint_equals_the_core_pipeline(glm, sdnq_model_dir):
    """The AR (its SDNQ decoder through the AR loader), the DiT and the VAE from the downloaded folder."""
    run = comfy_host.run_prompt(folder_text_to_image(FOLDER, "sdnq-transformer", SIZE, STEPS, SEED, capture="sdnq"))
    assert run.success, run.execution_error()
    ours = CAPTURED["sdnq"]
    latent, image = core_text_to_image(load_models(sdnq_model_dir, dtype=torch.float32), SIZE, STEPS, SEED)
    assert (ours["latent"] - latent).abs().max() <= 1e-4
    assert (ours["image"] * 255 - image).abs().max() <= 1


@pytest.mark.parametrize("component,node", [("vision_language_encoder", "1"), ("transformer", "5")])
def test_an_unsupported_sdnq_setting_is_refused_when_queued_before_anything_runs(
    glm, sdnq_model_dir, tmp_path, component, node
):
    """Hadamard rotations in the AR's or the DiT's config: the graph is refused by validation, naming them."""
    graph = folder_text_to_image(FOLDER, "sdnq-transformer", SIZE, STEPS, SEED, capture="refused")
    error = refusal_of_edited_quantisation(graph, sdnq_model_dir, tmp_path, component, node, use_hadamard=True)
    assert "Hadamard rotations (use_hadamard)" in error
