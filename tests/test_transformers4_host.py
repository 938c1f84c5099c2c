"""ComfyUI with transformers 4 (the stand-in of tests/transformers4.py, installed before ComfyUI imports anything):
the pack loads every node and logs the upgrade message once; a graph with Load GLM-Image AR Model is refused at queue
time with that message; the text-to-image graph from saved visual tokens (glyph encoder, DiT, VAE) still runs.

One subprocess does all of it (transformers must be swapped before ComfyUI imports it) and reports JSON."""

import json
import subprocess
import sys

import pytest

from tests import comfy_host, transformers4

comfy_host.require_comfyui()
pytestmark = pytest.mark.host

SIZE = 512
RUN_ON_TRANSFORMERS4 = r"""
import json, logging, sys
from pathlib import Path

from tests import transformers4

transformers4.install()
from tests import comfy_host

comfy_host.require_comfyui()
import folder_paths
import torch

records = []
handler = logging.Handler(logging.WARNING)
handler.emit = records.append
logging.getLogger().addHandler(handler)
glm = comfy_host.load_pack()
logging.getLogger().removeHandler(handler)

model_root, work, size = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
folder_paths.add_model_folder_path("glm_image", str(model_root))
folder_paths.set_input_directory(str(work))
folder_paths.set_output_directory(str(work))
from glm_image_core.tokens import VisualTokens, write_tokens

ids = torch.randint(0, 16384, (1, (size // 16) ** 2), generator=torch.Generator().manual_seed(0))
tokens = VisualTokens(ids, ids[:, ::4], ids[:, :0], size, size, 'A sign that reads "OPEN"', 0, [])
write_tokens(tokens, str(work / "saved.glm_tokens"))

graph = json.loads((comfy_host.REPO_ROOT / "tests/workflows/text_to_image.json").read_text())
graph["1"]["inputs"].update(dtype="fp32", device="cpu")
graph["2"]["inputs"].update(width=size, height=size)
graph["3"]["inputs"].update(dtype="fp32")
graph["8"]["inputs"].update(steps=2)
with_ar = comfy_host.run_prompt(graph)
graph.pop("1")
graph["2"] = {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": "saved.glm_tokens"}}
from_tokens = comfy_host.run_prompt(graph)
print(json.dumps({
    "nodes": sorted(glm),
    "warnings": [r.getMessage() for r in records],
    "with_ar": {"success": with_ar.success, "node_errors": with_ar.node_errors},
    "from_tokens": {"success": from_tokens.success, "error": from_tokens.execution_error(),
                    "images": len(from_tokens.outputs.get("11", {}).get("images", []))},
}))
"""


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("transformers4")
    done = subprocess.run(
        [sys.executable, "-c", RUN_ON_TRANSFORMERS4, str(tiny_model_dir.parent), str(work), str(SIZE)],
        cwd=comfy_host.REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def upgrade_message_in(text: str) -> bool:
    return f"transformers {transformers4.VERSION}" in text and "-m pip install" in text


def test_every_node_loads(report):
    assert report["nodes"] == sorted(comfy_host.load_pack())


def test_startup_log_has_the_upgrade_message_once(report):
    assert [upgrade_message_in(message) for message in report["warnings"]].count(True) == 1


def test_ar_loader_is_refused_at_queue_time_with_the_message(report):
    assert not report["with_ar"]["success"]
    assert upgrade_message_in(json.dumps(report["with_ar"]["node_errors"]["1"]))


def test_graph_from_saved_tokens_runs(report):
    assert report["from_tokens"]["success"], report["from_tokens"]["error"]
    assert report["from_tokens"]["images"] == 1
