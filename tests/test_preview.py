"""The live AR preview (glm_image_core.preview): codebook colours, the partly decoded grid as an image, the hook."""

import numpy as np
import pytest
import torch
from transformers import GlmImageForConditionalGeneration, GlmImageProcessor

from glm_image_core import ar, preview

UNDECODED = (preview.UNDECODED_GREY,) * 3


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    )


@pytest.fixture(scope="module")
def palette(model):
    return preview.model_palette(model)


def id_palette() -> np.ndarray:
    """Colour k = (k % 251, k // 251 % 251, 200): every id below 251 * 251 has its own colour."""
    ids = np.arange(16384)
    return np.stack([ids % 251, ids // 251 % 251, np.full_like(ids, 200)], axis=1).astype(np.uint8)


def cell_colour(image, geometry_rows, geometry_cols, row, col) -> tuple:
    """The colour at the centre of grid cell (row, col) of an image showing a rows x cols grid."""
    x = int((col + 0.5) * image.width / geometry_cols)
    y = int((row + 0.5) * image.height / geometry_rows)
    return image.getpixel((x, y))


# --- palette -------------------------------------------------------------------------------------------------------


def test_palette_has_one_rgb_byte_triple_per_codebook_entry(model, palette):
    assert palette.shape == (model.model.vqmodel.quantize.embedding.num_embeddings, 3) == (16384, 3)
    assert palette.dtype == torch.uint8 and palette.device.type == "cpu"


def test_palette_spans_the_full_range_in_every_channel(palette):
    assert palette.min(dim=0).values.tolist() == [0, 0, 0]
    assert palette.max(dim=0).values.tolist() == [255, 255, 255]


def test_palette_is_deterministic(model, palette):
    assert torch.equal(preview.model_palette(model), palette)
    assert torch.equal(preview.codebook_palette(model.model.vqmodel.quantize.embedding.weight.clone()), palette)


def test_palette_channels_are_the_principal_components_of_the_normalised_codebook(model, palette):
    codebook = model.model.vqmodel.quantize.embedding.weight.detach().double().numpy()
    codebook /= np.linalg.norm(codebook, axis=1, keepdims=True)
    centred = codebook - codebook.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)  # rows: principal directions, largest first
    for channel in range(3):
        correlation = np.corrcoef(centred @ components[channel], palette[:, channel].double().numpy())[0, 1]
        assert abs(correlation) > 0.98, (channel, correlation)  # (percentile clamping bends the ends a little)


# --- the image of a partial sequence -------------------------------------------------------------------------------


def test_while_the_preview_grid_fills_its_decoded_cells_are_painted_in_row_major_order():
    geometry = ar.ar_geometry(1024, 1024)  # preview 16x16, target 32x32
    ids = np.arange(1000, 1020)  # 20 tokens: the first row and 4 cells of the second
    image = preview.grid_image(ids, geometry, id_palette())
    colours = id_palette()
    assert image.size == (512, 512)
    assert cell_colour(image, 16, 16, 0, 0) == tuple(colours[1000])
    assert cell_colour(image, 16, 16, 0, 15) == tuple(colours[1015])
    assert cell_colour(image, 16, 16, 1, 3) == tuple(colours[1019])
    assert cell_colour(image, 16, 16, 1, 4) == UNDECODED
    assert cell_colour(image, 16, 16, 15, 15) == UNDECODED


def test_a_complete_preview_grid_is_shown_whole_and_the_next_token_starts_the_target_grid():
    geometry = ar.ar_geometry(1024, 1024)
    colours = id_palette()
    ids = np.arange(256 + 40) + 3000
    full_preview = preview.grid_image(ids[:256], geometry, colours)
    assert cell_colour(full_preview, 16, 16, 15, 15) == tuple(colours[3255])
    target = preview.grid_image(ids, geometry, colours)  # 40 target tokens: row 0 and 8 cells of row 1
    assert target.size == full_preview.size
    assert cell_colour(target, 32, 32, 0, 0) == tuple(colours[3256])
    assert cell_colour(target, 32, 32, 1, 7) == tuple(colours[3256 + 39])
    assert cell_colour(target, 32, 32, 1, 8) == UNDECODED
    assert cell_colour(target, 32, 32, 31, 31) == UNDECODED


def test_a_wide_target_gives_a_wide_image_for_both_grids():
    geometry = ar.ar_geometry(512, 768)  # preview 13x19, target 16x24
    assert (geometry.preview_h, geometry.preview_w, geometry.grid_h, geometry.grid_w) == (13, 19, 16, 24)
    colours = id_palette()
    ids = np.arange(geometry.num_grid_tokens)
    in_preview = preview.grid_image(ids[:20], geometry, colours)
    assert in_preview.size == (512, 341)
    assert cell_colour(in_preview, 13, 19, 1, 0) == tuple(colours[19])
    assert cell_colour(in_preview, 13, 19, 1, 1) == UNDECODED
    done = preview.grid_image(ids, geometry, colours)
    assert done.size == (512, 341)
    assert cell_colour(done, 16, 24, 15, 23) == tuple(colours[geometry.num_grid_tokens - 1])


def test_image_to_image_has_no_preview_grid():
    geometry = ar.ar_geometry(1024, 1024, image_to_image=True)
    colours = id_palette()
    assert cell_colour(preview.grid_image(np.array([], dtype=np.int64), geometry, colours), 32, 32, 0, 0) == UNDECODED
    image = preview.grid_image(np.array([7, 8, 9]), geometry, colours)
    assert cell_colour(image, 32, 32, 0, 2) == tuple(colours[9])
    assert cell_colour(image, 32, 32, 0, 3) == UNDECODED


# --- the per-token hook --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class RecordingTokens:
    """Stands in for the decode loop's [N, step] token view and records which slices were read."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.reads = ids, []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.ids[key]


def test_hook_paints_at_most_once_per_interval_and_always_the_last_token():
    geometry = ar.ar_geometry(256, 256)  # 16x16 preview + 8x8 target = 320 tokens
    clock = FakeClock()
    live = preview.LivePreview(geometry, torch.from_numpy(id_palette()), interval_s=0.25, clock=clock)
    tokens = RecordingTokens(torch.arange(320)[None])
    painted = []
    for step in range(1, 321):
        clock.now = step * 0.01  # 10 ms per token: an image every 25 tokens
        if live.poll(step, tokens) is not None:
            painted.append(step)
    assert painted == [1, 26, 51, 76, 101, 126, 151, 176, 201, 226, 251, 276, 301, 320]


def test_hook_copies_only_the_tokens_that_are_new_since_its_last_image():
    geometry = ar.ar_geometry(256, 256)
    clock = FakeClock()
    live = preview.LivePreview(geometry, torch.from_numpy(id_palette()), interval_s=1.0, clock=clock)
    tokens = RecordingTokens(torch.arange(320)[None])
    live.poll(1, tokens)
    for step in range(2, 100):
        live.poll(step, tokens)  # not due: the tokens are not read at all
    clock.now = 5.0
    image = live.poll(100, tokens)
    assert tokens.reads == [(0, slice(0, 1)), (0, slice(1, 100))]
    assert cell_colour(image, 16, 16, 6, 3) == tuple(id_palette()[99])


def test_hook_during_a_real_decode_ends_on_the_finished_target_grid(model, palette, tiny_model_dir):
    processor = GlmImageProcessor.from_pretrained(tiny_model_dir / "processor")
    inputs = ar.build_ar_inputs(processor, "A 'cat' on a mat", 256, 256)
    live = preview.LivePreview(inputs.geometry, palette, interval_s=0.0)
    images = []

    def on_token(step, total, ids):
        images.append(live.poll(step, ids))

    result = ar.generate_prior_tokens(model, inputs, [torch.Generator().manual_seed(0)], callback=on_token)
    assert len(images) == inputs.geometry.num_grid_tokens and all(image is not None for image in images)
    expected = palette.numpy()[result.target_ids[0].numpy()].reshape(8, 8, 3)
    final = images[-1]
    assert [cell_colour(final, 8, 8, r, c) for r in range(8) for c in range(8)] == [
        tuple(expected[r, c]) for r in range(8) for c in range(8)
    ]
