"""End to end: our pipeline against diffusers' GlmImagePipeline for the same prior tokens and initial noise."""

import dataclasses

import numpy as np
import PIL.Image
import torch

from glm_image_core import ar, memory
from glm_image_core.formats import w4a16
from glm_image_core.pipeline import generate, initial_noise, load_models

HEIGHT, WIDTH, STEPS, SEED = 512, 768, 3, 7
PROMPT = 'A shop sign that reads "OPEN" and \u201cDaily\u201d, with 「你好」 below'


def test_text_to_image_equals_glm_image_pipeline(core_models, reference_pipeline):
    ours = np.asarray(generate(core_models, PROMPT, HEIGHT, WIDTH, steps=STEPS, seed=SEED), dtype=np.float32)

    # The same tokens (our AR with the same seed) and the same noise through the reference.
    inputs = ar.build_ar_inputs(core_models.processor, PROMPT, HEIGHT, WIDTH)
    tokens = ar.generate_prior_tokens(core_models.ar_model, inputs, [torch.Generator().manual_seed(SEED)])
    expected = reference_pipeline(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        guidance_scale=1.5,
        prior_token_ids=tokens.prior_token_ids,
        latents=initial_noise(1, HEIGHT, WIDTH, SEED),
        output_type="np",
    ).images[0]
    assert ours.shape == (HEIGHT, WIDTH, 3)
    diff = np.abs(ours - np.round(expected * 255)).max()
    assert diff <= 1, diff  # uint8 rounding of values equal to float tolerance
    assert ours.std() > 1  # a real picture, not a constant


def lending_probe(models):
    """lent(part) -> whether that part's weights are device copies right now (stage() swaps in copies; on the CPU
    the copies are new storage). Parts: the AR's decoder (lm_head), the AR's vision encoder, the DiT, the glyph
    encoder, the VAE."""
    probes = {
        "ar decoder": models.ar_model.lm_head.weight,
        "ar vision": next(models.ar_model.model.visual.parameters()),
        "dit": next(models.dit.parameters()),
        "glyph": next(models.glyph_encoder.parameters()),
        "vae": next(models.vae.parameters()),
    }
    storage = {name: p.data_ptr() for name, p in probes.items()}
    return lambda name: probes[name].data_ptr() != storage[name]


def test_offloaded_stages_hold_one_model_at_a_time_and_give_the_same_image(core_models, monkeypatch):
    """With offload, each stage works on copies of its own models only; the CPU weights are never replaced. Text to
    image never moves the AR's vision encoder, and the VAE decodes in a turn of its own (its activations, ~4.5 GiB at
    1024x1024, never meet the DiT's weights)."""
    staged = dataclasses.replace(core_models, offload=True, device=torch.device("cpu"))
    lent = lending_probe(core_models)
    parts = ("ar decoder", "ar vision", "dit", "glyph", "vae")
    seen = set()
    decode = core_models.vae.decode

    def watched_decode(*args, **kwargs):
        seen.add(("vae decode", *(p for p in parts if lent(p))))
        return decode(*args, **kwargs)

    monkeypatch.setattr(core_models.vae, "decode", watched_decode)
    image = generate(
        staged,
        PROMPT,
        512,
        512,
        steps=2,
        seed=SEED,
        on_token=lambda *_: seen.add(("ar", *(p for p in parts if lent(p)))),
        on_step=lambda *_: seen.add(("dit", *(p for p in parts if lent(p)))),
    )
    assert seen == {("ar", "ar decoder"), ("dit", "dit"), ("vae decode", "vae")}
    assert not any(lent(p) for p in parts)
    monkeypatch.undo()
    resident = np.asarray(generate(core_models, PROMPT, 512, 512, steps=2, seed=SEED), dtype=np.float32)
    assert np.abs(np.asarray(image, dtype=np.float32) - resident).max() <= 1  # copies may round differently on CPU


def test_a_4bit_ar_stage_leaves_no_repacked_copy_on_the_device(autoround_model_dir, monkeypatch):
    """The int4 matmul's repacked copy of each 4-bit projection (~4 GB for the published AR) is made during the AR
    stage and must go with it: the glyph and DiT stages, and the next run, would otherwise hold it beside their own
    weights. CUDA's path run on torch's CPU int4 matmul."""
    monkeypatch.setattr(w4a16, "INT4PACK_DEVICES", ("cpu",))
    models = load_models(autoround_model_dir, dtype=torch.float32)
    layers = [m for m in models.ar_model.modules() if isinstance(m, w4a16.W4A16Linear)]
    generate(dataclasses.replace(models, offload=True, device=torch.device("cpu")), PROMPT, 512, 512, steps=1)
    assert w4a16.W4A16Linear.INT4PACK in {m.kernel for m in layers}  # decode steps took the int4 matmul
    assert [m for m in layers if m._int4pack is not None] == []


