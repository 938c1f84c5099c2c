"""The front end's prompt logic (web/glm_image_logic.js, run by Node) says what the Python code does, on the same inputs:
the glyph spans and their order, the unmatched quotes, the override's lines, the AR token count, the size rule."""

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

from glm_image_core import ar, glyph
from glm_image_core.errors import InvalidInputError
from glm_image_core.sizes import check_image_size

LOGIC = Path(__file__).resolve().parents[1] / "web" / "glm_image_logic.js"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="Node.js (`node`) is not installed: the web logic is not run")

# Reads [[function name, [args...]], ...] as JSON on stdin and prints the results as JSON.
DRIVER = f"""
import * as logic from {LOGIC.as_uri()!r};
let text = "";
process.stdin.setEncoding("utf8");  // decodes across chunk boundaries (a Buffer chunk may end inside a character)
for await (const chunk of process.stdin) text += chunk;
const calls = JSON.parse(text);
process.stdout.write(JSON.stringify(calls.map(([name, args]) => logic[name](...args))));
"""


def run_js(calls: list[tuple[str, list]]) -> list:
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", DRIVER],
        input=json.dumps(calls, ensure_ascii=False),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


PROMPTS = [
    "",
    "no quotes at all",
    "A shop sign that reads 'OPEN' in red",
    "'a' 'b' 'c'",
    "\u201cHello\u201d world",
    'a poster with "double" quotes',
    "\u300c\u591c\u300d\u306e\u8857",  # 「夜」の街
    "mixed: \"B\" then 'A' then \u201cC\u201d then \u300cD\u300d then 'E'",  # order: A E C B D
    "nested: 'outer \"inner\" outer'",
    "nested curly \u201ca \u201cb\u201d c\u201d",
    "nested corner \u300ca\u300cb\u300dc\u300d",
    "unbalanced 'open",
    'unbalanced "open',
    "unbalanced \u201copen",
    "unbalanced close\u201d",
    "unbalanced corner close\u300d",
    "Joe's diner with a sign 'OPEN'",  # the apostrophe opens a span
    "apostrophes only: it's Joe's",
    "empty '' and \"\" and \u201c\u201d and \u300c\u300d",
    "''''",
    "'''",
    '"a"b"c"',
    "CJK \u201c\u4f60\u597d\u4e16\u754c\u201d and \u300c\u6771\u4eac\u300d and '\ud55c\uad6d\uc5b4'",
    "emoji '\U0001f389 party \U0001f389' and \"\U0001f44d\U0001f3fd\" and \u201c\U0001f468\u200d\U0001f469\u200d\U0001f467\u201d",
    "a span over lines 'line one\nline two' and \"tab\there\"",
    "quotes that are not glyph quotes: \u2018single curly\u2019 \uff02fullwidth\uff02 \u00abguillemets\u00bb",
    'A cosy bookshop window at dusk, a hand-painted sign that reads "OPEN LATE" above the door',
]


def random_prompts(count: int, seed: int = 0) -> list[str]:
    """Strings mostly made of quote characters, so nesting and stray quotes are the rule, not the exception."""
    alphabet = ["'", '"', "\u201c", "\u201d", "\u300c", "\u300d", "a", " ", "\u4e2d", "\U0001f600", "\n", "\u2018"]
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(0, 24))) for _ in range(count)]


QUOTE_PAIRS = [("'", "'"), ("\u201c", "\u201d"), ('"', '"'), ("\u300c", "\u300d")]  # GLYPH_QUOTE_PATTERNS' quotes


def python_unmatched(prompt: str) -> list[dict]:
    """Quote characters of each style not used by a span of extract_glyph_texts' patterns."""
    found = []
    for pattern, (open_, close) in zip(glyph.GLYPH_QUOTE_PATTERNS, QUOTE_PAIRS, strict=True):
        assert pattern.match(open_ + close), pattern  # the pair is this pattern's
        count = sum(prompt.count(c) for c in {open_, close}) - 2 * len(pattern.findall(prompt))
        if count > 0:
            found.append({"open": open_, "close": close, "count": count})
    return found


