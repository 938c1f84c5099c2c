"""The AR stage (glm_image_core.ar) against transformers' GlmImageProcessor / GlmImageForConditionalGeneration."""

import contextlib
import copy
import hashlib
import logging
import os
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from glm_image_core import ar, cuda_graph, fast_ar
from glm_image_core.errors import GenerationCancelled, InvalidInputError
from glm_image_core.sizes import check_reference_size

NON_GRID_IDS = list(range(16384, 16512))  # image start, EOS and the unused visual ids


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return GlmImageProcessor.from_pretrained(tiny_model_dir / "processor")


@pytest.fixture(scope="module")
def references():
    rng = np.random.default_rng(0)
    return [
        PIL.Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)),
        PIL.Image.fromarray(rng.integers(0, 256, (512, 768, 3), dtype=np.uint8)),  # 512 high, 768 wide
    ]


@pytest.fixture(scope="module")
def t2i_inputs(processor):
    return ar.build_ar_inputs(processor, "A 'cat' on a mat", 256, 256)  # 16x16 preview + 8x8 grid: 320 tokens


@pytest.fixture(scope="module")
def i2i_inputs(processor, references):
    return ar.build_ar_inputs(processor, "make it 'blue'", 256, 256, references[:1])  # 8x8 grid: 64 tokens


PEAKED_SCALE = 30.0
# Float32 logits of two implementations on any CPU: our loop over transformers' static or dynamic cache vs generate
# (~2e-6 measured), and fast_ar vs generate (~3e-6 measured; a batch of 2 vs a batch of 1 alike).
CACHE_TOLERANCE = 1e-5
LOGITS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def peaked_model(model):
    """The tiny model with its code logits spread 30x (lm_head scaled). Two decoders whose logits differ by float
    noise sample the same tokens only if no draw lands within that noise of a boundary of the inverse CDF or of the
    top-p/top-k cut. The plain random model's next-token distribution is nearly flat (each code ~6e-5): about one
    draw in 20 lands that close, so which token comes out depends on the CPU's BLAS. On this model every pick wins
    by far more than the noise (test_peaked_model_decides_every_token_by_a_wide_margin checks it)."""
    peaked = copy.deepcopy(model)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(PEAKED_SCALE)
    return peaked


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def generate_kwargs(inputs):
    kwargs = dict(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        image_grid_thw=inputs.image_grid_thw,
        images_per_sample=inputs.images_per_sample,
    )
    if inputs.pixel_values is not None:
        kwargs["pixel_values"] = inputs.pixel_values
    return kwargs


# --- sizes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(512, 512), (512, 768), (768, 512), (1024, 1024), (2048, 512), (96, 64)])
def test_geometry_matches_the_processor_target_shape(processor, height, width):
    geometry = ar.ar_geometry(height, width)
    assert (geometry.grid_h, geometry.grid_w, geometry.preview_h, geometry.preview_w) == tuple(
        processor._get_target_shape(height, width)
    )
    assert geometry.num_new_tokens == geometry.preview_h * geometry.preview_w + height * width // 1024 + 1


def test_geometry_step_counts():
    assert ar.ar_geometry(1024, 1024).num_new_tokens == 1281  # the reference's max_new_tokens, its EOS included
    assert ar.ar_geometry(1024, 1024).num_grid_tokens == 1280  # what is sampled (the panel's and progress bar's count)
    assert ar.ar_geometry(2048, 2048).num_new_tokens == 4353
    i2i = ar.ar_geometry(1024, 768, image_to_image=True)
    assert (i2i.preview_h, i2i.preview_w, i2i.num_new_tokens) == (0, 0, 32 * 24 + 1)


@pytest.mark.parametrize("height,width", [(500, 512), (512, 1000), (0, 512), (-32, 64)])
def test_sizes_that_are_not_multiples_of_32_are_refused(height, width):
    with pytest.raises(InvalidInputError, match="multiples of 32"):
        ar.ar_geometry(height, width)


# --- prompt and positions ------------------------------------------------------------------------------------------


def test_t2i_prompt_is_the_pipelines(processor):
    inputs = ar.build_ar_inputs(processor, "A 'cat' on a mat", 512, 768)
    # diffusers' generate_prior_tokens call, as written there
    messages = [[{"role": "user", "content": [{"type": "text", "text": "A 'cat' on a mat"}]}]]
    reference = processor.apply_chat_template(
        messages, tokenize=True, padding=False, target_h=512, target_w=768, return_dict=True, return_tensors="pt"
    )
    assert torch.equal(inputs.input_ids, reference["input_ids"])
    assert torch.equal(inputs.image_grid_thw, reference["image_grid_thw"])
    assert torch.equal(inputs.images_per_sample, reference["images_per_sample"])
    text = processor.tokenizer.decode(inputs.input_ids[0])
    assert text == "A 'cat' on a mat<sop>16 24<eop><sop>13 19<eop><|dit_token_16384|>"


