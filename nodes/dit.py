"""The core DiT as ComfyUI's diffusion_model: attention through ComfyUI's dispatch, the forward through ComfyUI's
wrapper executor, and ComfyUI's per-block seams (block replacements, post-block patches) through the core's one block
loop (`GlmImageTransformer2DModel.run_blocks`)."""

from __future__ import annotations

import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import optimized_attention_masked

from ..glm_image_core.defaults import VAE_SCALE
from ..glm_image_core.dit import GlmImageTransformer2DModel, attention_layout


def comfy_attention(q, k, v, key_mask, transformer_options=None):
    """The core's attention through ComfyUI's dispatch (sage/xformers/flash/SDPA/sub-quad). One module-level function,
    so a compiled model sees the same function on every call; the per-call transformer_options (attention overrides,
    block index) come in as an argument."""
    mask = None
    if key_mask is not None:  # additive form: every ComfyUI backend accepts it
        mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill(~key_mask, -torch.finfo(q.dtype).max)[:, None, None, :]
    return optimized_attention_masked(
        q,
        k,
        v,
        q.shape[1],
        mask,
        skip_reshape=True,
        skip_output_reshape=True,
        transformer_options=transformer_options or {},
    )


class ComfyGlmImageDiT(GlmImageTransformer2DModel):
    """The core DiT behind ComfyUI's diffusion_model call convention, open to what ComfyUI attaches to native DiTs:

    - wrappers: the forward runs inside the DIFFUSION_MODEL wrapper executor (EasyCache, TorchCompileModel, ...);
    - transformer_options reach every block's attention, with `block_index`, `total_blocks` and `block_type`
      ("double") set as Qwen-Image and Flux set them, beside ComfyUI's own `sigmas`, `cond_or_uncond`, `uuids`;
    - `patches_replace["dit"][("double_block", i)]` replaces block i. GLM's blocks are one stream of joint blocks
      (image and text tokens with their own modulations, like Qwen-Image's), so they use Qwen-Image's key:
      args {"img", "txt", "vec", "pe", "transformer_options"} -> {"img", "txt"};
    - `patches["double_block"]` run after each block with {"img", "txt", "x", "block_index", "transformer_options"}.

    The block loop is the core's (`run_blocks`); this class supplies ComfyUI's seams through its per-block hook. The
    reference-image pass (`encode_reference`, once per sampling run) runs the core loop without the hook: no wrapper
    or patch sees it, so step caches never replay it. `control` (ControlNet residuals) is accepted and unused: there is
    no GLM-Image ControlNet.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs, attention=comfy_attention)

    def forward(
        self,
        x,
        timestep,
        context=None,
        glyph=None,
        prior_token_id=None,
        prior_token_drop=None,
        reference_kv=None,
        control=None,
        transformer_options=None,
        **kwargs,
    ):
        transformer_options = {} if transformer_options is None else transformer_options
        wrappers = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options
        )
        if wrappers:
            # Stock EasyCache adds its cached difference to this input in place; when the model computes in float32,
            # x is the very tensor BaseModel later turns into denoised = x - v * sigma, which that would corrupt.
            x = x.clone()
        return comfy.patcher_extension.WrapperExecutor.new_class_executor(self._forward, self, wrappers).execute(
            x,
            timestep,
            context,
            glyph,
            prior_token_id,
            prior_token_drop,
            reference_kv,
            control,
            transformer_options,
            **kwargs,
        )

    def _forward(
        self,
        x,
        timestep,
        context,
        glyph,
        prior_token_id,
        prior_token_drop,
        reference_kv,
        control,
        transformer_options,
        **kwargs,
    ):
        """x: [B, 16, h, w]; timestep: [B]; glyph: GlyphCond.concat's [embeds [B, T, C], mask [B, T], text groups]."""
        embeds, mask, *layout = glyph
        b, _, h, w = x.shape
        target = torch.tensor([[h * VAE_SCALE, w * VAE_SCALE]], dtype=torch.float32, device=x.device).expand(b, 2)
        img, txt, temb, rope = self.embed(
            x, embeds, prior_token_id, prior_token_drop, timestep, target, torch.zeros_like(target)
        )
        key_mask, text_groups = attention_layout(mask.bool(), img.shape[1], txt.shape[1], *layout)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        block_patches = transformer_options.get("patches", {}).get("double_block", [])
        transformer_options["total_blocks"] = len(self.transformer_blocks)
        transformer_options["block_type"] = "double"

        def run_block(i, block_fn, img, txt):
            """ComfyUI's per-block seams, keyed as Qwen-Image's: a replacement, then the post-block patches."""
            transformer_options["block_index"] = i

            def original_block(args):
                options = {"transformer_options": args["transformer_options"]}
                img, txt = block_fn(args["img"], args["txt"], attention_options=options)
                return {"img": img, "txt": txt}

            args = {"img": img, "txt": txt, "vec": temb, "pe": rope, "transformer_options": transformer_options}
            if ("double_block", i) in blocks_replace:
                out = blocks_replace[("double_block", i)](args, {"original_block": original_block})
            else:
                out = original_block(args)
            img, txt = out["img"], out["txt"]
            for patch in block_patches:
                out = patch(
                    {"img": img, "txt": txt, "x": x, "block_index": i, "transformer_options": transformer_options}
                )
                img, txt = out["img"], out["txt"]
            return img, txt

        img, _ = self.run_blocks(
            img,
            txt,
            temb=temb,
            rope=rope,
            attention=self.attention,
            key_mask=key_mask,
            text_groups=text_groups,
            reference_kv=reference_kv,
            run_block=run_block,
        )
        return self.unembed(img, temb, h, w)
