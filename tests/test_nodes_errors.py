"""Bad inputs give a node error that says what is wrong and what to do, and ComfyUI keeps working afterwards; every
conditioning a user can wire from stock nodes either works as the stock semantics say or fails with a clear message.

Prompts run in-process through ComfyUI's validation and executor (comfy_host.run_prompt), the sampler-level cases
through comfy.sample.sample (what KSampler calls), and one sequence against a real `main.py --cpu` server. Token
grids are written as token files (random ids), so no AR runs here.
"""

import shutil

import pytest
import torch

from tests import comfy_host
from tests.prompt_graphs import example_prompt

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.sample  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402  (ComfyUI's nodes.py)
from tests import comfy_glm  # noqa: E402

write_tokens = comfy_host.import_pack_module("glm_image_core.tokens").write_tokens
types = comfy_host.import_pack_module("nodes.types")
InvalidInputError = comfy_host.import_pack_module("glm_image_core.errors").InvalidInputError

SIZE = 512
SIZED_NODES = ["GLMImageGenerateTokens", "GLMImageEmptyLatent", "GLMImageModelSampling", "GLMImageScheduler"]


def random_tokens(width=SIZE, height=SIZE, grids=1, references=0, seed=0, prompt='A sign that reads "OPEN"'):
    """Visual tokens as the AR would hand them over (random grids and reference pictures), without running it."""
    g = torch.Generator().manual_seed(seed)
    n = (height // 16) * (width // 16)
    refs = [
        types.Reference(torch.rand(1, SIZE, SIZE, 3, generator=g), torch.randint(0, 16384, (1, 1024), generator=g))
        for _ in range(references)
    ]
    ids = torch.randint(0, 16384, (grids, n), generator=g)
    return types.VisualTokens(ids, ids[:, ::4], ids[:, :0], height, width, prompt, seed, refs)


@pytest.fixture(scope="module")
def files(tiny_model_dir, tmp_path_factory):
    """Model folders (the tiny one, a VAE file among the diffusion models), token files in the input
    folder, a temp output folder; the folders this adds are taken out of ComfyUI's lists afterwards."""
    glm = comfy_host.load_pack()
    root = tmp_path_factory.mktemp("errors")
    diffusion_models, inputs = root / "diffusion_models", root / "input"
    diffusion_models.mkdir()
    shutil.copy(tiny_model_dir / "vae/diffusion_pytorch_model.safetensors", diffusion_models / "glm_vae.safetensors")
    inputs.mkdir()
    write_tokens(random_tokens(), str(inputs / "square.glm_tokens"))
    write_tokens(random_tokens(width=768), str(inputs / "wide.glm_tokens"))
    write_tokens(random_tokens(references=1), str(inputs / "edit.glm_tokens"))

    wanted = {"glm_image": [str(tiny_model_dir.parent)], "diffusion_models": [str(diffusion_models)]}
    added = {kind: [p for p in paths if p not in folder_paths.get_folder_paths(kind)] for kind, paths in wanted.items()}
    for kind, paths in added.items():
        for path in paths:
            folder_paths.add_model_folder_path(kind, path)
    input_dir, output_dir = folder_paths.get_input_directory(), folder_paths.get_output_directory()
    folder_paths.set_input_directory(str(inputs))
    folder_paths.set_output_directory(str(root / "output"))
    yield glm
    folder_paths.set_input_directory(input_dir)
    folder_paths.set_output_directory(output_dir)
    for kind, paths in added.items():
        for path in paths:
            folder_paths.folder_names_and_paths[kind][0].remove(path)


def tokens_graph(
    tokens_file="square.glm_tokens",
    width=SIZE,
    height=SIZE,
    latent_follows_tokens=True,
    glyph_text="from prompt quotes",
    override="",
) -> dict:
    """The text-to-image example from a token file (node "1", GLM-Image Load Visual Tokens, in place of the AR) at
    width x height, 2 steps; its tokens feed Encode, and the latent when ``latent_follows_tokens``."""
    graph = example_prompt(
        "text_to_image",
        width,
        height,
        GLMImageEncode={"tokens": ["1", 0], "glyph_text": glyph_text, "override": override},
        SaveImage={"filename_prefix": "errors"},
    )
    del graph["2"]
    graph["1"] = {"class_type": "GLMImageLoadTokens", "inputs": {"tokens_file": tokens_file}}
    del graph["6"]["inputs"]["tokens"]  # ModelSampling at its widgets' size
    if latent_follows_tokens:
        graph["7"]["inputs"]["tokens"] = ["1", 0]
    else:
        del graph["7"]["inputs"]["tokens"]
    return graph


def sized_node_prompt(node_id: str, width, height=SIZE) -> dict:
    """`node_id` with the given size, feeding a PreviewAny (an output, so that ComfyUI validates the node)."""
    inputs = {"width": width, "height": height}
    prompt = {"9": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}}}
    if node_id == "GLMImageGenerateTokens":
        prompt["0"] = {
            "class_type": "GLMImageARModelLoader",
            "inputs": {"model_folder": "GLM-Image", "dtype": "fp32", "device": "cpu", "weights": "full"},
        }
        inputs.update(ar_model=["0", 0], prompt="a cat", seed=0, temperature=0.9, top_p=0.75, top_k=0, batch_size=1)
    elif node_id == "GLMImageEmptyLatent":
        inputs.update(batch_size=1)
    elif node_id == "GLMImageModelSampling":
        prompt["0"] = {"class_type": "GLMImageDiTLoader", "inputs": {"dit": "GLM-Image", "weight_dtype": "default"}}
        inputs.update(model=["0", 0])
    elif node_id == "GLMImageScheduler":
        inputs.update(steps=2)
    prompt["1"] = {"class_type": node_id, "inputs": inputs}
    return prompt


