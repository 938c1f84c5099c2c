"""AR stage nodes: load the AR model, generate visual tokens, save and load token grids."""

from __future__ import annotations

import contextlib
import logging
import os

import comfy.cli_args
import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..glm_image_core import ar, dependencies, formats, loading, memory, preview
from ..glm_image_core.defaults import PATCH_STRIDE, TEMPERATURE, TOP_P
from ..glm_image_core.errors import InvalidInputError
from ..glm_image_core.pipeline import image_to_tensor
from ..glm_image_core.sizes import check_image_size, check_reference_size
from ..glm_image_core.tokens import read_tokens, write_tokens
from . import paths
from .common import SIZE_WIDGET, file_input, pick_dtype, schema, validate_size
from .types import ARModel, GlmARModel, GlmTokens, ManagedHFModel, Reference, VisualTokens

MAX_REFERENCE_INPUTS = 4
AR_WEIGHTS = {"full": None, "int8": "int8"}  # the loader's weights options -> load_ar_model(quantisation=...)


def devices() -> list[str]:
    return ["default", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class ARModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageARModelLoader",
            display_name="Load GLM-Image AR Model",
            category="GLM-Image",
            search_aliases=["ar model", "autoregressive", "自回归模型"],
            description="The 9B autoregressive model that writes the visual token grid, with its processor.",
            inputs=[
                file_input(
                    "model_folder",
                    paths.AR_MODEL,
                    "A GLM-Image folder as downloaded, under models/glm_image.",
                ),
                io.Combo.Input("dtype", options=["auto", "bf16", "fp32"], tooltip="auto: bf16 where supported."),
                io.Combo.Input(
                    "device",
                    options=devices(),
                    tooltip="Where the AR runs: 'default' is ComfyUI's GPU; pick another GPU to keep the DiT's free.",
                ),
                io.Combo.Input(
                    "weights",
                    options=[*AR_WEIGHTS, *paths.AR_INT8.options()],
                    tooltip="full: every weight in dtype (~19 GB in bf16). int8: the decoder's linear layers in 8 "
                    "bits, quantised while loading (~9 GB on the GPU for decoding). Or an exported "
                    "*.ar_int8.safetensors file under models/glm_image (python -m glm_image_core export-ar-int8).",
                ),
            ],
            outputs=[
                GlmARModel.Output(
                    display_name="ar_model", tooltip="The AR model and its processor, for Generate Visual Tokens."
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, model_folder=None, weights=None):
        problem = dependencies.transformers_problem()  # at queue time, before any other graph node runs
        if problem is not None:
            return problem
        folder_check = paths.validate(paths.AR_MODEL, model_folder)
        if folder_check is not True or weights in AR_WEIGHTS:
            return folder_check
        return paths.validate(paths.AR_INT8, weights)

    @classmethod
    def execute(cls, model_folder, dtype, device, weights) -> io.NodeOutput:
        folder = paths.resolve(paths.AR_MODEL, model_folder)
        load_device = mm.get_torch_device() if device == "default" else torch.device(device)
        source, quantisation = (
            (folder, AR_WEIGHTS[weights]) if weights in AR_WEIGHTS else (paths.resolve(paths.AR_INT8, weights), None)
        )
        model = loading.load_ar_model(
            source, dtype=pick_dtype(dtype, load_device), device="cpu", quantisation=quantisation, trim=True
        )
        report_weight_format(model, model_folder, weights)
        offload = mm.unet_offload_device()
        decoder = ManagedHFModel.wrap(model, load_device, offload, parts=memory.ar_decode_modules(model))
        vision = ManagedHFModel.wrap(model, load_device, offload, parts=memory.ar_vision_modules(model))
        # the live preview's colours, from the VQ codebook while it is on the CPU (1-2 s on a desktop CPU, once per load)
        palette = preview.model_palette(model)
        return io.NodeOutput(ARModel(decoder, loading.load_ar_processor(folder), palette, vision))


def report_weight_format(model, model_folder: str, weights: str) -> None:
    """Log the format of the decoder's projections when the folder decided it (a quantised re-upload loads as
    published, whatever `weights` said)."""
    projection = model.model.language_model.layers[0].mlp.gate_up_proj
    fmt = formats.of_layer(projection)
    if fmt is formats.W4A16:
        logging.info(
            "GLM-Image AR: %s holds its decoder's projections in 4 bits (%s, group size %d); they stay packed%s.",
            model_folder,
            fmt.label,
            projection.group_size,
            f" (the weights choice {weights!r} applies to full-precision folders)" if weights != "full" else "",
        )


def image_batch_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """IMAGE [B, H, W, 3] in 0..1 -> PIL images."""
    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(a) for a in array]


class GenerateTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        size = SIZE_WIDGET
        references = [
            io.Image.Input(
                f"reference_{i}",
                optional=True,
                tooltip="Reference image(s) for editing; every image of a batch is one reference.",
            )
            for i in range(1, MAX_REFERENCE_INPUTS + 1)
        ]
        return schema(
            node_id="GLMImageGenerateTokens",
            display_name="GLM-Image Generate Visual Tokens",
            category="GLM-Image",
            search_aliases=["ar tokens", "visual tokens", "text to image", "视觉 token", "文生图"],
            description="Runs the AR model: the prompt (and reference images) become the grid of visual tokens the "
            "DiT paints from. Re-runs only when its own inputs change.",
            inputs=[
                GlmARModel.Input("ar_model", tooltip="From Load GLM-Image AR Model."),
                io.String.Input(
                    "prompt",
                    multiline=True,
                    dynamic_prompts=False,  # the front end would strip //... and /*...*/ and pick one of {a|b}
                    tooltip="Text in quotes ('...', \"...\", “...”, 「...」) is rendered as glyphs; as in the reference, an "
                    'apostrophe (don\'t) also opens a single-quoted span, so prefer "..." around text to render.',
                ),
                io.Int.Input("width", tooltip="Multiple of 32, 512..2048; must equal the latent's width.", **size),
                io.Int.Input("height", tooltip="Multiple of 32, 512..2048; must equal the latent's height.", **size),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Seed of the AR sampling (a private generator). Sample 0 uses the seed, sample i > 0 a seed "
                    "hashed from (seed, i), so neighbouring seeds share no sample; the log lists each sample's seed.",
                ),
                io.Float.Input(
                    "temperature", default=TEMPERATURE, min=0.01, max=2.0, step=0.01, tooltip="AR sampling temperature."
                ),
                io.Float.Input("top_p", default=TOP_P, min=0.01, max=1.0, step=0.01, tooltip="Nucleus sampling mass."),
                io.Int.Input("top_k", default=0, min=0, max=16384, tooltip="Top-k filter; 0 = off."),
                io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Token grids to sample from this prompt."),
                *references,
            ],
            outputs=[
                GlmTokens.Output(
                    display_name="tokens",
                    tooltip="The visual token grid(s) with their prompt, size, seed and references: for Encode, the "
                    "latent, ModelSampling and Save Visual Tokens.",
                )
            ],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None):
        return validate_size(width, height)

    @classmethod
    def execute(
        cls, ar_model, prompt, width, height, seed, temperature, top_p, top_k, batch_size, **refs
    ) -> io.NodeOutput:
        check_image_size(height, width)
        min_side = ar.reference_min_side(ar_model.processor)
        for i in range(1, MAX_REFERENCE_INPUTS + 1):  # before the AR runs, naming the input
            if refs.get(f"reference_{i}") is not None:
                _, h, w, _ = refs[f"reference_{i}"].shape
                check_reference_size(h, w, min_side, f"The image at reference_{i}")
        images = [
            im
            for i in range(1, MAX_REFERENCE_INPUTS + 1)
            if refs.get(f"reference_{i}") is not None
            for im in image_batch_to_pil(refs[f"reference_{i}"])
        ]
        inputs = ar.build_ar_inputs(ar_model.processor, prompt, height, width, images)
        progress = comfy.utils.ProgressBar(inputs.geometry.num_grid_tokens)
        live = preview.LivePreview(inputs.geometry, ar_model.preview_palette)

        def on_token(step, total, tokens):
            mm.throw_exception_if_processing_interrupted()  # Stop lands at the next call: every token, every 16 on CUDA
            image = live.poll(step, tokens)  # a few times a second: the grid so far, shown on the node
            shown = None if image is None else ("JPEG", image, preview.PREVIEW_MAX_SIDE)
            progress.update_absolute(step, total, preview=shown)

        def decoder_stage(working_bytes):  # ComfyUI evicts what does not fit beside the decoder and its working memory
            return contextlib.nullcontext(ar_model.decoder.loaded(working_bytes))

        seeds = ar.sample_seeds(seed, batch_size)
        if batch_size > 1:  # a batch of 1 at one of these seeds makes that sample again alone
            logging.info("GLM-Image AR: the samples' seeds are %s", ", ".join(map(str, seeds)))
        result = ar.generate_staged(
            ar_model.decoder.hf_model,
            inputs,
            seeds,
            vision_stage=lambda working: contextlib.nullcontext(ar_model.vision.loaded(working)),
            decoder_stage=decoder_stage,
            loras=ar_model.loras,  # applied unmerged for this run: the cached model is not changed
            temperature=temperature,
            top_p=top_p,
            top_k=top_k or None,
            callback=on_token,
            cuda_graph=False if getattr(comfy.cli_args.args, "disable_cuda_graphs", False) else None,
        )
        references = [
            Reference(
                pixels=(image_to_tensor(image, gh * PATCH_STRIDE, gw * PATCH_STRIDE) / 2 + 0.5).permute(0, 2, 3, 1),
                prior_token_ids=ids[None].cpu(),
            )
            for image, ids, (gh, gw) in zip(images, result.reference_prior_ids, result.reference_grid_sizes)
        ]
        tokens = VisualTokens(
            prior_token_ids=result.prior_token_ids.cpu(),
            target_ids=result.target_ids.cpu(),
            preview_ids=result.preview_ids.cpu(),
            height=height,
            width=width,
            prompt=prompt,
            seed=seed,
            references=references,
            sample_seeds=seeds,
        )
        return io.NodeOutput(tokens)


class SaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageSaveTokens",
            display_name="GLM-Image Save Visual Tokens",
            category="GLM-Image",
            search_aliases=["save tokens", "保存 token"],
            description=f"Writes the token grids (with prompt, size and each grid's seed) to output/glm_tokens/*{paths.TOKENS_EXTENSION}.",
            inputs=[
                GlmTokens.Input("tokens", tooltip="From Generate Visual Tokens."),
                io.String.Input(
                    "filename_prefix",
                    default="glm_tokens/tokens",
                    tooltip="Relative to the output folder; Load Visual Tokens lists output/glm_tokens/ and input/.",
                ),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None):
        try:
            if filename_prefix is not None:
                paths.check_output_prefix(filename_prefix)
        except InvalidInputError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, tokens, filename_prefix) -> io.NodeOutput:
        paths.check_output_prefix(filename_prefix)
        out_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        file = f"{name}_{counter:05}_{paths.TOKENS_EXTENSION}"
        write_tokens(tokens, os.path.join(folder, file))
        return io.NodeOutput(ui=ui.PreviewText(f"saved {os.path.join(subfolder, file)}"))


class LoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return schema(
            node_id="GLMImageLoadTokens",
            display_name="GLM-Image Load Visual Tokens",
            category="GLM-Image",
            search_aliases=["load tokens", "加载 token"],
            description="Reads token grids written by 'GLM-Image Save Visual Tokens' (no AR run needed).",
            inputs=[
                file_input(
                    "tokens_file",
                    paths.TOKENS,
                    "A *.glm_tokens file directly in input/ or in output/glm_tokens/.",
                )
            ],
            outputs=[
                GlmTokens.Output(
                    display_name="tokens", tooltip="The saved token grids, as Generate Visual Tokens made them."
                ),
                io.Int.Output(display_name="width", tooltip="The image width the tokens were made for."),
                io.Int.Output(display_name="height", tooltip="The image height the tokens were made for."),
            ],
        )

    @classmethod
    def validate_inputs(cls, tokens_file=None):
        return paths.validate(paths.TOKENS, tokens_file)

    @classmethod
    def fingerprint_inputs(cls, tokens_file):
        try:
            return os.path.getmtime(paths.resolve(paths.TOKENS, tokens_file))
        except InvalidInputError:
            return tokens_file  # execute reports it

    @classmethod
    def execute(cls, tokens_file) -> io.NodeOutput:
        tokens = read_tokens(paths.resolve(paths.TOKENS, tokens_file))
        return io.NodeOutput(tokens, tokens.width, tokens.height)
