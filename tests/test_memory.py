"""The AR decode's working-memory estimate (glm_image_core.memory.ar_working_memory) against the allocations of real
fast_ar generations on the CPU, measured with torch.profiler.

Each case is chosen so that a different moment of the estimate is the peak (prefill MLP, the CPU's float32 RMSNorm
copies, int8 matmul, attention over a long cache, sampling), so a wrong or missing term in any of them fails a case.
The tiny model's buffers are small, so its prompts are long (~1000 tokens) or its cache long (2048x2048: 4352 new
tokens) where that moment needs it."""

import copy
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType

from glm_image_core import ar, formats, loading, memory
from glm_image_core.defaults import NUM_VQ_CODES
from glm_image_core.errors import GenerationCancelled
from tests.benchmark_scripts import import_script

pytestmark = pytest.mark.heavy  # the vision encoder at its real width

TOLERANCE = 0.10  # the bound: the estimate within 10% of the measured peak, either way
UPPER_BOUND_SLACK = 0.25  # the encoders' estimates (an upper bound over CPU kernels' differing live sets): above
LONG_PROMPT = "a cat on a mat, " * 60  # 973 tokens: the tiny tokenizer reads characters
SHORT_PROMPT = "a cat"
PUBLISHED = Path(memory.__file__).parent / "published"  # the published configs


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return loading.load_ar_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def models(tiny_model_dir, autoround_model_dir):
    """The tiny AR as the loaders give it: the code rows of the embedding as the parameter (trim), fp32, bf16,
    int8 projections with bf16 activations (the published int8 setup), and auto-round's 4-bit projections."""
    return {
        "fp32": loading.load_ar_model(tiny_model_dir, dtype=torch.float32, trim=True),
        "bf16": loading.load_ar_model(tiny_model_dir, dtype=torch.bfloat16, trim=True),
        "int8": loading.load_ar_model(tiny_model_dir, dtype=torch.bfloat16, quantisation="int8", trim=True),
        "4-bit": loading.load_ar_model(autoround_model_dir, dtype=torch.bfloat16, trim=True),
    }


