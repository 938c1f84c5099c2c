"""Apple Silicon's rule, emulated on the CPU: MPS has no float64, so no tensor of the model's device may be float64
anywhere in a run. The whole text-to-image graph (AR with its live preview, glyphs, SamplerCustomAdvanced with
the GLM-Image scheduler, VAE) and an edit with the stock KSampler run under a dispatch mode that refuses every
float64 tensor; the CPU stands in for the model's device, so host-side float64 tensors are refused too (stricter
than MPS)."""

import PIL.Image
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests import comfy_host
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import folder_paths  # noqa: E402

from tests import comfy_glm  # noqa: E402

WIDTH, HEIGHT, STEPS = 512, 512, 2


class RefuseFloat64(TorchDispatchMode):
    """Raises on any op that takes or makes a float64 tensor, naming the op (as MPS would fail there)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for value in tree_leaves((args, kwargs, out)):
            if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
                raise TypeError(f"float64 tensor in {func}: MPS has no float64")
        if kwargs.get("dtype") == torch.float64:
            raise TypeError(f"float64 requested by {func}: MPS has no float64")
        return out


def test_the_refusing_mode_refuses_float64():
    with pytest.raises(TypeError, match="MPS has no float64"), RefuseFloat64():
        torch.ones(2).double()


@pytest.fixture(scope="module")
def comfy_models(tiny_model_dir, tmp_path_factory):
    comfy_host.load_pack()
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    folder_paths.set_output_directory(str(tmp_path_factory.mktemp("output")))
    inputs = tmp_path_factory.mktemp("input")
    PIL.Image.effect_noise((600, 400), 40).convert("RGB").save(inputs / "example.png")
    input_dir = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(inputs))
    yield
    folder_paths.set_input_directory(input_dir)


@pytest.mark.parametrize(
    "graph",
    [
        pytest.param(
            lambda: comfy_glm.with_sampler_custom_advanced(
                example_prompt("text_to_image", WIDTH, HEIGHT, STEPS),
                {"steps": STEPS, "width": WIDTH, "height": HEIGHT},
            ),
            id="text-to-image",
        ),
        pytest.param(lambda: example_prompt("edit_single_reference", WIDTH, HEIGHT, STEPS), id="edit-ksampler"),
    ],
)
def test_a_whole_graph_runs_without_float64(comfy_models, graph):
    with RefuseFloat64():
        run = comfy_host.run_prompt(graph())
    assert run.success, run.execution_error()
    assert run.outputs["11"]["images"]
