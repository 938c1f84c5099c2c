// Drives ComfyUI's front end in headless Chromium for tests/test_browser.py:
//   node run.mjs --url http://127.0.0.1:PORT --out DIR [--template text_rendering] [--steps N] [--size WxH]
// opens the pack's template from Workflow templates (its card pictures must load), reads the GLM-Image panel, edits
// prompt and size through the page, queues the workflow, watches the AR preview arrive on the token node and the
// image on the canvas, and saves screenshots in DIR. Then reloads the page twice and opens the template again: with
// the UI in Chinese (Comfy.Locale = zh: node titles and panel), and with Vue nodes ("Nodes 2.0": the panel and
// typing). Prints one JSON object (what it saw) as the last line of stdout; the Python test asserts.
// Needs only playwright-core (no browser download): Chromium comes from the system (/usr/bin/chromium or $CHROMIUM).
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opts } = parseArgs({
  options: {
    url: { type: "string" },
    out: { type: "string" },
    template: { type: "string", default: "text_rendering" },
    pack: { type: "string", default: "glm_image_nodes" },
    steps: { type: "string" },
    size: { type: "string" }, // WxH: the run at this size instead of the template's (every width/height widget)
    timeout: { type: "string", default: "600" },
  },
});
const TOKENS = "GLMImageGenerateTokens";
const VUE_NODES_SINCE = 28; // front end 1.x from which the Vue-node pass runs
const seen = { steps: [] };
const log = (step, data = {}) => {
  seen.steps.push({ step, ...data });
  console.error(`[run.mjs] ${step} ${JSON.stringify(data)}`);
};

/** Retry `fn` (canvas and dialogs settle at their own pace). */
async function retry(what, fn, { tries = 4, pause = 1500 } = {}) {
  for (let i = 1; ; i++) {
    try {
      return await fn();
    } catch (e) {
      if (i >= tries) throw new Error(`${what} failed ${tries} times: ${e.message}`);
      log(`retry ${what}`, { error: e.message.split("\n")[0] });
      await new Promise((r) => setTimeout(r, pause));
    }
  }
}

const profile = fs.mkdtempSync(path.join(os.tmpdir(), "glm-image-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1680, height: 1000 },
});
const page = context.pages()[0] ?? (await context.newPage());
page.setDefaultTimeout(60_000);
const pageErrors = []; // errors raised in this pack's scripts (the front end logs some of its own)
const consoleErrors = []; // every console error, with the phase it came in (the template browser's are checked)
const failedRequests = []; // responses >= 400 for the pack's templates, their pictures and the translations
const pictures = {}; // the pack's template pictures the page asked for: {name: HTTP status}
let phase = "start";
const ours = `/extensions/${opts.pack}/`;
page.on("pageerror", (e) => {
  if ((e.stack ?? "").includes(ours)) pageErrors.push(e.stack);
});
page.on("console", (m) => {
  if (m.type() !== "error") return;
  if ((m.location()?.url ?? "").includes(ours)) pageErrors.push(m.text());
  consoleErrors.push({ phase, text: m.text(), url: m.location()?.url ?? null });
});
page.on("response", (r) => {
  const picture = r.url().match(new RegExp(`/workflow_templates/${opts.pack}/([^/?]+\\.jpg)`));
  if (picture) pictures[decodeURIComponent(picture[1])] = r.status();
  if (r.status() >= 400 && /\/workflow_templates\/|\/i18n/.test(r.url())) failedRequests.push([r.status(), r.url()]);
});

/** Load the front end with these settings (a fresh server has none: tutorial done, so no template dialog opens by
 * itself mid-test; no minimap over the screenshot). */
async function loadFrontEnd(settings) {
  await page.request.post(`${opts.url}/api/settings`, {
    data: { "Comfy.TutorialCompleted": true, "Comfy.Minimap.Visible": false, ...settings },
  });
  await page.goto(opts.url);
  await page.waitForFunction(
    () => window.app?.graph && window.app.extensions?.some((e) => e.name === "GLMImage.PromptInfo"),
    null,
    { timeout: 120_000 },
  );
  seen.frontEnd = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  log("front end loaded", { version: seen.frontEnd });
}

/** The template, through the template browser: Browse Templates -> <pack> -> <template>; returns the node ids and
 * what the pack's cards showed. Opened by its command, which the menu entry runs: the menu moved between 1.27 and
 * 1.49. The pack's button shows its folder name, whatever the language. */
