"""The one place where tests meet ComfyUI: find it, import it CPU-only, load this repo as a custom node pack the way
ComfyUI does, and run API-format prompts in-process or against a `main.py --cpu` server.

Host tests start with `comfy_host.require_comfyui()`, which skips the module when ComfyUI is absent (set
COMFYUI_PATH to a ComfyUI checkout; default /opt/ComfyUI). One pytest process tests one ComfyUI: `.ci/run` runs
`pytest -m host` once per checkout and setting, each in an environment with that ComfyUI's requirements.
GLM_IMAGE_DYNAMIC_VRAM=1 switches on ComfyUI's dynamic VRAM
(`comfy.memory_management.aimdo_enabled`, on by default on NVIDIA GPUs since March 2026) in this process and in the
servers it starts. Everything here is internal ComfyUI API of 0.3.64 to 0.33; keep it in this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

COMFYUI_PATH = Path(os.environ.get("COMFYUI_PATH", "/opt/ComfyUI")).resolve()
DYNAMIC_VRAM = os.environ.get("GLM_IMAGE_DYNAMIC_VRAM") == "1"
REPO_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE_NAME = str(REPO_ROOT).replace(".", "_x_")  # the sys.modules key ComfyUI's load_custom_node uses


def require_comfyui() -> None:
    """Skip the calling test module unless ComfyUI is present; otherwise import it (CPU only, once)."""
    import pytest

    if not (COMFYUI_PATH / "comfy" / "sd.py").is_file():
        pytest.skip(
            f"ComfyUI not found at {COMFYUI_PATH}: set COMFYUI_PATH to a ComfyUI checkout to run the host tests",
            allow_module_level=True,
        )
    _import_comfyui()


def comfyui_version() -> tuple[int, ...]:
    """The version of the ComfyUI under test, e.g. (0, 33, 0)."""
    text = (COMFYUI_PATH / "comfyui_version.py").read_text()
    return tuple(int(part) for part in text.split('__version__ = "')[1].split('"')[0].split("."))


@cache
def _import_comfyui() -> None:
    sys.path.insert(0, str(COMFYUI_PATH))
    from comfy.cli_args import args  # parses no argv: comfy.options.args_parsing defaults to False

    if "comfy.model_management" in sys.modules and not args.cpu:
        raise RuntimeError("comfy.model_management was imported before comfy_host could set args.cpu = True")
    args.cpu = True  # must precede the first import of comfy.model_management (it probes CUDA at import)
    with _package_stubs():
        # As in main.py: ComfyUI's utils/ package first, before nodes.py puts comfy/ (with comfy/utils.py) first on
        # sys.path; then nodes.py, which imports comfy.sd, model_base, controlnet, ...
        importlib.import_module("utils.extra_config")
        import nodes

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))  # + comfy_extras nodes
    if Path(nodes.__file__).resolve() != COMFYUI_PATH / "nodes.py":
        raise RuntimeError(f"`import nodes` found {nodes.__file__}, not ComfyUI's nodes.py (this repo has a nodes/)")
    _set_dynamic_vram()


def _set_dynamic_vram() -> None:
    """What main.py does when comfy-aimdo starts: aimdo's host side (safetensors files are memory-mapped through it),
    the switch by which comfy.ops layers are built empty and take the loaded tensors as they are, and
    CoreModelPatcher = ModelPatcherDynamic (which pages weights on a GPU; for a CPU load device it builds the plain
    ModelPatcher)."""
    if not DYNAMIC_VRAM:
        return
    import comfy.memory_management

    if not hasattr(comfy.memory_management, "aimdo_enabled"):
        raise RuntimeError(f"GLM_IMAGE_DYNAMIC_VRAM=1, but ComfyUI {comfyui_version()} has no dynamic VRAM")
    import comfy_aimdo.control

    if not comfy_aimdo.control.init():
        raise RuntimeError("GLM_IMAGE_DYNAMIC_VRAM=1, but comfy-aimdo did not initialise")
    import comfy.model_patcher

    comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
    comfy.memory_management.aimdo_enabled = True


# --- torchvision, torchaudio ---------------------------------------------------------------------------------------
# ComfyUI imports torchvision (0.3.64 on: comfy.ldm.cascade, cosmos, ace) and torchaudio (0.33: the LTX and ACE audio
# VAEs, audio encoders) at module level, all reached by `import comfy.sd`, but uses them only when one of those
# models is built. The test environment has the CPU torch, and PyPI's torchvision/torchaudio for it fail at import
# ("operator torchvision::nms does not exist"). av: 0.3.64's comfy_api.latest imports it at module level for its video
# types (TorchCompileModel's module imports that), and a bare GPU image may lack it (benchmarks/gpu_check.py). So,
# only for those not installed, a stub package is importable while
# ComfyUI itself is imported and removed afterwards: transformers decides whether to use torchvision image
# processors by `find_spec("torchvision")`, and must keep seeing it as absent.
STUBBED_PACKAGES = ("torchvision", "torchaudio", "av")


class _PackageStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, packages: list[str]):
        self.packages = packages

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        def __getattr__(attr):
            raise AttributeError(f"{module.__name__}.{attr}: a stub in the GLM-Image host tests")

        module.__getattr__ = __getattr__


@contextlib.contextmanager
def _package_stubs():
    missing = [name for name in STUBBED_PACKAGES if importlib.util.find_spec(name) is None]
    if not missing:
        yield
        return
    stub = _PackageStub(missing)
    sys.meta_path.append(stub)
    try:
        yield
    finally:
        sys.meta_path.remove(stub)
        for name in [n for n in sys.modules if n.split(".")[0] in missing]:
            del sys.modules[name]  # ComfyUI's modules keep their reference; nothing else can find it now
        import_utils = sys.modules.get("transformers.utils.import_utils")
        for fn in vars(import_utils).values() if import_utils else ():
            if callable(getattr(fn, "cache_clear", None)):
                fn.cache_clear()  # availability checks answered while the stub was importable


# --- this repo as a custom node pack -------------------------------------------------------------------------------


def import_pack_module(name: str):
    """Import `<pack>.<name>` (e.g. "nodes.vae") with the pack package under the same sys.modules key ComfyUI gives
    it, so the pack's relative imports resolve as they do in ComfyUI. Does not register any nodes."""
    if PACK_MODULE_NAME not in sys.modules:
        init = REPO_ROOT / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(PACK_MODULE_NAME, init)
        else:  # no entry point yet: a bare package over the repo folder
            spec = importlib.machinery.ModuleSpec(PACK_MODULE_NAME, None, is_package=True)
            spec.submodule_search_locations = [str(REPO_ROOT)]
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK_MODULE_NAME] = module
        if spec.loader is not None:
            spec.loader.exec_module(module)
    return importlib.import_module(f"{PACK_MODULE_NAME}.{name}")


