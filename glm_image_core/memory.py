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

from collections.abc import Iterable

import torch


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
    from .quant import QUANTIZED_PROJECTIONS

    lm = model.model.language_model
    projections = {  # their weights in any format: bf16, int8 + scale, 4-bit packed + scales and zeros
        id(p): p
        for layer in lm.layers
        for name in QUANTIZED_PROJECTIONS
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


def ar_working_bytes(
    text_config, batch: int, prompt_length: int, new_tokens: int, dtype_bytes: int = 2, int8: bool = False
) -> int:
    """Device memory the AR decode needs beside its weights (fast_ar), from the text config's sizes:

    - the K/V cache, counted at float32: layers x 2 x kv_heads x head_dim x 4 B per token and sample, for prompt +
      new tokens rounded up to ``fast_ar.CACHE_BLOCK`` (1024) slots. fast_ar keeps it in the model's dtype; the
      difference stands in, roughly, for the fused k/v projections and the per-layer float32 casts it does not
      itemise (not yet checked against a measured decode);
    - the prefill's largest live activations (the prompt runs once for the batch; counted per sample, which
      overcounts): per prompt token the residual, the norm output, q/k/v, the
      attention output and the MLP's gate_up output (2 x intermediate) and its product (intermediate);
    - with int8 weights, the prefill's dequantised copy of the largest projection (gate_up), one matrix at a time.
    The transformers loop (CPU, tests) uses a bf16 cache of the same length: less than this."""
    from .fast_ar import CACHE_BLOCK

    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    slots = -(-(prompt_length + new_tokens) // CACHE_BLOCK) * CACHE_BLOCK
    cache = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4 * slots * batch
    per_token = 4 * c.hidden_size + 2 * c.num_key_value_heads * head_dim + 3 * c.intermediate_size
    prefill = batch * prompt_length * per_token * dtype_bytes
    dequantised = 2 * c.intermediate_size * c.hidden_size * dtype_bytes if int8 else 0
    return cache + prefill + dequantised


def ar_model_working_bytes(model, batch: int, prompt_length: int, new_tokens: int) -> int:
    """``ar_working_bytes`` for a loaded GlmImageForConditionalGeneration (its config, dtype and weight format)."""
    from .quant import Int8Linear
    from .w4a16 import W4A16Linear

    # int8 and 4-bit layers both make a dequantised copy of a matrix at a time in a prefill
    int8 = isinstance(model.model.language_model.layers[0].mlp.down_proj, (Int8Linear, W4A16Linear))
    dtype_bytes = model.lm_head.weight.element_size()
    return ar_working_bytes(model.config.text_config, batch, prompt_length, new_tokens, dtype_bytes, int8)
