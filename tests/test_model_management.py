"""The AR model, the glyph encoder and the DiT live under ComfyUI's model management: the node that uses a model loads
it through comfy.model_management.load_models_gpu, so ComfyUI knows it (and can offload or evict it for the next
model) instead of it sitting on the device unseen. Loader nodes only read the weights; nothing is loaded before use.
"""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management as mm  # noqa: E402
import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402

from tests import comfy_glm  # noqa: E402

types = comfy_host.import_pack_module("nodes.types")

SIZE = 512


@pytest.fixture(scope="module")
def glm(tiny_model_dir):
    node_classes = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    return node_classes


def is_managed(patcher) -> bool:
    return any(loaded.model is patcher for loaded in mm.current_loaded_models)


def random_tokens() -> "types.VisualTokens":
    n = (SIZE // 16) ** 2
    ids = torch.randint(0, 16384, (1, n), generator=torch.Generator().manual_seed(0))
    return types.VisualTokens(ids, torch.zeros(1, n // 4), torch.zeros(1, 0), SIZE, SIZE, 'a "sign"', 0)


def test_generate_tokens_loads_the_ar_model_through_model_management(glm):
    ar_model = glm["GLMImageARModelLoader"].execute(
        model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full"
    )[0]
    assert not is_managed(ar_model.decoder.patcher)

    comfy_glm.generate_tokens(glm, ar_model, "a cat", SIZE, seed=0)

    assert is_managed(ar_model.decoder.patcher)


def test_encode_loads_the_glyph_encoder_through_model_management(glm):
    encoder = glm["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]
    assert not is_managed(encoder.model.patcher)

    with torch.inference_mode():
        glm["GLMImageEncode"].execute(
            glyph_encoder=encoder, tokens=random_tokens(), glyph_text="from prompt quotes", override=""
        )

    assert is_managed(encoder.model.patcher)


def test_the_sampler_loads_the_dit_through_model_management(glm):
    dit = glm["GLMImageDiTLoader"].execute(dit="GLM-Image", weight_dtype="default")[0]
    encoder = glm["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]
    with torch.inference_mode():
        positive, negative = (
            glm["GLMImageEncode"]
            .execute(glyph_encoder=encoder, tokens=random_tokens(), glyph_text="from prompt quotes", override="")
            .args
        )
    model = glm["GLMImageModelSampling"].execute(model=dit, width=SIZE, height=SIZE)[0]
    assert not is_managed(model)

    noise = torch.randn(1, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        comfy.sample.sample(model, noise, 1, 1.5, "euler", "simple", positive, negative, torch.zeros_like(noise))

    assert is_managed(model)


def test_comfyui_can_evict_the_ar_model_and_the_next_run_loads_it_again(glm):
    ar_model = glm["GLMImageARModelLoader"].execute(
        model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full"
    )[0]
    first = comfy_glm.generate_tokens(glm, ar_model, "a cat", SIZE, seed=0)

    mm.free_memory(1e30, mm.get_torch_device())  # what loading a model that needs all the memory does
    assert not is_managed(ar_model.decoder.patcher)

    again = comfy_glm.generate_tokens(glm, ar_model, "a cat", SIZE, seed=0)
    assert is_managed(ar_model.decoder.patcher)
    assert torch.equal(first.prior_token_ids, again.prior_token_ids)
