"""The DiT as a ComfyUI MODEL: ComfyUI's own KSampler must reproduce the core's reference-equal denoising loop."""

import json

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402

from glm_image_core.loading import load_transformer, read_state_dict  # noqa: E402
from glm_image_core.sampling import DitCondition, denoise  # noqa: E402
from glm_image_core.schedule import glm_schedule  # noqa: E402

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
model_sampling = comfy_host.import_pack_module("nodes.model_sampling")
HEIGHT, WIDTH = 512, 768


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    patcher = dit_loading.load_dit_patcher(read_state_dict(folder), config)
    patcher = patcher.clone()
    patcher.add_object_patch("model_sampling", model_sampling.model_sampling_for_size(WIDTH, HEIGHT))
    return patcher, load_transformer(folder, dtype=torch.float32)


def make_conds(seed=0):
    g = torch.Generator().manual_seed(seed)
    glyph = torch.randn(1, 6, 64, generator=g)
    empty = torch.randn(1, 1, 64, generator=g)
    prior = torch.randint(0, 16384, (1, (HEIGHT // 16) * (WIDTH // 16)), generator=g)
    extras = {"glm_prior_token_ids": prior, "glm_empty_glyph": empty}
    return glyph, empty, prior, [[glyph, dict(extras)]], [[torch.zeros_like(glyph), dict(extras)]]


@pytest.mark.parametrize("steps", [1, 10])
def test_ksampler_euler_simple_equals_reference_loop(models, steps):
    patcher, core_dit = models
    glyph, empty, prior, positive, negative = make_conds()
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(1))
    latent = torch.zeros_like(noise)
    out = comfy.sample.sample(patcher, noise, steps, 1.5, "euler", "simple", positive, negative, latent)

    sigmas, timesteps = glm_schedule(steps, HEIGHT, WIDTH)
    expected = denoise(
        core_dit, noise, sigmas, timesteps, DitCondition(glyph, prior), DitCondition(empty, prior, drop_prior=True), 1.5
    )
    expected = patcher.model.process_latent_out(expected)  # KSampler returns raw VAE latents
    diff = (out - expected).abs().max()
    assert diff <= 5e-5, diff  # latents of magnitude ~10: float32 rounding in CFG on denoised


def test_fp8_weights_run_and_stay_near_the_float32_model(tiny_model_dir):
    """weight_dtype fp8 (ComfyUI's fp8 ops): the prior-token embedding comes back in fp8 and is cast, not masked in
    fp8 (no fp8 masked_fill). Weights rounded to 3 mantissa bits: close to the float32 model, not equal."""
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    patcher = dit_loading.load_dit_patcher(read_state_dict(folder), config, "fp8_e4m3fn")
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    model = patcher.model
    glyph, empty, prior, _, _ = make_conds()
    x = torch.randn(2, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6, [1] + [0] * 5])
    glyphs = torch.cat([glyph, torch.nn.functional.pad(empty, (0, 0, 0, 5))])
    drop, t = torch.tensor([[0], [1]]), torch.tensor([499.0, 499.0])
    with torch.no_grad():
        out = model.diffusion_model(
            x.to(model.manual_cast_dtype),
            t,
            glyph=(glyphs, mask),
            prior_token_id=prior.expand(2, -1),
            prior_token_drop=drop,
            transformer_options={},
        )
        target = torch.tensor([[HEIGHT, WIDTH]] * 2, dtype=torch.float32)
        full = load_transformer(folder, dtype=torch.float32)
        expected = full(x, glyphs, prior.expand(2, -1), drop, t, target, torch.zeros_like(target), mask.bool())
    error = (out.float() - expected).norm() / expected.norm()
    assert torch.isfinite(out).all() and error < 0.2, error


@pytest.mark.parametrize(
    "weight_dtype,stored",
    [("default", torch.float32), ("fp8_e4m3fn", torch.float8_e4m3fn), ("fp8_e4m3fn_fast", torch.float8_e4m3fn)],
)
def test_the_weights_are_held_in_the_chosen_dtype(tiny_model_dir, weight_dtype, stored):
    """The tiny file is bf16, as published; on the CPU the default weight dtype is float32. Under dynamic VRAM
    (GLM_IMAGE_DYNAMIC_VRAM=1) comfy.ops layers keep the tensors they are given, so the loader casts them itself."""
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    state_dict = read_state_dict(folder)
    patcher = dit_loading.load_dit_patcher(state_dict, config, weight_dtype)
    params = list(patcher.model.diffusion_model.parameters())
    assert {p.dtype for p in params} == {stored}
    assert sum(p.nbytes for p in params) == sum(t.numel() for t in state_dict.values()) * stored.itemsize
    assert patcher.model.model_config.optimizations.get("fp8", False) == weight_dtype.endswith("_fast")


def test_fp8_fast_weights_take_comfyuis_fp8_matmul(tiny_model_dir, monkeypatch):
    """fp8_e4m3fn_fast: every fp8 Linear goes through comfy.ops.fp8_linear (torch._scaled_mm on Ada/Hopper GPUs),
    which ComfyUI runs only outside training mode. Stood in on the CPU by declaring fp8 compute and counting the calls
    of fp8_linear, answered by the cast path (None) so the CPU's matmul runs."""
    monkeypatch.setattr(comfy.model_management, "supports_fp8_compute", lambda device=None: True)
    calls = []
    monkeypatch.setattr(comfy.ops, "fp8_linear", lambda layer, x: calls.append(layer))
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    patcher = dit_loading.load_dit_patcher(read_state_dict(folder), config, "fp8_e4m3fn_fast")
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    model = patcher.model
    assert not model.diffusion_model.training
    glyph, _, prior, _, _ = make_conds()
    x = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.diffusion_model(
            x.to(model.manual_cast_dtype),
            torch.tensor([499.0]),
            glyph=(glyph, torch.ones(1, glyph.shape[1], dtype=torch.long)),
            prior_token_id=prior,
            prior_token_drop=torch.tensor([[0]]),
            transformer_options={},
        )
    linears = [m for m in model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and {id(m) for m in calls} == {id(m) for m in linears}


@pytest.mark.parametrize("sampler", comfy.samplers.KSampler.SAMPLERS)
def test_every_stock_sampler_runs(models, sampler):
    patcher, _ = models
    _, _, _, positive, negative = make_conds()
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(2))
    out = comfy.sample.sample(
        patcher, noise, 3, 1.5, sampler, "simple", positive, negative, torch.zeros_like(noise), seed=2
    )
    assert out.shape == noise.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("scheduler", comfy.samplers.KSampler.SCHEDULERS)
def test_every_stock_scheduler_runs(models, scheduler):
    patcher, _ = models
    _, _, _, positive, negative = make_conds()
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(3))
    out = comfy.sample.sample(patcher, noise, 3, 1.5, "euler", scheduler, positive, negative, torch.zeros_like(noise))
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_sampler_custom_advanced_with_the_glm_scheduler_equals_the_reference_at_any_step_count(models):
    """At 7 steps 'simple' is not the reference grid (it truncates differently); the GLM-Image Scheduler's sigmas
    through SamplerCustomAdvanced's machinery (CFGGuider + KSAMPLER euler) are."""
    patcher, core_dit = models
    glyph, empty, prior, positive, negative = make_conds()
    noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(4))
    sigmas, timesteps = glm_schedule(7, HEIGHT, WIDTH)
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(1.5)
    out = guider.sample(noise, torch.zeros_like(noise), comfy.samplers.sampler_object("euler"), sigmas, seed=4)
    expected = denoise(
        core_dit, noise, sigmas, timesteps, DitCondition(glyph, prior), DitCondition(empty, prior, drop_prior=True), 1.5
    )
    diff = (out - patcher.model.process_latent_out(expected)).abs().max()  # the guider returns raw VAE latents
    assert diff <= 5e-5, diff
