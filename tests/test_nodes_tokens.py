"""GLM-Image Load Visual Tokens refuses every broken or hostile token file with a clear message when the prompt is
queued, so no such file reaches a model; on a real server a file uploaded through ComfyUI's own /upload/image is
refused the same way and the next prompt runs.

The corpus is test_tokens.mutated_token_files (seeded: the same 240 files every run).
"""

import json
import re

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

import folder_paths  # noqa: E402

from tests.test_nodes_errors import random_tokens, tokens_graph  # noqa: E402
from tests.test_tokens import REFUSED, as_file_contents, mutated_token_files, valid_tokens  # noqa: E402

InvalidInputError = comfy_host.import_pack_module("glm_image_core.errors").InvalidInputError
tokens_module = comfy_host.import_pack_module("glm_image_core.tokens")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The fuzz files in this process's input/ (restored afterwards); yields their names."""
    glm = comfy_host.load_pack()
    inputs = tmp_path_factory.mktemp("tokens_input")
    files = mutated_token_files(inputs)
    previous = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(inputs))
    yield glm["GLMImageLoadTokens"], [f.name for f in files]
    folder_paths.set_input_directory(previous)


def test_every_mutated_file_is_refused_when_the_prompt_is_queued(corpus):
    load_tokens, names = corpus
    assert len(names) >= 200
    for name in names:
        message = load_tokens.validate_inputs(tokens_file=name)
        assert isinstance(message, str) and message.startswith(f"{name} {REFUSED}: "), (name, message)


def test_every_mutated_file_is_refused_by_comfyuis_validation_with_the_nodes_message(corpus):
    _, names = corpus
    for name in names:
        run = comfy_host.run_prompt(
            {
                "1": {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": name}},
                "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
            }
        )
        assert not run.success and run.error is not None, name
        details = run.node_errors["1"]["errors"][0]["details"]
        assert f"{name} {REFUSED}: " in details, details


def test_every_mutated_file_is_refused_by_the_node_run_without_validation(corpus):
    """What a node run after validation meets if the file changed in between."""
    load_tokens, names = corpus
    for name in names:
        with pytest.raises(InvalidInputError, match=REFUSED):
            load_tokens.execute(tokens_file=name)


# --- a real server --------------------------------------------------------------------------------------------------


def hostile_file(tmp_path) -> bytes:
    """The probe of the issue: a well-formed tokens file whose ids are all 99999."""
    from safetensors.torch import save_file

    tensors, info = as_file_contents(valid_tokens())
    tensors = {k: torch.full_like(t, 99999) for k, t in tensors.items()}
    save_file(tensors, tmp_path / "hostile.bin", metadata={"glm_image_tokens": json.dumps(info)})
    return (tmp_path / "hostile.bin").read_bytes()


@pytest.mark.vram  # runs a model under ComfyUI's model management
@pytest.mark.server
def test_an_uploaded_hostile_file_is_refused_at_load_visual_tokens_and_the_next_prompt_runs(tiny_model_dir, tmp_path):
    tokens_module.write_tokens(random_tokens(), tmp_path / "good.bin")
    with comfy_host.comfy_server({"glm_image": str(tiny_model_dir.parent)}) as url:
        assert (
            comfy_host.server_upload(url, "hostile.glm_tokens", hostile_file(tmp_path))["name"] == "hostile.glm_tokens"
        )
        comfy_host.server_upload(url, "good.glm_tokens", (tmp_path / "good.bin").read_bytes())

        with pytest.raises(RuntimeError, match="ComfyUI rejected the prompt") as rejected:
            comfy_host.server_run_prompt(url, tokens_graph("hostile.glm_tokens"))
        answer = json.loads(str(rejected.value).split(": ", 1)[1])
        (error,) = answer["node_errors"]["1"]["errors"]
        assert answer["node_errors"]["1"]["class_type"] == "GLMImageLoadTokens"
        assert re.search(
            f"hostile.glm_tokens {REFUSED}: \\w+ holds ids from 99999 to 99999; .* 0..16383", error["details"]
        )

        served = comfy_host.server_run_prompt(url, tokens_graph("good.glm_tokens"))
        assert served["status"]["status_str"] == "success"
        assert len(served["outputs"]["11"]["images"]) == 1