def test_i2i_prompt_puts_each_reference_before_the_text(processor, references):
    inputs = ar.build_ar_inputs(processor, "make it blue", 512, 512, references)
    ids = inputs.input_ids[0].tolist()
    assert inputs.reference_grids == [(16, 16), (16, 24)]  # the processor halves the image: 32 px per token
    assert ids.count(167855) == 16 * 16 + 16 * 24
    assert inputs.pixel_values.shape == (16 * 16 + 16 * 24, 3 * 16 * 16)
    image = "<|dit_token_16384|>{}<|dit_token_16385|>".format
    expected = image("<|image|>" * 256) + image("<|image|>" * 384) + "make it blue<sop>16 16<eop><|dit_token_16384|>"
    assert processor.tokenizer.decode(ids) == expected


@pytest.mark.parametrize(
    "height,width,num_references", [(512, 768, 0), (768, 512, 0), (512, 512, 1), (512, 768, 2)], ids=str
)
def test_positions_equal_get_rope_index(model, processor, references, height, width, num_references):
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", height, width, references[:num_references])
    expected, _ = model.model.get_rope_index(
        inputs.input_ids, inputs.image_grid_thw, inputs.images_per_sample, inputs.attention_mask
    )
    assert torch.equal(inputs.position_ids, expected)  # [3, 1, L]
    cached = model.model._cached_decode_position_ids  # [1, 3, num_new_tokens], what generate() reads per step
    assert torch.equal(inputs.decode_position_ids, cached.permute(1, 0, 2))
    assert inputs.decode_position_ids.shape[-1] == inputs.geometry.num_new_tokens


def test_control_tokens_in_the_prompt_are_refused(processor):
    for prompt in ["a <|image|> b", "x<sop>1 2<eop>", "<|dit_token_5|>"]:
        with pytest.raises(InvalidInputError, match="control tokens"):
            ar.build_ar_inputs(processor, prompt, 512, 512)


# --- logits and tokens against transformers ------------------------------------------------------------------------


def greedy_generate_logits(model, inputs, steps):
    """transformers' greedy generate (non-grid ids suppressed) with its logits: (output, new tokens [1, steps + 1],
    the prompt ids with the reference images' VQ ids filled in, as our loops feed them)."""
    out = model.generate(
        **generate_kwargs(inputs),
        max_new_tokens=steps + 1,
        do_sample=False,
        suppress_tokens=NON_GRID_IDS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    input_ids = inputs.input_ids
    if inputs.reference_grids:
        reference_ids = torch.cat(ar.encode_reference_images(model, inputs))
        input_ids = input_ids.masked_scatter(input_ids == model.config.image_token_id, reference_ids)
    return out, out.sequences[:, inputs.input_ids.shape[1] :], input_ids


@pytest.mark.parametrize("num_references", [0, 2])
def test_step_logits_equal_generate_logits(model, processor, references, num_references):
    from transformers import DynamicCache, StaticCache

    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 384, references[:num_references])
    steps = 6
    out, new_tokens, input_ids = greedy_generate_logits(model, inputs, steps)
    for cache in (DynamicCache(config=model.config), StaticCache(config=model.config, max_cache_len=2000)):
        with torch.inference_mode():
            diffs = [(ar.next_token_logits(model, input_ids, inputs.position_ids, cache) - out.logits[0]).abs().max()]
            for k in range(steps):
                position = inputs.decode_position_ids[:, :, k : k + 1]
                logits = ar.next_token_logits(model, new_tokens[:, k : k + 1], position, cache)
                diffs.append((logits - out.logits[k + 1]).abs().max())
        assert max(diffs) <= CACHE_TOLERANCE, (type(cache).__name__, diffs)


