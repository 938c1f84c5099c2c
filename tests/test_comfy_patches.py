"""The GLM-Image MODEL is open to what ComfyUI attaches to native DiTs: DIFFUSION_MODEL wrappers, transformer_options
in every block's attention, patches_replace["dit"][("double_block", i)] and patches["double_block"]."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.patcher_extension  # noqa: E402

from tests.comfy_glm import reference, sample, tiny_patcher  # noqa: E402

SIZE = 256  # px: a 16x16 patch grid keeps these host runs fast
BLOCKS = 2  # the tiny DiT's layer count


@pytest.fixture(scope="module")
def patcher(tiny_model_dir):
    return tiny_patcher(tiny_model_dir, SIZE, SIZE)


@pytest.fixture(scope="module")
def plain_output(patcher):
    return sample(patcher, SIZE, SIZE)


def test_every_sampling_call_goes_through_the_diffusion_model_wrapper_and_the_reference_pass_does_not(patcher):
    calls = []

    def wrapper(executor, *args, **kwargs):
        calls.append(args[1].tolist())  # timesteps
        return executor(*args, **kwargs)

    wrapped = patcher.clone()
    wrapped.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "count", wrapper)
    sample(wrapped, SIZE, SIZE, steps=3, references=[reference(SIZE, SIZE, seed=5)])
    # 3 steps x (cond, uncond): with references the branches run apart; the reference pass at t=0 (in extra_conds)
    # never reaches the wrapper, so a step cache cannot replay it
    assert len(calls) == 6
    assert all(t[0] > 0 for t in calls)


def test_transformer_options_reach_every_blocks_attention(patcher, plain_output):
    seen = []

    def attention_override(func, *args, **kwargs):
        options = kwargs["transformer_options"]
        seen.append(
            (
                options["block_index"],
                options["total_blocks"],
                options["block_type"],
                tuple(sorted(options["cond_or_uncond"])),
                options["sigmas"].numel(),
            )
        )
        return func(*args, **kwargs)

    observed = patcher.clone()
    observed.model_options["transformer_options"]["optimized_attention_override"] = attention_override
    out = sample(observed, SIZE, SIZE)
    assert {s[:3] for s in seen} == {(i, BLOCKS, "double") for i in range(BLOCKS)}
    assert {s[3] for s in seen} == {(0, 1)}  # cond and uncond batched, ComfyUI's bookkeeping intact
    assert all(s[4] == 1 for s in seen)  # this step's sigma
    assert torch.equal(out, plain_output)


def test_a_double_block_replacement_that_calls_the_original_block_changes_nothing(patcher, plain_output):
    replaced = []

    def replacement(args, extra):
        replaced.append(args["transformer_options"]["block_index"])
        assert set(args) == {"img", "txt", "vec", "pe", "transformer_options"}
        return extra["original_block"](args)

    patched = patcher.clone()
    for i in range(BLOCKS):
        patched.set_model_patch_replace(replacement, "dit", "double_block", i)
    out = sample(patched, SIZE, SIZE)
    assert sorted(set(replaced)) == list(range(BLOCKS)) and len(replaced) == 3 * BLOCKS  # every block, every step
    assert torch.equal(out, plain_output)


def test_a_double_block_replacement_replaces_the_block(patcher, plain_output):
    patched = patcher.clone()
    patched.set_model_patch_replace(
        lambda args, extra: {"img": args["img"], "txt": args["txt"]}, "dit", "double_block", 1
    )
    out = sample(patched, SIZE, SIZE)
    assert not torch.allclose(out, plain_output, atol=1e-3)  # block 1 skipped


def test_double_block_patches_run_after_each_block(patcher, plain_output):
    after = []

    def patch(args):
        after.append(args["block_index"])
        assert args["x"].shape[2:] == (SIZE // 8, SIZE // 8)
        return {"img": args["img"], "txt": args["txt"]}

    patched = patcher.clone()
    patched.set_model_double_block_patch(patch)
    assert torch.equal(sample(patched, SIZE, SIZE), plain_output)
    assert after == list(range(BLOCKS)) * 3

    scaled = patcher.clone()
    scaled.set_model_double_block_patch(lambda args: {"img": args["img"] * 0.5, "txt": args["txt"]})
    assert not torch.allclose(sample(scaled, SIZE, SIZE), plain_output, atol=1e-3)


def test_the_glyph_layout_comes_from_the_cond_shapes_not_from_the_device(patcher, plain_output, monkeypatch):
    """Cond (6 glyph tokens) and uncond (1) batch with padding; the DiT gets their layout from GlyphCond, worked out
    from the shapes on the host, and never copies the mask back (no sync per step)."""
    dit_module = comfy_host.import_pack_module("glm_image_core.dit")

    def read_back(mask):
        raise AssertionError("the glyph mask was copied to the host")

    monkeypatch.setattr(dit_module, "padded_text_groups", read_back)
    assert torch.equal(sample(patcher, SIZE, SIZE), plain_output)
