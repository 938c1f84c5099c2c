"""The AR stage (docs/how-it-works.md, steps 1-3): prompt -> visual token grid -> prior token ids for the DiT.

The model and processor are transformers' ``GlmImageForConditionalGeneration`` and ``GlmImageProcessor``; the
prompt is built exactly as diffusers' ``GlmImagePipeline.generate_prior_tokens`` builds it. The decode loop is our
own instead of ``model.generate`` because:

- the grid is always exactly full: only VQ codes (ids 0..16383) can be sampled, so EOS (16385), image start (16384)
  and the unused ids 16386..16511 are impossible, and the loop stops after the last grid token (the EOS that the
  reference asks for as its last new token is never sampled);
- the random draws come only from caller-supplied ``torch.Generator`` s (the reference seeds torch's global RNG);
- positions are explicit (3-axis MRoPE, computed here, equal to ``GlmImageModel.get_rope_index``), so the model's
  own position caches (``rope_deltas``, ``_cached_decode_position_ids``) are never touched;
- a callback reports progress and can cancel by raising;
- on CUDA, ``fast_ar`` decodes with its own static-cache step replayed as a CUDA graph, sampling on the device
  (transformers' forward per token is ~15x slower than reading the weights).

Sampling follows transformers' warpers (temperature, then top-k, then top-p keeping at least one token) on the
VQ-code logits, then picks the token by inverse CDF from one uniform draw per token (see ``sample_tokens``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import logging
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import fast_ar, lora, memory
from .defaults import AR_GRID_STRIDE, IMAGE_END_ID, IMAGE_START_ID, NUM_VQ_CODES
from .errors import InvalidInputError
from .sizes import check_reference_size

CONTROL_STRINGS = ("<|dit_token_", "<|image|>", "<sop>", "<eop>")  # would change the prompt's structure

ProgressCallback = Callable[[int, int, torch.Tensor], None]


@dataclass(frozen=True)
class ARGeometry:
    """Token grids of one target size, as ``GlmImageProcessor._get_target_shape`` computes them."""

    height: int
    width: int
    grid_h: int  # target grid, one token per 32x32 pixels
    grid_w: int
    preview_h: int  # text-to-image decodes a ~16x16 preview grid first; 0 for image-to-image
    preview_w: int

    @property
    def num_preview_tokens(self) -> int:
        return self.preview_h * self.preview_w

    @property
    def num_grid_tokens(self) -> int:
        """Tokens sampled: preview grid (text-to-image only), then the target grid."""
        return self.num_preview_tokens + self.grid_h * self.grid_w

    @property
    def num_new_tokens(self) -> int:
        """The reference's ``max_new_tokens``: every grid token plus the final EOS (t2i: ph*pw + h*w + 1), which the
        reference asks for and this loop never samples (``num_grid_tokens`` are sampled)."""
        return self.num_grid_tokens + 1


def ar_geometry(height: int, width: int, image_to_image: bool = False) -> ARGeometry:
    """Grid sizes for an ``height`` x ``width`` target; both must be positive multiples of 32.

    Target grid ``(H/32, W/32)``; text-to-image preview grid ``(int(sqrt(H/W)*16), int(sqrt(W/H)*16))``
    (16x16 for a square, 13x19 for 512x768), computed like transformers from the token ratio.
    """
    if height <= 0 or width <= 0 or height % AR_GRID_STRIDE or width % AR_GRID_STRIDE:
        raise InvalidInputError(
            f"GLM-Image needs a height and width that are positive multiples of 32; got {height}x{width}. "
            f"Round to e.g. {max(32, round(height / 32) * 32)}x{max(32, round(width / 32) * 32)}."
        )
    grid_h, grid_w = height // AR_GRID_STRIDE, width // AR_GRID_STRIDE
    if image_to_image:
        return ARGeometry(height, width, grid_h, grid_w, 0, 0)
    ratio = grid_h / grid_w
    preview_h = int(math.sqrt(ratio) * (AR_GRID_STRIDE // 2))
    preview_w = int(math.sqrt(1 / ratio) * (AR_GRID_STRIDE // 2))
    return ARGeometry(height, width, grid_h, grid_w, preview_h, preview_w)


@dataclass
class ARInputs:
    """The AR prompt for one prompt (and its reference images), with every position the decode loop needs."""

    input_ids: torch.Tensor  # [1, L] int64; reference images are runs of the `<|image|>` placeholder
    attention_mask: torch.Tensor  # [1, L] all ones (one prompt, no padding)
    pixel_values: torch.Tensor | None  # [sum_i h_i*w_i, 3*16*16] reference patches, None for text-to-image
    image_grid_thw: torch.Tensor  # [n_ref + n_target_grids, 3] (1, h, w): references, then target (and preview)
    images_per_sample: torch.Tensor  # [1] n_ref + n_target_grids
    position_ids: torch.Tensor  # [3, 1, L] (t, row, col) MRoPE positions of the prompt
    decode_position_ids: torch.Tensor  # [3, 1, num_new_tokens]: position of the k-th new token when fed back
    geometry: ARGeometry
    reference_grids: list[tuple[int, int]]  # (h, w) per reference image, one token per 32x32 source pixels


def build_ar_inputs(processor, prompt: str, height: int, width: int, images: Sequence = ()) -> ARInputs:
    """Tokenise ``prompt`` with ``GlmImageProcessor`` for a ``height`` x ``width`` target.

    ``images``: reference images (PIL) for image-to-image, any number; each becomes
    ``<|dit_token_16384|><|image|>*(h*w)<|dit_token_16385|>`` before the text, at the processor's size for it.
    The chat template and target size are passed exactly as diffusers' ``generate_prior_tokens`` passes them.
    """
    geometry = ar_geometry(height, width, image_to_image=len(images) > 0)
    found = [s for s in CONTROL_STRINGS if s in prompt]
    if found:
        raise InvalidInputError(
            f"The prompt contains GLM-Image control tokens {found}; they would change the AR prompt's structure. "
            "Remove them from the prompt."
        )
    for i, image in enumerate(images, 1):
        check_reference_size(image.height, image.width, reference_min_side(processor), f"Reference image {i}")
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
    batch = processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"target_h": height, "target_w": width, "padding": False},
    )
    input_ids, grids = batch["input_ids"], batch["image_grid_thw"]
    n_ref = len(images)
    target_grids = [(geometry.grid_h, geometry.grid_w)]
    if not n_ref:
        target_grids.append((geometry.preview_h, geometry.preview_w))
    if grids[n_ref:, 1:].tolist() != [list(g) for g in target_grids]:  # guards against a changed processor
        raise InvalidInputError(f"The processor built target grids {grids[n_ref:].tolist()}, expected {target_grids}.")
    reference_grids = [(int(h), int(w)) for _, h, w in grids[:n_ref].tolist()]
    position_ids, decode_position_ids = mrope_position_ids(input_ids[0], reference_grids, target_grids)
    return ARInputs(
        input_ids=input_ids,
        attention_mask=batch["attention_mask"],
        pixel_values=batch.get("pixel_values"),
        image_grid_thw=grids,
        images_per_sample=batch["images_per_sample"],
        position_ids=position_ids[:, None],
        decode_position_ids=decode_position_ids[:, None],
        geometry=geometry,
        reference_grids=reference_grids,
    )


def reference_min_side(processor) -> int:
    """The shortest side, in pixels, of a reference image ``processor`` (GlmImageProcessor) takes: the factor its
    ``smart_resize`` rounds to."""
    image_processor = processor.image_processor
    return image_processor.patch_size * image_processor.merge_size


def mrope_position_ids(
    input_ids: torch.Tensor, reference_grids: Sequence[tuple[int, int]], target_grids: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """3-axis (t, row, col) positions of a prompt and of every token decoded after it.

    input_ids: [L]; reference_grids: (h, w) of each reference image in prompt order; target_grids: the grids to
    decode as the processor lists them (text-to-image: target, then preview; they are decoded in REVERSE order,
    preview first). Returns ``(prompt [3, L], decode [3, sum(h*w) + 1])``, equal to ``get_rope_index`` (its
    prompt positions and its cached decode positions).

    Text tokens advance all three axes together by one. An image whose first token sits at position p gets
    (p, p + row, p + col) and then advances the position by max(h, w), not h*w. The image-start token before an
    image and the image-end token after it are text. Decoded grids follow the same rule; the EOS slot gets the
    position after the last grid.
    """
    ids = input_ids.tolist()
    starts = [i + 1 for i, t in enumerate(ids) if t == IMAGE_START_ID]  # first image token of each image
    ends = [i for i, t in enumerate(ids) if t == IMAGE_END_ID]
    if len(ends) != len(reference_grids):
        raise InvalidInputError(f"The prompt holds {len(ends)} images but {len(reference_grids)} grids were given.")

    chunks = []
    position = 0  # next position to hand out
    text_from = 0  # index of the first token of the current text run
    for start, end, (h, w) in zip(starts, ends, reference_grids):
        if end - start != h * w:
            raise InvalidInputError(f"Image at token {start} has {end - start} tokens; its grid {h}x{w} needs {h * w}.")
        chunks.append(torch.arange(position, position + start - text_from).expand(3, -1))
        position += start - text_from
        chunks.append(_grid_positions(position, h, w))
        position += max(h, w)
        text_from = end
    chunks.append(torch.arange(position, position + len(ids) - text_from).expand(3, -1))
    position += len(ids) - text_from

    decode = []
    for h, w in reversed(target_grids):
        decode.append(_grid_positions(position, h, w))
        position += max(h, w)
    decode.append(torch.full((3, 1), position))  # EOS
    return torch.cat(chunks, dim=1), torch.cat(decode, dim=1)


def _grid_positions(position: int, h: int, w: int) -> torch.Tensor:
    """[3, h*w] positions of a row-major h x w grid starting at ``position``: (p, p + row, p + col)."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([torch.zeros_like(rows), rows, cols]) + position


