"""Load GLM-Image AR LoRA in ComfyUI: a PEFT adapter folder from models/loras on the AR model (full, int8, 4-bit or
SDNQ weights) gives the tokens PEFT's own PeftModel samples, the loaded AR model (cached by ComfyUI) stays as it was,
and adapters that are not for the AR, or that point out of the loras folders, are refused when the prompt is queued."""

import copy
import os

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import folder_paths  # noqa: E402

from glm_image_core import ar  # noqa: E402
from tests import comfy_glm  # noqa: E402
from tests.test_ar import PEAKED_SCALE, seeded  # noqa: E402
from tests.test_ar_lora import ADAPTERS, dequantised_copy, make_adapter  # noqa: E402

SIZE, SEED, PROMPT = 512, 4, "A 'cat' on a mat"


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    folder_paths.add_model_folder_path("loras", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))


@pytest.fixture(scope="module")
def glm(tiny_model_dir, loras):
    node_classes = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    return node_classes


@pytest.fixture(scope="module")
def peaked(tiny_model_dir):
    """transformers' tiny AR with its code logits spread 30x (tests/test_ar.py: every pick then wins by far more
    than float noise, so two implementations sample the same tokens)."""
    model = GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKED_SCALE)
    return model


@pytest.fixture(scope="module")
def adapter(peaked, loras):
    make_adapter(peaked, loras / "glm_ar_style", **ADAPTERS["attention, a list, dropout"])
    return "glm_ar_style"


def ar_model(glm, weights="full"):
    loaded = glm["GLMImageARModelLoader"].execute(model_folder="GLM-Image", dtype="fp32", device="cpu", weights=weights)
    with torch.no_grad():
        loaded[0].decoder.hf_model.lm_head.weight.mul_(PEAKED_SCALE)  # this module's own instance
    return loaded[0]


def tokens(glm, model):
    return comfy_glm.generate_tokens(glm, model, PROMPT, SIZE, SEED).target_ids


def test_the_node_samples_what_peft_samples_and_leaves_the_loaded_model_as_it_was(
    glm, adapter, peaked, loras, tiny_model_dir
):
    base = ar_model(glm)
    before = {name: param.detach().clone() for name, param in base.decoder.hf_model.named_parameters()}
    assert glm["GLMImageARLoraLoader"].validate_inputs(lora_name=adapter) is True
    adapted = glm["GLMImageARLoraLoader"].execute(ar_model=base, lora_name=adapter, strength=1.0)[0]

    got = tokens(glm, adapted)
    reference = PeftModel.from_pretrained(copy.deepcopy(peaked), loras / adapter).eval()
    processor = GlmImageProcessor.from_pretrained(tiny_model_dir / "processor")
    inputs = ar.build_ar_inputs(processor, PROMPT, SIZE, SIZE)
    expected = ar.generate_prior_tokens(
        reference.get_base_model(), inputs, seeded(SEED), temperature=0.9, top_p=0.75, fast=False
    ).target_ids
    assert torch.equal(got, expected)

    assert base.loras == () and adapted.decoder is base.decoder
    after = dict(base.decoder.hf_model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in before.items())
    assert not torch.equal(tokens(glm, base), expected)


def test_strength_zero_returns_the_input(glm, adapter):
    base = ar_model(glm)
    assert glm["GLMImageARLoraLoader"].execute(ar_model=base, lora_name=adapter, strength=0.0)[0] is base


# weights: (the folder fixture, the folder's name under its glm_image root, the loader's `weights`)
QUANTISED = {
    "int8": ("tiny_model_dir", "GLM-Image", "int8"),
    "4-bit": ("autoround_model_dir", "GLM-Image-int4-AutoRound", "full"),
    "SDNQ": ("sdnq_model_dir", "GLM-Image-SDNQ-4bit-dynamic", "full"),
}


@pytest.mark.parametrize("weights", list(QUANTISED))
def test_quantised_weights_sample_what_peft_samples_over_the_same_weights_and_keep_their_bits(
    glm, weights, loras, tiny_model_dir, request
):
    """The adapter applies beside the quantised projections (int8, 4-bit and SDNQ), and Generate Visual Tokens samples
    what PEFT samples over transformers' model with those weights dequantised (the peaked lm_head: every pick wins by
    far more than float noise); the loaded model's stored bits stay as they were."""
    fixture, folder, loader_weights = QUANTISED[weights]
    root = request.getfixturevalue(fixture).parent
    folder_paths.add_model_folder_path("glm_image", str(root))
    try:
        (base,) = glm["GLMImageARModelLoader"].execute(
            model_folder=folder, dtype="fp32", device="cpu", weights=loader_weights
        )
    finally:
        folder_paths.folder_names_and_paths["glm_image"][0].remove(str(root))
    model = base.decoder.hf_model
    registry = comfy_host.import_pack_module("glm_image_core.formats")
    assert registry.of_layer(model.model.language_model.layers[0].self_attn.q_proj) is not registry.PLAIN
    full_precision = GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    )
    reference = dequantised_copy(model, full_precision, registry)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKED_SCALE)
        reference.lm_head.weight.mul_(PEAKED_SCALE)
    stored = {name: t.clone() for name, t in model.state_dict().items()}
    peft_model = make_adapter(reference, loras / f"glm_ar_{weights}", **ADAPTERS["attention, a list, dropout"])
    (adapted,) = glm["GLMImageARLoraLoader"].execute(ar_model=base, lora_name=f"glm_ar_{weights}", strength=1.0)

    got = tokens(glm, adapted)
    inputs = ar.build_ar_inputs(base.processor, PROMPT, SIZE, SIZE)
    sampling = dict(temperature=0.9, top_p=0.75, fast=False)  # what `tokens` asks of the node
    expected = ar.generate_prior_tokens(peft_model.get_base_model(), inputs, seeded(SEED), **sampling).target_ids
    assert torch.equal(got, expected) and not torch.equal(tokens(glm, base), expected)
    assert all(torch.equal(t, stored[name]) for name, t in model.state_dict().items())


def test_a_dit_lora_is_refused_when_queued_naming_its_keys(glm, loras):
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, loras / "glm_dit_style.safetensors")
    message = glm["GLMImageARLoraLoader"].validate_inputs(lora_name="glm_dit_style.safetensors")
    assert "not a LoRA for GLM-Image's AR" in message and "transformer.proj_out.lora_A.weight" in message


def test_an_adapter_linked_in_from_elsewhere_is_followed_and_a_climbing_value_refused(glm, peaked, loras, tmp_path):
    """A symlink on disk inside models/loras is the machine owner's choice (as ComfyUI follows it); a prompt value
    that climbs out is not in the list and is refused."""
    make_adapter(peaked, tmp_path, r=2, target_modules=["q_proj"])
    (loras / "linked").mkdir()
    os.replace(tmp_path / "adapter_config.json", loras / "linked" / "adapter_config.json")
    (loras / "linked" / "adapter_model.safetensors").symlink_to(tmp_path / "adapter_model.safetensors")
    assert glm["GLMImageARLoraLoader"].validate_inputs(lora_name="linked") is True
    message = glm["GLMImageARLoraLoader"].validate_inputs(lora_name="../linked")
    assert "is not one of the choices" in message
