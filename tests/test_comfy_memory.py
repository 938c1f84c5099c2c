"""ComfyUI's memory estimate for a GLM-Image sampling run includes what the run really holds beside the latent: the
reference K/V stored for the whole run (exactly its size), the reference tokens and the glyph tokens attended to."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.sampler_helpers  # noqa: E402

from tests.comfy_glm import conditionings, reference, tiny_patcher  # noqa: E402

SIZE = 256
NOISE = [1, 16, SIZE // 8, SIZE // 8]


@pytest.fixture(scope="module")
def patcher(tiny_model_dir):
    return tiny_patcher(tiny_model_dir, SIZE, SIZE)


def estimate(patcher, references=None, glyph_len=6) -> float:
    """(bytes) what prepare_sampling asks load_models_gpu to keep free for a CFG run of this conditioning."""
    positive, negative = conditionings(SIZE, SIZE, references=references, glyph_len=glyph_len)
    conds = {
        "positive": comfy.sampler_helpers.convert_cond(positive),
        "negative": comfy.sampler_helpers.convert_cond(negative),
    }
    return comfy.sampler_helpers.estimate_memory(patcher, NOISE, conds)[0]


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
