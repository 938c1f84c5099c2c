"""What each stage needs on the device: the AR model's parts, and their bytes.

The AR model is one transformers module, but its stages need different parts of it:

- decoding (every image): the text decoder and the lm_head. With ``loading.trim_embedding`` the decoder's input
  embedding parameter holds only the 16384 VQ-code rows (decoding feeds back codes only); the full 168064-row
  table stays in CPU memory for the prompt's text tokens.
- reference images (edits only): the vision encoder and the VQ codebook, run once before decoding.

So a host moves ``ar_decode_modules`` for every generation and ``ar_vision_modules`` only when references are given
(and not both at once: the vision stage ends before decoding starts).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from . import formats
from .defaults import AR_DECODER_PROJECTIONS, NUM_VQ_CODES


def ar_decode_modules(model) -> list[torch.nn.Module]:
    """The parts of a GlmImageForConditionalGeneration that decoding reads: text decoder, lm_head."""
    return [model.model.language_model, model.lm_head]


def ar_vision_modules(model) -> list[torch.nn.Module]:
    """The parts that turn reference images into VQ ids: the ViT and the VQ model."""
    return [model.model.visual, model.model.vqmodel]


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tensor listed twice counts once)."""
    seen = {}
    for t in tensors:
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules`` (what moving them to a device copies)."""
    return tensor_bytes(t for m in modules for t in [*m.parameters(), *m.buffers()])


def ar_bytes_by_component(model) -> dict[str, int]:
    """The AR model's bytes by part, in the order a host cares about them. Keys:

    ``decoder projections`` (q/k/v/o, gate_up, down of every layer, with their int8 scales if any),
    ``decoder embedding`` (the embedding parameter: all rows, or the code rows when trimmed), ``lm_head``,
    ``decoder norms, biases, RoPE`` (the rest of the text decoder), ``vision encoder + VQ (edits only)``, and
    ``embedding table kept in CPU memory`` (0 unless trimmed). The first four are what decoding keeps resident."""
    lm = model.model.language_model
    projections = {  # their weights in any format: bf16, int8 + scale, 4-bit packed + scales and zeros
        id(p): p
        for layer in lm.layers
        for name in AR_DECODER_PROJECTIONS
        for p in layer.get_submodule(name).parameters()
        if p is not getattr(layer.get_submodule(name), "bias", None)
    }
    embedding = lm.embed_tokens.weight
    rest = [t for t in [*lm.parameters(), *lm.buffers()] if id(t) not in projections and t is not embedding]
    table = getattr(lm.embed_tokens, "table", None)
    return {
        "decoder projections": tensor_bytes(projections.values()),
        "decoder embedding": tensor_bytes([embedding]),
        "lm_head": module_bytes(model.lm_head),
        "decoder norms, biases, RoPE": tensor_bytes(rest),
        "vision encoder + VQ (edits only)": module_bytes(*ar_vision_modules(model)),
        "embedding table kept in CPU memory": 0 if table is None else tensor_bytes([table]),
    }


def ar_decode_bytes(model) -> int:
    """What decoding keeps on the device: the text decoder and the lm_head (``ar_decode_modules``)."""
    return module_bytes(*ar_decode_modules(model))


@dataclass(frozen=True)
class ARWorkingMemory:
    """The device memory an AR decode (``fast_ar.decode``) allocates beside the model's weights, buffer by buffer
    (bytes). ``persistent``: held from the decoder's construction to the end of the generation. ``moments``: the
    transient buffers alive at each candidate for the peak (one at a time). ``total``: the peak."""

    persistent: dict[str, int]
    moments: dict[str, dict[str, int]]

    @property
    def total(self) -> int:
        return sum(self.persistent.values()) + max(sum(moment.values()) for moment in self.moments.values())


def ar_working_memory(
    text_config,
    batch: int,
    prompt_length: int,
    new_tokens: int,
    dtype_bytes: int = 2,
    weights: formats.WeightFormat = formats.PLAIN,
    group_size: int = 128,
) -> ARWorkingMemory:
    """What ``fast_ar.decode`` allocates for ``batch`` samples of a ``prompt_length``-token prompt and ``new_tokens``
    sampled tokens, with activations of ``dtype_bytes`` (the model's dtype) and projections in the weight format
    ``weights`` (``group_size``: of 4-bit layers).

    The prompt is prefilled once (batch 1), one layer at a time; its largest moments are in the MLP, and for quantised
    projections in their largest matmul (gate_up), as the format counts it. Sampling is counted as published
    (temperature != 1 and top-p < 1: its largest path). A decode step's matmuls add less than the prefill's (CUDA's
    fused int8 kernel allocates only its output; elsewhere one small-batch matmul at a time); the first decode step
    may set up what its format needs on the device (the int4 matmul's repacked copy, counted for its largest layer
    and kept for every layer). On CUDA the decode step's buffers live in the CUDA graph's own pool; the caching
    allocator frees the prefill's cached blocks for it when the device is full. Checked against the allocations of
    generations measured on the CPU (``tests/test_memory.py``)."""
    from .fast_ar import ATTENTION_CHUNK, CACHE_BLOCK

    c, n, t, b = text_config, batch, prompt_length, dtype_bytes
    hidden, inter, layers, heads = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = 2 * c.num_key_value_heads * head_dim  # one token's keys and values in one layer, elements
    slots = -(-(prompt_length + new_tokens) // CACHE_BLOCK) * CACHE_BLOCK  # the cache's length (fast_ar.FastDecoder)
    f32, i64, vocab = 4, 8, NUM_VQ_CODES
    shapes = {  # one decoder layer's projections, (in, out)
        "q/o": (hidden, hidden),
        "k/v": (hidden, kv // 2),
        "gate_up": (hidden, 2 * inter),
        "down": (inter, hidden),
    }

    persistent = {
        "K/V cache (model dtype)": layers * n * slots * kv * b,
        "fused k/v projections and biases": layers * (weights.joined_bytes(kv, hidden, b, group_size) + kv * b),
        "decode RoPE tables (cos, sin)": 2 * new_tokens * head_dim * b,
        "sampled tokens, uniforms": n * new_tokens * (i64 + f32),
        "cache slot index": slots * i64,
        "prompt ids and positions, decode positions": (4 * t + 3 * new_tokens) * i64,
    }
    copies = layers * sum(
        weights.device_copy_bytes(i, o, group_size) * (2 if name in ("q/o", "k/v") else 1)
        for name, (i, o) in shapes.items()
    )
    if copies:
        persistent["device copies the projections make for themselves"] = copies
    layer = {  # a prefill layer's tensors that live until its end (layer_forward's locals)
        "prompt RoPE tables (cos, sin)": 2 * t * head_dim * b,
        "residual stream in": t * hidden * b,
        "normed layer input": t * hidden * b,
        "q, k, v projections": t * (hidden + kv) * b,
        "attention output": t * hidden * b,
        "residual stream after attention": t * hidden * b,
    }
    moments = {
        "prefill: MLP product": {
            **layer,
            "MLP gate_up output": t * 2 * inter * b,
            "silu(gate), up * silu(gate)": t * 2 * inter * b,
        },
        "prefill: MLP output norm": {
            **layer,
            "MLP gate_up output": t * 2 * inter * b,
            "MLP down output": t * hidden * b,
            # F.rms_norm off CUDA: the input upcast (unless float32), normalised, scaled, all float32 (CUDA's fused
            # kernel writes only its output, and there the product above is the larger moment)
            "F.rms_norm's float32 copies": (2 if b == f32 else 3) * t * hidden * f32,
        },
        "decode: attention over the cache": {  # one layer (attend_cache)
            "one layer's K/V cast to float32 (unless float32)": 0 if b == f32 else n * slots * kv * f32,
            "scores, biased scores, probabilities": 3 * n * heads * slots * f32,
            "probs @ V per key chunk": n * heads * (slots // ATTENTION_CHUNK) * head_dim * f32,
            "key mask": slots * f32,
        },
        "decode: sampling": {  # ar.warp_logits' top-p on the float32 code logits [batch, 16384]
            "logits": n * vocab * f32,
            "temperature-scaled logits": n * vocab * f32,
            "sorted logits": n * vocab * f32,
            "sort order (int64)": n * vocab * i64,
            "sorted probabilities and their cumsum": 2 * n * vocab * f32,  # (CPU: sort's int64 scratch, as large)
        },
    }
    gate_up_input = {**layer, "normed MLP input": t * hidden * b}
    for name, buffers in weights.many_rows_matmul_bytes(hidden, 2 * inter, t, b).items():
        moments[f"prefill: {weights.name} gate_up {name}"] = {**gate_up_input, **buffers}
    first_step = weights.first_step_bytes(hidden, 2 * inter, group_size)
    if first_step:
        moments[f"first decode step: {weights.name} gate_up set up"] = first_step
    return ARWorkingMemory(persistent, moments)


def ar_model_working_memory(model, batch: int, prompt_length: int, new_tokens: int) -> ARWorkingMemory:
    """``ar_working_memory`` for a loaded GlmImageForConditionalGeneration (its config, dtype and weight format)."""
    projection = model.model.language_model.layers[0].mlp.gate_up_proj
    dtype_bytes = model.lm_head.weight.element_size()
    return ar_working_memory(
        model.config.text_config,
        batch,
        prompt_length,
        new_tokens,
        dtype_bytes,
        formats.of_layer(projection),
        getattr(projection, "group_size", 128),
    )


def ar_model_working_bytes(model, batch: int, prompt_length: int, new_tokens: int) -> int:
    """Device memory the AR decode of a loaded GlmImageForConditionalGeneration needs beside its weights: the peak of
    ``ar_model_working_memory``."""
    return ar_model_working_memory(model, batch, prompt_length, new_tokens).total


def glyph_working_memory(config, lengths: Sequence[int], dtype_bytes: int = 2) -> int:
    """Bytes ``glyph.encode_glyphs`` allocates beside the Glyph-ByT5 encoder's weights for spans of ``lengths`` tokens
    (``glyph.span_lengths``; ``config``: its T5Config; ``dtype_bytes``: its dtype's size): the peak of its largest
    encoder call (``glyph.length_batches``), plus the token ids and every span's embedding kept until they are joined.

    One call of ``n`` spans padded to ``w`` tokens (transformers' T5 encoder, as measured on the CPU): the relative
    position bias is made once from ``w x w`` int64 temporaries (49 bytes per pair at their peak) and kept as
    ``[heads, w, w]``, beside a bool ``[n, w, w]`` mask when a span is padded. Each layer's MLP then holds the
    residual stream, its two sums, the input embedding, the normed input and one projection output (5 x d_model per
    token) with the gated GELU's input and temporaries (4 x d_ff); its attention q, k, v, output and the float mask
    made of the bias. Checked against measured allocations (``tests/test_memory.py``): from just above the CPU's peak
    (a call on 2048 tokens, bf16) to 20% over it (many short spans: the MLP's count is the larger of two CPU
    kernels' live sets)."""
    from .glyph import length_batches

    b, d, ff = dtype_bytes, config.d_model, config.d_ff
    heads, inner = config.num_heads, config.num_heads * config.d_kv
    calls = []
    for group in length_batches(lengths):
        n, w = len(group), max(lengths[i] for i in group)
        tokens = n * w
        bias = heads * w * w * b
        mask = n * w * w if any(lengths[i] < w for i in group) else 0
        moments = {
            "position buckets (int64)": 49 * w * w + tokens * 2 * d * b,
            "MLP": bias + mask + tokens * (5 * d + 4 * ff) * b,
            "attention": bias + mask + n * heads * w * w * b + tokens * (4 * d + 4 * inner) * b,
        }
        calls.append(max(moments.values()) + tokens * 2 * 8)  # + the call's ids and mask (int64)
    ids = 2 * len(lengths) * max(lengths) * 8  # the padded ids and mask of every span
    embeddings = sum(lengths) * d * b  # each call's real tokens (kept, then joined into as many bytes)
    return ids + max(embeddings + max(calls), 2 * embeddings)


def glyph_model_working_bytes(text_encoder, texts: Sequence[str], tokenizer) -> int:
    """``glyph_working_memory`` of a loaded Glyph-ByT5 encoder for these glyph spans (as ``glyph.encode_glyphs``
    takes them)."""
    from .glyph import span_lengths

    dtype_bytes = next(text_encoder.parameters()).element_size()
    return glyph_working_memory(text_encoder.config, span_lengths(texts, tokenizer), dtype_bytes)


def ar_vision_working_memory(vision_config, vq_config, patches: Sequence[int], dtype_bytes: int = 2) -> int:
    """Bytes ``ar.encode_reference_images`` allocates beside the vision encoder's and the VQ model's weights for
    reference images of ``patches`` 16-pixel patches each (``dtype_bytes``: the model's dtype's size).

    The embeddings first: the position table ([(image_size / 16)^2, hidden]) copied to float32 for its interpolation
    (in half precision; in float32 the copy is the table itself), the interpolated positions in float32 and the patch
    embeddings, their sum and the input to the blocks in the model's dtype (``4 + 3 x dtype`` bytes per feature). The
    ViT then runs once on every image's patches; its largest moment is an MLP: the fc1 output and the GELU's, in
    float32 at least (``4 + dtype`` bytes per intermediate feature), beside the residual stream, its sum and the norm
    (3 x hidden). Its features ([all patches, hidden]) are kept while the VQ model quantises one image at a time: the
    codebook normalised ([16384, embed_dim]) and three [patches, embed_dim] copies of the image's features (permuted,
    normalised twice), beside the largest of: the codebook's square (its norms' input); in half precision, a contiguous
    copy of the transposed codebook that the CPU's matmul makes, with the distances' sum and product in the model's
    dtype (counted on every device: on CUDA it overstates by at most those two [patches, 16384] tensors); the
    [patches, 16384] distances as a sum and a matmul product in the model's dtype with the matmul's float32 result
    (``2 x dtype + 4`` bytes each). For a few small references the codebook terms outweigh the distances.
    Checked against measured allocations (``tests/test_memory.py``)."""
    b, hidden, inter = dtype_bytes, vision_config.hidden_size, vision_config.intermediate_size
    codes, embed = vq_config.num_embeddings, vq_config.embed_dim
    total = sum(patches)
    positions = (vision_config.image_size // vision_config.patch_size) ** 2
    embeddings = (positions * hidden * 4 if b < 4 else 0) + total * hidden * (4 + 3 * b)
    vit = total * (inter * (b + 4) + 3 * hidden * b)
    codebook, image = codes * embed * b, max(patches)
    matmul_copy = codebook + 2 * image * codes * b if b < 4 else 0
    vq = codebook + 3 * image * embed * b + max(codebook, matmul_copy, image * codes * (2 * b + 4))
    return max(embeddings, total * hidden * b + max(vit, vq))


def ar_model_vision_working_bytes(model, image_grid_thw) -> int:
    """``ar_vision_working_memory`` of a loaded GlmImageForConditionalGeneration for its reference images:
    ``image_grid_thw`` [n_references, 3] (t, h, w) patches of each (``ARInputs.image_grid_thw``'s first rows)."""
    patches = [int(t * h * w) for t, h, w in image_grid_thw.tolist()]
    dtype_bytes = next(model.model.visual.parameters()).element_size()
    return ar_vision_working_memory(model.config.vision_config, model.config.vq_config, patches, dtype_bytes)
