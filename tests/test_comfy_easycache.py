"""Step caching: the stock EasyCache node and EasyCache (GLM-Image) really skip DiT calls on the GLM-Image MODEL, stay
within a stated distance of the uncached run, and never cache the reference-image pass."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

from comfy_extras.nodes_easycache import EasyCacheNode  # noqa: E402

from tests.comfy_glm import reference, sample, tiny_patcher  # noqa: E402

cache_nodes = comfy_host.import_pack_module("nodes.cache_nodes")
SIZE, STEPS = 256, 20
DEFAULTS = dict(reuse_threshold=0.2, start_percent=0.15, end_percent=0.95, verbose=False)  # the nodes' defaults
MIN_SKIPPED = 0.30
# Relative L2 distance of the cached result from the uncached one, measured 0.031-0.036 at the defaults on this model
# (45-50% of the calls skipped); bounded with room for other CPUs' rounding, far below a broken cache (~0.5-1.2).
MAX_DISTANCE = 0.06


@pytest.fixture(scope="module")
def smooth_patcher(tiny_model_dir):
    """The tiny DiT with its timestep embedding damped x0.1. Random weights make the velocity jump by ~50% from one
    step to the next (EasyCache then never skips, rightly); a trained DiT's velocity changes by a few % per step, and
    so does this one's. Everything else is the tiny model as the other tests use it."""
    patcher = tiny_patcher(tiny_model_dir, SIZE, SIZE)
    with torch.no_grad():
        patcher.model.diffusion_model.time_condition_embed.timestep_embedder.linear_1.weight.mul_(0.1)
    return patcher


def counting(patcher):
    """A clone that counts the DiT passes really run (block 0 of each sampling forward), and the counter."""
    calls = []

    def count(args):
        if args["block_index"] == 0:
            calls.append(args["transformer_options"]["sigmas"].item())
        return {"img": args["img"], "txt": args["txt"]}

    counted = patcher.clone()
    counted.set_model_double_block_patch(count)
    return counted, calls


def distance(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_cached(patcher, node, **sample_kwargs):
    """(uncached result, uncached DiT calls, cached result, cached DiT calls)."""
    counted, calls = counting(patcher)
    plain = sample(counted, SIZE, SIZE, steps=STEPS, **sample_kwargs)
    plain_calls = len(calls)
    calls.clear()
    cached = node.execute(counted, **DEFAULTS)[0]
    return plain, plain_calls, sample(cached, SIZE, SIZE, steps=STEPS, **sample_kwargs), len(calls)


def test_stock_easycache_skips_at_least_30_percent_of_the_dit_calls(smooth_patcher):
    _, plain_calls, _, cached_calls = run_cached(smooth_patcher, EasyCacheNode, cfg=1.5)
    assert plain_calls == STEPS  # cond and uncond in one batch per step
    assert 1 - cached_calls / plain_calls >= MIN_SKIPPED, (cached_calls, plain_calls)


def test_stock_easycache_stays_near_the_uncached_run_when_each_branch_runs_alone(smooth_patcher):
    """cfg 1 (one branch): no ComfyUI version mixes the caches of batched conds here."""
    plain, plain_calls, cached, cached_calls = run_cached(smooth_patcher, EasyCacheNode, cfg=1.0)
    assert 1 - cached_calls / plain_calls >= MIN_SKIPPED
    assert distance(cached, plain) <= MAX_DISTANCE


@pytest.mark.xfail(
    comfy_host.comfyui_version() < (0, 33),
    reason="ComfyUI 0.3.64's EasyCache adds every cond's cached difference to the whole batch (0.61 off, measured): "
    "use EasyCache (GLM-Image) there",
    strict=True,
)
def test_stock_easycache_stays_near_the_uncached_run_with_batched_cfg(smooth_patcher):
    plain, _, cached, _ = run_cached(smooth_patcher, EasyCacheNode, cfg=1.5)
    assert distance(cached, plain) <= MAX_DISTANCE


def test_glm_easycache_stays_near_the_uncached_run_with_batched_cfg(smooth_patcher):
    plain, plain_calls, cached, cached_calls = run_cached(smooth_patcher, cache_nodes.EasyCache, cfg=1.5)
    assert 1 - cached_calls / plain_calls >= MIN_SKIPPED
    assert distance(cached, plain) <= MAX_DISTANCE


def test_editing_with_easycache_skips_steps_but_computes_the_reference_kv_once_uncached(smooth_patcher, monkeypatch):
    model = smooth_patcher.model
    passes = []
    encode = model.encode_references
    monkeypatch.setattr(model, "encode_references", lambda *a: passes.append(1) or encode(*a))
    refs = [reference(SIZE, SIZE, seed=3)]
    plain, plain_calls, cached, cached_calls = run_cached(
        smooth_patcher, cache_nodes.EasyCache, cfg=1.5, references=refs
    )
    assert passes == [1, 1]  # one reference pass per sampling run, outside the cached forward
    assert plain_calls == 2 * STEPS and 1 - cached_calls / plain_calls >= MIN_SKIPPED
    assert distance(cached, plain) <= MAX_DISTANCE
