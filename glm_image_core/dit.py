"""The GLM-Image DiT (diffusers' `GlmImageTransformer2DModel`), written for this project.

Attribute names are the published checkpoint's key names, so `transformer/*.safetensors` loads by name. Every
parameterised layer comes from the `operations` namespace (default `torch.nn`), so a host can swap in its own
layers (ComfyUI's `comfy.ops`: fp8 storage, manual casting, partial offload) without the model knowing. Attention
is one replaceable function.

The model is joint attention over [glyph text tokens; image patch tokens]. Two GLM-specific inputs beside the
latent: the AR model's visual tokens (`prior_token_id`, upsampled to the 2x2-patch grid), embedded and added to the
patch embeddings, and the glyph embeddings of the quoted text. For image editing, each reference image is run once
through the model to produce per-layer keys/values (`encode_reference`) that conditional passes attend to.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# attention(q, k, v, key_mask, **options) -> out; q, k, v: [B, heads, L, head_dim]; key_mask: bool [B, Lk] (True =
# attend) or None; out: [B, heads, Lq, head_dim]. `options` are what the caller of a block passed as
# `attention_options` (a host's per-call settings, e.g. ComfyUI's transformer_options); none from `forward`.
AttentionFn = Callable[..., torch.Tensor]

# A run of batch rows whose glyph text is right-padded to the same number of real tokens: (first row, end row, n).
TextGroups = list[tuple[int, int, int]]
# A host's hook around each block: run_block(index, block_fn, x, text) -> (x, text) (see run_blocks).
BlockRunner = Callable[
    [int, Callable[..., tuple[torch.Tensor, torch.Tensor]], torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor],
]


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, **options
) -> torch.Tensor:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding [N] -> [N, dim] as diffusers' `Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)`."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_2d(height: int, width: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [height*width, head_dim] for a row-major patch grid: half the channels rotate with the row index,
    half with the column index, each half laid out twice (rotate-half convention)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (
        10000.0 ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float32, device=device)[:quarter] / (head_dim // 2))
    )
    rows = torch.outer(torch.arange(height, device=device, dtype=torch.float32), inv_freq)  # [h, d/4]
    cols = torch.outer(torch.arange(width, device=device, dtype=torch.float32), inv_freq)  # [w, d/4]
    freqs = torch.cat([rows[:, None].expand(height, width, -1), cols[None].expand(height, width, -1)], dim=-1)
    freqs = torch.cat([freqs, freqs], dim=-1).reshape(height * width, head_dim)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, heads, L, d]; cos/sin: [L, d]. Computed in fp32 like the reference."""
    x1, x2 = x.float().unflatten(-1, (2, -1)).unbind(-2)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