def test_glyph_spans_and_their_order_equal_extract_glyph_texts():
    prompts = PROMPTS + random_prompts(2000)
    spans = run_js([("extractGlyphTexts", [p]) for p in prompts])
    mismatches = [
        (p, js, glyph.extract_glyph_texts(p)) for p, js in zip(prompts, spans) if js != glyph.extract_glyph_texts(p)
    ]
    assert mismatches == []


def test_the_order_is_by_quote_style_not_by_position():
    assert run_js([("extractGlyphTexts", [PROMPTS[7]])]) == [["A", "E", "C", "B", "D"]]


def test_unmatched_quotes_are_the_quote_characters_no_span_uses():
    prompts = PROMPTS + random_prompts(2000, seed=1)
    found = run_js([("unmatchedQuotes", [p]) for p in prompts])
    assert [(p, js) for p, js in zip(prompts, found) if js != python_unmatched(p)] == []
    assert run_js([("unmatchedQuotes", ["unbalanced 'open"])]) == [[{"open": "'", "close": "'", "count": 1}]]


def test_token_counts_equal_ar_geometry_for_every_size():
    sizes = [(h, w) for h in range(32, 2561, 32) for w in range(32, 2561, 32)]
    calls = [("arGeometry", [h, w, i2i]) for h, w in sizes for i2i in (False, True)]
    results = iter(run_js(calls))
    for h, w in sizes:
        for i2i in (False, True):
            geometry = ar.ar_geometry(h, w, image_to_image=i2i)
            js = next(results)
            expected = {
                "gridH": geometry.grid_h,
                "gridW": geometry.grid_w,
                "previewH": geometry.preview_h,
                "previewW": geometry.preview_w,
                "numGridTokens": geometry.num_grid_tokens,
                "numNewTokens": geometry.num_new_tokens,
            }
            assert js == expected, (h, w, i2i)


def test_1024_square_is_1281_tokens_and_1025_with_references():
    t2i, i2i = run_js([("arGeometry", [1024, 1024, False]), ("arGeometry", [1024, 1024, True])])
    assert (t2i["numNewTokens"], i2i["numNewTokens"]) == (1281, 1025)


@pytest.mark.parametrize("height,width", [(0, 1024), (-32, 1024), (1000, 1024), (1024, 1023), (31, 64), (1024, 48)])
def test_sizes_ar_geometry_refuses_give_no_count(height, width):
    with pytest.raises(InvalidInputError):
        ar.ar_geometry(height, width)
    assert run_js([("arGeometry", [height, width, False])]) == [None]


def test_size_problems_are_those_of_check_image_size():
    sizes = [(h, w) for h in range(448, 2129, 16) for w in (512, 1000, 1024, 2048, 2080)]
    problems = run_js([("sizeProblem", [h, w]) for h, w in sizes])
    for (h, w), problem in zip(sizes, problems):
        try:
            check_image_size(h, w)
            refused = False
        except InvalidInputError:
            refused = True
        assert (problem is not None) == refused, (h, w, problem)


@pytest.mark.host
def test_override_lines_equal_the_encode_nodes_rule():
    from tests import comfy_host

    comfy_host.require_comfyui()  # glyph_spans lives in the ComfyUI node layer
    glyph_spans = comfy_host.import_pack_module("nodes.encode_nodes").glyph_spans
    overrides = [
        "OPEN\nLATE",
        "  \n\tX  \n",
        "a\r\nb\rc",
        "\u591c\n\n\u6771\u4eac",
        "\U0001f389",
        " keep  spaces ",
        *(f"a{chr(c)}b" for c in range(0x3001)),
        *(chr(c) for c in range(0x3001)),
        "\ufeff",
        "x\ufeffy",
    ]
    results = run_js([("overrideGlyphTexts", [text]) for text in overrides])
    for text, js in zip(overrides, results):
        try:
            expected = glyph_spans("", "override", text)
        except ValueError:  # nothing to render: the node refuses (InvalidInputError), the front end shows no span
            expected = []
        assert js == expected, repr(text)
