// GLM-Image front-end extension (ComfyUI frontend 1.27 to 1.58 API): a read-only panel at the bottom of the token node
// that shows which quoted spans of the prompt will be rendered as glyphs (in encoding order), quotes no span uses,
// and the AR token count the width/height imply, live as they change; the Encode node shows the spans it will encode.
// The rules themselves live in glm_image_logic.js (tested against the Python code). The panel's words come from the
// pack's locales/<lang>/main.json (key glmImage), which ComfyUI serves at /i18n with the node translations.
//
// The panel is the node's LAST widget and is never serialised: the saved workflow's widgets_values stay exactly the
// backend's widgets, position for position, so workflows load the same with or without this extension.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import {
  SIZE_MULTIPLE,
  arGeometry,
  extractGlyphTexts,
  overrideGlyphTexts,
  sizeProblem,
  unmatchedQuotes,
} from "./glm_image_logic.js";

const TOKENS_NODE = "GLMImageGenerateTokens";
const ENCODE_NODE = "GLMImageEncode";
const SIZED_NODES = [TOKENS_NODE, "GLMImageEmptyLatent", "GLMImageModelSampling", "GLMImageScheduler"];
const OVERRIDE = "override"; // GLMImageEncode's glyph_text choice (nodes/encode_nodes.py OVERRIDE)
const PANEL = "glm_image_info";
const LINE_HEIGHT = 18; // px per line of the panel
const MAX_LINES = 8; // taller content scrolls
const PADDING = 4; // px inside the panel
const MARGIN = 6; // px around the panel (the DOM widget's margin)

const STYLE = `
.glm-image-info { box-sizing: border-box; width: 100%; height: 100%; overflow: auto; padding: ${PADDING}px 6px;
  font: 12px/${LINE_HEIGHT}px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border-radius: 6px; pointer-events: auto; }
.glm-image-info .glm-label { opacity: 0.7; margin-right: 4px; }
.glm-image-info .glm-span { display: inline-block; margin: 1px 3px 1px 0; padding: 0 5px; border-radius: 4px;
  background: rgba(120, 170, 255, 0.22); white-space: pre; }
.glm-image-info .glm-span.glm-empty { opacity: 0.6; font-style: italic; }
.glm-image-info .glm-warn { color: #ffb84d; }
`;

/** The pack's strings by language ({en: {panel, size}, zh: ...}), from /i18n; filled in setup. */
const strings = {};

async function loadStrings() {
  try {
    const all = await (await api.fetchApi("/i18n")).json();
    for (const [lang, messages] of Object.entries(all)) if (messages.glmImage) strings[lang] = messages.glmImage;
  } catch (e) {
    console.warn("GLM-Image: no translations from /i18n, the panel shows its keys", e);
  }
}

/** The user's language as the front end chose it (the Comfy.Locale setting), when the pack has it; else English
 * (null until the strings have come: part of the panel's facts, so it renders again once they are there). */
function language() {
  if (!strings.en) return null;
  const setting = "Comfy.Locale";
  const locale = app.extensionManager?.setting?.get?.(setting) ?? app.ui?.settings?.getSettingValue?.(setting);
  return strings[locale] ? locale : "en";
}

/** The text of `key` ("panel.arTokens") in `lang` (English where missing), its {placeholders} filled from `values`. */
function tr(lang, key, values = {}) {
  const find = (messages) => key.split(".").reduce((tree, part) => tree?.[part], messages);
  const text = find(strings[lang]) ?? find(strings.en) ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text; // user text only ever goes in as text, never as HTML
  return el;
}

function line(parent, label, className) {
  const row = element("div", className);
  if (label) row.append(element("span", "glm-label", label));
  parent.append(row);
  return row;
}

/** Whether any input whose name passes `test` has a link. */
function linked(node, test) {
  return (node.inputs ?? []).some((input, slot) => test(input.name ?? "") && node.isInputConnected(slot));
}