@cache
def load_pack() -> dict[str, type]:
    """Load this repo with ComfyUI's own `nodes.load_custom_node` (as `init_external_custom_nodes` does, core node
    ids ignored) and return the node classes it registered, by node id. Raises with ComfyUI's log if it fails."""
    import nodes

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    before = dict(nodes.NODE_CLASS_MAPPINGS)
    try:
        ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT), ignore=set(before), module_parent="custom_nodes"))
    finally:
        logging.getLogger().removeHandler(handler)
    added = {k: v for k, v in nodes.NODE_CLASS_MAPPINGS.items() if before.get(k) is not v}
    if not ok:
        log = "\n".join(r.getMessage() for r in records)
        raise RuntimeError(f"ComfyUI could not load {REPO_ROOT} as a custom node pack:\n{log}")
    return added


# --- running prompts ------------------------------------------------------------------------------------------------


@dataclass
class PromptRun:
    success: bool
    outputs: dict = field(default_factory=dict)  # node id -> UI output ({"images": [...]}, ...), as /history has it
    messages: list = field(default_factory=list)  # (event, data) pairs: execution_start, execution_error, ...
    error: dict | None = None  # validation error, if the prompt did not validate
    node_errors: dict = field(default_factory=dict)

    def execution_error(self) -> dict | None:
        return next((data for event, data in self.messages if event == "execution_error"), None)


class _NoServer:
    """What PromptExecutor needs from PromptServer when nobody is listening."""

    client_id = None
    last_node_id = None
    last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, event, data, sid=None):
        pass


def run_prompt(prompt: dict, prompt_id: str | None = None) -> PromptRun:
    """Validate and execute an API-format prompt in this process, through ComfyUI's own executor, with a fresh cache."""
    import execution

    prompt_id = prompt_id or str(uuid.uuid4())
    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not ok:
        return PromptRun(success=False, error=error, node_errors=node_errors)
    executor = execution.PromptExecutor(_NoServer(), cache_type=execution.CacheType.CLASSIC, **_cache_args())
    executor.execute(prompt, prompt_id, extra_data={}, execute_outputs=outputs)
    return PromptRun(executor.success, executor.history_result["outputs"], executor.status_messages)


