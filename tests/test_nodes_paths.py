"""Every file a node reads is one of that input's own options and lies inside a folder registered for it; anything
else is refused when the prompt is queued, before a file outside those folders is opened. Symlinks that exist on disk
inside those folders are followed (the machine owner made them), and the names a downloaded index gives must stay
inside its folder.
Model files are checked at queue time too (shards present, headers readable), so a broken download is reported
before the AR runs.

The layout (one temp folder): registered roots `glm_image/`, `diffusion_models/`, `input/`, `output/`, and an
unregistered `outside/` holding a complete GLM-Image folder, a single-file DiT and a token file: the files a
traversal value would reach. `OpenWatch` (Linux inotify) records every file opened under `outside/` by any process,
from Python or from native code (safetensors opens files in Rust).
"""

import ctypes
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

import folder_paths  # noqa: E402

from glm_image_core.loading import save_single_file  # noqa: E402

write_tokens = comfy_host.import_pack_module("glm_image_core.tokens").write_tokens
paths = comfy_host.import_pack_module("nodes.paths")
InvalidInputError = comfy_host.import_pack_module("glm_image_core.errors").InvalidInputError

CANARY = "canary: the content of a file outside every registered folder"
LOADERS = {  # node id -> (its file input, its other inputs)
    "GLMImageDiTLoader": ("dit", {"weight_dtype": "default"}),
    "GLMImageVAELoader": ("vae", {}),
    "GLMImageGlyphEncoderLoader": ("encoder", {"dtype": "fp32"}),
    "GLMImageARModelLoader": ("model_folder", {"dtype": "fp32", "device": "cpu", "weights": "full"}),
    "GLMImageLoadTokens": ("tokens_file", {}),
}
SHARD = "transformer/diffusion_pytorch_model-00002-of-00003.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"


class OpenWatch:
    """Records files opened under a folder tree (Linux inotify IN_OPEN; directory listings are not counted)."""

    IN_OPEN, IN_ISDIR = 0x20, 0x40000000

    def __init__(self, root: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        self.folders = {}
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir() and not p.is_symlink())]:
            self.folders[self.libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN)] = folder

    def opened(self) -> list[Path]:
        files = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return files
            offset = 0
            while offset < len(data):
                wd, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode()
                if not mask & self.IN_ISDIR:
                    files.append(self.folders[wd] / name)
                offset += 16 + length

    def close(self):
        os.close(self.fd)


def write_layout(tmp: Path, tiny_model_dir: Path) -> None:
    outside = tmp / "outside"
    shutil.copytree(tiny_model_dir, outside / "qa" / "outside-model")
    save_single_file(tiny_model_dir / "transformer", outside / "dit.safetensors")
    (outside / "canary.glm_tokens").write_text(CANARY)

    glm = tmp / "glm_image"
    for name in ("MissingShard", "TruncatedShard"):
        shutil.copytree(tiny_model_dir / "transformer", glm / name / "transformer")
    (glm / "MissingShard" / SHARD).unlink()
    with open(glm / "TruncatedShard" / SHARD, "r+b") as f:
        f.truncate(100_000)
    (glm / "GLM-Image-linked").symlink_to(outside / "qa" / "outside-model", target_is_directory=True)
    (glm / "Elsewhere").symlink_to(tiny_model_dir, target_is_directory=True)  # into another registered root
    (glm / "loop").symlink_to(glm, target_is_directory=True)  # a symlink loop: the listing must end
    shutil.copytree(tiny_model_dir / "transformer", glm / "IndexEscape" / "transformer")
    index = glm / "IndexEscape" / "transformer" / INDEX
    weight_map = json.loads(index.read_text())["weight_map"]
    weight_map = {k: str(outside / "qa" / "outside-model" / "transformer" / v) for k, v in weight_map.items()}
    index.write_text(json.dumps({"weight_map": weight_map}))

    (tmp / "diffusion_models").mkdir()
    (tmp / "diffusion_models" / "escape.safetensors").symlink_to(outside / "dit.safetensors")
    (tmp / "input").mkdir()
    (tmp / "input" / "escape.glm_tokens").symlink_to(outside / "canary.glm_tokens")
    (tmp / "output" / "glm_tokens").mkdir(parents=True)


