"""ComfyUI's memory estimate for a GLM-Image sampling run includes what the run really holds beside the latent: the
reference K/V stored for the whole run (exactly its size), the reference tokens and the glyph tokens attended to;
each reference once, whatever the negative is (GLM-Image Encode's own, or a ConditioningZeroOut of the positive)."""

import dataclasses

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sampler_helpers  # noqa: E402

import nodes  # noqa: E402
from tests.comfy_glm import conditionings, dit_loading, generate_tokens, reference, tiny_patcher  # noqa: E402

SIZE = 256
NOISE = [1, 16, SIZE // 8, SIZE // 8]


@pytest.fixture(scope="module")
def patcher(tiny_model_dir):
    return tiny_patcher(tiny_model_dir, SIZE, SIZE)


def zero_out(conditioning):
    """The stock ConditioningZeroOut node's output."""
    return nodes.ConditioningZeroOut().zero_out(conditioning)[0]


def estimate(patcher, references=None, glyph_len=6, negative="encode") -> float:
    """(bytes) what prepare_sampling asks load_models_gpu to keep free for a CFG run of this conditioning, with the
    wrappers the model carries; ``negative``: GLM-Image Encode's ("encode") or a ConditioningZeroOut of the positive
    ("zero out")."""
    positive, encode_negative = conditionings(SIZE, SIZE, references=references, glyph_len=glyph_len)
    conds = {
        "positive": comfy.sampler_helpers.convert_cond(positive),
        "negative": comfy.sampler_helpers.convert_cond(
            zero_out(positive) if negative == "zero out" else encode_negative
        ),
    }
    asked = []
    load = comfy.model_management.load_models_gpu
    comfy.model_management.load_models_gpu = lambda models, memory_required=0, **kw: asked.append(memory_required)
    try:
        options = comfy.model_patcher.create_model_options_clone(patcher.model_options)
        comfy.sampler_helpers.prepare_model_patcher(patcher, conds, options)  # the patcher's wrappers, as the guider
        comfy.sampler_helpers.prepare_sampling(patcher, NOISE, conds, options)
    finally:
        comfy.model_management.load_models_gpu = load
    return asked[0]


def stored_kv_bytes(patcher, ref) -> int:
    """The K/V the model really computes for this reference, counted tensor by tensor."""
    kv = patcher.model.encode_references([ref], torch.device("cpu"))
    return sum(t.numel() * t.element_size() for layer in kv.layers for t in layer)


def test_a_reference_adds_its_stored_kv_and_its_tokens(patcher):
    ref = reference(SIZE, SIZE, seed=1)
    tokens = (SIZE // 16) ** 2
    model = patcher.model
    batch = [2] + NOISE[1:]  # cond + uncond
    attended = model.memory_required(batch, {"reference_kv": [[1, tokens]]}) - model.memory_required(batch, {})
    assert attended > 0
    assert estimate(patcher, [ref]) - estimate(patcher) == pytest.approx(stored_kv_bytes(patcher, ref) + attended)


def test_the_estimate_grows_with_the_number_and_the_size_of_references(patcher):
    small, large = reference(SIZE, SIZE, seed=1), reference(2 * SIZE, 2 * SIZE, seed=2)
    none, one, two = estimate(patcher), estimate(patcher, [small]), estimate(patcher, [small, small])
    assert none < one < two and two - one == pytest.approx(one - none)
    assert estimate(patcher, [large]) - none == pytest.approx(4 * (one - none))  # 4x the tokens, 4x the K/V


def test_the_estimate_grows_with_the_glyph_length(patcher):
    assert estimate(patcher, glyph_len=60) > estimate(patcher, glyph_len=6)


def test_the_reference_cond_reports_its_tokens_to_cond_batching(patcher):
    ref = reference(SIZE, 2 * SIZE, seed=3)
    conds = comfy_host.import_pack_module("nodes.conds")
    cond = conds.ReferenceKVCond(patcher.model.encode_references([ref], torch.device("cpu")))
    assert cond.size() == [1, (SIZE // 16) * (2 * SIZE // 16)]


@pytest.mark.parametrize("negative", ["encode", "zero out"])
def test_a_reference_is_counted_once_whatever_the_negative(patcher, negative):
    """The estimate's share of one reference against what a real sampling run computes and holds for it: the K/V
    that extra_conds stores (measured: every encode_references call of the run, tensor by tensor), and its tokens
    attended to by the conditional branch only."""
    ref = reference(SIZE, SIZE, seed=1)
    positive, encode_negative = conditionings(SIZE, SIZE, references=[ref])
    stored = []
    model = patcher.model
    encode_references = model.encode_references

    def measured(references, device):
        kv = encode_references(references, device)
        stored.append(sum(t.numel() * t.element_size() for layer in kv.layers for t in layer))
        return kv

    model.encode_references = measured
    try:
        noise = torch.randn(NOISE, generator=torch.Generator().manual_seed(1))
        neg = zero_out(positive) if negative == "zero out" else encode_negative
        comfy.sample.sample(patcher, noise, 2, 1.5, "euler", "simple", positive, neg, torch.zeros_like(noise), seed=0)
    finally:
        del model.encode_references
    tokens = (SIZE // 16) ** 2
    batch = [2] + NOISE[1:]  # cond + uncond
    attended_once = model.memory_required(batch, {"reference_kv": [[1, tokens]]}) - model.memory_required(batch, {})
    share = estimate(patcher, [ref], negative=negative) - estimate(patcher, negative=negative)
    assert len(stored) == 1  # the run computes the reference's K/V once: for the positive
    assert share == pytest.approx(sum(stored) + attended_once)


def test_a_zero_out_negative_is_estimated_as_the_unconditional_branch(patcher):
    """A ConditioningZeroOut of the positive carries the positive's glyph length and references; the negative branch
    reads neither (the empty glyph, no references), so the estimate equals that of GLM-Image Encode's negative."""
    ref = reference(SIZE, SIZE, seed=1)
    assert estimate(patcher, [ref], glyph_len=60, negative="zero out") == estimate(patcher, [ref], glyph_len=60)


def test_the_unconditional_view_samples_as_the_zero_out_negative(patcher):
    """The conds the wrapper hands on are those the run samples with: the same latent as without the wrapper."""
    ref = reference(SIZE, SIZE, seed=1)
    positive, _ = conditionings(SIZE, SIZE, references=[ref])
    noise = torch.randn(NOISE, generator=torch.Generator().manual_seed(1))

    def run(p):
        return comfy.sample.sample(p, noise, 2, 1.5, "euler", "simple", positive, zero_out(positive), noise * 0, seed=0)

    plain = patcher.clone()
    plain.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, dit_loading.UNCONDITIONAL_VIEW)
    assert torch.equal(run(patcher), run(plain))


@pytest.fixture(scope="module")
def glm(tiny_model_dir):
    import folder_paths

    node_classes = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    return node_classes


@pytest.fixture
def asked(monkeypatch):
    """{id of a model's patcher: the memory_required each load_models_gpu of it asked for}."""
    requests = {}
    load_models_gpu = comfy.model_management.load_models_gpu

    def recorded(models, memory_required=0, **kwargs):
        for patcher in models:
            requests.setdefault(id(patcher), []).append(memory_required)
        return load_models_gpu(models, memory_required=memory_required, **kwargs)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recorded)
    return requests


def test_the_vision_encoder_and_the_glyph_encoder_load_with_their_working_memory(glm, asked):
    """Generate Visual Tokens asks ComfyUI to free the vision encoder's working memory for its references, and
    GLM-Image Encode the glyph encoder's for its spans (before the fix: 0 bytes for both)."""
    from glm_image_core import ar, glyph, memory

    ar_model = glm["GLMImageARModelLoader"].execute(
        model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full"
    )[0]
    reference_image = torch.rand(1, 256, 384, 3, generator=torch.Generator().manual_seed(0))
    prompt = 'a poster that reads "OPEN" and "CLOSED"'
    tokens = generate_tokens(glm, ar_model, prompt, 512, seed=0, reference_1=reference_image)
    images = comfy_host.import_pack_module("nodes.ar_nodes").image_batch_to_pil(reference_image)
    inputs = ar.build_ar_inputs(ar_model.processor, prompt, 512, 512, images)
    vision = memory.ar_model_vision_working_bytes(ar_model.decoder.hf_model, inputs.image_grid_thw[:1])
    assert vision > 0 and asked[id(ar_model.vision.patcher)] == [vision]

    encoder = glm["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]
    text_tokens = dataclasses.replace(tokens, references=[])  # the glyph part needs no VAE
    with torch.inference_mode():
        glm["GLMImageEncode"].execute(
            glyph_encoder=encoder, tokens=text_tokens, glyph_text="from prompt quotes", override=""
        )
    spans = glyph.extract_glyph_texts(prompt)
    working = memory.glyph_model_working_bytes(encoder.model.hf_model, spans, encoder.tokenizer)
    assert working > 0 and asked[id(encoder.model.patcher)] == [working]
