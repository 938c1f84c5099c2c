// GLM-Image prompt facts for the front end, with no browser or ComfyUI dependency: the extension (glm_image.js)
// imports it in the page, tests/test_web_logic.py runs it under Node against the Python implementation.
// Mirrors glm_image_core/glyph.py (extract_glyph_texts), glm_image_core/ar.py (ar_geometry),
// glm_image_core/sizes.py (check_image_size) and nodes/encode_nodes.py (glyph_spans, override lines):
// change both sides together, the consistency test fails otherwise.

// The four quote styles in the order the spans are encoded: every '...' span first, then “...”, then "...",
// then 「...」 (grouped by style, not by position in the prompt).
export const GLYPH_QUOTES = [
  { open: "'", close: "'", pattern: /'([^']*)'/gu },
  { open: "\u201c", close: "\u201d", pattern: /\u201c([^\u201c\u201d]*)\u201d/gu },
  { open: '"', close: '"', pattern: /"([^"]*)"/gu },
  { open: "\u300c", close: "\u300d", pattern: /\u300c([^\u300c\u300d]*)\u300d/gu },
];

export const SIZE_MULTIPLE = 32; // pixels per AR grid token
export const MIN_SIDE = 512;
export const MAX_SIDE = 2048;

/** The text inside quotes, as extract_glyph_texts returns it: `'Hello' and “World”` -> ["Hello", "World"]. */
export function extractGlyphTexts(prompt) {
  return GLYPH_QUOTES.flatMap(({ pattern }) => [...String(prompt).matchAll(pattern)].map((m) => m[1]));
}

/** Quote characters that no span uses, per style: [{ open, close, count }] (empty when every quote is paired). */
export function unmatchedQuotes(prompt) {
  const text = String(prompt);
  const found = [];
  for (const { open, close, pattern } of GLYPH_QUOTES) {
    const chars = [...text].filter((c) => c === open || c === close).length;
    const count = chars - 2 * [...text.matchAll(pattern)].length;
    if (count > 0) found.push({ open, close, count });
  }
  return found;
}

// str.splitlines() boundaries and str.isspace() characters of Python, so the override rule matches glyph_spans.
const PY_LINE_BREAK = /\r\n|[\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029]/u;
const PY_NOT_SPACE = /[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]/u;

/** The glyph override's spans: one per line, lines that are only whitespace dropped, the others kept as typed. */
export function overrideGlyphTexts(override) {
  return String(override).split(PY_LINE_BREAK).filter((line) => PY_NOT_SPACE.test(line));
}

/**
 * Why GLM-Image refuses this size (check_image_size), or null when it is fine: { rule, side, value, ... } with rule
 * "whole" (not an integer), "multiple" (+ multiple, lower, upper: the nearest valid sides) or "range" (+ min, max).
 * The panel words it in the user's language (locales/<lang>/main.json, glmImage.size.<rule>).
 */
export function sizeProblem(height, width) {
  for (const [side, value] of [["height", height], ["width", width]]) {
    if (!Number.isInteger(value)) return { rule: "whole", side, value };
    if (value % SIZE_MULTIPLE) {
      const lower = Math.floor(value / SIZE_MULTIPLE) * SIZE_MULTIPLE;
      return { rule: "multiple", side, value, multiple: SIZE_MULTIPLE, lower, upper: lower + SIZE_MULTIPLE };
    }
    if (value < MIN_SIDE || value > MAX_SIDE) return { rule: "range", side, value, min: MIN_SIDE, max: MAX_SIDE };
  }
  return null;
}

/**
 * The AR token grids of a height x width target (ar_geometry), or null where ar_geometry refuses the size (not a
 * positive multiple of 32). numGridTokens is what the AR samples: text-to-image ph*pw + h*w (1280 at 1024x1024),
 * image-to-image (references connected) h*w. numNewTokens is the reference's max_new_tokens, one more for the end
 * token, which is never sampled.
 */
export function arGeometry(height, width, imageToImage = false) {
  if (!Number.isInteger(height) || !Number.isInteger(width) || height <= 0 || width <= 0) return null;
  if (height % SIZE_MULTIPLE || width % SIZE_MULTIPLE) return null;
  const gridH = height / SIZE_MULTIPLE;
  const gridW = width / SIZE_MULTIPLE;
  let previewH = 0;
  let previewW = 0;
  if (!imageToImage) {
    const ratio = gridH / gridW; // the same float operations as ar_geometry, so the truncation agrees
    previewH = Math.trunc(Math.sqrt(ratio) * (SIZE_MULTIPLE / 2));
    previewW = Math.trunc(Math.sqrt(1 / ratio) * (SIZE_MULTIPLE / 2));
  }
  const numGridTokens = previewH * previewW + gridH * gridW;
  return { gridH, gridW, previewH, previewW, numGridTokens, numNewTokens: numGridTokens + 1 };
}