def test_the_cache_goes_by_the_name_the_installed_transformers_takes(model, processor):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name is removed in 5.40): the
    decoder passes whichever the model's forward declares, with no deprecation warning (CI's newest-deps run tests
    the new name, the pinned version the old one)."""
    from transformers import DynamicCache

    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 256)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.inference_mode():
            ar.next_token_logits(model, inputs.input_ids, inputs.position_ids, DynamicCache(config=model.config))
    assert [str(w.message) for w in caught if "past_key_values" in str(w.message)] == []


@pytest.mark.parametrize("num_references", [0, 1])
def test_top_k_1_equals_greedy_generate_with_non_grid_ids_suppressed(model, processor, references, num_references):
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 256, references[:num_references])
    result = ar.generate_prior_tokens(model, inputs, seeded(0), top_k=1)
    out = model.generate(
        **generate_kwargs(inputs),
        max_new_tokens=inputs.geometry.num_grid_tokens,
        do_sample=False,
        suppress_tokens=NON_GRID_IDS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    greedy = out.sequences[:, inputs.input_ids.shape[1] :]
    # Logits within CACHE_TOLERANCE of each other have the same argmax wherever it wins by more than twice that.
    top2 = torch.stack(out.logits)[..., :16384].topk(2, dim=-1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 2 * CACHE_TOLERANCE
    assert torch.equal(torch.cat([result.preview_ids, result.target_ids], dim=1), greedy)


def test_static_and_dynamic_caches_sample_the_same_tokens(peaked_model, i2i_inputs):
    model = peaked_model
    static = ar.generate_prior_tokens(model, i2i_inputs, seeded(3), static_cache=True)
    dynamic = ar.generate_prior_tokens(model, i2i_inputs, seeded(3), static_cache=False)
    assert torch.equal(static.target_ids, dynamic.target_ids)


# --- sampling ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.9, None, 0.75), (0.7, 50, 0.9), (1.0, 16512, 1.0), (1.3, 3, 0.5)]
)
def test_warped_distribution_equals_transformers_warpers(temperature, top_k, top_p):
    logits = torch.randn(3, 16512, generator=torch.Generator().manual_seed(0)) * 3
    chain = [SuppressTokensLogitsProcessor(NON_GRID_IDS)]
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    expected = LogitsProcessorList(chain)(torch.zeros(3, 1, dtype=torch.long), logits)
    ours = ar.warp_logits(logits[:, :16384], temperature, top_k, top_p)
    assert torch.isinf(expected[:, 16384:]).all()
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1)[:, :16384], rtol=0, atol=1e-7)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected[:, :16384]))


def test_sampling_picks_the_inverse_cdf_token_and_never_a_removed_one():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0]])
    picks = [ar.sample_tokens(probs, torch.tensor([u])).item() for u in (0.0, 0.49, 0.5, 0.74, 0.75, 0.9999999)]
    assert picks == [1, 1, 3, 3, 4, 4]
    unnormalised = torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0]])  # u * total may round up to the total
    assert ar.sample_tokens(unnormalised, torch.tensor([1.0 - 2**-24])).item() == 3


def test_same_seed_same_tokens_and_other_seed_other_tokens(model, i2i_inputs):
    first = ar.generate_prior_tokens(model, i2i_inputs, seeded(7))
    again = ar.generate_prior_tokens(model, i2i_inputs, seeded(7))
    other = ar.generate_prior_tokens(model, i2i_inputs, seeded(8))
    assert torch.equal(first.target_ids, again.target_ids)
    assert (first.target_ids != other.target_ids).float().mean() > 0.9


def test_samples_in_a_batch_follow_their_own_generator(peaked_model, i2i_inputs):
    model = peaked_model  # a batch of 2 and a batch of 1 run different matmul shapes: logits differ by float noise
    batch = ar.generate_prior_tokens(model, i2i_inputs, seeded(7, 8))
    assert torch.equal(batch.target_ids[0], ar.generate_prior_tokens(model, i2i_inputs, seeded(7)).target_ids[0])
    assert torch.equal(batch.target_ids[1], ar.generate_prior_tokens(model, i2i_inputs, seeded(8)).target_ids[0])


def test_sample_0_uses_the_seed_and_sample_i_the_hash_of_seed_and_i():
    """The documented rule, written out with hashlib: BLAKE2b-64 of (seed, i) as two little-endian uint64, top 53 bits."""

    def rule(seed, i):
        digest = hashlib.blake2b(seed.to_bytes(8, "little") + i.to_bytes(8, "little"), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 11

    assert ar.sample_seeds(5, 1) == [5]
    assert ar.sample_seeds(5, 4) == [5, rule(5, 1), rule(5, 2), rule(5, 3)]
    assert ar.sample_seeds(2**64 + 5, 2) == ar.sample_seeds(5, 2)  # the seed modulo 2**64, as torch's manual_seed
    assert ar.sample_seeds(2**64 - 1, 2)[1] == rule(2**64 - 1, 1)


def test_a_batch_is_the_start_of_any_larger_batch_at_that_seed():
    assert ar.sample_seeds(9, 3) == ar.sample_seeds(9, 16)[:3]


def test_neighbouring_seeds_share_no_sample_seed():
    """seed + i gave seed 6 samples 1..N-1 of seed 5; the hashed seeds of every seed in 0..2000 are all distinct."""
    seeds = [s for seed in range(2000) for s in ar.sample_seeds(seed, 16)[1:]]
    assert len(set(seeds)) == len(seeds) and not set(seeds) & set(range(2000))


def test_derived_seeds_fit_a_javascript_number():
    """The seed widget is a JavaScript number: a derived seed typed into it must make that sample again."""
    assert all(s < 2**53 for seed in range(100) for s in ar.sample_seeds(seed, 16)[1:])


REFERENCE_SIZES = [  # (width, height): around the processor's two rules, aspect ratio <= 4 and sides >= 16
    (2100, 500), (2000, 500), (500, 2000), (500, 2004), (257, 64), (256, 64), (64, 16), (64, 15), (15, 15), (16, 16),
    (16, 17), (1, 1), (4096, 1024), (4097, 1024),
]  # fmt: skip


@pytest.mark.parametrize("width, height", REFERENCE_SIZES)
def test_a_reference_size_is_refused_exactly_when_the_processor_refuses_it(processor, width, height):
    """The check before the AR against transformers' own image processor (smart_resize raises a bare ValueError)."""
    image = PIL.Image.new("RGB", (width, height))
    try:
        processor.image_processor(images=[image], return_tensors="pt")
        processor_refuses = False
    except ValueError:
        processor_refuses = True
    try:
        check_reference_size(height, width, ar.reference_min_side(processor))
        we_refuse = False
    except InvalidInputError:
        we_refuse = True
    assert we_refuse == processor_refuses