# Values that try to reach outside/: relative to a root's parent (tmp/), or from anywhere ({up}: enough "../" to reach
# / and then outside/'s absolute path without its leading slash), or absolute ({abs}: outside/'s absolute path).
MODEL_VALUES = [
    "../outside/qa/outside-model",
    "GLM-Image/../../outside/qa/outside-model",
    "{up}/qa/outside-model",
    "{abs}/qa/outside-model",
    "..\\outside\\qa\\outside-model",
]
TRAVERSALS = {node: MODEL_VALUES for node in LOADERS} | {
    "GLMImageDiTLoader": MODEL_VALUES + ["../diffusion_models/../outside/dit.safetensors", "{up}/dit.safetensors"],
    "GLMImageLoadTokens": [
        "../outside/canary.glm_tokens",
        "{up}/canary.glm_tokens",
        "{abs}/canary.glm_tokens",
        "../outside/canary.glm_tokens [output]",
        "glm_tokens/../../outside/canary.glm_tokens [output]",
        "{up}/canary.glm_tokens [output]",
        "../outside/canary.glm_tokens [input]",
        "..\\outside\\canary.glm_tokens",
    ],
}
FILES = {
    "dit": paths.DIT,
    "vae": paths.VAE,
    "encoder": paths.GLYPH_ENCODER,
    "model_folder": paths.AR_MODEL,
    "tokens_file": paths.TOKENS,
}


def traversal(template: str, outside: Path) -> str:
    return template.format(up="../" * 24 + str(outside).lstrip("/"), abs=outside)