@dataclass
class ReferenceKV:
    """Keys/values of reference images, one (k, v) per layer, each [B_ref, heads, L_ref, head_dim], computed once per
    sampling run by `GlmImageTransformer2DModel.encode_reference`. B_ref is 1 (shared by the batch) or the batch size.
    Conditional passes attend to them before their own tokens; the unconditional pass does not get them."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]

    @staticmethod
    def concat(parts: list[ReferenceKV]) -> ReferenceKV:
        """Several references of one sample attend together: join along the sequence."""
        return ReferenceKV(
            [
                (torch.cat([p.layers[i][0] for p in parts], 2), torch.cat([p.layers[i][1] for p in parts], 2))
                for i in range(len(parts[0].layers))
            ]
        )

    @staticmethod
    def stack(samples: list[ReferenceKV]) -> ReferenceKV:
        """One ReferenceKV per batch sample (equal lengths) -> a batched one."""
        return ReferenceKV(
            [
                (torch.cat([s.layers[i][0] for s in samples]), torch.cat([s.layers[i][1] for s in samples]))
                for i in range(len(samples[0].layers))
            ]
        )


class FeedForward(nn.Module):
    """diffusers' FeedForward: `net.0.proj` (+activation), dropout at `net.1` (no weights), `net.2`."""

    def __init__(self, dim, dim_out, inner_dim, activation, dtype=None, device=None, operations=nn):
        super().__init__()
        self.activation = activation
        proj = nn.Module()
        proj.proj = operations.Linear(dim, inner_dim, dtype=dtype, device=device)
        self.net = nn.ModuleList(
            [proj, nn.Identity(), operations.Linear(inner_dim, dim_out, dtype=dtype, device=device)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.activation(self.net[0].proj(x)))


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class Attention(nn.Module):
    def __init__(self, dim, heads, head_dim, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = operations.Linear(dim, inner, dtype=dtype, device=device)
        self.to_k = operations.Linear(dim, inner, dtype=dtype, device=device)
        self.to_v = operations.Linear(dim, inner, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(inner, dim, dtype=dtype, device=device), nn.Identity()])

    def qkv(self, x: torch.Tensor, image_len: int, rope: tuple[torch.Tensor, torch.Tensor]):
        """[B, L, dim] with the image tokens first -> q, k, v [B, heads, L, head_dim] with LayerNorm on q/k and RoPE
        on the image tokens."""
        q, k, v = (
            proj(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v)
        )
        q = F.layer_norm(q, q.shape[-1:], eps=1e-5).to(x.dtype)
        k = F.layer_norm(k, k.shape[-1:], eps=1e-5).to(x.dtype)
        q = torch.cat([apply_rope(q[:, :, :image_len], *rope), q[:, :, image_len:]], dim=2)
        k = torch.cat([apply_rope(k[:, :, :image_len], *rope), k[:, :, image_len:]], dim=2)
        return q, k, v


class GlmImageTransformerBlock(nn.Module):
    def __init__(self, dim, heads, head_dim, time_embed_dim, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm1 = nn.Module()  # adaLN-zero: 12 modulations, 6 for image tokens and 6 for text tokens
        self.norm1.linear = operations.Linear(time_embed_dim, 12 * dim, dtype=dtype, device=device)
        self.attn1 = Attention(dim, heads, head_dim, dtype=dtype, device=device, operations=operations)
        self.ff = FeedForward(dim, dim, 4 * dim, gelu_tanh, dtype=dtype, device=device, operations=operations)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        *,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionFn,
        key_mask: torch.Tensor | None = None,
        reference: tuple[torch.Tensor, torch.Tensor] | None = None,
        write_kv: list | None = None,
        text_groups: TextGroups | None = None,
        attention_options: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, dim] image tokens; text: [B, T, dim]; temb: [B, time_embed_dim].
        reference: this layer's reference (k, v) to attend to; write_kv: a list to append this layer's (k, v) to.
        key_mask: bool [B, (L_ref +) N + T] or None. text_groups: (first row, end row, real text tokens) runs that
        cover the batch, for right-padded text: each run attends to a prefix of the keys, without a mask.
        attention_options: keyword arguments for every `attention` call (a host's per-call settings)."""
        options = attention_options or {}
        (
            shift,
            c_shift,
            scale,
            c_scale,
            gate,
            c_gate,
            shift_mlp,
            c_shift_mlp,
            scale_mlp,
            c_scale_mlp,
            gate_mlp,
            c_gate_mlp,
        ) = self.norm1.linear(temb)[:, None].chunk(12, dim=-1)
        # Joint attention over [image; text] (the reference orders them [text; image]: attention does not depend on
        # the order of its keys, and with the text last, right-padded text is a prefix of the keys to attend to).
        image_len, text_len = x.shape[1], text.shape[1]
        h = torch.cat([modulate(x, shift, scale), modulate(text, c_shift, c_scale)], dim=1)
        q, k, v = self.attn1.qkv(h, image_len, rope)
        if write_kv is not None:
            write_kv.append((k, v))
        if reference is not None:
            ref_k, ref_v = reference
            k = torch.cat([ref_k.expand(k.shape[0], -1, -1, -1), k], dim=2)
            v = torch.cat([ref_v.expand(v.shape[0], -1, -1, -1), v], dim=2)
            if key_mask is not None:
                key_mask = torch.cat([key_mask.new_ones(key_mask.shape[0], ref_k.shape[2]), key_mask], dim=1)
        if text_groups is None:
            out = attention(q, k, v, key_mask, **options)
        else:  # each run of rows sees its real text tokens as a prefix: no mask, so the fastest kernels apply
            before_text = k.shape[2] - text_len
            out = torch.cat(
                [
                    attention(q[a:b], k[a:b, :, : before_text + n], v[a:b, :, : before_text + n], None, **options)
                    for a, b, n in text_groups
                ]
            )
        out = self.attn1.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype))
        x = x + out[:, :image_len] * gate
        text = text + out[:, image_len:] * c_gate
        x = x + self.ff(modulate(x, shift_mlp, scale_mlp)) * gate_mlp
        text = text + self.ff(modulate(text, c_shift_mlp, c_scale_mlp)) * c_gate_mlp
        return x, text


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-5) * (1 + scale) + shift