def test_a_wide_reference_is_refused_naming_its_size_the_rule_and_a_fix(processor):
    with pytest.raises(InvalidInputError) as refused:
        ar.build_ar_inputs(
            processor, "make it blue", 512, 512, [PIL.Image.new("RGB", (640, 640)), PIL.Image.new("RGB", (2100, 500))]
        )
    assert str(refused.value) == (
        "Reference image 2 is 2100x500 pixels: its aspect ratio 4.20:1 is over the 4:1 GLM-Image's processor takes. "
        "Crop it to at most 4:1 (e.g. 2000x500) or pad its short side."
    )


def test_a_tiny_reference_is_refused_naming_its_size_the_rule_and_a_fix(processor):
    with pytest.raises(
        InvalidInputError, match=r"Reference image 1 is 40x12 pixels: its 12 px side is under the 16 px"
    ):
        ar.build_ar_inputs(processor, "make it blue", 512, 512, [PIL.Image.new("RGB", (40, 12))])


def test_global_rng_is_untouched(model, t2i_inputs):
    state = torch.get_rng_state()
    ar.generate_prior_tokens(model, t2i_inputs, seeded(1))
    assert torch.equal(torch.get_rng_state(), state)


def test_sampling_defaults_come_from_the_generation_config(model, i2i_inputs):
    default = ar.generate_prior_tokens(model, i2i_inputs, seeded(5))
    explicit = ar.generate_prior_tokens(model, i2i_inputs, seeded(5), temperature=0.9, top_p=0.75, top_k=16512)
    assert torch.equal(default.target_ids, explicit.target_ids)


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=0.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1)], ids=lambda k: str(k)
)
def test_invalid_sampling_parameters_are_refused(model, i2i_inputs, kwargs):
    with pytest.raises(InvalidInputError):
        ar.generate_prior_tokens(model, i2i_inputs, seeded(0), **kwargs)


def test_at_least_one_generator_is_needed(model, i2i_inputs):
    with pytest.raises(InvalidInputError, match="Generator"):
        ar.generate_prior_tokens(model, i2i_inputs, [])


# --- the grid is always full ---------------------------------------------------------------------------------------


@pytest.fixture
def model_wanting_to_stop(model):
    """The tiny model with EOS, image start and an unused id made overwhelmingly likely at every step."""
    bias = torch.zeros(16512)
    bias[[16384, 16385, 16500]] = torch.tensor([5e3, 1e4, 5e3])
    handle = model.lm_head.register_forward_hook(lambda module, args, logits: logits + bias)
    yield model
    handle.remove()