/** The prompt of the token node feeding an Encode node's `tokens` input, when it is linked directly. */
function linkedPrompt(node) {
  const slot = node.findInputSlot?.("tokens") ?? -1;
  const source = slot >= 0 ? node.getInputNode?.(slot) : null;
  return source?.comfyClass === TOKENS_NODE ? widget(source, "prompt")?.value : undefined;
}

function warn(panel, text) {
  line(panel, null, "glm-warn").textContent = `\u26a0 ${text}`;
}

function showSpans(panel, t, label, spans) {
  const row = line(panel, t(label, { count: spans.length }));
  if (!spans.length) row.append(element("span", "glm-span glm-empty", t("panel.noSpans")));
  for (const span of spans) {
    row.append(span ? element("span", "glm-span", span) : element("span", "glm-span glm-empty", t("panel.emptySpan")));
  }
}

/** Everything the panel shows depends on (its JSON is the key that tells whether to render again). */
function facts(node) {
  const lang = language();
  if (node.comfyClass === TOKENS_NODE) {
    const prompt = String(widget(node, "prompt")?.value ?? "");
    const height = widget(node, "height")?.value;
    const width = widget(node, "width")?.value;
    const sizeLinked = linked(node, (name) => name === "width" || name === "height");
    const references = linked(node, (name) => name.startsWith("reference_"));
    return { lang, kind: "tokens", prompt, height, width, sizeLinked, references };
  }
  const mode = widget(node, "glyph_text")?.value;
  if (mode === OVERRIDE) return { lang, kind: "override", override: String(widget(node, "override")?.value ?? "") };
  return { lang, kind: "prompt", prompt: linkedPrompt(node) };
}

function render(panel, f) {
  const t = (key, values) => tr(f.lang, key, values);
  panel.replaceChildren();
  if (f.kind === "tokens") {
    showSpans(panel, t, "panel.glyphs", extractGlyphTexts(f.prompt));
    for (const { open, close, count } of unmatchedQuotes(f.prompt)) {
      warn(panel, t("panel.unmatchedQuotes", { count, quote: open === close ? open : `${open}\u2009${close}` }));
    }
    if (f.sizeLinked) {
      line(panel, t("panel.arTokens")).append(t("panel.sizeLinked"));
      return;
    }
    const problem = sizeProblem(f.height, f.width);
    const geometry = arGeometry(f.height, f.width, f.references);
    if (problem) warn(panel, t(`size.${problem.rule}`, { ...problem, side: t(`size.${problem.side}`) }));
    if (geometry) {
      // the tokens the AR samples: the reference's max_new_tokens counts an end token that is never sampled
      const { previewH, previewW, gridH, gridW, numGridTokens } = geometry;
      const parts = f.references ? [] : [t("panel.previewGrid", { h: previewH, w: previewW })];
      parts.push(t("panel.targetGrid", { h: gridH, w: gridW }));
      const row = line(panel, t("panel.arTokens"));
      row.append(element("b", "glm-token-count", String(numGridTokens)), ` (${parts.join(" + ")})`);
    }
  } else if (f.kind === "override") {
    const spans = overrideGlyphTexts(f.override);
    showSpans(panel, t, "panel.glyphsFromOverride", spans);
    if (!spans.length) warn(panel, t("panel.overrideEmpty"));
  } else if (f.prompt !== undefined) {
    showSpans(panel, t, "panel.glyphsFromPrompt", extractGlyphTexts(f.prompt));
  } else {
    line(panel, t("panel.glyphsOfLinkedPrompt")).append(t("panel.linkedPromptHint"));
  }
}