def text_groups_for_lengths(lengths: list[int]) -> TextGroups:
    """Runs of consecutive rows with the same number of real (right-padded) text tokens: ``[(first, end, n), ...]``.
    A host that knows each row's length (ComfyUI: from the cond shapes) passes these to `forward` as `text_groups`,
    so the DiT never reads the mask back from the device."""
    groups: TextGroups = []
    for i, n in enumerate(lengths):
        if groups and groups[-1][2] == n:
            groups[-1] = (groups[-1][0], i + 1, n)
        else:
            groups.append((i, i + 1, n))
    return groups


def padded_text_groups(mask: torch.Tensor) -> TextGroups | None:
    """`text_groups_for_lengths` of ``mask`` (bool [B, T], True = real) when every row is right-padded (n real
    tokens, then padding); None otherwise. One small copy to the host."""
    rows = mask.bool().cpu()
    lengths = rows.sum(dim=1)
    if not torch.equal(rows, torch.arange(rows.shape[1]) < lengths[:, None]):
        return None
    return text_groups_for_lengths(lengths.tolist())


def attention_layout(
    mask: torch.Tensor | None, image_len: int, text_len: int, text_groups: TextGroups | None = None
) -> tuple[torch.Tensor | None, TextGroups | None]:
    """How the blocks attend to the text: (key_mask, text_groups), at most one of them set. Right-padded text runs
    group by group without a mask; other masks mask the keys [image; text]; unpadded text needs neither."""
    if mask is None:
        return None, None
    if text_groups is None:
        text_groups = padded_text_groups(mask)
    if text_groups is None:  # not right-padded: mask the keys (image keys first, as the blocks order them)
        return torch.cat([mask.new_ones(mask.shape[0], image_len), mask], 1).bool(), None
    if len(text_groups) == 1 and text_groups[0][2] == text_len:
        return None, None  # nothing is padded
    return None, text_groups


