"""What a user types reaches the pack unchanged, through ComfyUI's real front end: URLs, `//`, `/* */` and `{a|b}`,
inside and outside quotes, typed into Generate Visual Tokens' prompt and Encode's override (tests/browser/
prompt_as_typed.mjs drives headless Chromium). The front end rewrites the text of a widget whose input declares
dynamic prompts (it strips comments and picks one branch of every brace group before queueing); these inputs
declare none. Checked three ways: the body of the POST /prompt, the prompt the server keeps in its history, and the
prompt the AR ran with (the tokens file that Save Visual Tokens wrote).

Needs what tests/test_browser.py needs (Node.js, `npm ci` in tests/browser, Chromium); skipped with the reason when
one is missing. The front end is the installed one, or GLM_IMAGE_FRONT_END_ROOT's as in tests/test_browser.py.
"""

import json
import subprocess

import pytest

from glm_image_core.tokens import read_tokens
from tests import comfy_host
from tests.test_browser import BROWSER, BROWSER_TEST_MARKS, FRONT_END_ROOT

PROMPT = (
    'A poster that reads "Visit https://z.ai today" in red // and a line after the slashes\n'
    'a sign "OPEN /* 24 */ HOURS" under /* a block */ a banner "{OPEN|CLOSED}" and {red|blue} stars'
)
OVERRIDE = "https://z.ai // now\n/* kept */ {A|B}"

pytestmark = BROWSER_TEST_MARKS


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """Type, queue and run once against a fresh server; what the page saw, and the server's output folder."""
    comfy_host.require_comfyui()
    output = tmp_path_factory.mktemp("output")
    argv = ["--output-directory", str(output)] + (["--front-end-root", FRONT_END_ROOT] if FRONT_END_ROOT else [])
    with comfy_host.comfy_server({"glm_image": str(tiny_model_dir.parent)}, timeout=300, extra_argv=argv) as url:
        done = subprocess.run(
            ["node", "prompt_as_typed.mjs", "--url", url, "--prompt", PROMPT, "--override", OVERRIDE],
            cwd=BROWSER,
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ok"], f"{seen.get('error')}\n--- driver log ---\n{done.stderr[-4000:]}"
    return seen, output


def test_the_widgets_hold_what_was_typed(run):
    seen, _ = run
    assert seen["widgets"] == {"prompt": PROMPT, "override": OVERRIDE}


def test_the_queued_prompt_holds_the_text_unchanged(run):
    seen, _ = run
    assert len(seen["sent"]) == 1, seen["sent"]
    nodes = seen["sent"][0]["prompt"]
    assert nodes[str(seen["ids"]["tokens"])]["inputs"]["prompt"] == PROMPT
    assert nodes[str(seen["ids"]["encode"])]["inputs"]["override"] == OVERRIDE


def test_the_server_keeps_the_text_unchanged(run):
    seen, _ = run
    [entry] = seen["history"]
    assert entry["prompt"][str(seen["ids"]["tokens"])]["inputs"]["prompt"] == PROMPT
    assert entry["prompt"][str(seen["ids"]["encode"])]["inputs"]["override"] == OVERRIDE


def test_the_ar_runs_with_the_text_as_typed(run):
    seen, output = run
    assert seen["events"] == [["execution_success", None]]
    [file] = list(output.rglob("*.glm_tokens"))
    assert read_tokens(file).prompt == PROMPT