def validation_errors(run, node="1") -> str:
    assert not run.success and run.error is not None, "the prompt should have failed validation"
    return " | ".join(e["details"] for e in run.node_errors[node]["errors"])


def execution_error(run, node) -> str:
    error = run.execution_error()
    assert not run.success and error is not None, "the prompt should have failed while running"
    assert error["node_id"] == node, error
    return error["exception_message"]


# --- sizes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("node_id", SIZED_NODES)
def test_a_size_that_is_not_a_multiple_of_32_fails_validation(files, node_id):
    run = comfy_host.run_prompt(sized_node_prompt(node_id, width=520))
    assert "width 520 is not a multiple of 32" in validation_errors(run) and "try 512 or 544" in validation_errors(run)


@pytest.mark.parametrize("node_id", SIZED_NODES)
@pytest.mark.parametrize("width", [256, 4096])
def test_a_size_out_of_range_fails_validation(files, node_id, width):
    run = comfy_host.run_prompt(sized_node_prompt(node_id, width=width))
    assert f"width {width} is outside GLM-Image's range 512..2048" in validation_errors(run)


@pytest.mark.parametrize("node_id", SIZED_NODES)
def test_a_linked_size_is_checked_when_the_node_runs(files, node_id):
    prompt = sized_node_prompt(node_id, width=["8", 0])
    prompt["8"] = {"class_type": "PrimitiveInt", "inputs": {"value": 520}}
    assert "width 520 is not a multiple of 32" in execution_error(comfy_host.run_prompt(prompt), node="1")


def test_other_limits_of_the_sized_nodes_are_still_validated_by_comfyui(files):
    prompt = sized_node_prompt("GLMImageEmptyLatent", width=SIZE)
    prompt["1"]["inputs"]["batch_size"] = 0
    assert "Value 0 smaller than min of 1" in str(comfy_host.run_prompt(prompt).node_errors)


# --- reference images -----------------------------------------------------------------------------------------------


class NoDecoder:
    """An AR model part that must not be reached: the check comes before the AR runs."""

    def __getattr__(self, name):
        raise AssertionError(f"the AR was reached ({name})")


