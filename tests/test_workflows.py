"""The example workflows: `example_workflows/*.json` (the UI format the front end loads as templates) and their API
twins in `tests/workflows/` agree node for node, link for link and value for value; every example runs in ComfyUI
on the tiny model (in-process, and text-to-image also through a real `main.py --cpu` server); saved visual tokens
reproduce the image without the AR; and the pack imports cleanly in ComfyUI's own startup check."""

import io
import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import comfy_host, locales
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.heavy]  # real servers, every example run

import folder_paths  # noqa: E402

import nodes  # noqa: E402
from glm_image_core.glyph import GLYPH_QUOTE_PATTERNS  # noqa: E402

EXAMPLES = comfy_host.REPO_ROOT / "example_workflows"
TWINS = Path(__file__).parent / "workflows"
STEMS = ["text_to_image", "text_rendering", "edit_single_reference", "edit_multi_reference"]
PACK_FOLDER = "glm_image_nodes"  # the pack's folder name under custom_nodes in comfy_host's servers

# Test runs: the examples as shipped, except fp32 on the CPU, a small size and 2 steps ("simple" at 2 steps is
# exactly the reference schedule). Text rendering runs portrait so that a width/height swap shows.
RUN_SIZES = {stem: (512, 512) for stem in STEMS} | {"text_rendering": (512, 768)}  # (width, height)
RUN_STEPS = 2


def load(folder: Path, stem: str) -> dict:
    return json.loads((folder / f"{stem}.json").read_text(encoding="utf-8"))


# --- UI workflow -> API prompt ---------------------------------------------------------------------------------------

FRONTEND_ONLY_NODES = {"Note", "MarkdownNote"}  # no backend class: the front end leaves them out of the prompt
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


class WorkflowError(ValueError):
    """The UI workflow is inconsistent, or uses something this converter does not handle."""


def node_inputs(class_type: str) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every input, in the order /object_info's input_order gives (required, optional)."""
    input_types = nodes.NODE_CLASS_MAPPINGS[class_type].INPUT_TYPES()
    return [
        (name, spec[0], spec[1] if len(spec) > 1 else {})
        for section in ("required", "optional")
        for name, spec in input_types.get(section, {}).items()
    ]


def is_widget(kind, options: dict) -> bool:
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(class_type: str) -> list[tuple[str, str]]:
    """The node's widgets in the order the front end saves their values, as (input name, role). Role "value" is
    the input's value; "control" (control_after_generate, after a seed) and "upload" (LoadImage's upload button)
    are front-end-only widgets whose values are saved too but never sent to the server."""
    slots = []
    for name, kind, options in node_inputs(class_type):
        if not is_widget(kind, options):
            continue
        combo = isinstance(kind, list) or kind == "COMBO"
        slots.append((name, "value"))
        # the front end's rule: an INT named seed/noise_seed gets the control unless the input says otherwise
        if options.get("control_after_generate", kind == "INT" and name in ("seed", "noise_seed")):
            slots.append((name, "control"))
        if combo and options.get("image_upload"):
            slots.append((name, "upload"))
    return slots


def output_types(class_type: str) -> list[tuple[str, str]]:
    cls = nodes.NODE_CLASS_MAPPINGS[class_type]
    return list(zip(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES, cls.RETURN_TYPES))


def outputs_match(saved: list[dict], defined: list[tuple[str, str]]) -> bool:
    """A node's saved output sockets against its definition. ComfyUI appends outputs to stock nodes over time
    (SaveImage gained an IMAGE output in 0.33) and the front end loads a saved node with fewer or more unlinked
    trailing outputs, so one file serves both: the common outputs must agree, the others must be unlinked."""
    common = min(len(saved), len(defined))
    extra = saved[common:]
    return [(s["name"], s["type"]) for s in saved[:common]] == defined[:common] and not any(s["links"] for s in extra)