function addPanel(node) {
  const panel = element("div", "glm-image-info");
  const content = element("div"); // natural height: what the panel needs at the node's current width
  panel.append(content);
  let key = null;
  let contentHeight = 2 * LINE_HEIGHT;
  const height = () => Math.min(contentHeight, MAX_LINES * LINE_HEIGHT) + 2 * PADDING + 2 * MARGIN;
  const info = node.addDOMWidget(PANEL, PANEL, panel, {
    serialize: false, // not sent to the backend ...
    hideOnZoom: false,
    margin: MARGIN,
    getMinHeight: height, // the node grows to fit (LiteGraph gives each DOM widget at least its minimum)
    getMaxHeight: height,
  });
  info.serialize = false; // ... and not saved in widgets_values
  new ResizeObserver(() => {
    if (content.offsetHeight && content.offsetHeight !== contentHeight) {
      contentHeight = content.offsetHeight; // more spans, or the chips wrap differently after a resize
      node.setDirtyCanvas(true, true);
    }
  }).observe(content);
  info.refresh = () => {
    const f = facts(node);
    const next = JSON.stringify(f);
    if (next === key) return;
    key = next;
    render(content, f);
    node.setDirtyCanvas(true, true);
  };
  return info;
}

/**
 * A draw hook for the token node: when the AR preview arrives, the front end gives it a share of the node's height,
 * taken from the prompt box (down to two lines); grow the node so that the prompt keeps the height it had without
 * the preview. A few steps per preview at most, so a node the user resizes afterwards stays as they made it.
 */
function keepPromptHeight(node) {
  const prompt = widget(node, "prompt");
  let kept = null; // the prompt's height (graph units) while the node shows no preview
  let steps = 0;
  return () => {
    const height = prompt?.computedHeight;
    if (typeof height !== "number") return; // Vue nodes: laid out by CSS, the node grows by itself
    if (!node.imgs?.length) {
      kept = height;
      steps = 0;
      return;
    }
    const deficit = kept === null ? 0 : kept - height;
    if (deficit < 2 || steps >= 3) return;
    steps += 1;
    node.setSize([node.size[0], node.size[1] + 2 * deficit]); // the prompt and the preview share what is added
    node.setDirtyCanvas(true, true);
  };
}

/** Call `then` after every change of widget `name` (chained after the widget's own callback). */
function onChange(node, name, then) {
  const w = widget(node, name);
  if (!w) return;
  const own = w.callback;
  w.callback = function (...args) {
    const result = own?.apply(this, args);
    then();
    return result;
  };
}

function refreshAll(graph) {
  for (const node of graph?._nodes ?? graph?.nodes ?? []) widget(node, PANEL)?.refresh();
}

app.registerExtension({
  name: "GLMImage.PromptInfo",
  async setup() {
    document.head.append(element("style", null, STYLE));
    await loadStrings();
  },
  async nodeCreated(node) {
    const type = node.comfyClass;
    if (SIZED_NODES.includes(type)) {
      // The schema's step=32 arrives as options.step2 (what the arrows add and what typed values round to);
      // make sure of it for the sizes, whichever front end built the widget.
      for (const name of ["width", "height"]) {
        const w = widget(node, name);
        if (w?.options && w.options.step2 !== SIZE_MULTIPLE) {
          Object.assign(w.options, { step2: SIZE_MULTIPLE, step: SIZE_MULTIPLE * 10 }); // step: LiteGraph's legacy x10
        }
      }
    }
    if (type !== TOKENS_NODE && type !== ENCODE_NODE) return;
    const info = addPanel(node);
    const update = () => (type === TOKENS_NODE ? refreshAll(node.graph) : info.refresh()); // Encode shows our prompt
    for (const name of ["prompt", "width", "height", "glyph_text", "override"]) onChange(node, name, update);
    const configured = node.onConfigure;
    node.onConfigure = function (...args) {
      const result = configured?.apply(this, args);
      requestAnimationFrame(update); // values loaded from a workflow do not go through the callbacks
      return result;
    };
    const connections = node.onConnectionsChange;
    node.onConnectionsChange = function (...args) {
      const result = connections?.apply(this, args);
      update(); // references connected: image-to-image count; tokens linked: the Encode node's spans
      return result;
    };
    const keepPrompt = type === TOKENS_NODE ? keepPromptHeight(node) : () => {};
    const draw = node.onDrawForeground;
    node.onDrawForeground = function (...args) {
      const result = draw?.apply(this, args);
      info.refresh(); // cheap when nothing changed; catches values set by other extensions or links
      keepPrompt();
      return result;
    };
    requestAnimationFrame(() => info.refresh());
  },
});