# A host's way to give a stage of the AR the device: a context manager factory that has those modules resident for
# the length of the `with` (the core pipeline's offload, ComfyUI's model management). Each takes the bytes its run
# needs beside its weights (the vision encoder's for these references, the decode's).
VisionStage = Callable[[int], contextlib.AbstractContextManager]
DecoderStage = Callable[[int], contextlib.AbstractContextManager]


SAMPLE_SEED_BITS = 53  # derived seeds stay below 2**53: a JavaScript number (the seed widget) holds them exactly


def sample_seeds(seed: int, count: int) -> list[int]:
    """The generator seed of each of ``count`` samples drawn at ``seed``.

    Sample 0 uses ``seed`` itself (a batch of 1 is the run it always was); sample i > 0 uses the top 53 bits of the
    8-byte BLAKE2b digest of (seed, i) packed as two unsigned 64-bit little-endian integers, the digest read as a
    little-endian integer. So the samples of neighbouring seeds do not overlap (with ``seed + i``, seed 6 repeated
    samples 1..N-1 of seed 5), a batch of N is the first N samples of any larger batch at that seed, and any one
    sample can be made again alone: a batch of 1 at its derived seed (below 2**53, which ComfyUI's seed widget holds
    exactly)."""
    seed %= 2**64
    return [seed, *(_derived_seed(seed, i) for i in range(1, count))][:count]


