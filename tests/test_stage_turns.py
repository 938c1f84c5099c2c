"""The stages take turns on the device: the headless text-to-image graph with the 8-bit AR and the fp8 DiT, run by
ComfyUI's executor on a simulated card with no room beside the model being loaded, so that each load must evict the
others (the small-card case, 12-16 GB, where the AR and the DiT cannot stay resident together).

The simulated card: every model's load device is ``cpu:0`` (not ``torch.device("cpu")``, which ComfyUI exempts
from memory management) and ``get_free_memory`` reports no free memory on it. Everything else is ComfyUI's own
``load_models_gpu`` / ``free_memory``. What this checks about the pack: its AR decoder, AR vision encoder, glyph
encoder, DiT and VAE are all managed models that ComfyUI can evict; the AR decoder is loaded again after the DiT;
the vision encoder is never loaded for text to image; and ComfyUI counts the AR decoder as exactly what decoding
keeps on the device (the code rows of the embedding, not the 168064-row table; no vision encoder).
"""

import pytest
import torch

from tests import comfy_host
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management as mm  # noqa: E402
import folder_paths  # noqa: E402

from glm_image_core import memory  # noqa: E402

SIMULATED_CARD = torch.device("cpu", 0)


@pytest.fixture(scope="module")
def pack(tiny_model_dir, tmp_path_factory):
    comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))


@pytest.fixture
def full_card(monkeypatch, pack):
    """ComfyUI managing ``SIMULATED_CARD`` with no free memory beside what it loads; records, after every
    ``load_models_gpu``, the roles it was asked for and the roles then resident."""
    get_free_memory = mm.get_free_memory

    def no_room(dev=None, torch_free_too=False):
        if dev == SIMULATED_CARD:
            return (0, 0) if torch_free_too else 0
        return get_free_memory(dev, torch_free_too)

    loads = []
    load_models_gpu = mm.load_models_gpu

    def recorded(models, *args, **kwargs):
        load_models_gpu(models, *args, **kwargs)
        loads.append(({role(m) for m in models}, {role(m.model) for m in mm.current_loaded_models}))

    mm.unload_all_models()
    for device_of in ("get_torch_device", "text_encoder_device", "vae_device"):
        monkeypatch.setattr(mm, device_of, lambda: SIMULATED_CARD)
    monkeypatch.setattr(mm, "get_free_memory", no_room)
    monkeypatch.setattr(mm, "load_models_gpu", recorded)
    yield loads
    mm.unload_all_models()


def role(patcher) -> str:
    holder = patcher.model
    if hasattr(holder, "parts"):
        return "ar decoder" if type(holder.parts[0]).__name__ == "GlmImageTextModel" else "ar vision"
    return {"HFModelHolder": "glyph encoder", "GlmImageModel": "dit"}.get(type(holder).__name__, "vae")


def int8_ar_fp8_dit_graph(seed: int, workflow: str = "text_to_image") -> dict:
    return example_prompt(
        workflow,
        512,
        512,
        GLMImageARModelLoader={"weights": "int8", "device": "default"},  # on the simulated card
        GLMImageGenerateTokens={"seed": seed},
        GLMImageDiTLoader={"weight_dtype": "fp8_e4m3fn"},
    )


def test_int8_ar_and_fp8_dit_take_turns_on_a_full_card(full_card):
    first = comfy_host.run_prompt(int8_ar_fp8_dit_graph(seed=1))
    assert first.success, first.execution_error()
    again = comfy_host.run_prompt(int8_ar_fp8_dit_graph(seed=2))  # new tokens: the AR runs after the DiT did
    assert again.success, again.execution_error()

    requested = [asked for asked, _ in full_card]
    assert requested.count({"ar decoder"}) == 2 and requested.count({"dit"}) == 2
    assert all(resident == asked for asked, resident in full_card), full_card  # each load evicted every other
    assert "ar vision" not in set().union(*requested)  # text to image never loads the vision encoder
    ar_loads = [i for i, asked in enumerate(requested) if asked == {"ar decoder"}]
    assert any(asked == {"dit"} for asked in requested[: ar_loads[1]])  # the second AR load came after a DiT load


def test_an_edit_loads_the_vision_encoder_first_and_the_decoder_evicts_it(full_card, tmp_path):
    from PIL import Image

    Image.new("RGB", (256, 256), (120, 160, 200)).save(tmp_path / "example.png")
    input_directory = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    try:
        run = comfy_host.run_prompt(int8_ar_fp8_dit_graph(seed=1, workflow="edit_single_reference"))
    finally:
        folder_paths.set_input_directory(input_directory)
    assert run.success, run.execution_error()
    requested = [asked for asked, _ in full_card]
    assert requested.index({"ar vision"}) < requested.index({"ar decoder"})
    assert full_card[requested.index({"ar decoder"})][1] == {"ar decoder"}  # the vision encoder made room


def test_comfyui_counts_the_ar_decoder_as_what_decoding_keeps_on_the_device(pack):
    import nodes

    loader = nodes.NODE_CLASS_MAPPINGS["GLMImageARModelLoader"]
    ar_model = loader.execute(model_folder="GLM-Image", dtype="fp32", device="cpu", weights="int8")[0]
    model = ar_model.decoder.hf_model
    rotary = model.model.language_model.rotary_emb  # RoPE tables: moved with the model, not in its state dict
    rope_bytes = memory.tensor_bytes(rotary.buffers())
    assert ar_model.decoder.patcher.model_size() + rope_bytes == memory.ar_decode_bytes(model)
    parts = memory.ar_bytes_by_component(model)
    assert memory.ar_decode_bytes(model) == sum(list(parts.values())[:4])
    assert ar_model.vision.patcher.model_size() == parts["vision encoder + VQ (edits only)"]
    assert parts["decoder embedding"] == 16384 * 64 * 4  # the code rows; the table (168064 rows) stays on the CPU