async function openTemplate() {
  let cards = null;
  for (const name of Object.keys(pictures)) delete pictures[name];
  await retry("open template", async () => {
    await page.keyboard.press("Escape");
    await page.evaluate(() => window.app.graph.clear());
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
    const dialog = page.getByRole("dialog").filter({ hasText: opts.pack });
    await dialog.getByText(opts.pack, { exact: true }).click();
    await dialog.getByText(opts.template, { exact: true }).first().waitFor();
    // The cards' pictures: requested by name (1.58 shows them from blob: URLs), drawn once loaded.
    const templates = (await (await page.request.get(`${opts.url}/workflow_templates`)).json())[opts.pack];
    const loaded = await page.waitForFunction((count) => {
      const images = [...document.querySelectorAll("[role=dialog] img")];
      const drawn = images.filter((img) => img.complete && img.naturalWidth > 0).length;
      return drawn >= count && images.every((img) => img.complete) ? drawn : null;
    }, templates.length, { timeout: 15_000 }).then((h) => h.jsonValue());
    cards = { requested: { ...pictures }, loaded };
    await dialog.getByText(opts.template, { exact: true }).first().click();
    await page.waitForFunction((type) => window.app.graph.nodes.some((n) => n.comfyClass === type), TOKENS, {
      timeout: 15_000,
    });
  });
  await page.waitForTimeout(500);
  const ids = await page.evaluate((type) => {
    const nodes = window.app.graph.nodes;
    const id = (t) => nodes.find((n) => n.comfyClass === t)?.id ?? null;
    return { tokens: id(type), encode: id("GLMImageEncode"), sampler: id("KSampler"), save: id("SaveImage") };
  }, TOKENS);
  log("template loaded", { ids, cards });
  return { ids, cards };
}

/** The text box of a node's multiline widget: the DOM widget's element, or the Vue node's textarea (Nodes 2.0). */
const textBox = (nodeId, name) =>
  page.evaluateHandle(({ nodeId, name }) => {
    const vueNode = document.querySelector(`[data-node-id="${nodeId}"]`);
    if (vueNode) return vueNode.querySelector("textarea");
    return window.app.graph.getNodeById(nodeId).widgets.find((w) => w.name === name).element;
  }, { nodeId, name });