def allocation_peak(run) -> int:
    """The most bytes allocated and not yet freed at any time while ``run()`` runs, beyond what was allocated before:
    every allocation and free the profiler records (profile_memory=True: each tensor storage of the CPU allocator),
    summed in time order. (The event tree is torch's private API; ``export_memory_timeline``, built on it, is
    deprecated without a CPU replacement.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = []
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        nodes.extend(node.children)
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def stop_after_32_tokens(step, total, tokens):
    if step >= 32:
        raise GenerationCancelled("measured")


def generation_peak(model, inputs, batch: int) -> int:
    """The allocation peak of a fast_ar generation of ``batch`` samples, stopped after 32 tokens: every buffer is
    allocated before the first decode step and every step allocates the same (a full 256x256 generation peaks at
    the same byte), so the rest would only cost time."""

    def generate():
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        with pytest.raises(GenerationCancelled):
            ar.generate_prior_tokens(model, inputs, generators, fast=True, callback=stop_after_32_tokens)

    return allocation_peak(generate)


@pytest.mark.parametrize(
    "weights, batch, prompt, size, peak_moment",
    [
        ("fp32", 1, LONG_PROMPT, 256, "prefill: MLP product"),
        ("fp32", 4, SHORT_PROMPT, 256, "decode: sampling"),
        ("bf16", 2, LONG_PROMPT, 256, "prefill: MLP output norm"),
        ("bf16", 2, SHORT_PROMPT, 2048, "decode: attention over the cache"),
        ("int8", 2, LONG_PROMPT, 256, "prefill: int8 gate_up scale"),
        ("4-bit", 2, LONG_PROMPT, 256, "prefill: MLP output norm"),  # its 4-bit layers are small: see below
    ],
    ids=[
        "fp32-batch1-prefill",
        "fp32-batch4-sampling",
        "bf16-batch2-prefill",
        "bf16-batch2-attention",
        "int8-batch2",
        "4bit-batch2",
    ],
)
def test_the_working_memory_estimate_is_within_10_percent_of_the_measured_peak(
    models, processor, weights, batch, prompt, size, peak_moment
):
    model = models[weights]
    inputs = ar.build_ar_inputs(processor, prompt, size, size)
    prompt_length, new_tokens = inputs.input_ids.shape[1], inputs.geometry.num_grid_tokens
    estimate = memory.ar_model_working_memory(model, batch, prompt_length, new_tokens)
    moments = {name: sum(moment.values()) for name, moment in estimate.moments.items()}
    assert max(moments, key=moments.get) == peak_moment, moments  # the case tests the moment it is there for

    measured = generation_peak(model, inputs, batch)
    print(
        f"{weights}, batch {batch}, {prompt_length} + {new_tokens} tokens: estimated {estimate.total} B, measured {measured}"
    )
    assert abs(estimate.total - measured) <= TOLERANCE * measured, (estimate.total, measured, estimate)


@pytest.mark.parametrize("in_features, out_features", [(1024, 4096), (4096, 4096)], ids=["one-chunk", "four-chunks"])
def test_a_dequantising_4bit_matmul_allocates_what_the_estimate_counts(in_features, out_features):
    """The 4-bit moment of a real AR's prefill (its gate_up: 4096 x 27392), on layers big enough to measure: the
    tiny AR's 4-bit layers are too small to be its peak."""
    w4a16_layer = import_script("common").w4a16_layer
    layer = w4a16_layer(torch.nn.Linear(in_features, out_features, bias=False))
    x = torch.randn(8, in_features, dtype=torch.bfloat16)
    with torch.no_grad():
        measured = allocation_peak(lambda: layer(x))
    estimate = sum(formats.W4A16.many_rows_matmul_bytes(in_features, out_features, 8, 2)["matmul"].values())
    assert abs(estimate - measured) <= TOLERANCE * measured, (estimate, measured)


def test_the_first_decode_steps_4bit_repack_allocates_what_the_estimate_counts():
    """The repack of a 4-bit layer for CUDA's int4 matmul (a gate_up-sized layer: 1024 x 8192, four chunks): the code
    pairs and their scales and zeros are made here as on CUDA; torch's CUDA-only conversion is stood in by an
    allocation of its output's size (as many bytes as the pairs). The estimate of ``first_step_bytes``, within 10%."""
    w4a16_layer = import_script("common").w4a16_layer
    layer = w4a16_layer(torch.nn.Linear(1024, 8192, bias=False))
    w4a16 = formats.w4a16

    def repack():
        packed = torch.empty_like(w4a16.code_pairs(layer.qweight))  # _convert_weight_to_int4pack's output
        return packed, w4a16.int4pack_scales_and_zeros(layer.qzeros, layer.scales)

    measured = allocation_peak(repack)
    estimate = sum(formats.W4A16.first_step_bytes(1024, 8192, layer.group_size).values())
    assert abs(estimate - measured) <= TOLERANCE * measured, (estimate, measured)


@pytest.fixture(scope="module")
def glyph_encoders():
    """Glyph-ByT5 encoders of the published width (d_model 1472, d_ff 3584, 6 heads) with 2 of its 12 layers (a call
    peaks within one layer), random, in bf16 (the loader's choice on GPUs) and fp32 (on the CPU)."""
    from transformers import T5Config, T5EncoderModel

    config = dict(import_script("common").GLYPH_ENCODER_CONFIG, num_layers=2, is_encoder_decoder=False)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config.from_dict(config)).eval()
    return {"fp32": model, "bf16": T5EncoderModel(T5Config.from_dict(config)).to(torch.bfloat16).eval()}