def test_an_offloaded_edit_runs_the_vision_encoder_in_a_turn_of_its_own(core_models, monkeypatch):
    staged = dataclasses.replace(core_models, offload=True, device=torch.device("cpu"))
    lent = lending_probe(core_models)
    parts = ("ar decoder", "ar vision", "dit", "glyph")
    seen = []
    encode = ar.encode_reference_images

    def watched_encode(model, inputs):
        seen.append(("vision", *(p for p in parts if lent(p))))
        return encode(model, inputs)

    monkeypatch.setattr(ar, "encode_reference_images", watched_encode)
    reference = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8))
    generate(
        staged,
        "make it 'blue'",
        512,
        512,
        steps=1,
        seed=SEED,
        references=[reference],
        on_token=lambda *_: seen.append(("ar", *(p for p in parts if lent(p)))),
    )
    assert seen[0] == ("vision", "ar vision")
    assert set(seen[1:]) == {("ar", "ar decoder")}


def test_the_pipeline_runs_with_an_8bit_ar_and_trims_the_decoders_embedding(tiny_model_dir):
    models = load_models(tiny_model_dir, dtype=torch.float32, ar_quantisation="int8")
    parts = memory.ar_bytes_by_component(models.ar_model)
    assert parts["decoder embedding"] == 16384 * 64 * 4  # the code rows only; the table stays in CPU memory
    assert parts["embedding table kept in CPU memory"] == 168064 * 64 * 4
    assert models.ar_model.lm_head.weight.dtype == torch.float32
    image = generate(dataclasses.replace(models, offload=True), PROMPT, 512, 512, steps=2, seed=SEED)
    assert np.asarray(image, dtype=np.float32).std() > 1


def dit_lora_file(dit, path, seed=0, rank=4, alpha=2.0):
    """A DiT LoRA in diffusers/PEFT key names (``transformer.<layer>.lora_A/B.weight``, ``.alpha``) for every Linear
    layer, random; returns {layer: (down, up)}."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    pairs = {
        name: (
            torch.randn(rank, m.in_features, generator=g) * 0.1,
            torch.randn(m.out_features, rank, generator=g) * 0.1,
        )
        for name, m in dit.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    tensors = {}
    for name, (down, up) in pairs.items():
        tensors |= {
            f"transformer.{name}.lora_A.weight": down,
            f"transformer.{name}.lora_B.weight": up,
            f"transformer.{name}.alpha": torch.tensor(alpha),
        }
    save_file(tensors, path)
    return pairs


def test_a_dit_lora_in_the_pipeline_equals_its_update_merged_into_float32_weights(tiny_model_dir, tmp_path):
    """load_models(loras=...) applies a DiT LoRA unmerged, beside each layer; the reference merges W + s * alpha / rank
    * B A into the float32 weights."""
    plain = load_models(tiny_model_dir, dtype=torch.float32)
    pairs = dit_lora_file(plain.dit, tmp_path / "style.safetensors")
    adapted = load_models(tiny_model_dir, dtype=torch.float32, loras=[(tmp_path / "style.safetensors", 0.8)])
    got = np.asarray(generate(adapted, PROMPT, 512, 512, steps=2, seed=SEED), dtype=np.float32)
    unadapted = np.asarray(generate(plain, PROMPT, 512, 512, steps=2, seed=SEED), dtype=np.float32)
    with torch.no_grad():
        for name, (down, up) in pairs.items():
            plain.dit.get_submodule(name).weight += 0.8 * 2.0 / 4 * up @ down
    expected = np.asarray(generate(plain, PROMPT, 512, 512, steps=2, seed=SEED), dtype=np.float32)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - unadapted).max() > 10
    assert not [m for m in adapted.dit.modules() if m._forward_hooks]  # the model is as loaded again


def test_an_ar_lora_in_the_pipeline_samples_what_the_ar_samples_with_it(tiny_model_dir, tmp_path):
    from tests.test_ar_lora import ADAPTERS, make_adapter

    base = load_models(tiny_model_dir, dtype=torch.float32)
    make_adapter(base.ar_model, tmp_path / "ar_style", **ADAPTERS["attention, a list, dropout"])
    models = load_models(tiny_model_dir, dtype=torch.float32, ar_loras=[(tmp_path / "ar_style", 0.5)])
    seen = []
    generate(models, PROMPT, 512, 512, steps=1, seed=SEED, on_token=lambda step, total, ids: seen.append(ids.clone()))
    inputs = ar.build_ar_inputs(models.processor, PROMPT, 512, 512)
    generator = torch.Generator().manual_seed(SEED)
    expected = ar.generate_prior_tokens(models.ar_model, inputs, [generator], loras=models.ar_loras)
    unadapted = ar.generate_prior_tokens(models.ar_model, inputs, [torch.Generator().manual_seed(SEED)])
    sampled = seen[-1][:, -expected.target_ids.shape[1] :]  # the callback's tokens end with the target grid's
    assert torch.equal(sampled, expected.target_ids) and not torch.equal(sampled, unadapted.target_ids)