def ui_to_api(ui: dict) -> dict:
    """What the front end's "Export (API)" makes of a saved workflow, checking the UI file's own consistency on the
    way (link table vs. sockets, sockets vs. the node definitions). Handles what the examples use: active nodes,
    notes and links; muted/bypassed nodes, reroutes, primitives and subgraphs raise WorkflowError."""
    nodes_by_id = {node["id"]: node for node in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    if len(nodes_by_id) != len(ui["nodes"]) or len(links) != len(ui["links"]):
        raise WorkflowError("node or link ids are not unique")
    if ui["last_node_id"] < max(nodes_by_id) or ui["last_link_id"] < max(links, default=0):
        raise WorkflowError("last_node_id / last_link_id is below an id in use: the front end would reuse it")
    used_links = []
    prompt = {}
    for node in ui["nodes"]:
        nid, class_type = node["id"], node["type"]
        if class_type in FRONTEND_ONLY_NODES:
            continue
        if class_type not in nodes.NODE_CLASS_MAPPINGS:
            raise WorkflowError(f"node {nid}: unknown node type {class_type}")
        if node["mode"] != 0:
            raise WorkflowError(f"node {nid}: mode {node['mode']} (muted/bypassed) is not handled")

        slots, values = widget_slots(class_type), node.get("widgets_values", [])
        if len(values) != len(slots):
            raise WorkflowError(f"node {nid} ({class_type}): {len(values)} widgets_values for the widgets {slots}")
        inputs = {}
        for (name, role), value in zip(slots, values):
            if role == "value":
                inputs[name] = value
            elif role == "control" and value not in CONTROL_VALUES:
                raise WorkflowError(f"node {nid}: {value!r} after {name} is not a control_after_generate value")
            elif role == "upload" and value != "image":
                raise WorkflowError(f"node {nid}: {value!r} after {name} is not the upload widget's value 'image'")

        sockets = [(name, kind) for name, kind, options in node_inputs(class_type) if not is_widget(kind, options)]
        if [(s["name"], s["type"]) for s in node["inputs"]] != sockets:
            raise WorkflowError(f"node {nid} ({class_type}): input sockets {node['inputs']}, expected {sockets}")
        if not outputs_match(node["outputs"], output_types(class_type)):
            raise WorkflowError(
                f"node {nid} ({class_type}): outputs {node['outputs']}, expected {output_types(class_type)}"
            )
        for index, socket in enumerate(node["inputs"]):
            if socket["link"] is None:
                continue
            if socket["link"] not in links:
                raise WorkflowError(f"node {nid}.{socket['name']}: link {socket['link']} is not in the link table")
            link_id, source, source_slot, target, target_slot, link_type = links[socket["link"]]
            source_outputs = nodes_by_id[source]["outputs"] if source in nodes_by_id else []
            if (
                (target, target_slot) != (nid, index)
                or link_type != socket["type"]
                or source_slot >= len(source_outputs)
                or source_outputs[source_slot]["type"] != link_type
                or link_id not in (source_outputs[source_slot]["links"] or [])
            ):
                raise WorkflowError(f"link {links[socket['link']]} does not match node {nid}.{socket['name']}")
            used_links.append(link_id)
            inputs[socket["name"]] = [str(source), source_slot]

        title = node.get("title") or nodes.NODE_DISPLAY_NAME_MAPPINGS.get(class_type, class_type)
        prompt[str(nid)] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
    if sorted(used_links) != sorted(links):
        raise WorkflowError(f"links not used exactly once by an input: {sorted(set(links) ^ set(used_links))}")
    return prompt


def twin_differences(ui: dict, api: dict) -> list[str]:
    """How an API twin differs from what its UI workflow exports to; [] when they agree."""
    try:
        exported = ui_to_api(ui)
    except WorkflowError as e:
        return [f"UI workflow: {e}"]
    if sorted(exported) != sorted(api):
        return [f"node ids: UI {sorted(exported, key=int)}, API {sorted(api, key=int)}"]
    differences = []
    for nid, node in exported.items():
        twin = api[nid]
        for key in ("class_type", "_meta"):
            if node[key] != twin.get(key):
                differences.append(f"node {nid} {key}: UI {node[key]!r}, API {twin.get(key)!r}")
        for name in sorted(node["inputs"].keys() | twin["inputs"].keys()):
            ours, theirs = node["inputs"].get(name, "<missing>"), twin["inputs"].get(name, "<missing>")
            if ours != theirs or type(ours) is not type(theirs):
                differences.append(f"node {nid} ({node['class_type']}).{name}: UI {ours!r}, API {theirs!r}")
    return differences


# --- the twins agree ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_nodes():
    """The pack registered in ComfyUI (node definitions for the converter; nothing loaded or run)."""
    return comfy_host.load_pack()


def test_every_example_has_an_api_twin():
    assert sorted(p.stem for p in EXAMPLES.glob("*.json")) == sorted(STEMS)
    assert sorted(p.stem for p in TWINS.glob("*.json")) == sorted(STEMS)


@pytest.mark.parametrize("stem", STEMS)
def test_api_twin_equals_the_ui_workflow(pack_nodes, stem):
    assert twin_differences(load(EXAMPLES, stem), load(TWINS, stem)) == []


def _set_widget(ui, node_id, index, value):
    next(n for n in ui["nodes"] if n["id"] == node_id)["widgets_values"][index] = value


def _swap_width_height(ui, api):
    values = next(n for n in ui["nodes"] if n["id"] == 2)["widgets_values"]
    values[1], values[2] = values[2], values[1]  # GenerateTokens: prompt, width, height, ...


ALTERATIONS = {
    "api widget value": lambda ui, api: api["8"]["inputs"].update(cfg=2.0),
    "api widget type": lambda ui, api: api["8"]["inputs"].update(steps="50"),
    "api link slot": lambda ui, api: api["8"]["inputs"].update(negative=["4", 0]),
    "api link source": lambda ui, api: api["10"]["inputs"].update(vae=["5", 0]),
    "api extra input": lambda ui, api: api["7"]["inputs"].update(extra=1),
    "api missing input": lambda ui, api: api["4"]["inputs"].pop("override"),
    "api class type": lambda ui, api: api["10"].update(class_type="VAEDecodeTiled"),
    "api title": lambda ui, api: api["12"]["_meta"].update(title="Save"),
    "api missing node": lambda ui, api: api.pop("12"),
    "ui widget value": lambda ui, api: _set_widget(ui, 8, 3, 2.0),  # KSampler: seed, control, steps, cfg
    "ui width/height swapped": _swap_width_height,
    "ui control value dropped": lambda ui, api: next(n for n in ui["nodes"] if n["id"] == 2)["widgets_values"].pop(4),
    "ui control value invalid": lambda ui, api: _set_widget(ui, 2, 4, 0.9),
    "ui link slot": lambda ui, api: next(link for link in ui["links"] if link[3] == 8 and link[4] == 2).__setitem__(
        2, 0
    ),
    "ui link unused": lambda ui, api: (ui["links"].append([99, 2, 0, 7, 0, "GLM_TOKENS"]), ui.update(last_link_id=99)),
}


@pytest.mark.parametrize("alteration", ALTERATIONS)
def test_an_altered_twin_is_detected(pack_nodes, alteration):
    ui, api = load(EXAMPLES, "text_rendering"), load(TWINS, "text_rendering")
    assert twin_differences(ui, api) == []
    ALTERATIONS[alteration](ui, api)
    assert twin_differences(ui, api) != []


def test_text_rendering_prompt_quotes_in_every_style():
    (tokens_node,) = [n for n in load(TWINS, "text_rendering").values() if n["class_type"] == "GLMImageGenerateTokens"]
    prompt = tokens_node["inputs"]["prompt"]
    assert all(pattern.search(prompt) for pattern in GLYPH_QUOTE_PATTERNS), prompt


@pytest.mark.parametrize("stem", STEMS)
def test_every_image_an_example_loads_ships_with_comfyui(stem):
    """A template must run as shipped: its Load Image nodes name files a fresh ComfyUI install has in input/."""
    shipped = {p.name for p in (comfy_host.COMFYUI_PATH / "input").iterdir()}
    loaded = {n["inputs"]["image"] for n in load(TWINS, stem).values() if n["class_type"] == "LoadImage"}
    assert loaded <= shipped


@pytest.mark.parametrize("stem", STEMS)
def test_empty_latent_takes_its_size_from_the_tokens(stem):
    """So the runs below leave its width/height at the example's values: a wrong size would show."""
    graph = load(TWINS, stem)
    for node in graph.values():
        if node["class_type"] == "GLMImageEmptyLatent":
            assert graph[node["inputs"]["tokens"][0]]["class_type"] == "GLMImageGenerateTokens"


# --- the examples run -----------------------------------------------------------------------------------------------


def small_prompt(stem: str) -> dict:
    """The example's API twin at a CPU test size: fp32, the CPU, RUN_SIZES, RUN_STEPS; nothing else changed."""
    return example_prompt(stem, *RUN_SIZES[stem], RUN_STEPS)


def reference_images() -> dict[str, Image.Image]:
    """A small image for every LoadImage file name the examples use (the AR processor resizes them)."""
    images = {}
    for stem in STEMS:
        for node in load(TWINS, stem).values():
            if node["class_type"] == "LoadImage":
                name = node["inputs"]["image"]
                rng = np.random.default_rng(len(images))
                pixels = np.linspace(0, 255, 160 * 96 * 3).reshape(96, 160, 3) * rng.uniform(0.3, 1.0, 3)
                images[name] = Image.fromarray(pixels.astype(np.uint8))
    return images


@pytest.fixture(scope="module")
def host(pack_nodes, tiny_model_dir, tmp_path_factory):
    """The tiny GLM-Image folder under a glm_image root; input/ holds the examples' images; output/ is a temp dir."""
    folder_paths.add_model_folder_path("glm_image", str(tiny_model_dir.parent))
    previous = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    input_dir, output_dir = tmp_path_factory.mktemp("input"), tmp_path_factory.mktemp("output")
    for name, image in reference_images().items():
        image.save(input_dir / name)
    folder_paths.set_input_directory(str(input_dir))
    folder_paths.set_output_directory(str(output_dir))
    yield output_dir
    folder_paths.set_input_directory(previous[0])
    folder_paths.set_output_directory(previous[1])


@pytest.fixture(scope="module")
def run_example(host):
    """Runs an example in-process once (the executor caches nothing between prompts) and keeps the result."""
    runs = {}

    def run(stem: str):
        if stem not in runs:
            graph = small_prompt(stem)
            runs[stem] = graph, comfy_host.run_prompt(graph)
        return runs[stem]

    return run


def saved_image(graph: dict, run, output: Path) -> Image.Image:
    (save_id,) = [nid for nid, node in graph.items() if node["class_type"] == "SaveImage"]
    (image,) = run.outputs[save_id]["images"]
    return Image.open(output / image["subfolder"] / image["filename"])


@pytest.mark.vram  # runs a model under ComfyUI's model management
@pytest.mark.parametrize("stem", STEMS)
def test_example_makes_an_image_on_the_tiny_model(run_example, host, stem):
    graph, run = run_example(stem)
    assert run.success, run.error or run.node_errors or run.execution_error()
    image = saved_image(graph, run, host)
    assert image.size == RUN_SIZES[stem]
    assert np.asarray(image, dtype=np.float32).std() > 1  # not a constant image


def test_text_rendering_saves_its_visual_tokens(run_example, host):
    graph, run = run_example("text_rendering")
    (save_id,) = [nid for nid, node in graph.items() if node["class_type"] == "GLMImageSaveTokens"]
    (message,) = run.outputs[save_id]["text"]
    saved = message.removeprefix("saved ")
    assert saved.startswith(graph[save_id]["inputs"]["filename_prefix"]), message
    assert (host / saved).is_file()


@pytest.mark.vram  # runs a model under ComfyUI's model management
def test_saved_tokens_reproduce_the_image_without_the_ar(run_example, host):
    """The text-rendering graph with Load Visual Tokens in place of the AR (its size linked into ModelSampling)."""
    first_graph, first = run_example("text_rendering")
    (save_id,) = [nid for nid, node in first_graph.items() if node["class_type"] == "GLMImageSaveTokens"]
    saved = first.outputs[save_id]["text"][0].removeprefix("saved ")

    graph = small_prompt("text_rendering")
    ar_stage = {"GLMImageARModelLoader", "GLMImageGenerateTokens", "GLMImageSaveTokens"}
    (tokens_id,) = [nid for nid, node in graph.items() if node["class_type"] == "GLMImageGenerateTokens"]
    graph = {nid: node for nid, node in graph.items() if node["class_type"] not in ar_stage}
    graph["100"] = {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": f"{saved} [output]"}}
    for node in graph.values():
        node["inputs"].update({k: ["100", 0] for k, v in node["inputs"].items() if v == [tokens_id, 0]})
        if node["class_type"] == "GLMImageModelSampling":
            node["inputs"].update(width=["100", 1], height=["100", 2])

    second = comfy_host.run_prompt(graph)
    assert second.success, second.error or second.node_errors or second.execution_error()
    assert not any(node["class_type"] in ar_stage for node in graph.values())
    reloaded = np.asarray(saved_image(graph, second, host))
    assert np.array_equal(reloaded, np.asarray(saved_image(first_graph, first, host)))


# --- a real ComfyUI -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with comfy_host.comfy_server(model_paths={"glm_image": str(tiny_model_dir.parent)}) as url:
        yield url


@pytest.mark.server
def test_server_lists_and_serves_the_example_workflows(server):
    templates = json.load(urllib.request.urlopen(f"{server}/workflow_templates"))
    assert sorted(templates[PACK_FOLDER]) == sorted(STEMS)
    for stem in STEMS:
        served = json.load(urllib.request.urlopen(f"{server}/api/workflow_templates/{PACK_FOLDER}/{stem}.json"))
        assert served == load(EXAMPLES, stem)


@pytest.mark.server
@pytest.mark.parametrize("stem", STEMS)
def test_server_serves_the_template_thumbnail_the_template_browser_asks_for(server, stem):
    with urllib.request.urlopen(f"{server}/api/workflow_templates/{PACK_FOLDER}/{stem}.jpg") as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        body = response.read()
    assert len(body) < 60_000  # a card picture, not a download
    thumbnail = Image.open(io.BytesIO(body))
    assert thumbnail.format == "JPEG" and thumbnail.size[0] == thumbnail.size[1] >= 256  # square cards


@pytest.mark.server
def test_server_serves_the_pack_translations_at_i18n(server):
    served = json.load(urllib.request.urlopen(f"{server}/i18n"))
    for lang in ("en", "zh"):
        assert (
            served[lang]["nodeDefs"]["GLMImageGenerateTokens"]
            == locales.read(lang, "nodeDefs.json")["GLMImageGenerateTokens"]
        )
        assert served[lang]["glmImage"] == locales.read(lang, "main.json")["glmImage"]  # the panel's strings


@pytest.mark.server
def test_server_sends_the_search_aliases(server):
    from comfy_api.latest import io as comfy_io

    if "search_aliases" not in getattr(comfy_io.Schema, "__dataclass_fields__", {}):
        pytest.skip(f"ComfyUI {comfy_host.comfyui_version()} has no search aliases in its V3 schema")
    info = json.load(urllib.request.urlopen(f"{server}/object_info/GLMImageGenerateTokens"))
    assert {"glm", "智谱", "ar tokens"} <= set(info["GLMImageGenerateTokens"]["search_aliases"])


@pytest.mark.vram  # runs a model under ComfyUI's model management
@pytest.mark.server
def test_text_to_image_through_a_real_server(server):
    graph = small_prompt("text_to_image")
    history = comfy_host.server_run_prompt(server, graph)
    assert history["status"]["status_str"] == "success", history["status"]
    (save_id,) = [nid for nid, node in graph.items() if node["class_type"] == "SaveImage"]
    (image,) = history["outputs"][save_id]["images"]
    query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image["subfolder"], "type": "output"})
    with urllib.request.urlopen(f"{server}/view?{query}") as response:
        assert Image.open(response).size == RUN_SIZES["text_to_image"]