GLYPH_CASES = {  # spans: what each case makes the peak of
    "one of 2048 bytes among 8": ["x" * 2047] + [f"word {i}" for i in range(7)],  # the position buckets
    "100 short spans": [f"short span {i:02d}" for i in range(100)],  # the MLP, 16 spans per call
    "two of ~1000 bytes, padded": ["y" * 1019, "z" * 900],  # the MLP beside a padded call's bias and mask
}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", list(GLYPH_CASES))
def test_the_glyph_encoders_working_memory_bounds_the_measured_peak(glyph_encoders, case, dtype):
    """Within 10% below and 25% above: what ComfyUI frees before the encoder runs must not fall short."""
    from transformers import ByT5Tokenizer

    from glm_image_core import glyph

    spans, model, tokenizer = GLYPH_CASES[case], glyph_encoders[dtype], ByT5Tokenizer()
    estimate = memory.glyph_model_working_bytes(model, spans, tokenizer)
    measured = allocation_peak(lambda: glyph.encode_glyphs(spans, model, tokenizer))
    print(f"glyph, {case}, {dtype}: estimated {estimate} B, measured {measured}")
    assert -TOLERANCE * measured <= estimate - measured <= UPPER_BOUND_SLACK * measured, (estimate, measured)


@pytest.fixture(scope="module")
def vision_models(tiny_model_dir):
    """The tiny AR with the published vision encoder (hidden 1536, MLP 6144), 2 of its 40 ViT layers (a call peaks
    within one layer or in the VQ), random, in bf16 and fp32, by codebook size: the published VQ model's 16384 x 2048
    codebook, or 1024 x 2048 (the VQ then weighs little beside the ViT)."""
    import json

    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    config = json.loads((tiny_model_dir / "vision_language_encoder" / "config.json").read_text())
    published = json.loads((PUBLISHED / "vision_language_encoder__config.RECONSTRUCTED.json").read_text())
    config["vision_config"] = dict(published["vision_config"], depth=2)
    torch.manual_seed(0)
    models = {}
    for codes in (NUM_VQ_CODES, 1024):
        config["vq_config"] = dict(published["vq_config"], num_embeddings=codes)
        model = GlmImageForConditionalGeneration(GlmImageConfig.from_dict(config)).eval()
        models["fp32", codes], models["bf16", codes] = model, copy.deepcopy(model).to(torch.bfloat16)
    return models


VISION_CASES = {  # (reference sides in px, codebook size): what each case makes the peak of
    "one 512x512": ([512], NUM_VQ_CODES),  # the VQ's codebook: its square, or the CPU matmul's copy of it (bf16)
    "one 1024x1024": ([1024], NUM_VQ_CODES),  # the VQ's distances
    "two 1024x1024": ([1024] * 2, NUM_VQ_CODES),  # the VQ's, beside both images' features
    "1024 and 512": ([1024, 512], NUM_VQ_CODES),  # the VQ's of the larger image
    # the ViT's MLP on every image's patches (fp32), the position table's float32 copy (bf16)
    "four 512x512, 1024 codes": ([512] * 4, 1024),
}


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("case", list(VISION_CASES))
def test_the_vision_encoders_working_memory_bounds_the_measured_peak(vision_models, processor, case, dtype):
    """Within 10% below and 25% above the allocation peak of encoding the references (ViT + VQ)."""
    from PIL import Image

    sides, codes = VISION_CASES[case]
    model = vision_models[dtype, codes]
    images = [Image.new("RGB", (side, side), (40 * i, 150, 200)) for i, side in enumerate(sides)]
    inputs = ar.build_ar_inputs(processor, "a cat", 512, 512, images)
    estimate = memory.ar_model_vision_working_bytes(model, inputs.image_grid_thw[: len(images)])
    measured = allocation_peak(lambda: ar.encode_reference_images(model, inputs))
    print(f"vision, {case}, {dtype}: estimated {estimate} B, measured {measured}")
    assert -TOLERANCE * measured <= estimate - measured <= UPPER_BOUND_SLACK * measured, (estimate, measured)