def loader_prompt(node_id: str, value: str) -> dict:
    name, others = LOADERS[node_id]
    return {
        "1": {"class_type": node_id, "inputs": {name: value, **others}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def validation_errors(run, node="1") -> list[str]:
    """The node's distinct validation messages. ComfyUI lists a validate_inputs message under every input the
    validator names ("model_folder - ...", "weights - ..." for the AR loader, whose two file inputs share one)."""
    assert not run.success and run.error is not None, "the prompt should have failed validation"
    messages = [e["details"].split(" - ", 1)[-1] for e in run.node_errors[node]["errors"]]
    return list(dict.fromkeys(messages))


@pytest.fixture(scope="module")
def layout(tiny_model_dir, tmp_path_factory):
    """The layout registered in this process's ComfyUI; the folders it adds are taken out afterwards."""
    comfy_host.load_pack()
    tmp = tmp_path_factory.mktemp("paths")
    write_layout(tmp, tiny_model_dir)
    roots = {"glm_image": [tiny_model_dir.parent, tmp / "glm_image"], "diffusion_models": [tmp / "diffusion_models"]}
    added = [
        (kind, str(p)) for kind, ps in roots.items() for p in ps if str(p) not in folder_paths.get_folder_paths(kind)
    ]
    for kind, path in added:
        folder_paths.add_model_folder_path(kind, path)
    previous = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(tmp / "input"))
    folder_paths.set_output_directory(str(tmp / "output"))
    write_tokens(random_tokens(), str(tmp / "output" / "glm_tokens" / "saved.glm_tokens"))
    yield tmp
    folder_paths.set_input_directory(previous[0])
    folder_paths.set_output_directory(previous[1])
    for kind, path in added:
        folder_paths.folder_names_and_paths[kind][0].remove(path)


def random_tokens():
    types = comfy_host.import_pack_module("nodes.types")
    ids = torch.randint(0, 16384, (1, 1024), generator=torch.Generator().manual_seed(0))
    return types.VisualTokens(ids, ids[:, ::4], ids[:, :0], 512, 512, "a cat", 0)


@pytest.fixture
def watch(layout):
    watcher = OpenWatch(layout / "outside")
    yield watcher
    watcher.close()


# --- values that are not options ------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform != "linux", reason="OpenWatch uses inotify")
@pytest.mark.parametrize("node_id, template", [(n, t) for n, ts in TRAVERSALS.items() for t in ts])
def test_a_value_that_climbs_out_is_refused_at_queue_time_and_opens_nothing(layout, watch, node_id, template):
    value = traversal(template, layout / "outside")

    errors = validation_errors(comfy_host.run_prompt(loader_prompt(node_id, value)))

    assert len(errors) == 1 and f"{value!r} is not one of the choices for" in errors[0], errors
    assert watch.opened() == []


@pytest.mark.skipif(sys.platform != "linux", reason="OpenWatch uses inotify")
@pytest.mark.parametrize("node_id", LOADERS)
def test_a_node_run_without_validation_refuses_the_value_too(layout, watch, node_id):
    """What a linked value (unknown when the prompt is queued) goes through: the node resolves it again."""
    name, others = LOADERS[node_id]
    value = traversal(TRAVERSALS[node_id][2], layout / "outside")
    with pytest.raises(InvalidInputError, match="is not one of the choices for"):
        comfy_host.load_pack()[node_id].execute(**{name: value}, **others)
    assert watch.opened() == []


LATER_FILE_INPUTS = {  # file inputs beside a loader's main one: (node, its other inputs, the input)
    "weights": ("GLMImageARModelLoader", {"model_folder": "GLM-Image", "dtype": "fp32", "device": "cpu"}),
    "lora_name": ("GLMImageLoraLoader", {"model": ["2", 0], "strength_model": 1.0}),
}


@pytest.mark.skipif(sys.platform != "linux", reason="OpenWatch uses inotify")
@pytest.mark.parametrize("name", LATER_FILE_INPUTS)
@pytest.mark.parametrize("template", ["../outside/x.safetensors", "{up}/x.safetensors", "{abs}/x.safetensors"])
def test_the_ar_weights_file_and_the_lora_file_go_through_the_same_check(layout, watch, name, template):
    node_id, others = LATER_FILE_INPUTS[name]
    value = traversal(template, layout / "outside")
    prompt = {
        "1": {"class_type": node_id, "inputs": {name: value, **others}},
        "2": {"class_type": "GLMImageDiTLoader", "inputs": {"dit": "GLM-Image", "weight_dtype": "default"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }
    errors = validation_errors(comfy_host.run_prompt(prompt))
    assert len(errors) == 1 and f"{value!r} is not one of the choices for" in errors[0], errors
    assert watch.opened() == []


def test_the_error_for_an_unknown_choice_says_where_the_choices_come_from(layout):
    (error,) = validation_errors(comfy_host.run_prompt(loader_prompt("GLMImageDiTLoader", "GLM-Imag")))
    assert "'GLM-Imag' is not one of the choices for the DiT (GlmImageTransformer2DModel)" in error
    assert "GLM-Image folders with transformer/ in glm_image and .safetensors files in diffusion_models" in error
    assert "Pick one from the list" in error


# --- symlinks ---------------------------------------------------------------------------------------------------
# A symlink that exists on disk inside a registered folder is the machine owner's choice (weights kept on another
# disk, linked into models/) and is followed, as ComfyUI follows it; what a prompt names must still be an option.


@pytest.mark.vram  # runs a model under ComfyUI's model management
@pytest.mark.parametrize(
    "node_id, value",
    [
        ("GLMImageDiTLoader", "GLM-Image-linked"),
        ("GLMImageDiTLoader", "escape.safetensors"),
        ("GLMImageVAELoader", "GLM-Image-linked"),
        ("GLMImageGlyphEncoderLoader", "GLM-Image-linked"),
        ("GLMImageARModelLoader", "GLM-Image-linked"),
    ],
)
def test_a_model_folder_or_file_linked_from_elsewhere_is_listed_and_loads(layout, node_id, value):
    assert value in FILES[LOADERS[node_id][0]].options()

    run = comfy_host.run_prompt(loader_prompt(node_id, value))

    assert run.success, run.node_errors or run.execution_error()


def test_a_linked_token_file_is_followed_and_checked_like_any_other(layout):
    (error,) = validation_errors(comfy_host.run_prompt(loader_prompt("GLMImageLoadTokens", "escape.glm_tokens")))
    assert error.startswith("escape.glm_tokens is not a valid GLM-Image tokens file: it cannot be read")


def test_a_symlink_into_another_registered_folder_is_followed(layout, tiny_model_dir):
    assert paths.resolve(paths.DIT, "Elsewhere") == str(layout / "glm_image" / "Elsewhere")


def test_every_listed_choice_resolves_under_a_folder_registered_for_it(layout):
    for files in FILES.values():
        for choice in files.options():
            resolved = paths.resolve(files, choice)
            assert any(resolved.startswith(os.path.join(root, "")) for root, _ in files.locations(choice)), choice


@pytest.mark.skipif(sys.platform != "linux", reason="OpenWatch uses inotify")
def test_an_index_naming_a_shard_outside_its_folder_fails_validation_and_opens_nothing(layout, watch):
    (error,) = validation_errors(comfy_host.run_prompt(loader_prompt("GLMImageDiTLoader", "IndexEscape")))

    assert error.startswith(f"transformer/{INDEX} is refused: its entry ") and "is an absolute path" in error
    assert watch.opened() == []


# --- the model listing ----------------------------------------------------------------------------------------------


def test_the_listing_ends_on_a_symlink_loop_and_lists_each_folder_once(layout):
    listed = paths.DIT.options()
    assert listed.count("MissingShard") == 1 and not any(name.startswith("loop/") for name in listed)


@pytest.fixture
def walks(monkeypatch):
    """How many times the listing walked a tree since the fixture started."""
    calls = []
    real_walk = os.walk
    monkeypatch.setattr(os, "walk", lambda *a, **kw: calls.append(a[0]) or real_walk(*a, **kw))
    return calls


def test_a_second_listing_does_not_walk_the_model_folders_again(layout, walks):
    first = paths.DIT.options()
    walked = len(walks)
    assert paths.DIT.options() == first and paths.VAE.options()
    assert len(walks) == walked


def test_a_folder_added_after_a_listing_appears_in_the_next(layout, walks):
    paths.DIT.options()
    added = layout / "glm_image" / "qa" / "Added"
    shutil.copytree(layout / "glm_image" / "MissingShard" / "transformer", added / "transformer")
    try:
        assert "qa/Added" in paths.DIT.options()
    finally:
        shutil.rmtree(layout / "glm_image" / "qa")
    assert "qa/Added" not in paths.DIT.options()


@pytest.mark.parametrize("template", ["../outside/tokens", "{abs}/tokens", "{up}/tokens", "escape/tokens"])
def test_a_save_prefix_that_leaves_the_output_folder_is_refused_at_queue_time(layout, template):
    (layout / "output" / "escape").symlink_to(layout / "outside", target_is_directory=True)
    prompt = {
        "1": {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": "glm_tokens/saved.glm_tokens [output]"}},
        "2": {
            "class_type": "GLMImageSaveTokens",
            "inputs": {"tokens": ["1", 0], "filename_prefix": traversal(template, layout / "outside")},
        },
    }
    try:
        (error,) = validation_errors(comfy_host.run_prompt(prompt), node="2")
    finally:
        (layout / "output" / "escape").unlink()
    assert f"would save to {layout / 'outside'}" in error and "outside the output folder" in error


# --- model files are checked at queue time --------------------------------------------------------------------------


def test_a_missing_shard_fails_validation(layout):
    (error,) = validation_errors(comfy_host.run_prompt(loader_prompt("GLMImageDiTLoader", "MissingShard")))
    assert f"{SHARD} is missing; the index diffusion_pytorch_model.safetensors.index.json lists 3 shards" in error


def test_a_truncated_shard_fails_validation(layout):
    (error,) = validation_errors(comfy_host.run_prompt(loader_prompt("GLMImageDiTLoader", "TruncatedShard")))
    assert f"{SHARD} is truncated or corrupt" in error


@pytest.mark.vram  # runs a model under ComfyUI's model management
def test_a_complete_folder_passes_validation_and_loads(layout):
    run = comfy_host.run_prompt(loader_prompt("GLMImageDiTLoader", "GLM-Image"))
    assert run.success, run.node_errors or run.execution_error()


def test_a_token_file_in_the_output_folder_passes_validation_and_loads(layout):
    run = comfy_host.run_prompt(loader_prompt("GLMImageLoadTokens", "glm_tokens/saved.glm_tokens [output]"))
    assert run.success, run.node_errors or run.execution_error()


# --- a real server --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(layout, tiny_model_dir):
    model_paths = {
        "glm_image": [str(tiny_model_dir.parent), str(layout / "glm_image")],
        "diffusion_models": str(layout / "diffusion_models"),
    }
    with comfy_host.comfy_server(model_paths) as url:
        yield url


@pytest.mark.server
@pytest.mark.skipif(sys.platform != "linux", reason="OpenWatch uses inotify")
def test_the_server_refuses_every_traversal_value_and_opens_no_file_outside_the_roots(layout, server):
    """On `main.py --cpu`: the climbing values (its input/ and output/ are its own, so only the values that climb
    from anywhere or are absolute apply)."""
    outside = layout / "outside"
    cases = [
        (node, traversal(t, outside)) for node, ts in TRAVERSALS.items() for t in ts if t.startswith(("{up}", "{abs}"))
    ]
    watch = OpenWatch(outside)
    try:
        refusals = []
        for node_id, value in cases:
            with pytest.raises(RuntimeError, match="ComfyUI rejected the prompt") as rejected:
                comfy_host.server_run_prompt(server, loader_prompt(node_id, value))
            refusals.append(str(rejected.value))
        opened = watch.opened()
    finally:
        watch.close()
    assert len(cases) >= 12
    assert opened == []
    assert not [r for r in refusals if CANARY in r or "is not one of the choices" not in r]


@pytest.mark.server
def test_a_broken_dit_folder_is_reported_when_the_prompt_is_queued_not_after_the_ar(server):
    """The text-to-image example on the tiny model with a DiT folder that lacks a shard: ComfyUI answers the queue
    request with the error (nothing runs), in well under the AR's time."""
    import json

    prompt = json.loads((Path(__file__).parent / "workflows" / "text_to_image.json").read_text())
    prompt["1"]["inputs"].update(dtype="fp32", device="cpu")
    prompt["5"]["inputs"]["dit"] = "MissingShard"

    start = time.monotonic()
    with pytest.raises(RuntimeError, match=f"{SHARD} is missing"):
        comfy_host.server_run_prompt(server, prompt)
    seconds = time.monotonic() - start

    print(f"queue -> error with a broken DiT folder: {seconds:.3f} s")
    assert seconds < 2.0
