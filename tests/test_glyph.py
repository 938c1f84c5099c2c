"""Glyph text encoding matches diffusers' GlmImagePipeline (get_glyph_texts, _get_glyph_embeds) exactly."""

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from glm_image_core.errors import InvalidInputError
from glm_image_core.glyph import (
    encode_glyphs,
    encode_glyphs_batch,
    extract_glyph_texts,
    length_batches,
    tokenize_glyph_texts,
)

LONG_SPAN = "GLM-Image " * 230  # 2300 bytes: longer than the 2048-token limit, so truncation is exercised

PROMPTS = {
    "no quotes": "a cat sitting on a mat",
    "one span": 'a poster that says "Hello"',
    "single quotes": "signs reading 'OPEN', 'CLOSED' and 'BACK SOON'",
    "curly quotes": "a banner: \u201cSale\u201d and \u201cToday only\u201d",
    "straight double quotes": 'labels "one" "two" "three" "four"',
    "corner brackets": "招牌上写着「你好世界」和「欢迎」",
    "mixed styles": "「角」 then \u201ccurly\u201d then \"double\" then 'single' and 'again'",
    "cjk curly": "一张海报，标题是\u201c中文\u201d，副标题是\u201c排版测试\u201d",
    "empty quotes": "an empty sign \"\" next to a sign that says ''",
    "long span": f'a wall covered with "{LONG_SPAN}"',
}


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


@pytest.fixture(scope="module")
def text_encoder():
    """A tiny random T5 encoder with the Glyph-ByT5 layout (byte vocabulary 384, gated-gelu, relative attention)."""
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=384,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        is_encoder_decoder=False,
        use_cache=False,
    )
    return T5EncoderModel(config).eval()


@pytest.fixture(scope="module")
def reference_pipeline(tokenizer, text_encoder):
    """diffusers' GlmImagePipeline with only the two components its glyph code reads."""
    from diffusers import GlmImagePipeline

    pipe = GlmImagePipeline.__new__(GlmImagePipeline)
    pipe.tokenizer = tokenizer
    pipe.text_encoder = text_encoder
    return pipe


@pytest.mark.parametrize("name", list(PROMPTS))
def test_extraction_matches_reference(name, reference_pipeline):
    prompt = PROMPTS[name]
    assert extract_glyph_texts(prompt) == reference_pipeline.get_glyph_texts(prompt)[0]


def test_extraction_groups_spans_by_quote_style_not_position():
    prompt = "「d」 \u201cb\u201d \"c\" 'a'"
    assert extract_glyph_texts(prompt) == ["a", "b", "c", "d"]


def test_extraction_keeps_empty_quotes_as_empty_spans():
    assert extract_glyph_texts('say "" now') == [""]


def test_extraction_without_quotes_is_empty():
    assert extract_glyph_texts("no text at all") == []


def test_tokenize_no_spans_encodes_the_empty_string(tokenizer):
    input_ids, mask = tokenize_glyph_texts([], tokenizer)
    assert input_ids.tolist() == [[tokenizer.eos_token_id]]
    assert mask.tolist() == [[1]]


def test_tokenize_even_span_count_prefixes_every_span_with_one_pad(tokenizer):
    # Reference quirk: the prefix depends on the number of spans (2 -> one pad each), not on each span's length.
    input_ids, mask = tokenize_glyph_texts(["ab", "c"], tokenizer)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    a, b, c = (ord(ch) + 3 for ch in "abc")  # ByT5: byte value + 3 special ids
    assert input_ids.tolist() == [[pad, a, b, eos], [pad, c, eos, pad]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_tokenize_odd_span_count_has_no_prefix(tokenizer):
    input_ids, _ = tokenize_glyph_texts(["ab"], tokenizer)
    assert input_ids.tolist() == [[ord("a") + 3, ord("b") + 3, tokenizer.eos_token_id]]


def test_tokenize_truncates_each_span_to_max_length(tokenizer):
    input_ids, _ = tokenize_glyph_texts([LONG_SPAN], tokenizer)
    assert input_ids.shape == (1, 2048)
    input_ids, _ = tokenize_glyph_texts([LONG_SPAN, "x"], tokenizer)
    assert input_ids.shape == (2, 2049)  # the pad prefix comes after truncation, as in the reference


@pytest.mark.parametrize("name", list(PROMPTS))
def test_encoding_matches_reference(name, text_encoder, tokenizer, reference_pipeline):
    prompt = PROMPTS[name]
    with torch.no_grad():  # as in GlmImagePipeline.__call__; grad mode picks other CPU kernels (~1e-6 apart)
        expected = reference_pipeline._get_glyph_embeds(prompt, device=torch.device("cpu"))
    got = encode_glyphs(prompt, text_encoder, tokenizer)
    max_diff = (got - expected).abs().max().item()
    print(f"{name}: shape {tuple(got.shape)}, max abs diff {max_diff:.3g}")
    assert got.shape == expected.shape
    assert max_diff == 0


def test_spans_of_very_different_lengths_encode_like_the_reference_batch(text_encoder, tokenizer, reference_pipeline):
    """The reference pads every span to the longest in one batch; ours encodes them in batches of similar length
    (here four: the 2048-byte span alone, then the shorter ones), the same embeddings to float rounding."""
    spans = ["x" * 2047, "Hello", "a" * 700, "", "world " * 40, "b" * 1500, "OPEN", "c" * 690]
    prompt = " ".join(f'"{span}"' for span in spans)
    lengths = tokenize_glyph_texts(spans, tokenizer)[1].sum(dim=1).tolist()
    assert len(length_batches(lengths)) == 4
    with torch.no_grad():
        expected = reference_pipeline._get_glyph_embeds(prompt, device=torch.device("cpu"))
    got = encode_glyphs(prompt, text_encoder, tokenizer)
    print(f"max abs diff {(got - expected).abs().max().item():.3g}")
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_length_batches_bound_the_padded_tokens_of_each_encoder_call():
    lengths = [2049, 5, 700, 1, 241, 1500, 5, 690] + [30] * 100
    groups = length_batches(lengths, budget=2048)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))  # each span once
    for group in groups:
        padded = len(group) * max(lengths[i] for i in group)
        assert padded <= 2048 or len(group) == 1, (group, padded)
        assert group == sorted(group)  # the prompt's order within a call
    # short spans still share calls: 2049 | 1500 | 700, 690 | 241 + 7 x 30 | 68 x 30 | 25 x 30, 5, 5, 1
    assert [len(group) for group in groups] == [1, 1, 2, 8, 68, 28]


