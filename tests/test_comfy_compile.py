"""The stock TorchCompileModel node compiles the GLM-Image DiT in its first step and never again: no recompilation
across steps or sampling runs.

The first step does recompile a few times (5 on the tiny model with torch 2.13), each once: the uncond batch's keys
are shorter than the cond's (its glyph tokens), after which Dynamo marks those sizes dynamic, and the block index
changes from 0 to 1, after which it is a dynamic int. Counted from Dynamo's `recompiles` log: its
`counters["recompiles"]` is no longer kept by current torch.

The node's only work is comfy_api.torch_helpers.set_torch_compile_wrapper(model, backend); its backends are
inductor and cudagraphs. The test passes backend "eager" through the node: Dynamo's tracing, guards and
recompilations are the same for every backend, and inductor's C++ compile takes ~2 minutes on a small CPU."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import torch._dynamo  # noqa: E402
from comfy_extras.nodes_torch_compile import TorchCompileModel  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from tests.benchmark_scripts import import_script  # noqa: E402
from tests.comfy_glm import sample, tiny_patcher  # noqa: E402

recompile_log = import_script("gpu_check").recompile_log

SIZE = 256


@pytest.fixture
def recompiles():
    """The reasons Dynamo logs for each recompilation (the GPU check's ``recompile_log``), from a fresh Dynamo."""
    torch._dynamo.reset()
    counters.clear()
    with recompile_log() as reasons:
        yield reasons
    torch._dynamo.reset()


def test_compiled_in_the_first_step_and_reused_across_steps_and_runs(tiny_model_dir, recompiles):
    patcher = tiny_patcher(tiny_model_dir, SIZE, SIZE)
    compiled = TorchCompileModel.execute(patcher, "eager")[0]

    after_each_step = []
    first = sample(compiled, SIZE, SIZE, steps=3, callback=lambda *_: after_each_step.append(len(recompiles)))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # really compiled
    assert after_each_step[0] <= 8, recompiles  # each shape change once, not once per layer (the real DiT has 30)
    assert after_each_step == [after_each_step[0]] * 3  # none in steps 2 and 3

    for seed in (1, 2):  # new sampling runs: new noise, new sigmas, new uuids
        sample(compiled, SIZE, SIZE, steps=3, seed=seed)
    assert recompiles[after_each_step[0] :] == [] and counters["stats"]["unique_graphs"] == graphs

    assert torch.allclose(first, sample(patcher, SIZE, SIZE, steps=3), atol=1e-4)
