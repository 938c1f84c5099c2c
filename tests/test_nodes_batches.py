"""Batches through ComfyUI's sampling: latent batches (one shared token grid, one grid per sample, shared reference
images) give each sample exactly what a single-sample run gives, and ComfyUI's cond/uncond batching (glyphs of
different lengths in one forward, zero-padded and masked) gives what separate passes give.

Direct node calls (the executor adds nothing here), in inference mode as the executor runs nodes; the sampler is
comfy.sample.sample, which the stock KSampler calls, with explicit noise so that a batch sample and its single run
start from the same noise.
"""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
import folder_paths  # noqa: E402

from tests import comfy_glm  # noqa: E402

ar = comfy_host.import_pack_module("glm_image_core.ar")
conds = comfy_host.import_pack_module("nodes.conds")
types = comfy_host.import_pack_module("nodes.types")

SIZE, STEPS, GUIDANCE = 512, 3, 1.5
# Grid i of a batch is drawn with its own seed (ar.sample_seeds), but the batched forward changes the logits' last
# bits. On the tiny random model, whose next-token distribution is nearly flat, that flips a token wherever a draw
# lands within float noise of a cumulative-probability boundary (about one draw in 20; which ones depends on the CPU's
# BLAS), so the AR model here has its code logits spread 30x: every pick then wins by far more than the noise
# (tests/test_ar.py checks this).
AR_SEED = 5
PEAKED_SCALE = 30.0
PROMPT = 'A shop sign that reads "HELLO WORLD"'  # its glyphs are longer than the empty negative's
BATCH_TOLERANCE = 5e-5  # latents of magnitude ~30; batched vs single matmuls differ in the last bits


@pytest.fixture(scope="module")
def glm(tiny_model_dir):
    """The pack's node classes (by node id) with the tiny folder under a glm_image root."""
    node_classes = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    return node_classes


@pytest.fixture(scope="module")
def model(glm):
    with torch.inference_mode():
        dit = glm["GLMImageDiTLoader"].execute(dit="GLM-Image", weight_dtype="default")[0]
        return glm["GLMImageModelSampling"].execute(model=dit, width=SIZE, height=SIZE)[0]


