"""Glyph encoder loader and GLM-Image Encode: visual tokens + glyph text (+ references) -> CONDITIONING."""

from __future__ import annotations

import os

import comfy.model_management as mm
from comfy_api.latest import io

from ..glm_image_core import glyph, loading, memory
from ..glm_image_core.errors import InvalidInputError
from . import paths
from .common import file_input, pick_dtype, schema
from .types import GlmGlyphEncoder, GlmTokens, GlyphEncoder, ManagedHFModel, VisualTokens
from .vae import check_glm_image_vae

FROM_PROMPT, OVERRIDE = "from prompt quotes", "override"


class GlyphEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageGlyphEncoderLoader",
            display_name="Load GLM-Image Glyph Encoder",
            category="GLM-Image",
            search_aliases=["glyph", "byt5", "text rendering", "字形", "文字渲染"],
            description="The Glyph-ByT5 text encoder that tells the DiT which characters to render.",
            inputs=[
                file_input(
                    "encoder",
                    paths.GLYPH_ENCODER,
                    "A GLM-Image folder (models/glm_image) or a single .safetensors in models/text_encoders.",
                ),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp32"], tooltip="auto: bf16 where supported."),
            ],
            outputs=[
                GlmGlyphEncoder.Output(
                    display_name="glyph_encoder", tooltip="The glyph encoder and its tokenizer, for GLM-Image Encode."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, encoder=None):
        return paths.validate(paths.GLYPH_ENCODER, encoder)

    @classmethod
    def execute(cls, encoder, dtype) -> io.NodeOutput:
        path = paths.resolve(paths.GLYPH_ENCODER, encoder)
        device = mm.text_encoder_device()
        model = loading.load_glyph_encoder(path, dtype=pick_dtype(dtype, device), device="cpu")
        tokenizer = loading.load_glyph_tokenizer(path if os.path.isdir(path) else None)
        managed = ManagedHFModel.wrap(model, device, mm.text_encoder_offload_device())
        return io.NodeOutput(GlyphEncoder(managed, tokenizer))


def glyph_spans(prompt: str, mode: str, override: str) -> list[str]:
    """The glyph strings to encode: the prompt's quoted spans, or the override's lines."""
    if mode == FROM_PROMPT:
        return glyph.extract_glyph_texts(prompt)
    spans = [line for line in override.splitlines() if line.strip()]
    if not spans:
        raise InvalidInputError(
            "Glyph text is set to 'override' but the override is empty: write the text to render (one span per line) "
            "or choose 'from prompt quotes'."
        )
    return spans


class Encode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageEncode",
            display_name="GLM-Image Encode",
            category="GLM-Image",
            search_aliases=["glyph", "conditioning", "text rendering", "字形", "条件"],
            description="Makes the DiT's positive and negative conditioning from the visual tokens and the glyph "
            "text. The negative is always GLM's unconditional branch (no glyphs, no tokens, no references), also "
            "when a ConditioningZeroOut of the positive is wired instead.",
            inputs=[
                GlmGlyphEncoder.Input("glyph_encoder", tooltip="From Load GLM-Image Glyph Encoder."),
                GlmTokens.Input("tokens", tooltip="From 'GLM-Image Generate Visual Tokens' or 'Load Visual Tokens'."),
                io.Combo.Input(
                    "glyph_text",
                    options=[FROM_PROMPT, OVERRIDE],
                    tooltip="Render the quoted spans of the tokens' prompt, or the override text.",
                ),
                io.String.Input(
                    "override",
                    multiline=True,
                    default="",
                    dynamic_prompts=False,  # rendered as typed: braces, // and /* */ included
                    tooltip="One glyph span per line.",
                ),
                io.Vae.Input("vae", optional=True, tooltip="Needed for editing: encodes the reference images."),
            ],
            outputs=[
                io.Conditioning.Output(
                    display_name="positive",
                    tooltip="Glyph embedding, visual tokens and references: the sampler's positive.",
                ),
                io.Conditioning.Output(
                    display_name="negative", tooltip="GLM-Image's unconditional branch: the sampler's negative."
                ),
            ],
        )

    @classmethod
    def validate_inputs(cls, glyph_text=None, override=None):
        """An empty override fails when the prompt is queued, not after the AR has run (a linked override is checked
        in execute). Naming glyph_text here turns off ComfyUI's own check of its options, hence the first test."""
        if glyph_text is not None and glyph_text not in (FROM_PROMPT, OVERRIDE):
            return f"glyph_text must be '{FROM_PROMPT}' or '{OVERRIDE}', not '{glyph_text}'."
        if glyph_text == OVERRIDE and override is not None:
            try:
                glyph_spans("", glyph_text, override)
            except InvalidInputError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, glyph_encoder, tokens: VisualTokens, glyph_text, override, vae=None) -> io.NodeOutput:
        if vae is not None:
            check_glm_image_vae(vae, "GLM-Image Encode's vae input")
        spans = glyph_spans(tokens.prompt, glyph_text, override)
        # ComfyUI frees room for the encoder's activations too (the spans' own: "" after them needs less)
        working = memory.glyph_model_working_bytes(glyph_encoder.model.hf_model, spans, glyph_encoder.tokenizer)
        model = glyph_encoder.model.loaded(working)
        cond = glyph.encode_glyphs(spans, model, glyph_encoder.tokenizer).to(mm.intermediate_device())
        empty = glyph.encode_glyphs([], model, glyph_encoder.tokenizer).to(mm.intermediate_device())
        extras = {
            "glm_prior_token_ids": tokens.prior_token_ids,
            "glm_empty_glyph": empty,
            "glm_image_size": (tokens.height, tokens.width),  # the sampler checks the latent against it
        }
        if tokens.references:
            if vae is None:
                raise InvalidInputError(
                    "These tokens come from reference images: connect the VAE so they can be encoded."
                )
            extras["glm_references"] = [
                {
                    "latent": vae.encode(ref.pixels),
                    "prior_token_ids": ref.prior_token_ids,
                    "image_size": tuple(ref.pixels.shape[1:3]),
                }
                for ref in tokens.references
            ]
        # the unconditional branch never reads the references: leaving them off keeps ComfyUI's memory estimate exact
        negative = {k: v for k, v in extras.items() if k != "glm_references"}
        return io.NodeOutput([[cond, dict(extras)]], [[empty, negative]])
