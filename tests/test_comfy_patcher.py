"""The DiT's patcher is what ComfyUI builds for a native model on the running version: CoreModelPatcher (under
dynamic VRAM, ModelPatcherDynamic) whose dynamic weights are the loaded tensors themselves, so loading a DiT holds
it once in host RAM, not twice."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests import allocator, comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.model_patcher  # noqa: E402

from glm_image_core.loading import read_state_dict  # noqa: E402
from glm_image_core.tiny import PUBLISHED_CONFIGS  # noqa: E402

dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
DYNAMIC = comfy_host.DYNAMIC_VRAM
A_GPU = torch.device("cuda", 0)  # a load device that is not the CPU; nothing is moved there before sampling


def load(tiny_model_dir, **model_options):
    folder = tiny_model_dir / "transformer"
    config = json.loads((folder / "config.json").read_text())
    return dit_loading.load_dit_patcher(read_state_dict(folder), config, model_options=model_options)


def test_the_patcher_is_comfyuis_core_patcher(tiny_model_dir):
    patcher = load(tiny_model_dir)
    core = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    # under dynamic VRAM the core class is ModelPatcherDynamic, which builds the plain one for a CPU load device
    assert type(patcher) is (comfy.model_patcher.ModelPatcher if DYNAMIC else core)


class DynamicPatcher(comfy.model_patcher.ModelPatcher):
    """Stands in for ModelPatcherDynamic, which needs comfy-aimdo's native library and so a GPU driver: what the
    loader must honour is the class ComfyUI names CoreModelPatcher and its is_dynamic()."""

    def is_dynamic(self):
        return True


def test_a_dynamic_core_patcher_is_used_and_holds_the_loaded_tensors(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(comfy.model_patcher, "CoreModelPatcher", DynamicPatcher, raising=False)
    folder = tiny_model_dir / "transformer"
    state_dict = read_state_dict(folder, dtype=torch.float32)
    loaded = {key: tensor.data_ptr() for key, tensor in state_dict.items()}
    config = json.loads((folder / "config.json").read_text())
    patcher = dit_loading.load_dit_patcher(state_dict, config, model_options={"dtype": torch.float32})
    assert type(patcher) is DynamicPatcher
    params = patcher.model.diffusion_model.state_dict()
    assert all(params[key].data_ptr() == pointer for key, pointer in loaded.items())  # assigned, not copied


PEAK_SCRIPT = """
import json, sys, threading, time
sys.path.insert(0, {repo!r})
from tests import comfy_host
comfy_host.require_comfyui()
import comfy.model_patcher
import torch
from safetensors.torch import save_file
from glm_image_core.dit import GlmImageTransformer2DModel
from glm_image_core.loading import read_state_dict
from tests.test_comfy_patcher import DynamicPatcher
dit_loading = comfy_host.import_pack_module("nodes.dit_loading")
if {dynamic}:
    comfy.model_patcher.CoreModelPatcher = DynamicPatcher

config = json.loads(open({config!r}).read())
config.update(num_layers=1, num_attention_heads=16)  # the published layout, narrower and shallower: ~300 MB
meta = GlmImageTransformer2DModel(**{{k: v for k, v in config.items() if not k.startswith("_")}}, device="meta")
tensors = {{k: torch.randn(v.shape) * 0.02 for k, v in meta.state_dict().items()}}
save_file(tensors, {file!r})
size = sum(t.numel() * t.element_size() for t in tensors.values())
del tensors, meta

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

base, peak, done = rss(), [0], []
def watch():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.002)
threading.Thread(target=watch, daemon=True).start()
patcher = dit_loading.load_dit_patcher(read_state_dict({file!r}), config, model_options={{"dtype": torch.float32}})
done.append(1)
print(json.dumps({{"ratio": (peak[0] - base) / size, "bytes": size}}))
"""


def loading_peak(tiny_model_dir, tmp_path, dynamic: bool) -> dict:
    """Host RAM held above the start while a few-hundred-MB DiT file is read and loaded, over its bytes."""
    script = PEAK_SCRIPT.format(
        repo=str(comfy_host.REPO_ROOT),
        config=str(PUBLISHED_CONFIGS / "transformer__config.json"),
        file=str(tmp_path / "dit.safetensors"),
        dynamic=dynamic,
    )
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=allocator.measuring_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not DYNAMIC, reason="needs ComfyUI's dynamic VRAM (0.33+, GLM_IMAGE_DYNAMIC_VRAM=1)")
def test_loading_under_dynamic_vram_holds_the_dit_once_in_host_ram(tiny_model_dir, tmp_path):
    dynamic = loading_peak(tiny_model_dir, tmp_path, dynamic=True)
    plain = loading_peak(tiny_model_dir, tmp_path, dynamic=False)
    print(
        f"host RAM peak while loading a {dynamic['bytes'] / 2**20:.0f} MiB DiT: {dynamic['ratio']:.2f}x its bytes "
        f"with the dynamic patcher, {plain['ratio']:.2f}x with the plain one"
    )
    assert dynamic["ratio"] <= 1.3, dynamic