@pytest.fixture(scope="module")
def glyph_encoder(glm):
    return glm["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]


@pytest.fixture(scope="module")
def vae(glm):
    return glm["GLMImageVAELoader"].execute(vae="GLM-Image")[0]


@pytest.fixture(scope="module")
def ar_model(glm):
    loaded = glm["GLMImageARModelLoader"].execute(model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full")[
        0
    ]
    with torch.no_grad():
        loaded.decoder.hf_model.lm_head.weight.mul_(PEAKED_SCALE)  # this module's own instance
    return loaded


def random_tokens(grids: int = 1, seed: int = 0, references: int = 0) -> "types.VisualTokens":
    """Visual tokens as the AR would hand them over, without running it (random grids; random reference pictures)."""
    g = torch.Generator().manual_seed(seed)
    n = (SIZE // 16) ** 2
    refs = [
        types.Reference(torch.rand(1, SIZE, SIZE, 3, generator=g), torch.randint(0, 16384, (1, n), generator=g))
        for _ in range(references)
    ]
    return types.VisualTokens(
        prior_token_ids=torch.randint(0, 16384, (grids, n), generator=g),
        target_ids=torch.zeros(grids, n // 4),
        preview_ids=torch.zeros(grids, 0),
        height=SIZE,
        width=SIZE,
        prompt=PROMPT,
        seed=seed,
        references=refs,
    )


def encode(glm, glyph_encoder, tokens, vae=None):
    with torch.inference_mode():
        out = glm["GLMImageEncode"].execute(
            glyph_encoder=glyph_encoder, tokens=tokens, glyph_text="from prompt quotes", override="", vae=vae
        )
    return out[0], out[1]


def empty_latent(glm, batch_size, tokens=None):
    return glm["GLMImageEmptyLatent"].execute(width=SIZE, height=SIZE, batch_size=batch_size, tokens=tokens)[0]


def sample(model, noise, positive, negative, latent=None):
    """What KSampler euler/simple does, with the given noise."""
    latent = torch.zeros_like(noise) if latent is None else latent["samples"]
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, STEPS, GUIDANCE, "euler", "simple", positive, negative, latent)


def noise_for(batch: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(batch, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def assert_each_sample_equals_its_single_run(batch_out, single_outs):
    diffs = [(batch_out[i : i + 1] - single).abs().max().item() for i, single in enumerate(single_outs)]
    print("batch vs single runs: max diffs", ", ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= BATCH_TOLERANCE, diffs
    assert (batch_out[0] - batch_out[1]).abs().max() > 0.1  # the samples really differ


# --- glyph conds: padded with a mask, never repeated ---------------------------------------------------------------


def test_glyph_conds_of_lengths_3_and_7_concat_by_zero_padding_with_a_mask():
    short, long = torch.randn(1, 3, 8), torch.randn(1, 7, 8)
    a, b = conds.GlyphCond(short), conds.GlyphCond(long)
    assert a.can_concat(b)

    embeds, mask, text_groups = a.concat([b])

    assert embeds.shape == (2, 7, 8)
    assert torch.equal(embeds[0, :3], short[0]) and torch.equal(embeds[1], long[0])
    assert torch.equal(embeds[0, 3:], torch.zeros(4, 8))  # zeros, not the short sequence repeated
    assert mask.dtype == torch.long  # long: ComfyUI moves it to the device without casting it to the model dtype
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0, 0], [1] * 7]
    assert text_groups == [(0, 1, 3), (1, 2, 7)]  # row runs and their real lengths, from the shapes (no device read)


# --- cond/uncond batching -------------------------------------------------------------------------------------------


def recording_forwards(model, separate: bool):
    """A clone of `model` that records which branches (0 = positive, 1 = negative) each DiT forward carried; with
    `separate`, ComfyUI's calc_cond_batch hook evaluates positive and negative in forwards of their own."""
    forwards = []
    patched = model.clone()

    def record(apply_model, args):
        forwards.append(sorted(args["c"]["prior_token_drop"].flatten().tolist()))  # 1 only on the negative
        return apply_model(args["input"], args["timestep"], **args["c"])

    def one_branch_per_forward(args):
        return [
            comfy.samplers.calc_cond_batch(args["model"], [conds], args["input"], args["sigma"], args["model_options"])[
                0
            ]
            for conds in args["conds"]
        ]

    patched.set_model_unet_function_wrapper(record)
    if separate:
        patched.set_model_sampler_calc_cond_batch_function(one_branch_per_forward)
    return patched, forwards


def test_batched_cond_and_uncond_equal_separate_passes(glm, model, glyph_encoder):
    positive, negative = encode(glm, glyph_encoder, random_tokens())
    assert positive[0][0].shape[1] > negative[0][0].shape[1]  # glyphs of different lengths
    noise = noise_for(1)
    batched_model, batched_forwards = recording_forwards(model, separate=False)
    separate_model, separate_forwards = recording_forwards(model, separate=True)

    batched = sample(batched_model, noise, positive, negative)
    separate = sample(separate_model, noise, positive, negative)

    assert batched_forwards == [[0, 1]] * STEPS  # ComfyUI ran both branches in one forward
    assert separate_forwards == [[0], [1]] * STEPS
    diff = (batched - separate).abs().max().item()
    print(f"batched vs separate cond/uncond: max diff {diff:.2e} (|latent| max {separate.abs().max():.1f})")
    assert diff <= BATCH_TOLERANCE, diff


# --- latent batches -------------------------------------------------------------------------------------------------


def test_a_latent_batch_of_2_shares_one_token_grid(glm, model, glyph_encoder):
    tokens = random_tokens(grids=1)
    positive, negative = encode(glm, glyph_encoder, tokens)
    latent = empty_latent(glm, batch_size=2, tokens=tokens)
    assert latent["samples"].shape[0] == 2
    noise = noise_for(2)

    batch = sample(model, noise, positive, negative, latent)

    singles = [sample(model, noise[i : i + 1], positive, negative) for i in range(2)]
    assert_each_sample_equals_its_single_run(batch, singles)


def generate_tokens(glm, ar_model, seed, batch_size):
    return comfy_glm.generate_tokens(glm, ar_model, PROMPT, SIZE, seed, batch_size)


def test_a_batch_of_2_is_the_single_runs_at_its_sample_seeds(glm, model, glyph_encoder, ar_model):
    tokens = generate_tokens(glm, ar_model, AR_SEED, batch_size=2)
    assert tokens.sample_seeds == ar.sample_seeds(AR_SEED, 2)  # what Save Visual Tokens keeps
    single_tokens = [generate_tokens(glm, ar_model, seed, 1) for seed in ar.sample_seeds(AR_SEED, 2)]
    assert torch.equal(tokens.prior_token_ids, torch.cat([t.prior_token_ids for t in single_tokens]))
    latent = empty_latent(glm, batch_size=1, tokens=tokens)  # the latent batch follows the grids
    assert latent["samples"].shape[0] == 2
    noise = noise_for(2)

    batch = sample(model, noise, *encode(glm, glyph_encoder, tokens), latent)

    singles = [sample(model, noise[i : i + 1], *encode(glm, glyph_encoder, t)) for i, t in enumerate(single_tokens)]
    assert_each_sample_equals_its_single_run(batch, singles)


def test_neighbouring_seeds_give_no_common_grid_in_a_batch_of_3(glm, ar_model):
    """With seed + i, seed 6 repeated samples 1 and 2 of seed 5 token for token (ComfyUI's "increment" default)."""
    state = torch.get_rng_state()
    grids = [generate_tokens(glm, ar_model, seed, 3).target_ids for seed in (AR_SEED, AR_SEED + 1)]
    assert torch.equal(torch.get_rng_state(), state)  # the AR's generators are its own
    same = (grids[0][:, None, :] == grids[1][None, :, :]).float().mean(-1)  # [3, 3] share of equal tokens
    assert same.max() < 0.5, same  # a shifted sample would be 1.0


def test_the_same_seed_and_batch_give_the_same_grids(glm, ar_model):
    first, again = (generate_tokens(glm, ar_model, AR_SEED, 3) for _ in range(2))
    assert torch.equal(first.prior_token_ids, again.prior_token_ids)
    assert len({tuple(g.tolist()) for g in first.target_ids}) == 3  # three different samples


def test_reference_images_are_shared_by_every_sample_of_a_batch(glm, model, glyph_encoder, vae):
    positive, negative = encode(glm, glyph_encoder, random_tokens(references=2), vae)
    noise = noise_for(2)

    batch = sample(model, noise, positive, negative)

    singles = [sample(model, noise[i : i + 1], positive, negative) for i in range(2)]
    assert_each_sample_equals_its_single_run(batch, singles)