@pytest.mark.parametrize("height,width", [(512, 512), (512, 768), (768, 512)])
def test_grid_is_exactly_full_even_when_the_model_wants_eos(model_wanting_to_stop, processor, height, width):
    model = model_wanting_to_stop
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", height, width)
    stopped = model.generate(**generate_kwargs(inputs), max_new_tokens=5, do_sample=False)
    assert stopped[0, inputs.input_ids.shape[1] :].tolist() == [16385]  # transformers stops at once

    result = ar.generate_prior_tokens(model, inputs, seeded(0))
    h, w = height // 32, width // 32
    ph, pw = inputs.geometry.preview_h, inputs.geometry.preview_w
    assert result.target_ids.shape == (1, h * w) and result.preview_ids.shape == (1, ph * pw)
    assert 0 <= result.target_ids.min() and result.target_ids.max() < 16384
    assert 0 <= result.preview_ids.min() and result.preview_ids.max() < 16384
    assert result.prior_token_ids.shape == (1, (height // 16) * (width // 16))


# --- callback ------------------------------------------------------------------------------------------------------


def test_callback_sees_every_token(model, t2i_inputs):
    seen = []
    result = ar.generate_prior_tokens(
        model, t2i_inputs, seeded(2), callback=lambda step, total, ids: seen.append((step, total, ids.clone()))
    )
    total = t2i_inputs.geometry.num_grid_tokens
    assert [(step, t) for step, t, _ in seen] == [(k, total) for k in range(1, total + 1)]
    assert all(ids.shape == (1, step) for step, _, ids in seen)
    assert torch.equal(seen[-1][2][:, -64:], result.target_ids)


def test_an_exception_in_the_callback_stops_generation(model, t2i_inputs):
    calls = []

    def cancel_at_5(step, total, ids):
        calls.append(step)
        if step == 5:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        ar.generate_prior_tokens(model, t2i_inputs, seeded(2), callback=cancel_at_5)
    assert calls == [1, 2, 3, 4, 5]


# --- image-to-image references and upsampling ----------------------------------------------------------------------


def test_reference_ids_are_get_image_tokens_of_each_image_alone(model, processor, references):
    inputs = ar.build_ar_inputs(processor, "make it blue", 512, 512, references)
    together = ar.encode_reference_images(model, inputs)

    alone = []
    offset = 0
    for i, (h, w) in enumerate(inputs.reference_grids):
        pixels = inputs.pixel_values[offset : offset + h * w]
        offset += h * w
        with torch.inference_mode():
            features = model.get_image_features(pixels, image_grid_thw=inputs.image_grid_thw[i : i + 1]).pooler_output
            alone.append(model.get_image_tokens(features))
    assert [t.shape for t in together] == [(16 * 16,), (16 * 24,)]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))


def test_concatenating_the_feature_maps_like_diffusers_breaks_get_image_tokens(model, processor, references):
    """diffusers 0.42.1 generate_prior_tokens: torch.cat(pooler_output, dim=0) then get_image_tokens. The
    concatenation is a [n*C, h, w] tensor, which get_image_tokens iterates over channel by channel: the VQ conv
    gets a 1-channel map and fails, even for a single reference (different sizes fail in the cat already)."""
    inputs = ar.build_ar_inputs(processor, "make it blue", 512, 512, references[:1])
    with torch.inference_mode():
        features = model.get_image_features(inputs.pixel_values, image_grid_thw=inputs.image_grid_thw[:1]).pooler_output
        with pytest.raises(RuntimeError, match="channels"):
            model.get_image_tokens(torch.cat(features, dim=0), inputs.image_grid_thw[:1])


def test_i2i_result_carries_each_references_upsampled_ids(model, processor, references):
    inputs = ar.build_ar_inputs(processor, "make it blue", 256, 256, references)
    result = ar.generate_prior_tokens(model, inputs, seeded(0))
    reference_ids = ar.encode_reference_images(model, inputs)
    assert result.preview_ids.shape == (1, 0) and result.target_ids.shape == (1, 64)
    assert result.reference_grid_sizes == [(32, 32), (32, 48)]
    for ids, prior, (h, w) in zip(reference_ids, result.reference_prior_ids, inputs.reference_grids):
        assert torch.equal(prior, ar.upsample_token_ids(ids[None], h, w)[0])


