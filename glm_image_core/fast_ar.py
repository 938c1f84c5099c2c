"""Fast AR decoding: GLM-Image's text decoder as plain tensor code over transformers' own weights.

transformers' per-token forward costs ~60 ms on an H200 where reading the decoder's weights takes ~4 ms: the time
goes to Python, hundreds of small kernel launches and cache bookkeeping. Here one decode step is

    embed -> 40 x [RMSNorm, q and kv projections, 3-axis partial RoPE, K/V into a preallocated cache, attention over
    the cache, o projection, RMSNorm, residual, RMSNorm, gated MLP, RMSNorm, residual] -> RMSNorm
    -> the lm_head's 16384 VQ-code rows only -> warp + sample with the token's pre-drawn uniform

and every per-token index (cache slot, MRoPE position, uniform, output column) is read from a step counter that
lives on the device. So on CUDA the whole step, sampling included, is captured once as a CUDA graph and replayed
for every token; the host only waits every few tokens (to report progress and to let the user cancel), never per
token. Elsewhere (CPU) the same step runs eagerly, which is how the tests check it against transformers.

Numerics follow transformers' GLM-Image text model layer by layer: the same weights (read, never copied, except the
k and v projections, fused into one [512, 4096] matrix per layer, ~170 MB), the same dtype casts in RMSNorm and RoPE.
Quantised projections are read as stored, through their weight format's projection (``formats.projection``): int8
with its per-row scales, 4-bit packed, never a dequantised copy of a layer kept beside them. The prompt is prefilled once for the whole batch (its keys and values are copied into
every sample's cache slots): its samples differ only from their first sampled token on. The prefill attends with SDPA
like transformers; decode steps attend over a K/V cache in the model's dtype (keys and values are computed in that
dtype, so storing them in it loses nothing) with float32 scores and probabilities, the precision SDPA's kernels keep
internally: each layer's keys and values are cast to float32 (exactly) for its attention, a transient copy. The
cache costs 40 x 2 x 2 x 128 x 2 bytes = 40 KB per token and sample in bf16 (~200 MB at 2048x2048).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import formats, lora
from .cuda_graph import StepGraph
from .defaults import AR_DECODER_LAYERS_PREFIX
from .errors import InvalidInputError
from .formats import int8_kernel

CACHE_BLOCK = 1024  # the K/V cache length is a multiple of this (and of ATTENTION_CHUNK): few shapes to compile
ATTENTION_CHUNK = 64  # decode attention splits the keys into chunks of this many for the probs @ V product

# pick(logits [N, V] float32, uniforms [N]) -> tokens [N] int64, e.g. warp_logits + sample_tokens from ar.py
PickFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int, torch.Tensor], None]


def unsupported_reason(model) -> str | None:
    """Why this model cannot use the fast decoder (None when it can).

    The fast decoder reads the weights of ``GlmImageForConditionalGeneration`` directly, so it refuses anything it
    was not verified against: another layer layout, another activation or RoPE type, and any forward hook or
    pre-hook on the text model or the lm_head (the hook would be bypassed silently).
    """
    try:
        lm = model.model.language_model
        config = lm.config
        layer = lm.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        _ = (model.lm_head.weight, lm.embed_tokens.weight, lm.norm.weight, lm.rotary_emb.inv_freq)
        _ = (layer.input_layernorm, layer.post_self_attn_layernorm, layer.post_attention_layernorm)
        _ = (layer.post_mlp_layernorm, mlp.gate_up_proj, mlp.down_proj)
    except AttributeError as e:
        return f"not a transformers GlmImageForConditionalGeneration ({e})"
    rope = config.rope_parameters or {}
    if config.hidden_act != "silu":
        return f"hidden_act {config.hidden_act!r} (only 'silu' is implemented)"
    if rope.get("rope_type", "default") != "default" or getattr(lm.rotary_emb, "attention_scaling", 1.0) != 1.0:
        return f"rope_type {rope.get('rope_type')!r} (only the default RoPE is implemented)"
    if attn.q_proj.bias is None or attn.k_proj.bias is None or attn.v_proj.bias is None or attn.o_proj.bias is not None:
        return "attention biases differ from GLM-Image's (q/k/v with bias, o without)"
    if lm.training:
        return "the model is in training mode"
    hooked = [
        name
        for name, module in [*lm.named_modules(prefix="language_model"), ("lm_head", model.lm_head)]
        if module._forward_hooks or module._forward_pre_hooks
    ]
    if hooked:
        return f"forward hooks on {hooked[:3]} would be bypassed"
    return None


class LayerWeights(NamedTuple):
    """One decoder layer's weights: views of the HF parameters; its projections as their weight formats multiply
    (``formats.Projection``), the k and v projections joined."""

    input_norm: torch.Tensor
    q: formats.Projection
    q_bias: torch.Tensor
    kv: formats.Projection  # [2 * kv_heads * head_dim] outputs: k, then v
    kv_bias: torch.Tensor
    o: formats.Projection
    post_attn_norm: torch.Tensor  # post_self_attn_layernorm
    mlp_norm: torch.Tensor  # post_attention_layernorm (before the MLP, despite its name)
    gate_up: formats.Projection
    down: formats.Projection
    post_mlp_norm: torch.Tensor


def linear(x: torch.Tensor, projection: formats.Projection, bias: torch.Tensor | None = None) -> torch.Tensor:
    out = projection(x)
    return out if bias is None else out + bias


class Dims(NamedTuple):
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    scale: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' GlmImageRMSNorm (normalise in float32, cast back, scale in the input dtype); ``F.rms_norm``
    computes exactly that, with one fused kernel on CUDA."""
    return F.rms_norm(x, x.shape[-1:], weight, eps)