@pytest.mark.parametrize(
    "height, width, expected",
    [
        (500, 2100, "The image at reference_2 is 2100x500 pixels: its aspect ratio 4.20:1 is over the 4:1"),
        (12, 40, "The image at reference_2 is 40x12 pixels: its 12 px side is under the 16 px"),
    ],
)
def test_a_reference_the_processor_cannot_take_is_refused_before_the_ar(files, tiny_model_dir, height, width, expected):
    processor = comfy_host.import_pack_module("glm_image_core.loading").load_ar_processor(tiny_model_dir)
    ar_model = types.ARModel(decoder=NoDecoder(), processor=processor, preview_palette=None, vision=NoDecoder())
    with pytest.raises(InvalidInputError, match=expected):
        comfy_glm.generate_tokens(
            files,
            ar_model,
            "make it blue",
            SIZE,
            seed=0,
            reference_1=torch.rand(1, 64, 64, 3),
            reference_2=torch.rand(2, height, width, 3),
        )


# --- token grids and latents ----------------------------------------------------------------------------------------


def test_tokens_for_another_size_than_the_latent_fail_in_the_sampler(files):
    run = comfy_host.run_prompt(tokens_graph("wide.glm_tokens", latent_follows_tokens=False))
    message = execution_error(run, node="8")
    assert "visual tokens are for a different image size" in message and "512x512 latent" in message


def test_comfyui_runs_the_next_prompt_after_an_error_in_the_sampler(files):
    failed = comfy_host.run_prompt(tokens_graph("wide.glm_tokens", latent_follows_tokens=False))
    assert failed.execution_error() is not None

    run = comfy_host.run_prompt(tokens_graph("square.glm_tokens"))

    assert run.success, run.execution_error()
    assert len(run.outputs["11"]["images"]) == 1


@pytest.fixture(scope="module")
def dit(files):
    """The DiT loader's MODEL as it comes out (GLM-Image's sampling for 1024x1024)."""
    with torch.inference_mode():
        return files["GLMImageDiTLoader"].execute(dit="GLM-Image", weight_dtype="default")[0]


@pytest.fixture(scope="module")
def model(files, dit):
    with torch.inference_mode():
        return files["GLMImageModelSampling"].execute(model=dit, width=SIZE, height=SIZE)[0]


