"""Our DiT against diffusers' GlmImageTransformer2DModel, both loaded from the same tiny transformer/ weights."""

import pytest
import torch
from diffusers import GlmImageTransformer2DModel as ReferenceDiT
from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

from glm_image_core.dit import ReferenceKV, sdpa_attention
from glm_image_core.loading import load_transformer

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def dits(tiny_model_dir):
    reference = ReferenceDiT.from_pretrained(tiny_model_dir / "transformer", torch_dtype=torch.float32).eval()
    ours = load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)
    return ours, reference


def make_inputs(reference, batch, height, width, text_len, seed=0):
    """Random DiT inputs for an image of height x width pixels (latent /8, patch grid /16)."""
    g = torch.Generator().manual_seed(seed)
    cfg = reference.config
    latent = torch.randn(batch, cfg.in_channels, height // 8, width // 8, generator=g)
    glyph = torch.randn(batch, text_len, cfg.text_embed_dim, generator=g)
    prior = torch.randint(0, cfg.prior_vq_quantizer_codebook_size, (batch, (height // 16) * (width // 16)), generator=g)
    timestep = torch.tensor([999.0, 479.0][:batch])
    target = torch.tensor([[height, width]] * batch, dtype=torch.float32)
    return latent, glyph, prior, timestep, target, torch.zeros(batch, 2)


def run_reference(reference, latent, glyph, prior, drop, timestep, target, crop, kv_caches=None):
    with torch.no_grad():
        return reference(
            latent, glyph, prior, drop.clone(), timestep, target, crop, kv_caches=kv_caches, return_dict=False
        )[0]


@pytest.mark.parametrize("height,width", [(512, 512), (512, 768), (768, 512)])
def test_forward_matches_diffusers_batch_of_two(dits, height, width):
    ours, reference = dits
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, height, width, text_len=7)
    drop = torch.tensor([[False], [True]]).expand_as(prior)  # one conditional, one unconditional sample
    expected = run_reference(reference, latent, glyph, prior, drop, timestep, target, crop)
    with torch.no_grad():
        got = ours(latent, glyph, prior, drop, timestep, target, crop)
    assert got.shape == latent.shape
    assert (got - expected).abs().max() <= TOLERANCE


def test_padded_glyphs_with_mask_equal_each_sample_alone(dits):
    """diffusers turns the text mask into a float bias that masks nothing (issue 13587); ours masks for real, so a
    padded batch must equal each sample run alone, unpadded, through the reference."""
    ours, reference = dits
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, 512, 512, text_len=9)
    lengths = [9, 4]
    mask = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    drop = torch.zeros_like(prior, dtype=torch.bool)
    with torch.no_grad():
        got = ours(latent, glyph * mask[..., None], prior, drop, timestep, target, crop, encoder_attention_mask=mask)
    for i, length in enumerate(lengths):
        alone = run_reference(
            reference,
            latent[i : i + 1],
            glyph[i : i + 1, :length],
            prior[i : i + 1],
            drop[i : i + 1],
            timestep[i : i + 1],
            target[i : i + 1],
            crop[i : i + 1],
        )
        assert (got[i : i + 1] - alone).abs().max() <= TOLERANCE


def test_reference_kv_written_once_and_read_matches_diffusers_cache(dits):
    """Editing: two reference images of different sizes write K/V once; conditional passes read them."""
    ours, reference = dits
    refs = [make_inputs(reference, 1, 512, 512, 0, seed=1), make_inputs(reference, 1, 512, 768, 0, seed=2)]
    caches = GlmImageKVCache(num_layers=reference.config.num_layers)
    caches.set_mode("write")
    parts = []
    for latent, _, prior, _, target, crop in refs:
        no_text = torch.zeros(1, 0, reference.config.text_embed_dim)
        zero_t = torch.zeros(1)
        run_reference(
            reference, latent, no_text, prior, torch.zeros_like(prior, dtype=torch.bool), zero_t, target, crop, caches
        )
        parts.append(ours.encode_reference(latent, prior, tuple(int(s) for s in target[0])))
    kv = ReferenceKV.concat(parts)

    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, 512, 512, text_len=5, seed=3)
    drop = torch.zeros_like(prior, dtype=torch.bool)
    caches.set_mode("read")
    expected = run_reference(reference, latent, glyph, prior, drop, timestep, target, crop, caches)
    with torch.no_grad():
        got = ours(latent, glyph, prior, drop, timestep, target, crop, reference_kv=kv)
        without = ours(latent, glyph, prior, drop, timestep, target, crop)
    assert (got - expected).abs().max() <= TOLERANCE
    assert (got - without).abs().max() > 1e-3  # the references really are attended to


def test_int_drop_flag_per_sample_equals_bool_mask(dits):
    """Hosts pass the drop flag as a long [B, 1] (ComfyUI casts bool conds to the model dtype)."""
    ours, reference = dits
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, 512, 512, text_len=3)
    bool_drop = torch.tensor([[False], [True]]).expand_as(prior)
    with torch.no_grad():
        a = ours(latent, glyph, prior, bool_drop, timestep, target, crop)
        b = ours(latent, glyph, prior, torch.tensor([[0], [1]]), timestep, target, crop)
    assert torch.equal(a, b)


def test_right_padded_glyphs_attend_without_a_mask(dits):
    """Rows with 9 and 4 real glyph tokens: each run of rows attends to a prefix of the keys, never with a mask, so
    hosts can use their fastest (maskless) attention kernels."""
    ours, reference = dits
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 2, 512, 512, text_len=9)
    mask = torch.arange(9)[None] < torch.tensor([9, 4])[:, None]
    drop = torch.zeros_like(prior, dtype=torch.bool)
    calls = []

    def spy(q, k, v, key_mask):
        calls.append((q.shape[0], k.shape[2], key_mask))
        return sdpa_attention(q, k, v, key_mask)

    with torch.no_grad():
        ours(latent, glyph, prior, drop, timestep, target, crop, encoder_attention_mask=mask, attention=spy)
    image_tokens = (512 // 16) ** 2
    assert set(calls) == {(1, image_tokens + 9, None), (1, image_tokens + 4, None)}


def test_glyph_mask_with_holes_equals_the_sample_without_those_tokens(dits):
    """A mask that is not right-padding falls back to masking the keys."""
    ours, reference = dits
    latent, glyph, prior, timestep, target, crop = make_inputs(reference, 1, 512, 512, text_len=6)
    mask = torch.tensor([[True, False, True, True, False, True]])
    drop = torch.zeros_like(prior, dtype=torch.bool)
    with torch.no_grad():
        got = ours(latent, glyph, prior, drop, timestep, target, crop, encoder_attention_mask=mask)
    kept = run_reference(reference, latent, glyph[:, mask[0]], prior, drop, timestep, target, crop)
    assert (got - kept).abs().max() <= TOLERANCE


def test_the_published_dit_stores_1_875_gib_of_reference_kv_per_1024px_reference_in_bf16():
    """30 layers x (key + value) x 4096 tokens x 4096 numbers x 2 bytes: what ComfyUI's memory estimate adds."""
    from glm_image_core.dit import GlmImageTransformer2DModel

    with torch.device("meta"):
        published = GlmImageTransformer2DModel()
    assert published.reference_kv_elements(128, 128) * 2 / 2**30 == 1.875
    assert published.reference_kv_elements(256, 256) * 2 / 2**30 == 7.5  # a 2048x2048 reference