def rope_tables(
    inv_freq: torch.Tensor, mrope_section: list[int], position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE factors [N, T, head_dim] of 3-axis positions [3, N, T] for ``apply_rope``.

    The angles are GlmImageTextRotaryEmbedding's: frequency chunk i (of ``mrope_section``) turns with axis i % 3,
    the chunks laid out twice, over the first rotary_dim channels. Returned as ``cos`` (1 on the channels that do
    not turn) and a signed ``sin`` (-sin on the first rotary half, +sin on the second, 0 beyond), cast to ``dtype``
    as transformers casts them.
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, N, T, rotary_dim / 2]
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(mrope_section, dim=-1))], dim=-1)
    cos, sin = freqs.cos().to(dtype), freqs.sin().to(dtype)
    rest = head_dim - 2 * freqs.shape[-1]
    cos = torch.cat([cos, cos, cos.new_ones(*cos.shape[:-1], rest)], dim=-1)
    sin = torch.cat([-sin, sin, sin.new_zeros(*sin.shape[:-1], rest)], dim=-1)
    return cos, sin


def rotate_half_index(head_dim: int, rotary_dim: int, device) -> torch.Tensor:
    """The channel each output channel's sin term reads: the other half of the rotary channels (rotate-half);
    itself beyond them (where the signed sin is 0)."""
    index = torch.arange(head_dim, device=device)
    half = rotary_dim // 2
    index[:half] += half
    index[half:rotary_dim] -= half
    return index


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate_index: torch.Tensor) -> torch.Tensor:
    """Partial rotary embedding of [N, T, heads, head_dim] with ``rope_tables``' factors: x * cos + rotate_half(x) *
    sin on the rotary channels, x elsewhere, in three kernels."""
    return torch.addcmul(x * cos[:, :, None], x.index_select(-1, rotate_index), sin[:, :, None])


def layer_forward(x: torch.Tensor, w: LayerWeights, rope, attend, dims: Dims) -> torch.Tensor:
    """One GLM-4 decoder layer on x [N, T, hidden]; rope: (cos, sin, rotate_index) for ``apply_rope``;
    attend(q, k, v) ([N, T, heads or kv_heads, d] after RoPE) -> [N, T, heads * d] attends and stores the new keys
    and values."""
    n, t, _ = x.shape
    h = rms_norm(x, w.input_norm, dims.eps)
    q = linear(h, w.q, w.q_bias).view(n, t, dims.heads, dims.head_dim)
    k, v = linear(h, w.kv, w.kv_bias).view(n, t, 2 * dims.kv_heads, dims.head_dim).chunk(2, dim=2)
    a = attend(apply_rope(q, *rope), apply_rope(k, *rope), v)
    x = x + rms_norm(linear(a, w.o), w.post_attn_norm, dims.eps)
    gate, up = linear(rms_norm(x, w.mlp_norm, dims.eps), w.gate_up).chunk(2, dim=-1)
    return x + rms_norm(linear(up * F.silu(gate), w.down), w.post_mlp_norm, dims.eps)