def test_upsampling_equals_the_pipelines():
    from diffusers import GlmImagePipeline

    ids = torch.randint(0, 16384, (1, 6 * 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ar.upsample_token_ids(ids, 6, 4), GlmImagePipeline._upsample_token_ids(ids, 6, 4))


# --- the fast decoder (fast_ar) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_references", [0, 2])
def test_fast_decoder_logits_equal_generate_logits(model, processor, references, num_references):
    """Prefill and every decode step of our own layer loop against transformers' generate, float32."""
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 384, references[:num_references])
    steps = 6
    out, new_tokens, input_ids = greedy_generate_logits(model, inputs, steps)
    prompt_length = input_ids.shape[1]
    decoder = fast_ar.FastDecoder(model, batch=1, max_length=prompt_length + steps)
    cos, sin = decoder.rope(inputs.decode_position_ids)
    with torch.inference_mode():
        diffs = [(decoder.prefill(input_ids, inputs.position_ids, 16512) - out.logits[0]).abs().max()]
        for k in range(steps):
            slot = torch.tensor([prompt_length + k])
            logits = decoder.step(new_tokens[:, k : k + 1], cos[:, k : k + 1], sin[:, k : k + 1], slot, 16512)
            diffs.append((logits - out.logits[k + 1]).abs().max())
    assert max(diffs) <= LOGITS_TOLERANCE, diffs


@pytest.mark.parametrize("fast", [True, False], ids=["fast_ar", "transformers"])
def test_a_batch_of_4_runs_the_prompt_once(model, t2i_inputs, monkeypatch, fast):
    """The samples of a batch share their prompt: it goes through the decoder once, as a batch of 1, and its keys
    and values serve every sample (test_samples_in_a_batch_follow_their_own_generator checks what each samples)."""
    prompts = []  # (batch, length) of every pass through a decoder layer
    with contextlib.ExitStack() as stack:
        if fast:
            real = fast_ar.layer_forward
            monkeypatch.setattr(fast_ar, "layer_forward", lambda x, *a: prompts.append(x.shape[:2]) or real(x, *a))
        else:
            layer = model.model.language_model.layers[0]
            stack.callback(layer.register_forward_pre_hook(lambda m, args: prompts.append(args[0].shape[:2])).remove)
        result = ar.generate_prior_tokens(model, t2i_inputs, seeded(1, 2, 3, 4), fast=fast)
    prompt_length = t2i_inputs.input_ids.shape[1]
    prefills = [shape for shape in prompts if shape[1] > 1]
    layers = len(model.model.language_model.layers) if fast else 1
    assert prefills == [(1, prompt_length)] * layers
    assert result.target_ids.shape[0] == 4 and len({tuple(ids.tolist()) for ids in result.target_ids}) == 4


def test_the_fast_decoders_cache_is_in_the_models_dtype(model):
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    assert {c.dtype for c in fast_ar.FastDecoder(bf16, batch=2, max_length=64).k_cache} == {torch.bfloat16}
    assert {c.dtype for c in fast_ar.FastDecoder(model, batch=2, max_length=64).v_cache} == {torch.float32}


