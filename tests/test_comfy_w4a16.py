"""The 4-bit checkpoint (AutoRound W4A16, as Intel/GLM-Image-int4-AutoRound) through ComfyUI: the tiny folder that the
`auto-round` library quantised (`autoround_model_dir`) loads through the pack's loaders with its layers packed, the
DiT as a MODEL whose 4-bit layers ComfyUI's patcher can offload, and the text-to-image graph with the stock KSampler
gives the core pipeline's image on the same weights. The core's equality with diffusers/transformers + auto-round is
tested in test_w4a16.py."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402

import nodes  # noqa: E402
from glm_image_core.loading import load_transformer  # noqa: E402
from glm_image_core.pipeline import load_models  # noqa: E402
from tests.comfy_glm import (  # noqa: E402
    core_text_to_image,
    folder_text_to_image,
    pack_with_downloaded_folder,
    refusal_of_edited_quantisation,
    tiny_patcher,
)
from tests.test_comfy_easycache import MAX_DISTANCE, MIN_SKIPPED, distance, run_cached  # noqa: E402
from tests.test_comfy_lora import not_loaded  # noqa: E402
from tests.test_comfy_weight_formats import velocity  # noqa: E402
from tests.test_nodes_edit import CAPTURED  # noqa: E402
from tests.test_scaled_fp8 import dit_inputs, relative_error  # noqa: E402

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")
lora_nodes = comfy_host.import_pack_module("nodes.lora_nodes")
paths = comfy_host.import_pack_module("nodes.paths")
w4a16 = comfy_host.import_pack_module("glm_image_core.formats.w4a16")  # the pack's copy: the class its layers are
InvalidInputError = comfy_host.import_pack_module("glm_image_core.errors").InvalidInputError

FOLDER = "GLM-Image-int4-AutoRound"  # under a glm_image root, as downloaded
IN_DIFFUSION_MODELS = ["int4-root", "int4-transformer"]  # the root, and its transformer/ alone, in diffusion_models
SIZE, STEPS, SEED = 256, 4, 3
PACKED = "transformer_blocks.0.attn1.to_q"  # AutoRound quantised the transformer blocks' linear layers
NOT_PACKED = "proj_out"


@pytest.fixture(scope="module")
def glm(autoround_model_dir, tmp_path_factory):
    """The pack in ComfyUI; the 4-bit folder under a glm_image root and, linked in, under a diffusion_models root."""
    links = {"int4-root": autoround_model_dir, "int4-transformer": autoround_model_dir / "transformer"}
    with pack_with_downloaded_folder(autoround_model_dir, tmp_path_factory.mktemp("diffusion_models"), links) as glm:
        yield glm


def load_dit(glm, dit="int4-transformer", weight_dtype="default"):
    (patcher,) = glm["GLMImageDiTLoader"].execute(dit=dit, weight_dtype=weight_dtype)
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(SIZE, SIZE))
    return patcher


def packed_layers(patcher) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in patcher.model.diffusion_model.named_modules() if isinstance(m, w4a16.W4A16Linear)}


@pytest.fixture(scope="module")
def core_dit(autoround_model_dir):
    return load_transformer(autoround_model_dir, dtype=torch.float32)


# --- the DiT -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dit", IN_DIFFUSION_MODELS)
def test_the_dit_loader_lists_and_loads_4bit_folders_in_diffusion_models_as_the_core_does(glm, core_dit, dit):
    assert dit in paths.DIT.options() and paths.validate(paths.DIT, dit) is True
    patcher = load_dit(glm, dit)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    layers = packed_layers(patcher)
    assert set(layers) == {n for n, m in core_dit.named_modules() if type(m).__name__ == "W4A16Linear"}
    assert all(type(m) is dit_loading.ComfyW4A16Linear and m.scales.dtype == torch.float16 for m in layers.values())
    assert patcher.model.get_dtype() == torch.float32  # ComfyUI's choice on the CPU
    with torch.no_grad():
        expected = core_dit(*dit_inputs())
    assert relative_error(velocity(patcher), expected) <= 1e-6
    assert next(iter(layers.values())).kernel == w4a16.W4A16Linear.DEQUANTISE


def test_the_model_size_comfyui_sees_is_the_4bit_bytes(glm, autoround_model_dir, tiny_model_dir):
    """Every packed layer weighs its codes, zero points and float16 scales instead of its bf16 weight."""
    bf16 = {"dtype": torch.bfloat16}
    weights = paths.loading.read_checked_weights(autoround_model_dir, paths.loading.TRANSFORMER)
    patcher = dit_loading.load_dit_patcher(weights.state_dict, weights.config, model_options=bf16, fmt=weights.format)
    full = tiny_patcher(tiny_model_dir, SIZE, SIZE, model_options=bf16)
    layers = packed_layers(patcher)
    packed_bytes = sum(m.qweight.nbytes + m.qzeros.nbytes + m.scales.nbytes for m in layers.values())
    bf16_bytes = sum(m.in_features * m.out_features * 2 for m in layers.values())
    assert patcher.model_size() == full.model_size() - bf16_bytes + packed_bytes
    assert patcher.model_size() < full.model_size()


def test_comfyuis_patchers_find_a_bias_and_no_weight_on_a_packed_layer(glm):
    """What ModelPatcher (and 0.33's dynamic one, for every comfy.ops layer it pages) looks up on a layer: a 4-bit
    layer has no `.weight` to patch or page, and its bias is an ordinary one."""
    patcher = load_dit(glm)
    weight, *_ = comfy.model_patcher.get_key_weight(patcher.model, f"diffusion_model.{PACKED}.weight")
    bias, *_ = comfy.model_patcher.get_key_weight(patcher.model, f"diffusion_model.{PACKED}.bias")
    assert weight is None and bias is packed_layers(patcher)[PACKED].bias


def low_vram_load(patcher):
    """What load_models_gpu does when the model does not fit: a partial load with (here) no room for any layer."""
    patcher.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)


def test_a_low_vram_load_streams_the_packed_layers_and_computes_the_same(glm):
    patcher = load_dit(glm)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    expected = velocity(patcher)
    comfy.model_management.unload_all_models()
    layers = packed_layers(patcher)
    stored = {n: {p: t.data_ptr() for p, t in m.named_parameters()} for n, m in layers.items()}
    low_vram_load(patcher)
    try:
        assert patcher.model.model_lowvram
        assert all(m.comfy_cast_weights for m in layers.values())  # read on the input's device at each call
        assert torch.equal(velocity(patcher), expected)
        # the forward left every packed tensor where ComfyUI put it
        assert {n: {p: t.data_ptr() for p, t in m.named_parameters()} for n, m in layers.items()} == stored
    finally:
        patcher.unpatch_model()


def bias_patched(patcher):
    """(a clone with a bias patch on a packed layer, its output on a full load)."""
    delta = torch.randn(packed_layers(patcher)[PACKED].out_features, generator=torch.Generator().manual_seed(0))
    patched = patcher.clone()
    assert patched.add_patches({f"diffusion_model.{PACKED}.bias": (delta,)}, 0.5)
    comfy.model_management.load_models_gpu([patched], force_full_load=True)
    full_load = velocity(patched)
    comfy.model_management.unload_all_models()
    return patched, full_load


def test_a_bias_patch_on_a_packed_layer_applies_alike_in_a_full_and_a_low_vram_load(glm):
    """What ComfyUI's patcher can patch on a 4-bit layer: its bias, in place on a full load, through the layer's
    bias_function on a partial one."""
    patcher = load_dit(glm)
    patched, full_load = bias_patched(patcher)
    bias = packed_layers(patched)[PACKED].bias
    stored = bias.clone()
    low_vram_load(patched)
    try:
        assert torch.allclose(velocity(patched), full_load, rtol=1e-5, atol=1e-6)
        assert torch.equal(bias, stored)  # patched on the way to the matmul, not in place
    finally:
        patched.unpatch_model()
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    assert relative_error(full_load, velocity(patcher)) > 1e-3  # the patch changed the output


def test_a_bias_patch_that_dynamic_vram_hangs_on_a_packed_layer_applies(glm):
    """ComfyUI 0.33's dynamic VRAM (ModelPatcherDynamic, on GPUs only) hangs a layer's bias patch on
    `bias_lowvram_function` rather than in its bias_function list: the packed layer applies it there too. Hung by
    hand as ModelPatcherDynamic.load does, the CPU having no dynamic VRAM."""
    patcher = load_dit(glm)
    patched, full_load = bias_patched(patcher)
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    layer = packed_layers(patcher)[PACKED]
    key = f"diffusion_model.{PACKED}.bias"
    layer.bias_lowvram_function = comfy.model_patcher.LowVramPatch(key, patched.patches)
    try:
        assert torch.allclose(velocity(patcher), full_load, rtol=1e-5, atol=1e-6)
    finally:
        del layer.bias_lowvram_function


def test_the_4bit_dit_is_built_on_the_meta_device_and_its_layers_swapped_before_anything_is_allocated(
    glm, autoround_model_dir, monkeypatch
):
    """With the GPU as the first device (--highvram, or more free VRAM than RAM), building the DiT's Linear layers
    on it before swapping in the 4-bit ones would allocate the whole bf16 DiT on an 8-12 GB card: it is built on the
    meta device, the packed layers swapped in there, and only then is anything allocated."""
    built_on = []
    get_model = dit_loading.GlmImageDiTConfig.get_model

    def watched(self, state_dict, prefix="", device=None):
        built_on.append(str(device))
        return get_model(self, state_dict, prefix, device)

    monkeypatch.setattr(dit_loading.GlmImageDiTConfig, "get_model", watched)
    monkeypatch.setattr(comfy.model_management, "unet_inital_load_device", lambda *a: torch.device("cpu"))
    weights = paths.loading.read_checked_weights(autoround_model_dir, paths.loading.TRANSFORMER)
    patcher = dit_loading.load_dit_patcher(weights.state_dict, weights.config, fmt=weights.format)
    assert built_on == ["meta"]
    model = patcher.model.diffusion_model
    assert not [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert packed_layers(patcher)[PACKED].qweight.dtype == torch.int32


def test_stock_easycache_skips_dit_calls_on_the_4bit_model_and_stays_near_the_uncached_run(glm):
    patcher = load_dit(glm)
    with torch.no_grad():  # damped as in test_comfy_easycache (a trained DiT's velocity changes slowly)
        patcher.model.diffusion_model.time_condition_embed.timestep_embedder.linear_1.weight.mul_(0.1)
    plain, plain_calls, cached, cached_calls = run_cached(patcher, EasyCacheNode, cfg=1.0)
    assert 1 - cached_calls / plain_calls >= MIN_SKIPPED, (cached_calls, plain_calls)
    assert distance(cached, plain) <= MAX_DISTANCE


# --- LoRA ------------------------------------------------------------------------------------------------------------


def peft_lora(patcher, layers, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(patcher.model.diffusion_model.named_modules())
    lora = {}
    for name in layers:
        m = modules[name]
        lora[f"transformer.{name}.lora_A.weight"] = torch.randn(4, m.in_features, generator=g) * 0.1
        lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.1
    return lora


def test_the_glm_lora_loader_patches_a_packed_layer_through_the_layer_and_the_rest_as_comfyui_does(glm):
    """A packed layer has no weight tensor to patch: its LoRA patch goes to the layer (an object patch of the clone,
    applied to the dequantised weight in its forward); a layer kept in full precision takes ComfyUI's patch. The
    arithmetic is checked in tests/test_comfy_lora_formats.py."""
    patcher = load_dit(glm)
    patched = lora_nodes.apply_lora(patcher, peft_lora(patcher, [PACKED, NOT_PACKED]), 1.0, "style.safetensors")
    assert set(patched.patches) == {f"diffusion_model.{NOT_PACKED}.weight"}
    assert len(patched.object_patches[f"diffusion_model.{PACKED}.lora_patches"]) == 1
    assert not patcher.patches and f"diffusion_model.{PACKED}.lora_patches" not in patcher.object_patches


def test_a_lora_of_the_layers_kept_in_full_precision_applies(glm):
    patcher = load_dit(glm)
    patched = lora_nodes.apply_lora(patcher, peft_lora(patcher, [NOT_PACKED]), 1.0)
    assert set(patched.patches) == {f"diffusion_model.{NOT_PACKED}.weight"}


def test_the_stock_loader_skips_the_packed_layers_keys_and_says_so(glm, tmp_path, caplog):
    """What the refusal's message tells users: LoraLoaderModelOnly loads only the rest."""
    patcher = load_dit(glm)
    modules = dict(patcher.model.diffusion_model.named_modules())
    lora = {}
    for name in (PACKED, NOT_PACKED):
        key, m = "lora_unet_" + name.replace(".", "_"), modules[name]
        lora[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features)
        lora[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4)
    save_file(lora, tmp_path / "kohya.safetensors")
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    try:
        with caplog.at_level(logging.WARNING):
            (patched,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, "kohya.safetensors", 1.0)
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(tmp_path))
    assert set(patched.patches) == {f"diffusion_model.{NOT_PACKED}.weight"}
    assert any(PACKED.replace(".", "_") in message for message in not_loaded(caplog))