def _derived_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(struct.pack("<QQ", seed, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> (64 - SAMPLE_SEED_BITS)


def generate_staged(
    model,
    inputs: ARInputs,
    seeds: Sequence[int],
    vision_stage: VisionStage,
    decoder_stage: DecoderStage,
    **sampling,
) -> ARResult:
    """The AR's turns on the device as every host runs them: the vision encoder encodes the reference images (edits
    only), then the text decoder samples one token grid per seed (sample i from ``torch.Generator(device)
    .manual_seed(seeds[i])``). ``sampling``: the keyword arguments of ``generate_prior_tokens``."""
    reference_ids = None
    if inputs.reference_grids:
        references = inputs.image_grid_thw[: len(inputs.reference_grids)]
        with vision_stage(memory.ar_model_vision_working_bytes(model, references)):
            reference_ids = [ids.cpu() for ids in encode_reference_images(model, inputs)]
    working = memory.ar_model_working_bytes(
        model, len(seeds), inputs.input_ids.shape[1], inputs.geometry.num_grid_tokens
    ) + lora.update_bytes(sampling.get("loras", ()))
    with decoder_stage(working):
        device = decoder_device(model)
        generators = [torch.Generator(device).manual_seed(seed % 2**64) for seed in seeds]
        return generate_prior_tokens(model, inputs, generators, reference_ids=reference_ids, **sampling)


@torch.inference_mode()
def encode_reference_images(model, inputs: ARInputs) -> list[torch.Tensor]:
    """VQ ids of each reference image: a list of [h_i * w_i] int64 (one id per 32x32 pixels of the source).

    One ViT call for all images (its attention is per image), then ``get_image_tokens`` on the per-image feature
    list, which quantises each [C, h_i, w_i] feature map separately, exactly as ``GlmImageModel.forward`` does.
    (diffusers 0.42.1 ``generate_prior_tokens`` first concatenates the feature maps with ``torch.cat(dim=0)``:
    ``get_image_tokens`` then iterates over the channels of one [n*C, h, w] tensor and the VQ conv fails, even
    with one reference; with references of different sizes the concatenation itself fails.)
    """
    if not inputs.reference_grids:
        return []
    device = next(model.model.visual.parameters()).device  # the vision encoder may live apart from the decoder
    source_grids = inputs.image_grid_thw[: len(inputs.reference_grids)].to(device)
    features = model.get_image_features(inputs.pixel_values.to(device), image_grid_thw=source_grids).pooler_output
    ids = model.get_image_tokens(features)  # [sum h_i*w_i]
    return list(ids.split([h * w for h, w in inputs.reference_grids]))


@dataclass(frozen=True)
class ARResult:
    """Sampled grids of ``N`` samples of one prompt, and the prior ids the DiT consumes."""

    target_ids: torch.Tensor  # [N, h*w] target grid, row-major, ids 0..16383 (stride 32 px)
    preview_ids: torch.Tensor  # [N, ph*pw] preview grid (text-to-image), [N, 0] for image-to-image
    grid_size: tuple[int, int]  # (h, w) = (H/32, W/32)
    preview_size: tuple[int, int]  # (ph, pw); (0, 0) for image-to-image
    prior_token_ids: torch.Tensor  # [N, (H/16)*(W/16)] target grid upsampled x2 (nearest): the DiT's prior ids
    reference_prior_ids: list[torch.Tensor]  # per reference image: [(2h_i)*(2w_i)] its ids upsampled x2
    reference_grid_sizes: list[tuple[int, int]]  # per reference image: (2h_i, 2w_i), DiT tokens (stride 16 px);
    # the VAE must encode that reference at (32*h_i) x (32*w_i) pixels for its latent to match


def upsample_token_ids(token_ids: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[N, h*w] grid ids -> [N, (2h)*(2w)]: each id repeated into a 2x2 block (the pipeline's nearest x2)."""
    grid = token_ids.reshape(-1, h, w)
    return grid.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2).reshape(grid.shape[0], -1)


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """transformers' sampling warpers in their order: temperature, top-k, top-p (min_tokens_to_keep=1).

    logits: [N, V] float32 -> [N, V] with removed tokens at -inf. top_k None/0 or >= V and top_p 1.0 disable those.
    """
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        remove[..., -1:] = False  # the most likely token always stays
        logits = logits.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    return logits


def sample_tokens(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: for each row the smallest id whose cumulative probability (in id order) exceeds u.

    probs: [N, V] (rows need not be normalised), uniforms: [N] in [0, 1) -> [N] int64. Never picks a
    zero-probability id, whatever the rounding of the cumulative sum.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    picked = torch.searchsorted(cdf, uniforms[:, None].to(cdf.dtype) * total, right=True)
    last_nonzero = torch.searchsorted(cdf, total, right=False)  # where the cdf reaches its total
    return torch.minimum(picked, last_nonzero).squeeze(-1)


def token_picker(temperature: float, top_k: int | None, top_p: float) -> fast_ar.PickFn:
    """The one sampling rule of both decoders: pick(logits [N, V] float32, uniforms [N]) -> tokens [N] int64,
    transformers' warpers (``warp_logits``) then inverse CDF (``sample_tokens``)."""

    def pick(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
        return sample_tokens(warp_logits(logits, temperature, top_k, top_p).softmax(dim=-1), uniforms)

    return pick


def next_token_logits(model, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
    """One model call on new tokens with the KV ``cache``: float32 logits of the last position, [N, 16512].

    input_ids: [N, T] (prefill: the whole prompt with reference ids filled in; decode: T = 1);
    position_ids: [3, N, T]. Only the last position goes through the lm_head.
    """
    cache_argument = {cache_keyword(type(model)): cache}
    out = model(input_ids=input_ids, position_ids=position_ids, **cache_argument, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


@functools.cache
def cache_keyword(model_class) -> str:
    """The name of the forward's KV-cache argument: ``cache`` from transformers 5.24, ``past_key_values`` before
    (5.24 still takes the old name, with a deprecation warning, until 5.40)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate_prior_tokens(
    model,
    inputs: ARInputs,
    generators: Sequence[torch.Generator],
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    callback: ProgressCallback | None = None,
    static_cache: bool = True,
    fast: bool | None = None,
    callback_every: int = 16,
    compile_decoder: bool = False,
    cuda_graph: bool | None = None,
    reference_ids: Sequence[torch.Tensor] | None = None,
    loras: Sequence[lora.Lora] = (),
) -> ARResult:
    """Sample ``len(generators)`` token grids for one prompt, decoded together as a batch.

    model: ``GlmImageForConditionalGeneration`` (eval mode, any device/dtype); inputs: from ``build_ar_inputs``.
    Sample i draws its ``geometry.num_grid_tokens`` uniforms up front with ``torch.rand(..., generator=
    generators[i])`` (on the generator's device) and nothing else is random; torch's global RNG is not used.
    Tokens are reproducible per seed for the same batch size and device (batching may change the logits' last bits).

    temperature / top_p / top_k: None takes ``model.generation_config`` (published: 0.9 / 0.75 / 16512, i.e. no
    top-k; a generation config without top_k means no top-k here, where ``generate`` would apply its default 50).
    callback(step, total, token_ids) runs at least every ``callback_every`` tokens and after the last one: step =
    tokens so far (1..total, increasing), token_ids the [N, step] tokens so far (a view, still on the model's
    device). The transformers loop calls it after every token; the fast decoder after the first token, at multiples
    of ``callback_every`` and at the end (on CUDA once the GPU has finished those tokens). An exception raised in it
    stops generation and propagates unchanged.

    Both decoders run the prompt once (batch 1) and copy its keys and values to every sample.

    fast: decode with ``fast_ar`` (own layer loop over the same weights, static K/V cache, a CUDA graph per token on
    CUDA). None (default) = on CUDA when ``fast_ar.unsupported_reason(model)`` finds nothing against it;
    True forces it on any device (it falls back to the transformers loop, with a warning, if the model is not
    supported); False = the transformers loop (``static_cache`` chooses its cache). compile_decoder: let
    ``torch.compile`` fuse the fast decoder's small kernels (faster per token; the first call compiles for a while).
    cuda_graph: None = the fast decoder replays each token as a CUDA graph on CUDA; False = never (a host's switch,
    e.g. ComfyUI's --disable-cuda-graphs).
    reference_ids: the references' VQ ids from ``encode_reference_images``, when the caller ran the vision encoder
    in a stage of its own (None: encoded here). Only the text decoder and the lm_head need to be on the device for
    text-to-image, or when ``reference_ids`` are given. loras: adapters of the text decoder (``ar_lora``), applied
    unmerged for this generation; the model is not changed.
    """
    if not generators:
        raise InvalidInputError("generate_prior_tokens needs at least one torch.Generator (one per sample).")
    config = model.generation_config
    temperature = config.temperature if temperature is None else temperature
    top_p = config.top_p if top_p is None else top_p
    top_k = config.top_k if top_k is None else top_k
    temperature = 1.0 if temperature is None else temperature  # unset in the config: transformers' defaults
    top_p = 1.0 if top_p is None else top_p
    if temperature <= 0:
        raise InvalidInputError(f"temperature must be > 0, got {temperature} (use top_k=1 for greedy decoding).")
    if not 0.0 < top_p <= 1.0:
        raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 0:
        raise InvalidInputError(f"top_k must be >= 1 (or 0/None for no top-k), got {top_k}.")
    if callback_every < 1:
        raise InvalidInputError(f"callback_every must be >= 1, got {callback_every}.")

    geometry = inputs.geometry
    total = geometry.num_grid_tokens
    device = decoder_device(model)

    if reference_ids is None:
        reference_ids = encode_reference_images(model, inputs)
    reference_ids = [ids.to(device) for ids in reference_ids]
    input_ids = inputs.input_ids.to(device)
    if reference_ids:  # the placeholders become the references' VQ ids, as in GlmImageModel.forward
        image_mask = input_ids == model.config.image_token_id
        input_ids = input_ids.masked_scatter(image_mask, torch.cat(reference_ids))
    position_ids = inputs.position_ids.to(device)  # [3, 1, L]: the prompt is prefilled once for the whole batch
    decode_position_ids = inputs.decode_position_ids.to(device)  # [3, 1, total], the same for every sample

    uniforms = torch.stack([torch.rand(total, generator=g, device=g.device).to(device) for g in generators])
    pick = token_picker(temperature, top_k, top_p)
    updates = lora.projection_updates(loras, device)
    if use_fast_decoder(model, fast):
        tokens = fast_ar.decode(
            model,
            input_ids,
            position_ids,
            decode_position_ids,
            uniforms,
            pick,
            rows=NUM_VQ_CODES,
            callback=callback,
            callback_every=callback_every,
            compile=compile_decoder,
            cuda_graph=cuda_graph,
            updates=updates,
        )
        return _result(tokens, geometry, inputs, reference_ids)
    with lora.hooked(model, updates):
        tokens = _transformers_loop(
            model, input_ids, position_ids, decode_position_ids, uniforms, pick, callback, static_cache
        )
    return _result(tokens, geometry, inputs, reference_ids)


def _transformers_loop(model, input_ids, position_ids, decode_position_ids, uniforms, pick, callback, static_cache):
    """The reference decoder: transformers' forward one token at a time, with its own cache; tokens [N, total]."""
    from transformers import DynamicCache, StaticCache

    n, total = uniforms.shape
    prompt_length = input_ids.shape[1]

    if static_cache:
        cache = StaticCache(config=model.config, max_cache_len=prompt_length + total)
    else:
        cache = DynamicCache(config=model.config)
    tokens = torch.empty(n, total, dtype=torch.long, device=input_ids.device)

    logits = next_token_logits(model, input_ids, position_ids, cache).expand(n, -1)  # [N, 16512]
    expand_cache(cache, n)
    for step in range(total):
        token = pick(logits[:, :NUM_VQ_CODES], uniforms[:, step])  # [N]
        tokens[:, step] = token
        if callback is not None:
            callback(step + 1, total, tokens[:, : step + 1])
        if step + 1 < total:  # the last grid token is never fed back: the EOS after it is not sampled
            position = decode_position_ids[:, :, step : step + 1].expand(3, n, 1)
            logits = next_token_logits(model, token[:, None], position, cache)
    return tokens


def expand_cache(cache, n: int) -> None:
    """A transformers cache that holds one prompt's keys and values, made the cache of ``n`` samples that share that
    prompt: each layer's keys and values repeated along the batch (copied, not recomputed)."""
    if n == 1:
        return
    for layer in cache.layers:
        layer.keys = layer.keys.repeat(n, 1, 1, 1)
        layer.values = layer.values.repeat(n, 1, 1, 1)
        if hasattr(layer, "batch_size"):  # a StaticLayer's record of its shape
            layer.batch_size = n


def decoder_device(model) -> torch.device:
    """Where the text decoder runs (the lm_head's device; ``model.device`` is the vision encoder's, which stays on
    the CPU for text-to-image)."""
    return model.lm_head.weight.device


def use_fast_decoder(model, fast: bool | None) -> bool:
    """Whether ``generate_prior_tokens`` decodes with ``fast_ar`` (see its ``fast`` argument)."""
    if fast is False or (fast is None and decoder_device(model).type != "cuda"):
        return False
    reason = fast_ar.unsupported_reason(model)
    if reason is not None and fast:
        logging.warning("GLM-Image AR: the fast decoder cannot run this model (%s); using transformers.", reason)
    return reason is None


def _result(tokens: torch.Tensor, geometry: ARGeometry, inputs: ARInputs, reference_ids) -> ARResult:
    """ARResult from the sampled [N, total] grid tokens (preview first, then the target grid)."""
    h, w = geometry.grid_h, geometry.grid_w
    target_ids = tokens[:, geometry.num_preview_tokens :]
    reference_prior_ids = [
        upsample_token_ids(ids[None], gh, gw)[0] for ids, (gh, gw) in zip(reference_ids, inputs.reference_grids)
    ]
    return ARResult(
        target_ids=target_ids,
        preview_ids=tokens[:, : geometry.num_preview_tokens],
        grid_size=(h, w),
        preview_size=(geometry.preview_h, geometry.preview_w),
        prior_token_ids=upsample_token_ids(target_ids, h, w),
        reference_prior_ids=reference_prior_ids,
        reference_grid_sizes=[(2 * gh, 2 * gw) for gh, gw in inputs.reference_grids],
    )
