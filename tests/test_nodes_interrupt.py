"""Stopping the AR mid-run: the user's interrupt (comfy.model_management.interrupt_current_processing, what the Cancel
button calls) stops GLM-Image Generate Visual Tokens within a token with ComfyUI's InterruptProcessingException, the
executor reports it as execution_interrupted, and the next run (ComfyUI clears the flag when a prompt starts) is
unaffected: the same tokens as a run that was never interrupted.

The interrupt is raised from ComfyUI's progress-bar hook once the node reports N tokens, as main.py's hook would see
them; with no server the hook is otherwise unset.
"""

import contextlib
import os

import pytest
import torch

from tests import comfy_host
from tests.prompt_graphs import example_prompt, upstream

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_management as mm  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from tests import comfy_glm  # noqa: E402

ar_nodes = comfy_host.import_pack_module("nodes.ar_nodes")
read_tokens = comfy_host.import_pack_module("glm_image_core.tokens").read_tokens

SIZE, SEED, INTERRUPT_AT = 512, 7, 40
PROMPT = 'A poster that reads "STOP"'
TOTAL = 16 * 16 + (SIZE // 32) ** 2  # preview grid + target grid


@pytest.fixture(scope="module")
def glm(tiny_model_dir, tmp_path_factory):
    node_classes = comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    output = folder_paths.get_output_directory()
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))
    yield node_classes
    folder_paths.set_output_directory(output)


@pytest.fixture(scope="module")
def ar_model(glm):
    return glm["GLMImageARModelLoader"].execute(model_folder="GLM-Image", dtype="fp32", device="cpu", weights="full")[0]


def generate_tokens(glm, ar_model):
    return comfy_glm.generate_tokens(glm, ar_model, PROMPT, SIZE, SEED)


@pytest.fixture(scope="module")
def uninterrupted(glm, ar_model):
    return generate_tokens(glm, ar_model)


@contextlib.contextmanager
def interrupt_after(tokens: int):
    """Press Cancel once the progress bar reaches `tokens`; yields the progress values seen. Afterwards the hook is
    restored and the flag cleared, so nothing leaks into other tests."""
    seen = []
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value >= tokens:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield seen
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)


def test_interrupting_the_ar_raises_comfyuis_interrupt_and_the_next_run_is_unaffected(glm, ar_model, uninterrupted):
    with interrupt_after(INTERRUPT_AT) as seen, pytest.raises(mm.InterruptProcessingException):
        generate_tokens(glm, ar_model)
    print(f"interrupted at token {INTERRUPT_AT}; the last progress report was token {seen[-1]} of {TOTAL}")
    assert INTERRUPT_AT <= seen[-1] < TOTAL  # stopped soon after the interrupt, long before the grid was full

    mm.interrupt_current_processing(False)  # as PromptExecutor does when the next prompt starts
    assert torch.equal(generate_tokens(glm, ar_model).prior_token_ids, uninterrupted.prior_token_ids)


SAVE_TOKENS = "12"  # the text-rendering example's GLM-Image Save Visual Tokens


def tokens_prompt() -> dict:
    """The text-rendering example's AR part: its tokens saved by GLM-Image Save Visual Tokens."""
    graph = example_prompt(
        "text_rendering",
        SIZE,
        SIZE,
        GLMImageGenerateTokens={"prompt": PROMPT, "seed": SEED},
        GLMImageSaveTokens={"filename_prefix": "glm_tokens/interrupt"},
    )
    return upstream(graph, SAVE_TOKENS)


def test_the_executor_reports_an_interrupted_ar_and_runs_the_next_prompt(glm, uninterrupted):
    with interrupt_after(INTERRUPT_AT) as seen:
        run = comfy_host.run_prompt(tokens_prompt())
    assert not run.success
    interrupted = [data for event, data in run.messages if event == "execution_interrupted"]
    assert [data["node_id"] for data in interrupted] == ["2"]
    assert seen[-1] < TOTAL
    assert run.execution_error() is None  # an interrupt, not an error

    run = comfy_host.run_prompt(tokens_prompt())  # the executor clears the flag itself

    assert run.success, run.execution_error()
    saved_as = run.outputs[SAVE_TOKENS]["text"][0].removeprefix("saved ")  # relative to the output folder
    saved = read_tokens(os.path.join(folder_paths.get_output_directory(), saved_as))
    assert torch.equal(saved.prior_token_ids, uninterrupted.prior_token_ids)


@pytest.mark.parametrize("disabled", [False, True])
def test_comfyuis_disable_cuda_graphs_switch_reaches_the_decoder(glm, ar_model, monkeypatch, disabled):
    import comfy.cli_args

    seen = []
    real = ar_nodes.ar.generate_prior_tokens
    monkeypatch.setattr(ar_nodes.ar, "generate_prior_tokens", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    monkeypatch.setattr(comfy.cli_args.args, "disable_cuda_graphs", disabled, raising=False)
    generate_tokens(glm, ar_model)
    assert seen[0]["cuda_graph"] is (False if disabled else None)


# --- the DiT: per-run state is released when a run stops -----------------------------------------------------------


def call_node(class_type: str, **inputs):
    """A stock node's first output, whichever API it has (V1 on 0.3.64, V3 on 0.33)."""
    import nodes

    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "FUNCTION"):
        return getattr(cls(), cls.FUNCTION)(**inputs)[0]
    return cls.execute(**inputs)[0]


@contextlib.contextmanager
def cancel_at_step(step: int):
    """Press Cancel once the sampler reports `step`; the progress hook then raises, as main.py's hook does."""
    previous = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value >= step:
            mm.interrupt_current_processing(True)
        mm.throw_exception_if_processing_interrupted()

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        yield
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        mm.interrupt_current_processing(False)


def test_an_interrupted_edit_run_releases_the_reference_kv_the_guider_still_holds_nothing(tiny_model_dir, monkeypatch):
    """SamplerCustomAdvanced's guider (a CFGGuider node output, kept in the executor's cache between prompts) must
    not keep the reference K/V of a run that was cancelled: ComfyUI deletes it only when sampling completes."""
    import gc
    import weakref

    model_nodes = comfy_host.import_pack_module("nodes.model")
    made = []
    encode = model_nodes.GlmImageModel.encode_references
    monkeypatch.setattr(
        model_nodes.GlmImageModel, "encode_references", lambda self, *a: made.append(encode(self, *a)) or made[-1]
    )
    patcher = comfy_glm.tiny_patcher(tiny_model_dir, SIZE, SIZE)
    positive, negative = comfy_glm.conditionings(SIZE, SIZE, references=[comfy_glm.reference(SIZE, SIZE)])
    guider = call_node("CFGGuider", model=patcher, positive=positive, negative=negative, cfg=1.5)
    inputs = dict(
        noise=call_node("RandomNoise", noise_seed=0),
        guider=guider,
        sampler=call_node("KSamplerSelect", sampler_name="euler"),
        sigmas=call_node("BasicScheduler", model=patcher, scheduler="simple", steps=4, denoise=1.0),
        latent_image={"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)},
    )

    with cancel_at_step(1), pytest.raises(mm.InterruptProcessingException):
        call_node("SamplerCustomAdvanced", **inputs)
    kv = weakref.ref(made.pop())
    gc.collect()

    assert kv() is None, "the reference K/V of the cancelled run is still referenced"
    assert getattr(guider, "conds", None) is None
    assert call_node("SamplerCustomAdvanced", **inputs)["samples"].isfinite().all()  # the guider still samples
