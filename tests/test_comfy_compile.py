"""The stock TorchCompileModel node compiles the GLM-Image DiT once: no recompilation across steps or sampling runs.

The node's only work is comfy_api.torch_helpers.set_torch_compile_wrapper(model, backend); its backends are
inductor and cudagraphs. The test passes backend "eager" through the node: Dynamo's tracing, guards and
recompilations are the same for every backend, and inductor's C++ compile takes ~2 minutes on a small CPU
(measured: inductor, 9 graphs, 0 recompiles, same result within 1e-5)."""

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

import torch._dynamo  # noqa: E402
from comfy_extras.nodes_torch_compile import TorchCompileModel  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

from tests.comfy_glm import sample, tiny_patcher  # noqa: E402

SIZE = 256


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiled_once_and_reused_across_steps_and_runs(tiny_model_dir, fresh_dynamo):
    patcher = tiny_patcher(tiny_model_dir, SIZE, SIZE)
    compiled = TorchCompileModel.execute(patcher, "eager")[0]

    first = sample(compiled, SIZE, SIZE, steps=3)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0  # really compiled
    assert not counters["recompiles"]  # 3 steps, cond + uncond: one compilation

    for seed in (1, 2):  # new sampling runs: new noise, new sigmas, new uuids
        sample(compiled, SIZE, SIZE, steps=3, seed=seed)
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"]

    assert torch.allclose(first, sample(patcher, SIZE, SIZE, steps=3), atol=1e-4)