def test_cache_attention_equals_masked_sdpa():
    """Grouped-query attention of one query over a partly filled cache, chunked probs @ V."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 32, generator=g)  # 8 query heads share 2 key/value heads
    k_cache = torch.randn(3, 2, 256, 32, generator=g)
    v_cache = torch.randn(3, 2, 256, 32, generator=g)
    filled = 131
    key_bias = torch.zeros(256).masked_fill(torch.arange(256) >= filled, float("-inf"))
    ours = fast_ar.attend_cache(q, k_cache, v_cache, key_bias, scale=32**-0.5)
    k = k_cache[:, :, :filled].repeat_interleave(4, dim=1)
    v = v_cache[:, :, :filled].repeat_interleave(4, dim=1)
    expected = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v)[:, :, 0].flatten(1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


SAMPLINGS = [dict(), dict(temperature=0.7, top_k=50, top_p=0.9), dict(top_k=1)]


@pytest.mark.parametrize("inputs_name", ["t2i_inputs", "i2i_inputs"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
def test_peaked_model_decides_every_token_by_a_wide_margin(peaked_model, request, monkeypatch, inputs_name, sampling):
    """The premise of comparing two decoders' samples: shifting the logits by the decoders' tolerance (scaled like
    the logits), towards either side of the picked token or at random, never changes a pick of the reference loop."""
    inputs = request.getfixturevalue(inputs_name)
    seen = []
    real_logits = ar.next_token_logits
    monkeypatch.setattr(ar, "next_token_logits", lambda *a: seen.append(real_logits(*a)) or seen[-1])
    result = ar.generate_prior_tokens(peaked_model, inputs, seeded(4, 5), fast=False, **sampling)
    tokens = torch.cat([result.preview_ids, result.target_ids], dim=1)
    uniforms = torch.stack([torch.rand(tokens.shape[1], generator=g) for g in seeded(4, 5)])
    config = peaked_model.generation_config
    pick = ar.token_picker(
        sampling.get("temperature", config.temperature),
        sampling.get("top_k", config.top_k),
        sampling.get("top_p", config.top_p),
    )
    delta = LOGITS_TOLERANCE * PEAKED_SCALE
    noise = torch.Generator().manual_seed(0)
    for step, logits in enumerate(seen):
        logits = logits[:, :16384].expand(len(tokens), -1)  # the shared prefill's one row serves the whole batch
        token = tokens[:, step]
        before = torch.arange(16384)[None] < token[:, None]
        shifts = [torch.where(before, delta, -delta), torch.where(before, -delta, delta)]
        shifts += [(torch.rand(logits.shape, generator=noise) * 2 - 1) * delta for _ in range(4)]
        for shift in shifts:
            assert torch.equal(pick(logits + shift, uniforms[:, step]), token), step


@pytest.mark.parametrize("inputs_name", ["t2i_inputs", "i2i_inputs"])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=str)
def test_fast_decoder_samples_the_transformers_loops_tokens(peaked_model, request, inputs_name, sampling):
    """Same tokens where float noise cannot decide them (see peaked_model); the logits themselves are compared along
    a forced path in test_fast_decoder_logits_equal_generate_logits."""
    inputs = request.getfixturevalue(inputs_name)
    slow = ar.generate_prior_tokens(peaked_model, inputs, seeded(4, 5), fast=False, **sampling)
    fast = ar.generate_prior_tokens(peaked_model, inputs, seeded(4, 5), fast=True, **sampling)
    assert torch.equal(fast.preview_ids, slow.preview_ids)
    assert torch.equal(fast.target_ids, slow.target_ids)
    assert torch.equal(fast.prior_token_ids, slow.prior_token_ids)


def test_fast_decoder_is_only_the_default_on_cuda(model):
    assert model.device.type == "cpu"
    assert not ar.use_fast_decoder(model, None)
    assert ar.use_fast_decoder(model, True)
    assert not ar.use_fast_decoder(model, False)


def test_fast_decoder_refuses_a_hooked_model_and_transformers_runs_it(model_wanting_to_stop, processor):
    """A forward hook (here: on the lm_head) would be bypassed by the fast decoder, so it is not used."""
    assert "hook" in fast_ar.unsupported_reason(model_wanting_to_stop)
    inputs = ar.build_ar_inputs(processor, "a red 'sign'", 256, 256)
    forced = ar.generate_prior_tokens(model_wanting_to_stop, inputs, seeded(0), fast=True)
    loop = ar.generate_prior_tokens(model_wanting_to_stop, inputs, seeded(0), fast=False)
    assert torch.equal(forced.target_ids, loop.target_ids)


@pytest.mark.parametrize("every", [1, 16, 50])
def test_fast_decoder_reports_every_k_tokens_and_the_last(model, t2i_inputs, every):
    seen = []
    result = ar.generate_prior_tokens(
        model,
        t2i_inputs,
        seeded(2),
        fast=True,
        callback_every=every,
        callback=lambda step, total, ids: seen.append((step, total, ids.clone())),
    )
    total = t2i_inputs.geometry.num_grid_tokens  # 320
    expected = sorted({1, *range(every, total + 1, every), total})
    assert [step for step, _, _ in seen] == expected
    assert all(t == total and ids.shape == (1, step) for step, t, ids in seen)
    assert torch.equal(seen[-1][2][:, -64:], result.target_ids)


def test_an_exception_in_the_callback_stops_the_fast_decoder(model, t2i_inputs):
    calls = []

    def cancel_at_32(step, total, ids):
        calls.append(step)
        if step >= 32:
            raise GenerationCancelled("stop")

    with pytest.raises(GenerationCancelled):
        ar.generate_prior_tokens(model, t2i_inputs, seeded(2), fast=True, callback=cancel_at_32)
    assert calls == [1, 16, 32]


@pytest.mark.skipif(not os.environ.get("GLM_IMAGE_SLOW_TESTS"), reason="compiles for ~25 s; set GLM_IMAGE_SLOW_TESTS=1")
def test_compiled_fast_decoder_samples_the_same_tokens(peaked_model, t2i_inputs):
    eager = ar.generate_prior_tokens(peaked_model, t2i_inputs, seeded(6), fast=True)
    compiled = ar.generate_prior_tokens(peaked_model, t2i_inputs, seeded(6), fast=True, compile_decoder=True)
    assert torch.equal(eager.target_ids, compiled.target_ids)


# --- the CUDA graph runner, with torch.cuda replaced by stand-ins (no GPU here) ---------------------------------------


class FakeGraph:
    def __init__(self, device):
        self.device = device  # the current device when the graph was made
        self.replays, self.resets = 0, 0
        self.captured_on = None

    def replay(self):
        self.replays += 1

    def reset(self):
        self.resets += 1


class FakeStream:
    def __init__(self, device):
        self.device = device

    def wait_stream(self, other):
        assert other.device == self.device, f"a stream of {self.device} waits on one of {other.device}"


class FakeEvent:
    def __init__(self):
        self.device = None

    def record(self, stream=None):
        self.device = stream.device if stream is not None else None

    def synchronize(self):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda as the graph runner and the progress reports use it, on a machine whose current device is cuda:0;
    every stream, graph, capture and event records its device. `capture_error` makes the capture fail."""
    state = dict(current=0, synchronized=[], graphs=[], streams=[], events=[], capture_error=None)

    def device_of(device):
        if device is None:
            return state["current"]
        return device if isinstance(device, int) else torch.device(device).index

    @contextlib.contextmanager
    def use_device(device):
        before, state["current"] = state["current"], device_of(device)
        yield
        state["current"] = before

    @contextlib.contextmanager
    def graph(g, capture_error_mode=None):
        if state["capture_error"] is not None:
            raise state["capture_error"]
        g.captured_on = state["current"]  # torch.cuda.graph's capture stream is made on the current device
        yield

    def new_stream(device=None):
        state["streams"].append(FakeStream(device_of(device)))
        return state["streams"][-1]

    def new_graph():
        state["graphs"].append(FakeGraph(state["current"]))
        return state["graphs"][-1]

    def new_event():
        state["events"].append(FakeEvent())
        return state["events"][-1]

    monkeypatch.setattr(torch.cuda, "device", use_device)
    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: use_device(s.device))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream(device_of(device)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: state["synchronized"].append(device_of(device)))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Event", new_event)
    cuda_graph._warn_once.cache_clear()
    return state


