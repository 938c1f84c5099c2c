// Drives ComfyUI's front end in headless Chromium for tests/test_browser_prompt.py:
//   node prompt_as_typed.mjs --url http://127.0.0.1:PORT --prompt TEXT --override TEXT
// builds Load AR Model -> Generate Visual Tokens -> Save Visual Tokens (and Load Glyph Encoder -> Encode with its
// override), types TEXT into the prompt box and the override box with the keyboard, presses Run and waits for the
// run to end. Prints one JSON object as the last line of stdout: the widgets' values, the body of the POST /prompt
// the page sent, the prompt the server keeps in its history and the run's events. The Python test asserts.
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    prompt: { type: "string" },
    override: { type: "string" },
    size: { type: "string", default: "512" },
    timeout: { type: "string", default: "300" },
  },
});
const seen = { sent: [] };
const log = (step, data = {}) => console.error(`[prompt_as_typed] ${step} ${JSON.stringify(data)}`);

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "glm-image-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  viewport: { width: 1680, height: 1000 },
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(60_000);
page.on("request", (r) => {
  if (r.method() === "POST" && new URL(r.url()).pathname.endsWith("/prompt")) seen.sent.push(r.postDataJSON());
});

try {
  await page.request.post(`${opts.url}/api/settings`, {
    data: { "Comfy.TutorialCompleted": true, "Comfy.Locale": "en", "Comfy.VueNodes.Enabled": false },
  });
  await page.goto(opts.url);
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph?.registered_node_types?.GLMImageEncode, null, {
    timeout: 120_000,
  });
  seen.frontEnd = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  log("front end loaded", { version: seen.frontEnd });

  const ids = await page.evaluate((size) => {
    const { app, LiteGraph } = window;
    app.graph.clear();
    const add = (type, pos, widgets = {}) => {
      const node = LiteGraph.createNode(type);
      node.pos = pos;
      app.graph.add(node);
      for (const [name, value] of Object.entries(widgets)) node.widgets.find((w) => w.name === name).value = value;
      return node;
    };
    const loader = add("GLMImageARModelLoader", [0, 0], { model_folder: "GLM-Image", dtype: "fp32", device: "cpu" });
    const tokens = add("GLMImageGenerateTokens", [400, 0], { width: size, height: size, seed: 3 });
    const save = add("GLMImageSaveTokens", [900, 0]);
    const glyph = add("GLMImageGlyphEncoderLoader", [0, 500], { encoder: "GLM-Image", dtype: "fp32" });
    const encode = add("GLMImageEncode", [900, 400], { glyph_text: "override" });
    loader.connect(0, tokens, "ar_model");
    tokens.connect(0, save, "tokens");
    tokens.connect(0, encode, "tokens");
    glyph.connect(0, encode, "glyph_encoder");
    for (const w of tokens.widgets) if (w.name === "control_after_generate") w.value = "fixed";
    return { tokens: tokens.id, encode: encode.id };
  }, Number(opts.size));

  /** Type into a node's multiline widget with the keyboard, as a user does. */
  const typeInto = async (nodeId, name, text) => {
    await page.evaluate((nodeId) => {
      const app = window.app;
      app.canvas.ds.scale = 1; // zoomed out, some front ends hide the text boxes
      app.canvas.centerOnNode(app.graph.getNodeById(nodeId));
      app.canvas.setDirty(true, true);
    }, nodeId);
    await page.waitForTimeout(300);
    const box = await page.evaluateHandle(
      ({ nodeId, name }) => window.app.graph.getNodeById(nodeId).widgets.find((w) => w.name === name).element,
      { nodeId, name },
    );
    await box.click();
    await page.keyboard.press("Control+A");
    await page.keyboard.press("Delete");
    await page.keyboard.type(text);
    await page.mouse.click(5, 500); // blur: the widget's value is what was typed
  };
  await typeInto(ids.tokens, "prompt", opts.prompt);
  await typeInto(ids.encode, "override", opts.override);
  seen.widgets = await page.evaluate(({ tokens, encode }) => {
    const value = (id, name) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === name).value;
    return { prompt: value(tokens, "prompt"), override: value(encode, "override") };
  }, ids);
  seen.ids = ids;

  await page.evaluate(() => {
    const api = window.comfyAPI.api.api;
    window.__glmEvents = [];
    for (const type of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(type, ({ detail }) => window.__glmEvents.push([type, detail?.exception_message ?? null]));
    }
  });
  await page.locator("button", { hasText: /^\s*Run\s*$/ }).first().click();
  await page.waitForFunction(() => window.__glmEvents.length > 0, null, { timeout: Number(opts.timeout) * 1000 });
  seen.events = await page.evaluate(() => window.__glmEvents);
  log("run ended", { events: seen.events });
  const history = await (await page.request.get(`${opts.url}/api/history`)).json();
  seen.history = Object.values(history).map((entry) => ({ prompt: entry.prompt[2], outputs: entry.outputs }));
  seen.ok = true;
} catch (e) {
  seen.ok = false;
  seen.error = e.stack ?? String(e);
} finally {
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(seen));
