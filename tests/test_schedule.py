"""GLM's schedule against diffusers: the pipeline's integer timesteps, its dynamic mu and the scheduler's shift."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.glm_image.pipeline_glm_image import calculate_shift, retrieve_timesteps

from glm_image_core.schedule import compute_mu, glm_schedule, glm_schedule_shift, glm_timesteps, shift_sigmas


def reference_schedule(tiny_model_dir, steps, height, width):
    """What GlmImagePipeline.__call__ computes (step 7 of its code) with the published scheduler config."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dir / "scheduler")
    timesteps = np.linspace(1000, 1.0, steps + 1)[:-1].astype(np.int64).astype(np.float32)
    mu = calculate_shift((height // 8) * (width // 8) // 4)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", timesteps, timesteps / 1000, mu=mu)
    return scheduler.sigmas, timesteps - 1  # the pipeline feeds the DiT t - 1


@pytest.mark.parametrize("steps", [1, 2, 7, 30, 50])
@pytest.mark.parametrize("height,width", [(512, 512), (1024, 1024), (1280, 768), (2048, 2048)])
def test_sigmas_and_dit_timesteps_equal_diffusers(tiny_model_dir, steps, height, width):
    sigmas, dit_timesteps = glm_schedule(steps, height, width)
    ref_sigmas, ref_timesteps = reference_schedule(tiny_model_dir, steps, height, width)
    assert sigmas.shape == ref_sigmas.shape == (steps + 1,)
    assert (sigmas - ref_sigmas).abs().max() <= 1e-7  # float32 rounding of the shift formula (<= 1 ulp)
    assert torch.equal(dit_timesteps, ref_timesteps)  # the unshifted integer grid, exactly


def test_mu_is_the_published_resolution_shift():
    assert compute_mu(1024, 1024) == pytest.approx(3.25)
    assert compute_mu(512, 512) == pytest.approx(1.75)


def test_dit_sees_the_unshifted_time_while_sigmas_are_shifted():
    sigmas, dit_timesteps = glm_schedule(50, 1024, 1024)
    assert dit_timesteps[1] == 979  # t = 980, minus one
    assert sigmas[1] > 0.98  # shifted towards noise by mu = 3.25
    assert sigmas[-1] == 0


@pytest.mark.parametrize("steps", [3, 7, 50, 1000])
@pytest.mark.parametrize("height,width", [(512, 512), (1024, 1024), (1280, 768), (512, 2048), (2048, 2048)])
def test_the_shift_of_a_glm_schedule_is_read_back_from_its_sigmas(steps, height, width):
    sigmas, _ = glm_schedule(steps, height, width)
    assert glm_schedule_shift(sigmas) == pytest.approx(compute_mu(height, width), rel=1e-5)


def test_sigmas_that_are_no_whole_glm_schedule_have_no_shift(tiny_model_dir):
    """Another scheduler's sigmas, part of a schedule, one or two steps: nothing to compare with an image size."""
    sigmas, _ = glm_schedule(20, 1024, 1024)
    karras = torch.cat([torch.linspace(1.0, 0.002, 20) ** 3, torch.zeros(1)])
    assert glm_schedule_shift(karras) is None
    assert glm_schedule_shift(sigmas[5:]) is None  # denoise below 1 / split sigmas
    assert glm_schedule_shift(sigmas[:-5]) is None
    assert glm_schedule_shift(glm_schedule(1, 512, 512)[0]) is None  # [1, 0] at every size
    assert glm_schedule_shift(glm_schedule(2, 512, 512)[0]) is None  # [1, x, 0]: any x fits some shift
    shift_9 = torch.cat([shift_sigmas(glm_timesteps(8) / 1000, 9.0), torch.zeros(1)])  # beyond 2048x2048's 6.25
    assert glm_schedule_shift(shift_9) is None
    diffusers_karras = FlowMatchEulerDiscreteScheduler.from_pretrained(
        tiny_model_dir / "scheduler", use_karras_sigmas=True
    )
    diffusers_karras.set_timesteps(20, mu=compute_mu(1024, 1024))
    assert glm_schedule_shift(diffusers_karras.sigmas) is None