class GlmImageTransformer2DModel(nn.Module):
    """Constructor arguments are the keys of the published `transformer/config.json`."""

    def __init__(
        self,
        patch_size: int = 2,
        in_channels: int = 16,
        out_channels: int = 16,
        num_layers: int = 30,
        attention_head_dim: int = 128,
        num_attention_heads: int = 32,
        text_embed_dim: int = 1472,
        time_embed_dim: int = 512,
        condition_dim: int = 256,
        prior_vq_quantizer_codebook_size: int = 16384,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=nn,
        attention: AttentionFn = sdpa_attention,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.head_dim = attention_head_dim
        self.time_embed_dim = time_embed_dim
        self.condition_dim = condition_dim
        self.dtype = dtype
        self.attention = attention
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        kw = dict(dtype=dtype, device=device)

        self.image_projector = nn.Module()
        self.image_projector.proj = operations.Linear(in_channels * patch_size**2, dim, **kw)
        self.glyph_projector = FeedForward(text_embed_dim, dim, dim, F.gelu, operations=operations, **kw)
        self.prior_token_embedding = operations.Embedding(prior_vq_quantizer_codebook_size, dim, **kw)
        self.prior_projector = FeedForward(dim, dim, dim, F.silu, operations=operations, **kw)

        self.time_condition_embed = nn.Module()
        tce = self.time_condition_embed
        tce.timestep_embedder = nn.Module()
        tce.timestep_embedder.linear_1 = operations.Linear(time_embed_dim, time_embed_dim, **kw)
        tce.timestep_embedder.linear_2 = operations.Linear(time_embed_dim, time_embed_dim, **kw)
        tce.condition_embedder = nn.Module()  # crop coords and target size, 2 numbers each, condition_dim sinusoids
        tce.condition_embedder.linear_1 = operations.Linear(4 * condition_dim, time_embed_dim, **kw)
        tce.condition_embedder.linear_2 = operations.Linear(time_embed_dim, time_embed_dim, **kw)

        self.transformer_blocks = nn.ModuleList(
            GlmImageTransformerBlock(
                dim, num_attention_heads, attention_head_dim, time_embed_dim, operations=operations, **kw
            )
            for _ in range(num_layers)
        )
        self.norm_out = nn.Module()
        self.norm_out.linear = operations.Linear(time_embed_dim, 2 * dim, **kw)
        self.proj_out = operations.Linear(dim, patch_size * patch_size * out_channels, **kw)

    def conditioning(self, timestep, target_size, crop_coords, dtype) -> torch.Tensor:
        """temb [B, time_embed_dim] from the timestep and the SDXL-style size conditions (pixels)."""
        tce = self.time_condition_embed
        t = timestep_embedding(timestep, self.time_embed_dim).to(dtype)
        sizes = torch.cat([crop_coords, target_size], dim=1)  # [B, 4]
        c = timestep_embedding(sizes.flatten(), self.condition_dim).view(sizes.shape[0], -1).to(dtype)
        t = tce.timestep_embedder.linear_2(F.silu(tce.timestep_embedder.linear_1(t)))
        c = tce.condition_embedder.linear_2(F.silu(tce.condition_embedder.linear_1(c)))
        return F.silu(t + c)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], channel-major inside each patch."""
        p = self.patch_size
        b, c, h, w = x.shape
        return (
            x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
        )

    def embed_image(self, x, prior_token_id, prior_token_drop):
        """Patch embeddings plus the (possibly dropped) prior-token embeddings. prior_token_drop: bool/int [B] or
        [B, N]; a dropped prior contributes zeros to the projector (the reference's unconditional branch)."""
        prior = self.prior_token_embedding(prior_token_id).to(x.dtype)  # fp8 storage (ComfyUI) returns fp8 rows
        if prior_token_drop is not None:
            drop = prior_token_drop.bool()
            prior = prior.masked_fill(drop.view(drop.shape[0], -1, 1), 0.0)
        return self.image_projector.proj(self.patchify(x)) + self.prior_projector(prior)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        prior_token_id: torch.Tensor,
        prior_token_drop: torch.Tensor | None,
        timestep: torch.Tensor,
        target_size: torch.Tensor,
        crop_coords: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        reference_kv: ReferenceKV | None = None,
        collect_kv: list | None = None,
        attention: AttentionFn | None = None,
        text_groups: TextGroups | None = None,
    ) -> torch.Tensor:
        """Flow velocity (noise - x0) for a latent.

        hidden_states: [B, C, H, W] normalised latent, H and W multiples of `patch_size`.
        encoder_hidden_states: [B, T, text_embed_dim] glyph embeddings (T may be 0).
        prior_token_id: long [B, (H/p)(W/p)] AR visual tokens on the patch grid (stride-32 grid upsampled x2).
        prior_token_drop: bool [B] or [B, N]; True zeroes the prior embedding (unconditional branch).
        timestep: [B] the UNSHIFTED schedule time in [0, 1000) minus 1, as the reference feeds it (not the shifted
            sigma: feeding the shifted value gives colour drift).
        target_size, crop_coords: [B, 2] (height, width) and (top, left) in pixels.
        encoder_attention_mask: bool [B, T], True for real glyph tokens; padded ones are never attended to. Right-padded
            rows (``glyph.pad_glyphs``) are attended without a mask, run by run of equal length.
        reference_kv: reference-image keys/values to attend to (conditional branch of editing).
        collect_kv: if given, each layer appends its (k, v) here (how `encode_reference` records them).
        attention: overrides the model's attention function for this call.
        text_groups: the right-padded layout of the mask, if the caller knows it (`text_groups_for_lengths`);
            otherwise it is read from the mask.
        Returns [B, out_channels, H, W].
        """
        height, width = hidden_states.shape[2:]
        x, text, temb, rope = self.embed(
            hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop, timestep, target_size, crop_coords
        )
        key_mask, text_groups = attention_layout(encoder_attention_mask, x.shape[1], text.shape[1], text_groups)
        x, _ = self.run_blocks(
            x,
            text,
            temb=temb,
            rope=rope,
            attention=attention or self.attention,
            key_mask=key_mask,
            text_groups=text_groups,
            reference_kv=reference_kv,
            collect_kv=collect_kv,
        )
        return self.unembed(x, temb, height, width)

    def run_blocks(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        *,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention: AttentionFn,
        key_mask: torch.Tensor | None = None,
        text_groups: TextGroups | None = None,
        reference_kv: ReferenceKV | None = None,
        collect_kv: list | None = None,
        run_block: BlockRunner | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The one loop over the blocks, with each layer's reference K/V: x [B, N, dim], text [B, T, dim] in and out.

        run_block: a host's hook around each block (ComfyUI: block replacements, post-block patches, per-block
        options), called as ``run_block(i, block_fn, x, text) -> (x, text)``; ``block_fn(x, text,
        attention_options=None)`` runs block i with everything else of this call."""
        for i, block in enumerate(self.transformer_blocks):
            reference = None if reference_kv is None else reference_kv.layers[i]

            def block_fn(x, text, attention_options=None, block=block, reference=reference):
                return block(
                    x,
                    text,
                    temb=temb,
                    rope=rope,
                    attention=attention,
                    key_mask=key_mask,
                    reference=reference,
                    write_kv=collect_kv,
                    text_groups=text_groups,
                    attention_options=attention_options,
                )

            x, text = block_fn(x, text) if run_block is None else run_block(i, block_fn, x, text)
        return x, text

    def embed(
        self, hidden_states, encoder_hidden_states, prior_token_id, prior_token_drop, timestep, target_size, crop_coords
    ):
        """The blocks' inputs (arguments as `forward`): image tokens x [B, N, dim], text tokens [B, T, dim], temb
        [B, time_embed_dim] and the RoPE (cos, sin) of the patch grid."""
        height, width = hidden_states.shape[2:]
        p = self.patch_size
        dtype = hidden_states.dtype
        rope = rope_2d(height // p, width // p, self.head_dim, hidden_states.device)
        x = self.embed_image(hidden_states, prior_token_id, prior_token_drop)
        text = self.glyph_projector(encoder_hidden_states.to(dtype))
        temb = self.conditioning(timestep, target_size, crop_coords, dtype)
        return x, text, temb, rope

    def unembed(self, x: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Image tokens [B, N, dim] after the last block -> [B, out_channels, height, width] (latent cells)."""
        p = self.patch_size
        scale, shift = self.norm_out.linear(temb.to(x.dtype))[:, None].chunk(2, dim=-1)
        x = self.proj_out(modulate(x, shift, scale))  # [B, N, p*p*C]
        x = x.reshape(x.shape[0], height // p, width // p, -1, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(x.shape[0], -1, height, width)

    def reference_kv_elements(self, latent_height: int, latent_width: int) -> int:
        """How many numbers `encode_reference` stores for one reference latent of this size: a key and a value
        [heads, L_ref, head_dim] per layer, L_ref = its patch count."""
        tokens = (latent_height // self.patch_size) * (latent_width // self.patch_size)
        return 2 * len(self.transformer_blocks) * tokens * self.inner_dim

    @torch.no_grad()
    def encode_reference(
        self, latent: torch.Tensor, prior_token_id: torch.Tensor, image_size: tuple[int, int]
    ) -> ReferenceKV:
        """Keys/values of one reference image: a pass at t=0 with no text, the reference's own prior tokens and its
        own pixel size (height, width) as target_size. latent: normalised [B, C, h, w]; prior_token_id: long
        [B, (h/p)(w/p)]."""
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        b = latent.shape[0]
        x, text, temb, rope = self.embed(
            latent,
            latent.new_zeros(b, 0, self.glyph_projector.net[0].proj.in_features),
            prior_token_id,
            None,
            latent.new_zeros(b, dtype=torch.float32),
            torch.tensor([image_size], dtype=torch.float32, device=latent.device).expand(b, 2),
            latent.new_zeros(b, 2, dtype=torch.float32),
        )
        self.run_blocks(x, text, temb=temb, rope=rope, attention=self.attention, collect_kv=kv)
        return ReferenceKV(kv)