@pytest.fixture(scope="module")
def encode(files):
    encoder = files["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]
    vae = files["GLMImageVAELoader"].execute(vae="GLM-Image")[0]

    def run(tokens, glyph_text="from prompt quotes", override=""):
        with torch.inference_mode():
            out = files["GLMImageEncode"].execute(
                glyph_encoder=encoder, tokens=tokens, glyph_text=glyph_text, override=override, vae=vae
            )
        return out[0], out[1]

    return run


def sample(model, positive, negative, batch=1, steps=2):
    """KSampler euler/simple, CFG 1.5, from fixed noise."""
    noise = torch.randn(batch, 16, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return comfy.sample.sample(
            model, noise, steps, 1.5, "euler", "simple", positive, negative, torch.zeros_like(noise)
        )


def test_tokens_for_the_transposed_size_fail_in_the_sampler(model, encode):
    """Tokens for 768x512 have as many prior ids as a 512x768 latent needs; only their size tells them apart."""
    positive, negative = encode(random_tokens(width=768, height=512))
    noise = torch.randn(1, 16, 768 // 8, 512 // 8)
    with pytest.raises(InvalidInputError, match=r"different image size \(768x512\) than this 512x768 latent"):
        with torch.inference_mode():
            comfy.sample.sample(model, noise, 1, 1.5, "euler", "simple", positive, negative, torch.zeros_like(noise))


def test_a_stock_empty_latent_that_is_not_a_multiple_of_32_fails_with_a_clear_message(model, encode):
    positive, negative = encode(random_tokens())
    latent = stock("EmptyLatentImage", "generate", width=520, height=520, batch_size=1)["samples"]  # 4 channels
    noise = torch.randn(1, 16, *latent.shape[2:])
    with pytest.raises(InvalidInputError, match=r"different image size \(512x512\) than this 520x520 latent"):
        with torch.inference_mode():
            comfy.sample.sample(model, noise, 1, 1.5, "euler", "simple", positive, negative, latent)


def test_more_token_grids_than_one_and_fewer_than_the_latent_batch_fail_with_a_clear_message(model, encode):
    positive, negative = encode(random_tokens(grids=2))
    with pytest.raises(
        InvalidInputError, match="2 token grids for a latent batch of 3: use one grid or one per latent"
    ):
        sample(model, positive, negative, batch=3)


# --- model sampling -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "node_id, method, inputs",
    [
        ("ModelSamplingAuraFlow", "patch_aura", {"shift": 1.75}),  # 1.75: GLM-Image's shift at 512x512
        ("ModelSamplingSD3", "patch", {"shift": 1.75}),
        ("ModelSamplingFlux", "patch", {"max_shift": 1.15, "base_shift": 0.5, "width": SIZE, "height": SIZE}),
        ("ModelSamplingDiscrete", "patch", {"sampling": "eps", "zsnr": False}),
    ],
)
def test_a_stock_model_sampling_node_is_refused_with_the_glm_node_named(dit, encode, node_id, method, inputs):
    positive, negative = encode(random_tokens())
    stock_sampled = stock(node_id, method, model=dit, **inputs)
    with pytest.raises(InvalidInputError) as error:
        sample(stock_sampled, positive, negative)
    message = str(error.value)
    assert "set by a stock ModelSampling node" in message and "makes a different image" in message
    assert f"'ModelSampling GLM-Image' set to {SIZE}x{SIZE}" in message


def test_the_loaders_model_samples_1024x1024_without_a_model_sampling_node(dit, encode):
    positive, negative = encode(random_tokens(width=1024, height=1024))
    noise = torch.randn(1, 16, 1024 // 8, 1024 // 8, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = comfy.sample.sample(dit, noise, 1, 1.5, "euler", "simple", positive, negative, torch.zeros_like(noise))
    assert out.isfinite().all()


def test_the_loaders_model_at_another_size_is_refused_with_the_glm_node_named(dit, encode):
    positive, negative = encode(random_tokens())
    with pytest.raises(InvalidInputError) as error:
        sample(dit, positive, negative)
    message = str(error.value)
    assert "shift 3.250 is for another image size than this 512x512 latent" in message
    assert "straight from the loader is set for 1024x1024" in message
    assert f"'ModelSampling GLM-Image' set to {SIZE}x{SIZE}" in message


def test_glm_model_sampling_for_another_size_is_refused(files, dit, encode):
    positive, negative = encode(random_tokens())
    wrong = files["GLMImageModelSampling"].execute(model=dit, width=768, height=768)[0]
    with pytest.raises(InvalidInputError, match="is for another image size than this 512x512 latent"):
        sample(wrong, positive, negative)


def scheduler_graph(scheduler: dict) -> dict:
    """The 512x512 token-file graph sampled by SamplerCustomAdvanced with the GLM-Image Scheduler's sigmas."""
    return comfy_glm.with_sampler_custom_advanced(
        tokens_graph(), {"steps": 3, **scheduler}
    )  # 3: see glm_schedule_shift


def test_a_scheduler_left_at_another_size_is_refused_before_the_first_step(files):
    run = comfy_host.run_prompt(scheduler_graph({"width": 1024, "height": 1024}))
    message = execution_error(run, node="8")
    assert "GLM-Image's schedule for another image size (shift 3.250, as for 1024x1024)" in message
    assert "this 512x512 latent (shift 1.750)" in message
    assert "Connect the tokens to the 'GLM-Image Scheduler'" in message and "width and height to 512x512" in message


@pytest.mark.parametrize(
    "scheduler", [{"width": 512, "height": 512}, {"width": 1024, "height": 1024, "tokens": ["1", 0]}]
)
def test_a_scheduler_at_the_latents_size_or_given_the_tokens_samples(files, scheduler):
    run = comfy_host.run_prompt(scheduler_graph(scheduler))
    assert run.success, run.execution_error()


# --- model files ----------------------------------------------------------------------------------------------------


def dit_loader_prompt(choice: str) -> dict:
    return {
        "1": {"class_type": "GLMImageDiTLoader", "inputs": {"dit": choice, "weight_dtype": "default"}},
        "2": {"class_type": "PreviewAny", "inputs": {"source": ["1", 0]}},
    }


def test_a_vae_file_given_to_the_dit_loader_is_named_as_a_vae_when_queued(files):
    """(Missing and truncated shards: test_nodes_paths.py.)"""
    message = validation_errors(comfy_host.run_prompt(dit_loader_prompt("glm_vae.safetensors")))
    assert "holds the weights of the VAE" in message and "load this file with the vae loader" in message


# --- the Encode node ------------------------------------------------------------------------------------------------


def test_an_unknown_glyph_text_choice_fails_validation(files):
    run = comfy_host.run_prompt(tokens_graph(glyph_text="from quotes"))
    assert "glyph_text must be 'from prompt quotes' or 'override', not 'from quotes'" in validation_errors(
        run, node="4"
    )


def test_an_empty_glyph_override_fails_validation(files):
    run = comfy_host.run_prompt(tokens_graph(glyph_text="override", override="  \n"))
    assert "'override' but the override is empty" in validation_errors(run, node="4")


def flux_shaped_vae():
    """A 16-channel VAE of another model as ComfyUI's stock VAELoader builds it from Flux's ae.safetensors (the
    shapes that decide its geometry; the weights are left empty)."""
    import comfy.sd

    sd = {
        "decoder.conv_in.weight": torch.zeros(512, 16, 3, 3),
        "encoder.conv_out.weight": torch.zeros(32, 512, 3, 3),
        "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3),
    }
    return comfy.sd.VAE(sd=sd)


@pytest.mark.parametrize("references", [1, 0])
def test_another_models_16_channel_vae_at_encode_is_refused(files, references):
    vae = flux_shaped_vae()
    assert vae.latent_channels == 16 and vae.downscale_ratio == 8  # as GLM-Image's: no shape tells them apart
    encoder = files["GLMImageGlyphEncoderLoader"].execute(encoder="GLM-Image", dtype="fp32")[0]
    with pytest.raises(InvalidInputError) as refused, torch.inference_mode():
        files["GLMImageEncode"].execute(
            glyph_encoder=encoder,
            tokens=random_tokens(references=references),
            glyph_text="from prompt quotes",
            override="",
            vae=vae,
        )
    message = str(refused.value)
    assert (
        "The VAE at GLM-Image Encode's vae input is not GLM-Image's: it is a 16-channel AutoencodingEngine" in message
    )
    assert "Connect the VAE of 'Load GLM-Image VAE'" in message


def test_editing_tokens_without_a_vae_at_encode_fail_with_a_clear_message(files):
    message = execution_error(comfy_host.run_prompt(tokens_graph("edit.glm_tokens")), node="4")
    assert "These tokens come from reference images: connect the VAE" in message


# --- conditioning from stock nodes ----------------------------------------------------------------------------------


def stock(node_id, method, **inputs):
    return getattr(nodes.NODE_CLASS_MAPPINGS[node_id](), method)(**inputs)[0]


def test_a_zeroed_out_positive_works_as_the_negative_and_equals_ours(model, encode):
    positive, negative = encode(random_tokens())
    zeroed = stock("ConditioningZeroOut", "zero_out", conditioning=positive)

    assert torch.equal(sample(model, positive, zeroed), sample(model, positive, negative))


def test_a_timestep_range_over_the_whole_run_keeps_the_glm_conditioning(model, encode):
    positive, negative = encode(random_tokens())
    ranged = stock("ConditioningSetTimestepRange", "set_range", conditioning=positive, start=0.0, end=1.0)

    assert torch.equal(sample(model, ranged, negative), sample(model, positive, negative))


def test_a_mask_over_the_whole_image_keeps_the_glm_conditioning(model, encode):
    positive, negative = encode(random_tokens())
    masked = stock(
        "ConditioningSetMask",
        "append",
        conditioning=positive,
        mask=torch.ones(1, SIZE, SIZE),
        set_cond_area="default",
        strength=1.0,
    )

    assert (sample(model, masked, negative) - sample(model, positive, negative)).abs().max() <= 1e-5


def test_an_area_conditioning_fails_with_a_clear_message(model, encode):
    positive, negative = encode(random_tokens())
    area = stock("ConditioningSetArea", "append", conditioning=positive, width=256, height=256, x=0, y=0, strength=1.0)
    with pytest.raises(InvalidInputError, match="cannot be limited to an area"):
        sample(model, area, negative)


def test_a_conditioning_without_glm_tokens_fails_with_a_clear_message(model, encode):
    positive, _ = encode(random_tokens())
    foreign = [[torch.zeros(1, 4, 64), {}]]  # e.g. a text encoder's output: none of GLM-Image Encode's keys
    with pytest.raises(InvalidInputError, match="no GLM-Image visual tokens: connect the output of 'GLM-Image Encode'"):
        sample(model, positive, foreign)


def test_combining_encodes_with_different_references_averages_their_predictions(model, encode):
    """ConditioningCombine of edits with one and with two references: each branch attends to its own references,
    and ComfyUI averages the two predictions; one Euler step to sigma 0 lands on that average."""
    one_ref, negative = encode(random_tokens(references=1, seed=1))
    two_refs, _ = encode(random_tokens(references=2, seed=2))
    combined = stock("ConditioningCombine", "combine", conditioning_1=one_ref, conditioning_2=two_refs)

    out = sample(model, combined, negative, steps=1)

    expected = (sample(model, one_ref, negative, steps=1) + sample(model, two_refs, negative, steps=1)) / 2
    assert (out - expected).abs().max() <= 1e-5


def test_concatenating_encodes_adds_the_second_glyph_text_to_the_first(model, encode):
    """ConditioningConcat joins the glyph embeddings and keeps the first encode's tokens (and references): the DiT
    then sees both texts' glyphs. (Not the same as encoding both spans in one Encode: the reference tokenizer pads
    every span by one when there is an even number of spans.)"""
    first, negative = encode(random_tokens(prompt='a sign "OPEN"', seed=1))
    second, _ = encode(random_tokens(prompt='a sign "LATE"', seed=2))

    joined = stock("ConditioningConcat", "concat", conditioning_to=first, conditioning_from=second)

    assert torch.equal(joined[0][0], torch.cat([first[0][0], second[0][0]], dim=1))
    assert joined[0][1].keys() == first[0][1].keys()
    assert torch.equal(joined[0][1]["glm_prior_token_ids"], first[0][1]["glm_prior_token_ids"])
    assert sample(model, joined, negative).isfinite().all()


# --- a real server --------------------------------------------------------------------------------------------------


@pytest.mark.server
def test_the_server_reports_bad_prompts_and_keeps_serving(tiny_model_dir, tmp_path):
    (tmp_path / "diffusion_models").mkdir()
    shutil.copy(
        tiny_model_dir / "vae/diffusion_pytorch_model.safetensors", tmp_path / "diffusion_models/vae.safetensors"
    )
    model_paths = {"glm_image": str(tiny_model_dir.parent), "diffusion_models": str(tmp_path / "diffusion_models")}
    decode_empty = {
        "1": {"class_type": "GLMImageEmptyLatent", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "2": {"class_type": "GLMImageVAELoader", "inputs": {"vae": "GLM-Image"}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "server"}},
    }
    with comfy_host.comfy_server(model_paths) as url:
        bad_size = {
            **decode_empty,
            "1": {**decode_empty["1"], "inputs": {"width": 520, "height": SIZE, "batch_size": 1}},
        }
        with pytest.raises(RuntimeError, match="width 520 is not a multiple of 32"):
            comfy_host.server_run_prompt(url, bad_size)

        with pytest.raises(RuntimeError, match="holds the weights of the VAE"):
            comfy_host.server_run_prompt(url, dit_loader_prompt("vae.safetensors"))

        linked_size = {**decode_empty, "5": {"class_type": "PrimitiveInt", "inputs": {"value": 520}}}
        linked_size["1"] = {**decode_empty["1"], "inputs": {"width": ["5", 0], "height": SIZE, "batch_size": 1}}
        failed = comfy_host.server_run_prompt(url, linked_size)
        assert failed["status"]["status_str"] == "error"
        errors = [data for event, data in failed["status"]["messages"] if event == "execution_error"]
        assert "width 520 is not a multiple of 32" in errors[0]["exception_message"]

        served = comfy_host.server_run_prompt(url, decode_empty)
        assert served["status"]["status_str"] == "success"
        assert len(served["outputs"]["4"]["images"]) == 1
