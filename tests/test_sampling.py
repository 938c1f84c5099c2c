"""Batched CFG: cond and uncond as one DiT batch give the velocities of two separate passes."""

import pytest
import torch

from glm_image_core.dit import ReferenceKV
from glm_image_core.loading import load_transformer
from glm_image_core.sampling import DitCondition, denoise, stack_conditions
from glm_image_core.schedule import glm_schedule

HEIGHT, WIDTH, STEPS = 256, 384, 3


@pytest.fixture(scope="module")
def dit(tiny_model_dir):
    return load_transformer(tiny_model_dir / "transformer", dtype=torch.float32)


class CountingDit(torch.nn.Module):
    """The DiT, counting its forward passes and the batch of each."""

    def __init__(self, dit):
        super().__init__()
        self.dit, self.dtype, self.batches = dit, dit.dtype, []

    def forward(self, latent, *args, **kwargs):
        self.batches.append(latent.shape[0])
        return self.dit(latent, *args, **kwargs)


def branches(dit, batch=1, cond_len=7, uncond_len=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_dim = dit.glyph_projector.net[0].proj.in_features
    prior = torch.randint(0, 16384, (1, (HEIGHT // 16) * (WIDTH // 16)), generator=g)
    cond = DitCondition(torch.randn(1, cond_len, text_dim, generator=g), prior)
    uncond = DitCondition(torch.randn(1, uncond_len, text_dim, generator=g), prior, drop_prior=True)
    noise = torch.randn(batch, 16, HEIGHT // 8, WIDTH // 8, generator=g)
    return noise, cond, uncond


def run(dit, noise, cond, uncond, batched):
    sigmas, timesteps = glm_schedule(STEPS, HEIGHT, WIDTH)
    with torch.no_grad():
        return denoise(dit, noise, sigmas, timesteps, cond, uncond, 1.5, batched_cfg=batched)


@pytest.mark.parametrize("batch,cond_len,uncond_len", [(1, 7, 1), (2, 7, 1), (1, 3, 9), (1, 4, 4)])
def test_batched_cfg_equals_two_passes(dit, batch, cond_len, uncond_len):
    noise, cond, uncond = branches(dit, batch, cond_len, uncond_len)
    counting = CountingDit(dit)
    batched = run(counting, noise, cond, uncond, batched=True)
    separate = run(dit, noise, cond, uncond, batched=False)
    assert counting.batches == [2 * batch] * STEPS  # one pass per step
    diff = (batched - separate).abs().max() / separate.abs().max()
    assert diff <= 1e-6, diff


def test_editing_keeps_two_passes_because_only_cond_sees_the_references(dit):
    noise, cond, uncond = branches(dit)
    with torch.no_grad():
        latent = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))
        reference = dit.encode_reference(latent, cond.prior_token_id, (HEIGHT, WIDTH))
    cond = DitCondition(cond.glyph, cond.prior_token_id, reference_kv=reference)
    counting = CountingDit(dit)
    result = run(counting, noise, cond, uncond, batched=True)
    assert counting.batches == [1, 1] * STEPS
    assert torch.equal(result, run(dit, noise, cond, uncond, batched=False))


def test_stacked_conditions_pad_glyphs_and_keep_each_branchs_own_mask():
    prior = torch.zeros(1, 4, dtype=torch.long)
    cond = DitCondition(torch.ones(1, 3, 2), prior, glyph_mask=torch.tensor([[True, True, False]]))
    uncond = DitCondition(torch.ones(1, 1, 2), prior, drop_prior=True)
    stacked = stack_conditions([cond, uncond], batch=2)
    assert stacked.glyph.shape == (4, 3, 2) and stacked.prior_token_id.shape == (4, 4)
    assert stacked.glyph_mask.tolist() == [[True, True, False]] * 2 + [[True, False, False]] * 2
    assert stacked.drop_prior.tolist() == [False, False, True, True]
    assert stacked.glyph[2:, 1:].abs().sum() == 0  # padding is zeros


def test_stacking_refuses_reference_kv():
    prior = torch.zeros(1, 4, dtype=torch.long)
    reference = ReferenceKV([(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))])
    with pytest.raises(ValueError, match="separate passes"):
        stack_conditions([DitCondition(torch.ones(1, 1, 2), prior, reference_kv=reference)], batch=1)
