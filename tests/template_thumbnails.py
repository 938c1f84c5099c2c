"""The template browser's card pictures, example_workflows/<name>.jpg: a diagram of what each template does, read
from the template itself (its prompt's quoted spans, its reference images, its size, whether it saves the tokens),
drawn as the pipeline's stages. No sample output: the cards must not promise a picture the user will not get.

After changing a template, redraw them with
  python -m tests.template_thumbnails
(DejaVu Sans is used when installed, e.g. Debian's fonts-dejavu-core; Pillow's own font otherwise).
"""

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from glm_image_core import ar, glyph

TEMPLATES = Path(__file__).resolve().parents[1] / "example_workflows"
SIZE = 512  # px, square: the cards crop to a square
MAX_BYTES = 60_000
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
BACKGROUND, BOX, ACCENT, TEXT, DIM, CHIP = "#1c1f24", "#2c3138", "#3f789e", "#f2f2f2", "#aeb6bf", "#35506a"


def font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    path = FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size)


def stages(workflow: dict) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """The template's stages as (heading, detail lines), and the quoted spans of its prompt."""
    nodes = {n["type"]: n for n in workflow["nodes"]}
    prompt, width, height = nodes["GLMImageGenerateTokens"]["widgets_values"][:3]
    references = sum(n["type"] == "LoadImage" for n in workflow["nodes"])
    spans = glyph.extract_glyph_texts(prompt)
    geometry = ar.ar_geometry(height, width, image_to_image=references > 0)
    first = "Prompt" + (f" + {references} image{'s' * (references > 1)}" if references else "")
    tokens = f"{geometry.num_grid_tokens} visual tokens" + (", saved" if "GLMImageSaveTokens" in nodes else "")
    return [
        (first, [] if spans else ["no quoted text"]),
        ("AR model 9B", [tokens]),
        ("DiT 7B + KSampler", ["glyphs + tokens \u2192 latent"]),
        ("VAE decode", [f"{width}\u00d7{height} image"]),
    ], spans


def draw(name: str, workflow: dict) -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    d = ImageDraw.Draw(image)
    d.text((28, 22), "GLM-Image", font=font(24, bold=True), fill=ACCENT)
    d.text((28, 52), name.replace("_", " ").capitalize(), font=font(38, bold=True), fill=TEXT)
    steps, spans = stages(workflow)
    top, gap, x0, x1 = 118, 22, 28, SIZE - 28
    box_h = (SIZE - top - 20 - gap * (len(steps) - 1)) // len(steps)
    for k, (heading, details) in enumerate(steps):
        y = top + k * (box_h + gap)
        d.rounded_rectangle((x0, y, x1, y + box_h), radius=10, fill=BOX)
        d.rounded_rectangle((x0, y, x0 + 8, y + box_h), radius=4, fill=ACCENT)
        d.text((x0 + 22, y + 10), heading, font=font(27, bold=True), fill=TEXT)
        if k == 0 and spans:  # the text the template renders, as chips
            cx = x0 + 22
            for span in spans:
                label = "\u201c" + (span if len(span) <= 16 else span[:15] + "\u2026") + "\u201d"
                w = d.textlength(label, font=font(20)) + 16
                if cx + w > x1 - 10:
                    break
                d.rounded_rectangle((cx, y + 46, cx + w, y + 74), radius=6, fill=CHIP)
                d.text((cx + 8, y + 48), label, font=font(20), fill=TEXT)
                cx += w + 8
        for j, detail in enumerate(details):
            d.text((x0 + 22, y + 48 + 26 * j), detail, font=font(22), fill=DIM)
        if k:  # an arrow from the box above
            mid = SIZE // 2
            d.polygon([(mid - 12, y - gap + 4), (mid + 12, y - gap + 4), (mid, y - 3)], fill=ACCENT)
    return image


def write(path: Path, image: Image.Image) -> None:
    for quality in (88, 80, 70, 60):
        image.save(path, "JPEG", quality=quality, optimize=True, progressive=True)
        if path.stat().st_size <= MAX_BYTES:
            return
    raise RuntimeError(f"{path.name} is {path.stat().st_size} bytes even at quality 60 (limit {MAX_BYTES})")


if __name__ == "__main__":
    for template in sorted(TEMPLATES.glob("*.json")):
        write(template.with_suffix(".jpg"), draw(template.stem, json.loads(template.read_text(encoding="utf-8"))))
        print(f"{template.with_suffix('.jpg')}: {template.with_suffix('.jpg').stat().st_size} bytes")
