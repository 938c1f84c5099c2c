"""The pack in ComfyUI's real front end: a `main.py --cpu` server with the tiny models, headless Chromium driven by
tests/browser/run.mjs. Opens the text-rendering template from the template browser (the cards show the pack's
pictures), checks the GLM-Image panel (glyph spans, unmatched quotes, AR token count, live updates, size arrows
stepping by 32), runs the workflow at 512x512 and checks the live AR preview on the token node, the prompt box beside it
and the output image on the canvas; then the same template with the UI in Chinese and with Vue nodes ("Nodes 2.0").
Screenshots land in tests/browser/artifacts/; with GLM_IMAGE_UPDATE_DOCS_IMAGES=1 they are also copied to
docs/images/ for the README.

The front end is the one installed with ComfyUI (comfyui-frontend-package), or the one whose `static` folder
GLM_IMAGE_FRONT_END_ROOT names (served with `main.py --front-end-root`), e.g. a newer release from PyPI:
  pip download --no-deps comfyui-frontend-package==1.58.1 -d /tmp/fe && python -m zipfile -e /tmp/fe/*.whl /tmp/fe
  GLM_IMAGE_FRONT_END_ROOT=/tmp/fe/comfyui_frontend_package/static pytest tests/test_browser.py

Needs Node.js, `npm ci` in tests/browser (playwright-core, no browser download) and Chromium (/usr/bin/chromium or
$CHROMIUM); skipped with the reason when one is missing. Takes 2-5 minutes on a small CPU machine.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from glm_image_core import ar, glyph, preview
from tests import comfy_host, locales

REPO = Path(__file__).resolve().parents[1]
BROWSER = REPO / "tests" / "browser"
ARTIFACTS = BROWSER / "artifacts"
DOCS_IMAGES = REPO / "docs" / "images"
TEMPLATE = REPO / "example_workflows" / "text_rendering.json"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FRONT_END_ROOT = os.environ.get("GLM_IMAGE_FRONT_END_ROOT")
STEPS = 4  # sampler steps for the run (the template's 50 take minutes on the CPU with nothing more to show)
# The run at the smallest size (a third of the template's AR tokens), the template's own for the README's pictures
RUN_SIZE = [] if os.environ.get("GLM_IMAGE_UPDATE_DOCS_IMAGES") else ["--size", "512x512"]


def missing_tools() -> str | None:
    if shutil.which("node") is None:
        return "Node.js (`node`) is not installed"
    if not (BROWSER / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed: run `npm ci` in tests/browser"
    if not os.access(CHROMIUM, os.X_OK):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set CHROMIUM)"
    if not TEMPLATE.is_file():
        return f"the template {TEMPLATE.relative_to(REPO)} does not exist yet"
    return None


BROWSER_TEST_MARKS = [  # every test that drives the front end (tests/test_browser_prompt.py too)
    pytest.mark.skipif(missing_tools() is not None, reason=f"browser test: {missing_tools()}"),
    pytest.mark.host,
    pytest.mark.server,
    pytest.mark.browser,
    pytest.mark.heavy,
]
pytestmark = BROWSER_TEST_MARKS


@pytest.fixture(scope="module")
def seen(tiny_model_dir):
    """Run the driver once against a fresh server; what it saw, as JSON."""
    comfy_host.require_comfyui()
    ARTIFACTS.mkdir(exist_ok=True)
    argv = ["--front-end-root", FRONT_END_ROOT] if FRONT_END_ROOT else []
    with comfy_host.comfy_server({"glm_image": str(tiny_model_dir.parent)}, timeout=300, extra_argv=argv) as url:
        command = ["node", "run.mjs", "--url", url, "--out", str(ARTIFACTS), "--steps", str(STEPS), "--timeout", "900"]
        done = subprocess.run(
            command + RUN_SIZE,
            cwd=BROWSER,
            capture_output=True,
            text=True,
            timeout=1200,
        )
    (ARTIFACTS / "run.log").write_text(done.stderr)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"], f"{result.get('error')}\n--- driver log ---\n{done.stderr[-4000:]}"
    if os.environ.get("GLM_IMAGE_UPDATE_DOCS_IMAGES"):
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        for name in ("text_rendering.png", "ar_preview.png"):
            shutil.copyfile(ARTIFACTS / name, DOCS_IMAGES / name)
    return result


def template_node(node_type: str) -> dict:
    return next(n for n in json.loads(TEMPLATE.read_text())["nodes"] if n["type"] == node_type)


def test_panel_shows_the_glyph_spans_of_the_prompt_in_encoding_order(seen):
    spans = glyph.extract_glyph_texts(seen["initial"]["prompt"])
    assert spans, "the text-rendering template should quote some text"
    assert seen["initial"]["spans"] == spans
    assert seen["initial"]["warnings"] == []


def test_panel_shows_the_ar_token_count_of_the_size(seen):
    panel = seen["initial"]
    assert panel["tokenCount"] == str(ar.ar_geometry(panel["height"], panel["width"]).num_grid_tokens)


def test_encode_node_shows_the_spans_of_the_linked_prompt(seen):
    assert seen["encodeInitial"]["spans"] == glyph.extract_glyph_texts(seen["initial"]["prompt"])


def test_panel_follows_typing_in_the_prompt(seen):
    typed = seen["afterTyping"]
    assert "NEW" in typed["spans"] and typed["spans"] == glyph.extract_glyph_texts(typed["prompt"])
    assert any('"' in warning for warning in seen["afterUnbalanced"]["warnings"])
    assert seen["afterRestore"]["spans"] == seen["initial"]["spans"]


def test_size_arrows_step_by_32_and_the_count_follows(seen):
    assert seen["stepOptions"] == {"width": 32, "height": 32}
    width, height = seen["initial"]["width"], seen["initial"]["height"]
    up = seen["afterArrowUp"]
    assert up["width"] == width + 32
    assert up["tokenCount"] == str(ar.ar_geometry(height, width + 32).num_grid_tokens)
    assert seen["afterArrowDown"]["width"] == width


def test_connected_references_give_the_image_to_image_count(seen):
    height, width = seen["initial"]["height"], seen["initial"]["width"]
    assert seen["withReference"]["tokenCount"] == str(
        ar.ar_geometry(height, width, image_to_image=True).num_grid_tokens
    )
    assert seen["referenceRemoved"]["tokenCount"] == seen["initial"]["tokenCount"]


def test_encode_override_shows_its_lines_and_warns_when_empty(seen):
    assert seen["overrideEmpty"]["spans"] == [] and seen["overrideEmpty"]["warnings"]
    assert seen["override"]["spans"] == ["OPEN LATE", "Since 1898"]  # blank lines are dropped, as the node does
    assert seen["overrideOff"]["spans"] == seen["encodeInitial"]["spans"]


def test_panel_is_not_saved_with_the_workflow(seen):
    assert "glm_image_info" in seen["initial"]["widgetNames"]
    assert seen["initial"]["serialized"] == template_node("GLMImageGenerateTokens")["widgets_values"]


def test_the_size_set_for_the_run_reaches_the_panel(seen):
    run = seen["run"]
    assert run["tokenCount"] == str(ar.ar_geometry(run["height"], run["width"]).num_grid_tokens)
    size = [512, 512] if RUN_SIZE else [seen["initial"]["width"], seen["initial"]["height"]]
    assert [run["width"], run["height"]] == size


def test_ar_preview_appears_on_the_token_node_while_it_decodes(seen):
    assert seen["previewMidRun"]["previews"] >= 1 and seen["previewMidRun"]["nodeImages"] > 0
    geometry = ar.ar_geometry(seen["run"]["height"], seen["run"]["width"])
    assert seen["previewFinal"]["sizes"][0] == list(preview.preview_size(geometry))


def test_workflow_runs_and_its_image_shows_on_the_canvas(seen):
    assert ["execution_success", None] in seen["events"]
    assert (seen["output"]["width"], seen["output"]["height"]) == (seen["run"]["width"], seen["run"]["height"])
    assert Path(seen["screenshot"]).is_file()


def test_no_errors_from_the_extension(seen):
    assert seen["pageErrors"] == []


def test_prompt_box_keeps_its_height_beside_the_ar_preview(seen):
    height = seen["promptHeight"]
    assert height["afterRun"] >= 0.95 * height["before"], height


def vue_pass(seen) -> dict:
    if "vue" not in seen:  # run.mjs VUE_NODES_SINCE
        pytest.skip(f"front end {seen['frontEnd']}: its Vue nodes (an early experiment) show no extension DOM widgets")
    return seen["vue"]


@pytest.mark.parametrize("phase", ["en", "zh", "vue"])
def test_template_cards_show_the_pack_pictures(seen, phase):
    cards = seen["cards"] if phase == "en" else (vue_pass(seen) if phase == "vue" else seen[phase])["cards"]
    stems = [p.stem for p in TEMPLATE.parent.glob("*.json")]
    assert cards["requested"] == {f"{stem}.jpg": 200 for stem in stems}
    assert cards["loaded"] >= len(stems)  # drawn, not broken images


def test_template_browser_logs_no_errors(seen):
    assert seen["failedRequests"] == []
    assert [e for e in seen["consoleErrors"] if "workflow_templates" in f"{e['text']} {e['url']}"] == []


def test_chinese_ui_shows_the_nodes_in_chinese(seen):
    zh = locales.read("zh", "nodeDefs.json")
    titles = seen["zh"]["titles"]
    assert titles and titles == {node_id: zh[node_id]["display_name"] for node_id in titles}
    categories = locales.read("zh", "main.json")["nodeCategories"]
    assert seen["zh"]["categories"] == [categories["GLM-Image"]]


def test_chinese_ui_shows_the_panel_in_chinese(seen):
    strings = locales.read("zh", "main.json")["glmImage"]["panel"]
    panel = seen["zh"]["initial"]
    assert strings["arTokens"] in panel["text"] and strings["glyphs"].split("{")[0] in panel["text"]
    assert panel["tokenCount"] == seen["initial"]["tokenCount"] and panel["spans"] == seen["initial"]["spans"]
    assert strings["glyphsFromPrompt"].split("{")[0] in seen["zh"]["encode"]["text"]


def test_vue_nodes_show_the_panel_and_follow_typing(seen):
    vue = vue_pass(seen)
    assert vue["isVue"], "the front end did not draw Vue nodes"
    assert vue["initial"]["spans"] == seen["initial"]["spans"]
    assert vue["initial"]["tokenCount"] == seen["initial"]["tokenCount"]
    assert vue["afterTyping"]["spans"] == glyph.extract_glyph_texts(vue["afterTyping"]["prompt"])