# --- the AR and the whole graph --------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["full", "int8"])
def test_the_ar_loader_keeps_the_4bit_layers_packed_whatever_weights_says_and_logs_it(glm, weights, caplog):
    with caplog.at_level(logging.INFO):
        (ar_model,) = glm["GLMImageARModelLoader"].execute(
            model_folder=FOLDER, dtype="fp32", device="cpu", weights=weights
        )
    decoder = ar_model.decoder.hf_model.model.language_model
    assert isinstance(decoder.layers[0].self_attn.q_proj, w4a16.W4A16Linear)
    (line,) = [r.getMessage() for r in caplog.records if "in 4 bits" in r.getMessage()]
    assert FOLDER in line and "stay packed" in line and ((weights == "int8") == ("'int8'" in line))


def text_to_image(dit: str = "int4-transformer") -> dict:
    return folder_text_to_image(FOLDER, dit, SIZE, STEPS, SEED, capture="int4")


def test_the_text_to_image_graph_on_the_4bit_checkpoint_equals_the_core_pipeline(glm, autoround_model_dir):
    run = comfy_host.run_prompt(text_to_image())
    assert run.success, run.execution_error()
    ours = CAPTURED["int4"]
    latent, image = core_text_to_image(load_models(autoround_model_dir, dtype=torch.float32), SIZE, STEPS, SEED)
    latent_diff = (ours["latent"] - latent).abs().max().item()
    image_diff = (ours["image"] * 255 - image).abs().max().item()
    print(f"latent max diff {latent_diff:.2e}, image max diff {image_diff:.2f} (of 255)")
    assert latent_diff <= 1e-4, latent_diff
    assert image_diff <= 1, image_diff  # the core's image is rounded to uint8
    assert ours["image"].std() > 0.01


@pytest.mark.parametrize("component,node", [("vision_language_encoder", "1"), ("transformer", "5")])
def test_an_unsupported_quantisation_is_refused_when_queued_before_anything_runs(
    glm, autoround_model_dir, tmp_path, component, node
):
    graph = text_to_image(dit=FOLDER)
    assert "8 bits" in refusal_of_edited_quantisation(graph, autoround_model_dir, tmp_path, component, node, bits=8)