try {
  phase = "en";
  await loadFrontEnd({ "Comfy.Locale": "en", "Comfy.VueNodes.Enabled": false });
  const { ids, cards } = await openTemplate();
  seen.cards = cards;

  const panel = (id) =>
    page.evaluate((nodeId) => {
      const node = window.app.graph.getNodeById(nodeId);
      const info = node?.widgets?.find((w) => w.name === "glm_image_info");
      const el = info?.element;
      if (!el) return null;
      const rect = el.getBoundingClientRect();
      return {
        spans: [...el.querySelectorAll(".glm-span:not(.glm-empty)")].map((s) => s.textContent),
        warnings: [...el.querySelectorAll(".glm-warn")].map((s) => s.textContent),
        tokenCount: el.querySelector(".glm-token-count")?.textContent ?? null,
        text: el.innerText,
        visible: rect.width > 0 && rect.height > 0 && getComputedStyle(el.parentElement).display !== "none",
        prompt: node.widgets.find((w) => w.name === "prompt")?.value ?? null,
        width: node.widgets.find((w) => w.name === "width")?.value ?? null,
        height: node.widgets.find((w) => w.name === "height")?.value ?? null,
        serialized: node.serialize().widgets_values,
        widgetNames: node.widgets.map((w) => w.name),
      };
    }, id);
  const waitPanel = (id, test, what) =>
    retry(what, async () => {
      const p = await panel(id);
      if (!p || !test(p)) throw new Error(`${what}: panel shows ${JSON.stringify(p?.text ?? null)}`);
      return p;
    }, { tries: 10, pause: 300 });

  seen.initial = await waitPanel(ids.tokens, (p) => p.visible && p.tokenCount, "panel on the token node");
  seen.encodeInitial = await panel(ids.encode);
  log("panel", { text: seen.initial.text });

  // --- live updates: type into the prompt, use the width arrows ---------------------------------------------------
  const centerOn = (nodeId) =>
    page.evaluate((nodeId) => {
      const app = window.app;
      const node = app.graph.getNodeById(nodeId);
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      app.canvas.setDirty(true, true);
    }, nodeId);
  // At full scale: zoomed out, front end 1.49 draws nodes without their widgets (the prompt textarea is hidden).
  await centerOn(ids.tokens);
  await page.waitForTimeout(300);
  const textarea = await textBox(ids.tokens, "prompt");
  const promptHeight = () => textarea.evaluate((el) => el.getBoundingClientRect().height / window.app.canvas.ds.scale);
  seen.promptHeight = { before: await promptHeight() };
  const original = seen.initial.prompt;
  await textarea.click();
  await page.keyboard.press("Control+End");
  await page.keyboard.type(" and a note 'NEW'");
  seen.afterTyping = await waitPanel(ids.tokens, (p) => p.spans.includes("NEW"), "panel after typing a span");
  await page.keyboard.type(' "open');
  seen.afterUnbalanced = await waitPanel(ids.tokens, (p) => p.warnings.length > 0, "panel after an unmatched quote");
  await textarea.fill(original);
  seen.afterRestore = await waitPanel(ids.tokens, (p) => p.prompt === original && !p.warnings.length, "restored");
  await page.mouse.click(5, 500); // blur the textarea: canvas clicks land on the canvas again

  /** Click a number widget's arrow on the canvas (the real UI path: LiteGraph's NumberWidget.onClick). */
  const clickArrow = async (nodeId, name, direction) => {
    const at = await page.evaluate(
      ({ nodeId, name, direction }) => {
        const app = window.app;
        const node = app.graph.getNodeById(nodeId);
        const w = node.widgets.find((x) => x.name === name);
        const h = w.computedHeight ?? window.LiteGraph?.NODE_WIDGET_HEIGHT ?? 20;
        const graphX = node.pos[0] + (direction > 0 ? node.size[0] - 20 : 20);
        const graphY = node.pos[1] + w.y + h / 2;
        const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([graphX, graphY]);
        const rect = app.canvas.canvas.getBoundingClientRect();
        const ratio = rect.width / app.canvas.canvas.width;
        return { x: rect.left + cx * ratio, y: rect.top + cy * ratio };
      },
      { nodeId, name, direction },
    );
    await page.mouse.click(at.x, at.y);
  };
  const fitAll = () =>
    page.evaluate(() => {
      const app = window.app;
      app.canvas.deselectAll?.();
      const nodes = app.graph.nodes;
      const x0 = Math.min(...nodes.map((n) => n.pos[0]));
      const y0 = Math.min(...nodes.map((n) => n.pos[1] - 40));
      const x1 = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
      const y1 = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
      app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], { zoom: 0.95 });
      app.canvas.setDirty(true, true);
    });
  await centerOn(ids.tokens);
  await page.waitForTimeout(300);
  const width0 = seen.afterRestore.width;
  seen.afterArrowUp = await retry("width arrow up", async () => {
    await clickArrow(ids.tokens, "width", +1);
    return waitPanel(ids.tokens, (p) => p.width !== width0, "panel after the width arrow");
  });
  await clickArrow(ids.tokens, "width", -1);
  seen.afterArrowDown = await waitPanel(ids.tokens, (p) => p.width === width0, "panel after the width arrow back");
  seen.stepOptions = await page.evaluate((nodeId) => {
    const node = window.app.graph.getNodeById(nodeId);
    const step = (name) => node.widgets.find((w) => w.name === name).options.step2;
    return { width: step("width"), height: step("height") };
  }, ids.tokens);

  // references connected: the image-to-image count (no preview grid); removed again before the run
  await page.evaluate((nodeId) => {
    const app = window.app;
    const image = window.LiteGraph.createNode("LoadImage");
    image.pos = [app.graph.getNodeById(nodeId).pos[0] - 400, 0];
    app.graph.add(image);
    image.connect(0, app.graph.getNodeById(nodeId), "reference_1");
    window.__glmReference = image;
  }, ids.tokens);
  const initialCount = seen.initial.tokenCount;
  seen.withReference = await waitPanel(ids.tokens, (p) => p.tokenCount !== initialCount, "panel with a reference");
  await page.evaluate(() => window.app.graph.remove(window.__glmReference));
  seen.referenceRemoved = await waitPanel(ids.tokens, (p) => p.tokenCount === initialCount, "panel without reference");

  // the Encode node with glyph_text = override: its lines are the spans
  await page.evaluate((nodeId) => {
    const mode = window.app.graph.getNodeById(nodeId).widgets.find((w) => w.name === "glyph_text");
    mode.value = "override";
    mode.callback?.(mode.value); // what the combo menu calls
  }, ids.encode);
  const overrideBox = await textBox(ids.encode, "override");
  seen.overrideEmpty = await waitPanel(ids.encode, (p) => p.warnings.length > 0, "override empty");
  await overrideBox.click();
  await page.keyboard.type("OPEN LATE\n\n  \nSince 1898");
  seen.override = await waitPanel(ids.encode, (p) => p.spans.length === 2, "override spans");
  await overrideBox.fill("");
  await page.evaluate((nodeId) => {
    const mode = window.app.graph.getNodeById(nodeId).widgets.find((w) => w.name === "glyph_text");
    mode.value = "from prompt quotes";
    mode.callback?.(mode.value);
  }, ids.encode);
  const promptSpans = seen.encodeInitial.spans.length;
  seen.overrideOff = await waitPanel(ids.encode, (p) => p.spans.length === promptSpans, "override off");
  await page.mouse.click(5, 500);

  if (opts.steps) {
    await page.evaluate(
      ({ nodeId, steps }) => {
        const w = window.app.graph.getNodeById(nodeId).widgets.find((x) => x.name === "steps");
        w.value = steps;
      },
      { nodeId: ids.sampler, steps: Number(opts.steps) },
    );
  }

  const [width, height] = opts.size ? opts.size.split("x").map(Number) : [seen.initial.width, seen.initial.height];
  if (opts.size) {
    await page.evaluate(({ width, height }) => {
      for (const node of window.app.graph.nodes) {
        for (const w of node.widgets ?? []) {
          if (w.name === "width" || w.name === "height") {
            w.value = w.name === "width" ? width : height;
            w.callback?.(w.value); // what the widget calls when edited: the panel follows
          }
        }
      }
    }, { width, height });
  }
  seen.run = await waitPanel(ids.tokens, (p) => p.width === width && p.height === height, "panel at the run's size");

  // --- run: the AR preview on the token node, then the image on the canvas -----------------------------------------
  await page.evaluate((tokensId) => {
    const api = window.comfyAPI.api.api;
    window.__glm = { previews: 0, previewSizes: [], nodeImages: 0, events: [] };
    api.addEventListener("b_preview_with_metadata", ({ detail }) => {
      if (String(detail.displayNodeId) !== String(tokensId)) return;
      window.__glm.previews += 1;
      createImageBitmap(detail.blob).then((b) => window.__glm.previewSizes.push([b.width, b.height]));
    });
    for (const type of ["execution_start", "execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(type, ({ detail }) => window.__glm.events.push([type, detail?.exception_message ?? null]));
    }
    const node = window.app.graph.getNodeById(tokensId);
    window.__glm.poll = setInterval(() => {
      const previews = window.app.nodePreviewImages?.[String(tokensId)];
      if (previews?.length || node.imgs?.length) window.__glm.nodeImages += 1;
    }, 100);
  }, ids.tokens);
  const started = Date.now();
  await retry("queue", async () => {
    await page.locator("button", { hasText: /^\s*Run\s*$/ }).first().click({ timeout: 5000 });
    await page.waitForFunction(() => window.__glm.events.length > 0, null, { timeout: 20_000 });
  }, { tries: 2 });
  log("queued");

  // a mid-run picture of the token node with its preview, part of the target grid decoded (README)
  const ended = () => window.__glm.events.some(([t]) => t !== "execution_start");
  await page.waitForFunction(`(${ended})() || (window.__glm.previews >= 12 && window.__glm.nodeImages > 0)`, null, {
    timeout: Number(opts.timeout) * 1000,
  });
  await centerOn(ids.tokens);
  await page.waitForTimeout(400);
  const tokenBox = await page.evaluate((nodeId) => {
    const app = window.app;
    const node = app.graph.getNodeById(nodeId);
    const toCanvas = (gx, gy) => app.canvas.ds.convertOffsetToCanvas([gx, gy]);
    const [x, y] = toCanvas(node.pos[0] - 10, node.pos[1] - 40); // the title bar sits above pos
    const [x2, y2] = toCanvas(node.pos[0] + node.size[0] + 10, node.pos[1] + node.size[1] + 10);
    const r = app.canvas.canvas.getBoundingClientRect();
    return { x: Math.max(0, r.left + x), y: Math.max(0, r.top + y), width: x2 - x, height: y2 - y };
  }, ids.tokens);
  await page.screenshot({ path: path.join(opts.out, "ar_preview.png"), clip: tokenBox });
  seen.previewMidRun = await page.evaluate(() => ({
    previews: window.__glm.previews,
    nodeImages: window.__glm.nodeImages,
  }));
  log("preview seen", seen.previewMidRun);

  await page.waitForFunction(`(${ended})()`, null, { timeout: Number(opts.timeout) * 1000 });
  seen.events = await page.evaluate(() => window.__glm.events);
  seen.runSeconds = (Date.now() - started) / 1000;
  log("run finished", { events: seen.events, seconds: seen.runSeconds });

  await fitAll(); // the output node must be on screen: LiteGraph loads a node's images when it draws it
  seen.output = await retry("output image on the canvas", () =>
    page.waitForFunction((saveId) => {
      const node = window.app.graph.getNodeById(saveId);
      const img = node?.imgs?.[0];
      if (!img?.complete || !img.naturalWidth) return null;
      return { width: img.naturalWidth, height: img.naturalHeight, src: img.src };
    }, ids.save, { timeout: 30_000 }).then((h) => h.jsonValue()),
  );
  log("output on canvas", seen.output);

  // the whole graph for the README: fit it into the window, then the screenshot
  await fitAll();
  await page.waitForTimeout(1000);
  seen.previewFinal = await page.evaluate(() => (clearInterval(window.__glm.poll), {
    previews: window.__glm.previews,
    sizes: window.__glm.previewSizes.slice(0, 3),
    nodeImages: window.__glm.nodeImages,
  }));
  await page.screenshot({ path: path.join(opts.out, `${opts.template}.png`) });
  seen.screenshot = path.join(opts.out, `${opts.template}.png`);
  await centerOn(ids.tokens);
  await page.waitForTimeout(300);
  seen.promptHeight.afterRun = await promptHeight(); // the AR preview shares the node with the prompt box
  await page.screenshot({ path: path.join(opts.out, "after_run_tokens_node.png"), clip: tokenBox });

  /** The template again with Vue nodes ("Nodes 2.0"): the panel shows inside the Vue node and follows typing. */
  async function vueNodesPass() {
    phase = "vue";
    await loadFrontEnd({ "Comfy.Locale": "en", "Comfy.VueNodes.Enabled": true });
    const vue = await openTemplate();
    seen.vue = { cards: vue.cards };
    seen.vue.isVue = await page.evaluate((id) => !!document.querySelector(`[data-node-id="${id}"]`), vue.ids.tokens);
    seen.vue.initial = await waitPanel(vue.ids.tokens, (p) => p.visible && p.tokenCount, "panel in a Vue node");
    await centerOn(vue.ids.tokens);
    await page.waitForTimeout(500);
    const vueBox = await textBox(vue.ids.tokens, "prompt");
    await vueBox.click();
    await page.keyboard.press("Control+End");
    await page.keyboard.type(" and a note 'NEW'");
    seen.vue.afterTyping = await waitPanel(vue.ids.tokens, (p) => p.spans.includes("NEW"), "Vue panel after typing");
    await page.screenshot({ path: path.join(opts.out, "vue_tokens_node.png") });
  }

  // --- the same template with the UI in Chinese: node titles, category, panel -------------------------------------
  phase = "zh";
  await loadFrontEnd({ "Comfy.Locale": "zh" });
  const zh = await openTemplate();
  seen.zh = { cards: zh.cards };
  seen.zh.titles = await page.evaluate(() => {
    const ours = window.app.graph.nodes.filter((n) => n.comfyClass?.startsWith("GLMImage"));
    return Object.fromEntries(ours.map((n) => [n.comfyClass, n.title]));
  });
  seen.zh.categories = await page.evaluate(() => {
    const ours = Object.values(window.LiteGraph.registered_node_types).filter((t) => t.comfyClass?.startsWith("GLM"));
    return [...new Set(ours.map((t) => t.category))];
  });
  seen.zh.initial = await waitPanel(zh.ids.tokens, (p) => p.visible && p.tokenCount, "panel in Chinese");
  seen.zh.encode = await panel(zh.ids.encode);
  await centerOn(zh.ids.tokens);
  await page.waitForTimeout(300);
  await page.screenshot({ path: path.join(opts.out, "zh_tokens_node.png") });

  // --- Vue nodes ("Nodes 2.0"): the panel inside the Vue node, live while typing -----------------------------------
  // Not before 1.28: 1.27's Vue nodes were an early experiment that does not show extensions' DOM widgets.
  const [major, minor] = String(seen.frontEnd).split(".").map(Number);
  if (major > 1 || minor >= VUE_NODES_SINCE) await vueNodesPass();
  seen.ok = true;
} catch (e) {
  seen.ok = false;
  seen.error = e.stack ?? String(e);
  await page.screenshot({ path: path.join(opts.out, "failure.png") }).catch(() => {});
} finally {
  seen.pageErrors = pageErrors;
  seen.consoleErrors = consoleErrors;
  seen.failedRequests = failedRequests;
  await context.close();
  fs.rmSync(profile, { recursive: true, force: true });
}
console.log(JSON.stringify(seen));