def test_pack_imports_in_comfyui_quick_test(tmp_path):
    """`main.py --cpu --quick-test-for-ci` with the repo as a custom node: it loads every node, then exits 0 even
    when a pack failed, so the log is the verdict. (comfy_extras nodes missing optional packages log IMPORT FAILED
    too, hence only this pack's lines count.)"""
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    (custom_nodes / PACK_FOLDER).symlink_to(comfy_host.REPO_ROOT, target_is_directory=True)
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(json.dumps({"glm_image_tests": {"custom_nodes": str(custom_nodes)}}))  # JSON is YAML
    boot = f"import sys; sys.path.insert(0, {str(Path(comfy_host.__file__).parent)!r}); import comfy_host; comfy_host._serve(sys.argv[1:])"
    argv = [
        "--cpu",
        "--quick-test-for-ci",
        "--disable-api-nodes",
        "--extra-model-paths-config",
        str(config),
        "--output-directory",
        str(tmp_path / "output"),
        "--temp-directory",
        str(tmp_path),
    ]
    result = subprocess.run([sys.executable, "-c", boot, *argv], capture_output=True, text=True, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    pack_dir = str(custom_nodes / PACK_FOLDER)
    assert not [
        line for line in log.splitlines() if pack_dir in line and re.search("IMPORT FAILED|Cannot import", line)
    ]
    # listed as loaded; ComfyUI 0.33 prefixes its log lines with the level and logger ("INFO:root:")
    assert re.search(rf"^(\w+:\w+:)?\s*[\d.]+ seconds: {re.escape(pack_dir)}$", log, re.MULTILINE), log