def decode_layer(
    x: torch.Tensor,
    w: LayerWeights,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot: torch.Tensor,
    key_bias: torch.Tensor,
    dims: Dims,
) -> torch.Tensor:
    """``layer_forward`` for one new token per sample (x [N, 1, hidden]) at cache slot ``slot`` (long [1])."""

    def attend(q, k, v):
        k_cache.index_copy_(2, slot, k.transpose(1, 2))
        v_cache.index_copy_(2, slot, v.transpose(1, 2))
        return attend_cache(q[:, 0], k_cache, v_cache, key_bias, dims.scale)[:, None]

    return layer_forward(x, w, rope, attend, dims)


def attend_cache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sample over the cache: q [N, heads, d]; caches [N, kv_heads, L, d] in any float dtype; key_bias
    [L] float32 (0 for filled slots, -inf beyond). Returns [N, heads * d] in q's dtype.

    Scores, probabilities and their product with V in float32 (the cache cast to it, exactly, for this layer only).
    Grouped-query attention without repeating the cache per query head: the query heads that share a key/value head
    act as that head's queries. probs @ V is summed over chunks of keys so that the product has many independent
    pieces.
    """
    n, heads, d = q.shape
    kv_heads, length = k_cache.shape[1], k_cache.shape[2]
    groups = heads // kv_heads
    k_cache, v_cache = k_cache.float(), v_cache.float()
    scores = torch.matmul(q.view(n, kv_heads, groups, d).float(), k_cache.transpose(2, 3))  # [N, kvh, g, L]
    probs = torch.add(key_bias, scores, alpha=scale).softmax(dim=-1)
    chunks = length // ATTENTION_CHUNK
    probs = probs.view(n, kv_heads, groups, chunks, ATTENTION_CHUNK).transpose(2, 3)  # [N, kvh, c, g, chunk]
    values = v_cache.view(n, kv_heads, chunks, ATTENTION_CHUNK, d)
    out = torch.matmul(probs, values).sum(dim=2)  # [N, kvh, g, d]
    return out.reshape(n, heads * d).to(q.dtype)


def layer_weights(layer, name: str, updates: dict[str, lora.ProjectionUpdate]) -> LayerWeights:
    """The weights of one transformers GlmImageTextDecoderLayer (module ``name``), in any weight format
    (``formats``), each projection with its adapters' update beside it (``updates``, by module name)."""
    attn = layer.self_attn

    def projection(*parts: str):
        modules = [layer.get_submodule(part) for part in parts]
        parts_updates = [updates.get(f"{name}.{part}") for part in parts]
        update = parts_updates[0] if len(parts) == 1 else lora.joined(parts_updates, [m.out_features for m in modules])
        return lora.updated(formats.projection(modules), update)

    return LayerWeights(
        input_norm=layer.input_layernorm.weight,
        q=projection("self_attn.q_proj"),
        q_bias=attn.q_proj.bias,
        kv=projection("self_attn.k_proj", "self_attn.v_proj"),
        kv_bias=torch.cat([attn.k_proj.bias, attn.v_proj.bias]),
        o=projection("self_attn.o_proj"),
        post_attn_norm=layer.post_self_attn_layernorm.weight,
        mlp_norm=layer.post_attention_layernorm.weight,
        gate_up=projection("mlp.gate_up_proj"),
        down=projection("mlp.down_proj"),
        post_mlp_norm=layer.post_mlp_layernorm.weight,
    )