def test_spans_that_fit_one_batch_are_encoded_in_one_call(tokenizer):
    lengths = tokenize_glyph_texts(["OPEN", "CLOSED", "BACK SOON"], tokenizer)[1].sum(dim=1).tolist()
    assert length_batches(lengths) == [[0, 1, 2]]


def test_override_list_is_encoded_like_the_same_spans_in_a_prompt(text_encoder, tokenizer):
    from_prompt = encode_glyphs('\u201cWorld\u201d then "Hello"', text_encoder, tokenizer)
    from_override = encode_glyphs(["World", "Hello"], text_encoder, tokenizer)
    assert torch.equal(from_prompt, from_override)


def test_empty_override_is_encoded_like_a_prompt_without_quotes(text_encoder, tokenizer):
    assert torch.equal(encode_glyphs([], text_encoder, tokenizer), encode_glyphs("plain", text_encoder, tokenizer))


def test_batch_matches_reference_and_masks_the_left_padding(text_encoder, tokenizer, reference_pipeline):
    prompts = [PROMPTS["no quotes"], PROMPTS["mixed styles"], PROMPTS["cjk curly"], ""]
    with torch.no_grad():
        expected = reference_pipeline._get_glyph_embeds(prompts, device=torch.device("cpu"))
    embeds, mask = encode_glyphs_batch(prompts, text_encoder, tokenizer)
    print(f"batch: shape {tuple(embeds.shape)}, max abs diff {(embeds - expected).abs().max().item():.3g}")
    assert embeds.shape == expected.shape
    assert mask.dtype == torch.bool and mask.shape == embeds.shape[:2]
    lengths = [encode_glyphs(p, text_encoder, tokenizer).shape[1] for p in prompts]
    assert mask.sum(dim=1).tolist() == lengths
    for row, row_mask, reference_row, length in zip(embeds, mask, expected, lengths):
        assert row_mask[:length].all()  # ours right-padded, the reference left-padded: the same real tokens
        assert torch.equal(row[:length], reference_row[reference_row.shape[0] - length :])
    assert (embeds[~mask] == 0).all()


def test_batch_accepts_override_lists_next_to_prompts(text_encoder, tokenizer):
    embeds, mask = encode_glyphs_batch(['say "Hi"', ["Hi"]], text_encoder, tokenizer)
    assert torch.equal(embeds[0], embeds[1]) and torch.equal(mask[0], mask[1])


def test_batch_refuses_no_prompts(text_encoder, tokenizer):
    with pytest.raises(InvalidInputError, match="no prompts"):
        encode_glyphs_batch([], text_encoder, tokenizer)


def test_tiny_folder_encoding_matches_reference_pipeline_components(tiny_model_dir):
    """Loaded through glm_image_core.loading vs the reference's own loading (transformers from_pretrained)."""
    from diffusers import GlmImagePipeline

    from glm_image_core.loading import load_glyph_encoder, load_glyph_tokenizer

    pipe = GlmImagePipeline.__new__(GlmImagePipeline)
    pipe.tokenizer = ByT5Tokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    pipe.text_encoder = T5EncoderModel.from_pretrained(tiny_model_dir / "text_encoder", dtype=torch.float32).eval()
    encoder = load_glyph_encoder(tiny_model_dir, dtype=torch.float32)
    tokenizer = load_glyph_tokenizer(tiny_model_dir)
    prompts = [PROMPTS["mixed styles"], PROMPTS["corner brackets"], PROMPTS["no quotes"]]
    with torch.no_grad():
        expected = pipe._get_glyph_embeds(prompts, device=torch.device("cpu"))
    embeds, mask = encode_glyphs_batch(prompts, encoder, tokenizer)
    for row, row_mask, reference_row in zip(embeds, mask, expected):  # right- vs left-padded
        real = int(row_mask.sum())
        assert torch.equal(row[:real], reference_row[reference_row.shape[0] - real :])