class CountingLoop:
    def __init__(self, device: str = "cuda:0"):
        self.device = torch.device(device)
        self.steps = 0

    def step(self):
        self.steps += 1


def test_graph_runner_captures_the_third_step_after_a_synchronize_and_releases_the_graph(fake_cuda):
    loop = CountingLoop()
    runner = cuda_graph.StepGraph(loop.step, loop.device)
    for _ in range(5):
        runner()
    (graph,) = fake_cuda["graphs"]
    assert loop.steps == 3  # two warm-up steps run, the third is recorded (the stand-in runs it once)
    assert graph.replays == 3 and fake_cuda["synchronized"] == [0]
    runner.release()
    assert graph.resets == 1 and runner.graph is None


def test_an_ar_on_the_second_gpu_makes_its_streams_graph_and_events_there(fake_cuda):
    """The host's current device stays cuda:0 (ComfyUI's, for the DiT); the AR lives on cuda:1."""
    loop = CountingLoop("cuda:1")
    runner = cuda_graph.StepGraph(loop.step, loop.device)
    for _ in range(5):
        runner()
    pending = fast_ar.deque()
    fast_ar.report(None, pending, 16, 32, torch.zeros(1, 32), loop.device, final=False)
    (graph,) = fake_cuda["graphs"]
    assert [stream.device for stream in fake_cuda["streams"]] == [1]  # the warm-up side stream
    assert graph.device == 1 and graph.captured_on == 1 and fake_cuda["synchronized"] == [1]
    assert [event.device for event in fake_cuda["events"]] == [1]
    assert fake_cuda["current"] == 0  # left as it was


def test_a_failed_capture_decodes_eagerly_and_warns_once_with_the_reason(fake_cuda, caplog):
    fake_cuda["capture_error"] = ValueError("operation not permitted when stream is capturing")
    for _ in range(2):  # two generations
        loop = CountingLoop()
        runner = cuda_graph.StepGraph(loop.step, loop.device)
        with caplog.at_level(logging.WARNING):
            for _ in range(5):
                runner()
        assert loop.steps == 5 and runner.graph is None
    warnings = [r.getMessage() for r in caplog.records if "CUDA graph" in r.getMessage()]
    assert len(warnings) == 1 and "ValueError: operation not permitted" in warnings[0]