class FastDecoder:
    """The text decoder of one ``GlmImageForConditionalGeneration`` with a static K/V cache in the model's dtype for
    ``batch`` sequences of at most ``max_length`` tokens (prompt + decoded). Holds views of the model's weights (and
    the fused k/v projections), and the adapters' updates beside them (``updates``: ``lora.projection_updates``);
    build one per generation (it is cheap) and drop it afterwards to free the cache and the captured graph."""

    def __init__(
        self,
        model,
        batch: int,
        max_length: int,
        compile: bool = False,
        updates: dict[str, lora.ProjectionUpdate] | None = None,
    ):
        lm = model.model.language_model
        config = lm.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dims = Dims(
            config.num_attention_heads, config.num_key_value_heads, head_dim, config.rms_norm_eps, head_dim**-0.5
        )
        self.mrope_section = list(config.rope_parameters.get("mrope_section", [8, 12, 12]))
        self.inv_freq = lm.rotary_emb.inv_freq
        self.embed_tokens = lm.embed_tokens  # the prompt's lookup (it may hold only the VQ-code rows on the device)
        self.embed = lm.embed_tokens.weight  # decode steps feed back VQ codes: rows 0..16383
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.final_norm = lm.norm.weight
        self.layers = [
            layer_weights(layer, f"{AR_DECODER_LAYERS_PREFIX}{i}", updates or {}) for i, layer in enumerate(lm.layers)
        ]
        self.lm_head = model.lm_head.weight
        self.batch = batch
        self.max_length = math.ceil(max_length / CACHE_BLOCK) * CACHE_BLOCK
        shape = (batch, self.dims.kv_heads, self.max_length, head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.key_index = torch.arange(self.max_length, device=self.device)
        self.rotate_index = rotate_half_index(head_dim, 2 * self.inv_freq.numel(), self.device)
        # compile: kernel fusion for the decode layer (RMSNorm, RoPE, cache writes, softmax: ~30 small kernels a
        # layer in eager mode). One compilation serves all layers (same shapes); it takes a while the first time.
        self.compiled_layer = torch.compile(decode_layer, dynamic=False, fullgraph=True) if compile else None

    def decode_layer(self, *args) -> torch.Tensor:
        """``decode_layer``, compiled if asked. A compilation that fails (no Triton, an unsupported op) falls back
        to the eager layer with a warning; the layer's cache write is idempotent, so the retry is exact."""
        if self.compiled_layer is not None:
            try:
                return self.compiled_layer(*args)
            except Exception as e:  # torch.compile raises many types (BackendCompilerFailed, Unsupported, ...)
                logging.warning("GLM-Image AR: torch.compile of the decode layer failed (%s); running eagerly.", e)
                self.compiled_layer = None
        return decode_layer(*args)

    def rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE factors (cos, signed sin) [N, T, head_dim] of positions [3, N, T] (see ``rope_tables``)."""
        return rope_tables(self.inv_freq, self.mrope_section, position_ids, self.dims.head_dim, self.dtype)

    def _logits(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """Final norm and the first ``rows`` rows of the lm_head on [N, hidden] -> float32 [N, rows]."""
        return F.linear(rms_norm(x, self.final_norm, self.dims.eps), self.lm_head[:rows]).float()

    def prefill(self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: int) -> torch.Tensor:
        """Run the prompt that every sample shares (input_ids [1, T], positions [3, 1, T]) once and copy its keys
        and values into cache slots 0..T-1 of every sample; float32 logits of the last position [1, rows]. Causal
        SDPA over the prompt itself, as transformers computes it."""
        if input_ids.shape[0] != 1:
            raise InvalidInputError(
                f"FastDecoder.prefill got input_ids of shape {tuple(input_ids.shape)}; it runs the one prompt a batch "
                "shares, [1, T]. Pass the prompt once; the batch size is the decoder's."
            )
        t = input_ids.shape[1]
        rope = (*self.rope(position_ids), self.rotate_index)
        groups = self.dims.heads // self.dims.kv_heads
        x = self.embed_tokens(input_ids)
        for i, weights in enumerate(self.layers):

            def attend(q, k, v, i=i):
                self.k_cache[i][:, :, :t] = k.transpose(1, 2)
                self.v_cache[i][:, :, :t] = v.transpose(1, 2)
                k = k.transpose(1, 2).repeat_interleave(groups, dim=1)
                v = v.transpose(1, 2).repeat_interleave(groups, dim=1)
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True, scale=self.dims.scale)
                return out.transpose(1, 2).flatten(2)

            x = layer_forward(x, weights, rope, attend, self.dims)
        return self._logits(x[:, -1], rows)

    def step(self, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slot: torch.Tensor, rows: int):
        """One new token per sample: token [N, 1] at cache slot ``slot`` (long [1], on the device; every earlier slot
        filled) with RoPE factors cos, sin [N, 1, head_dim] from ``rope``. Returns float32 logits [N, rows]."""
        rope = (cos, sin, self.rotate_index)
        key_bias = torch.zeros(self.max_length, device=self.device).masked_fill(self.key_index > slot, -math.inf)
        x = F.embedding(token, self.embed)
        for i, weights in enumerate(self.layers):
            x = self.decode_layer(x, weights, rope, self.k_cache[i], self.v_cache[i], slot, key_bias, self.dims)
        return self._logits(x[:, -1], rows)


class _DecodeLoop:
    """Device-side state of one generation, and the per-token step that reads and advances it."""

    def __init__(self, decoder: FastDecoder, prompt_length: int, decode_position_ids, uniforms, pick, rows):
        n, total = uniforms.shape
        self.decoder, self.pick, self.rows, self.total = decoder, pick, rows, total
        self.uniforms = uniforms  # [N, total]
        self.cos, self.sin = decoder.rope(decode_position_ids)
        self.prompt_length = torch.tensor([prompt_length], device=decoder.device)
        self.tokens = torch.zeros(n, total, dtype=torch.long, device=decoder.device)
        self.last = torch.zeros(n, 1, dtype=torch.long, device=decoder.device)  # the token to feed next
        self.index = torch.zeros(1, dtype=torch.long, device=decoder.device)  # its index among the new tokens

    def first(self, logits: torch.Tensor) -> None:
        token = self.pick(logits, self.uniforms[:, 0])
        self.tokens[:, 0] = token
        self.last.copy_(token[:, None])

    def step(self) -> None:
        """Feed the last token, sample the next one. Only device tensors: capturable as a CUDA graph."""
        i = self.index
        cos, sin = self.cos.index_select(1, i), self.sin.index_select(1, i)
        logits = self.decoder.step(self.last, cos, sin, self.prompt_length + i, self.rows)
        i.add_(1)
        token = self.pick(logits, self.uniforms.index_select(1, i)[:, 0])
        self.last.copy_(token[:, None])
        self.tokens.index_copy_(1, i, token[:, None])


def decode(
    model,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    decode_position_ids: torch.Tensor,
    uniforms: torch.Tensor,
    pick: PickFn,
    *,
    rows: int,
    callback: ProgressCallback | None = None,
    callback_every: int = 16,
    cuda_graph: bool | None = None,
    compile: bool = False,
    updates: dict[str, lora.ProjectionUpdate] | None = None,
) -> torch.Tensor:
    """Sample ``uniforms.shape[1]`` tokens per sample after the prompt; returns them, long [N, total].

    input_ids [1, T] (the prompt every sample shares, reference VQ ids already in place; prefilled once),
    position_ids [3, 1, T], decode_position_ids [3, 1 or N, >=total] (the position of the k-th new token when it is
    fed back), uniforms [N, total] on the model's device, one per token. ``pick(logits[:, :rows], uniforms[:, k])`` chooses token k. callback(step, total, tokens[:, :step]) runs
    every ``callback_every`` tokens and after the last (step = tokens so far); an exception raised in it stops the
    generation. cuda_graph: None = on CUDA devices (False, e.g., for ComfyUI's --disable-cuda-graphs). compile: fuse
    each decode layer's small kernels with ``torch.compile`` (see ``FastDecoder``). updates: adapters' updates of
    projections, by module name (``lora.projection_updates``).

    On CUDA the host queues up to two chunks of ``callback_every`` tokens and reports a chunk once the GPU has
    finished it, so the callback trails the GPU by at most one chunk and a cancel lands within two.
    """
    n, total = uniforms.shape
    int8_kernel.FUSED_KERNEL.retry()  # a kernel error of an earlier generation (a capture, say) does not last
    decoder = FastDecoder(model, n, input_ids.shape[1] + total, compile=compile, updates=updates)
    loop = _DecodeLoop(decoder, input_ids.shape[1], decode_position_ids, uniforms, pick, rows)
    loop.first(decoder.prefill(input_ids, position_ids, rows).expand(n, -1))
    cuda_device = decoder.device if decoder.device.type == "cuda" else None
    runner = StepGraph(loop.step, decoder.device) if cuda_device and cuda_graph is not False else None
    run = runner or loop.step

    pending: deque[tuple[int, torch.cuda.Event | None]] = deque()
    done = 1
    try:
        report(callback, pending, done, total, loop.tokens, cuda_device, final=total == 1)
        while done < total:
            chunk = min(callback_every - done % callback_every, total - done)  # keep reports on multiples of k
            for _ in range(chunk):
                run()
            done += chunk
            report(callback, pending, done, total, loop.tokens, cuda_device, final=done == total)
    finally:
        if runner is not None:
            runner.release()  # its memory pool goes back to the allocator now, not when Python collects it
    return loop.tokens


def report(
    callback, pending: deque, done: int, total: int, tokens: torch.Tensor, cuda_device: torch.device | None, final: bool
) -> None:
    """Report ``done`` tokens. On CUDA (``cuda_device``: the model's GPU) the report waits in ``pending`` until the
    device has finished that work, and at most one chunk stays queued beyond the one being computed (none after the
    ``final`` one)."""
    event = None
    if cuda_device is not None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(cuda_device))  # the model's stream, not the current device's
    pending.append((done, event))
    keep = 1 if cuda_device is not None and not final else 0
    while len(pending) > keep:
        step, event = pending.popleft()
        if event is not None:
            event.synchronize()  # also bounds how far the host runs ahead of the GPU
        if callback is not None:
            callback(step, total, tokens[:, :step])