def _cache_args() -> dict:
    """PromptExecutor's cache_args (ComfyUI 0.33 reads them even for the classic cache; 0.3.64 has none)."""
    import inspect

    import execution

    if "cache_args" not in inspect.signature(execution.PromptExecutor).parameters:
        return {}
    return {"cache_args": {"lru": 0, "ram": 0, "ram_inactive": 0}}


# --- a real server --------------------------------------------------------------------------------------------------


def _serve(argv: list[str]) -> None:
    """Entry point of the server process: ComfyUI's main.py, with the torchvision stub while ComfyUI imports."""
    os.chdir(COMFYUI_PATH)
    sys.path.insert(0, str(COMFYUI_PATH))
    sys.argv = [str(COMFYUI_PATH / "main.py"), *argv]
    import comfy.options

    comfy.options.enable_args_parsing()
    with _package_stubs():  # main.py's own imports then find these imported
        importlib.import_module("utils.extra_config")
        importlib.import_module("nodes")
    _set_dynamic_vram()
    import runpy

    runpy.run_path(sys.argv[0], run_name="__main__")


@contextlib.contextmanager
def comfy_server(
    model_paths: dict[str, str | list[str]] | None = None, timeout: float = 120.0, extra_argv: Sequence[str] = ()
):
    """Start `main.py --cpu` on a free localhost port with this repo as its only custom node pack and
    `model_paths` ({"vae": "/dir", "glm_image": [...]}) as extra model folders, plus `extra_argv` (e.g.
    ["--front-end-root", dir]); yield the base URL; kill it after."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "custom_nodes").mkdir()
        (tmp / "user").mkdir()  # settings and database of this server, not of the ComfyUI install
        (tmp / "input").mkdir()  # its own input/ (LoadImage lists it; uploads land there)
        (tmp / "custom_nodes" / "glm_image_nodes").symlink_to(REPO_ROOT, target_is_directory=True)
        section = {"custom_nodes": str(tmp / "custom_nodes")}
        for key, paths in (model_paths or {}).items():
            section[key] = "\n".join([paths] if isinstance(paths, str) else paths)
        (tmp / "extra_model_paths.yaml").write_text(json.dumps({"glm_image_tests": section}))  # JSON is YAML
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        argv = [
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-auto-launch",
            "--extra-model-paths-config",
            str(tmp / "extra_model_paths.yaml"),
            "--disable-api-nodes",
            "--output-directory",
            str(tmp / "output"),
            "--input-directory",
            str(tmp / "input"),
            "--temp-directory",
            str(tmp),
            "--user-directory",
            str(tmp / "user"),
            *extra_argv,
        ]
        boot = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import comfy_host; comfy_host._serve(sys.argv[1:])"
        log = open(tmp / "server.log", "w+")
        proc = subprocess.Popen([sys.executable, "-c", boot, *argv], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"ComfyUI server did not come up (exit code {proc.poll()}):\n{log.read()}")
                try:
                    urllib.request.urlopen(f"{url}/object_info/KSampler", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError):
                    time.sleep(0.5)
            yield url
        finally:
            proc.kill()
            proc.wait()
            log.close()


def server_upload(url: str, name: str, data: bytes) -> dict:
    """Upload a file into the server's input/ as the front end does (`POST /upload/image`, multipart); returns
    ComfyUI's answer ({"name", "subfolder", "type"})."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return json.load(urllib.request.urlopen(urllib.request.Request(f"{url}/upload/image", body, headers)))


def server_run_prompt(url: str, prompt: dict, timeout: float = 300.0) -> dict:
    """POST an API-format prompt and poll /history until it finishes; return its history entry ({"outputs",
    "status", ...}). A prompt that fails validation raises with ComfyUI's 400 answer."""
    body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4())}).encode()
    request = urllib.request.Request(f"{url}/prompt", body, {"Content-Type": "application/json"})
    try:
        prompt_id = json.load(urllib.request.urlopen(request))["prompt_id"]
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"ComfyUI rejected the prompt: {e.read().decode()}") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        history = json.load(urllib.request.urlopen(f"{url}/history/{prompt_id}"))
        if prompt_id in history:  # written once the prompt has finished, successfully or not
            return history[prompt_id]
        time.sleep(0.25)
    raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout} s")
