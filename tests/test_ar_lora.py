"""AR LoRA adapters (glm_image_core.ar_lora) against PEFT itself: adapters made by peft's get_peft_model +
save_pretrained on transformers' GlmImageForConditionalGeneration; PeftModel's teacher-forced logits and sampled
tokens are the reference for the pack's adapter, applied unmerged, over float32, int8 and 4-bit decoder weights (the
reference: PEFT over transformers' model with the quantised weights dequantised)."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GlmImageForConditionalGeneration, GlmImageProcessor

from glm_image_core import ar, ar_lora, formats, lora
from glm_image_core.errors import InvalidInputError
from glm_image_core.loading import load_ar_model
from tests.test_ar import PEAKED_SCALE, greedy_generate_logits, seeded

STEPS = 6
# Ours (W x + s B (A x), the update in float32) vs PEFT's same side path: the same sums in another order (~1e-6).
TOLERANCE = 1e-4

ADAPTERS = {  # name: LoraConfig arguments (random, non-zero B: init_lora_weights=False)
    "attention, a list, dropout": dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.1
    ),
    "mlp, a regex, rslora": dict(
        r=2, lora_alpha=3, target_modules=r".*language_model.*\.(gate_up_proj|down_proj)", use_rslora=True
    ),
}


def make_adapter(model, folder, seed=0, **config):
    """A PEFT adapter folder for ``model`` (left unchanged) made by peft's own code; returns the PeftModel. Random
    A and B (peft's init_lora_weights=False), B scaled to a tenth: an update that moves the logits by ~15%, not by
    more than their own size."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.1)
    peft_model.save_pretrained(folder)
    return peft_model.eval()


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    return GlmImageForConditionalGeneration.from_pretrained(
        tiny_model_dir / "vision_language_encoder", dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def inputs(tiny_model_dir):
    processor = GlmImageProcessor.from_pretrained(tiny_model_dir / "processor")
    return ar.build_ar_inputs(processor, "A 'cat' on a mat", 256, 256)


@pytest.fixture(scope="module", params=list(ADAPTERS))
def adapter(request, base, tmp_path_factory):
    """(the adapter folder, the PeftModel that saved it)."""
    folder = tmp_path_factory.mktemp("adapter")
    return folder, make_adapter(base, folder, **ADAPTERS[request.param])


def forced_logits(model, input_ids, inputs, tokens):
    """Float32 logits [steps + 1, 16512] of ``model`` fed the prompt, then ``tokens`` [1, steps] one at a time."""
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = [ar.next_token_logits(model, input_ids, inputs.position_ids, cache)]
        for k in range(tokens.shape[1]):
            position = inputs.decode_position_ids[:, :, k : k + 1]
            logits.append(ar.next_token_logits(model, tokens[:, k : k + 1], position, cache))
    return torch.cat(logits)


def with_adapter(path, strength=1.0):
    return [lora.Lora(ar_lora.read_adapter(path), strength, str(path))]


def applied(model, loras):
    """The adapters on the transformers forward of ``model`` (teacher forcing), as the transformers loop applies
    them."""
    return lora.hooked(model, lora.projection_updates(loras, model.lm_head.weight.device))


def dequantised_copy(model, base, registry=formats):
    """transformers' model with ``model``'s decoder projections, in any weight format, as float32 weights: what the
    quantised weights stand for. ``registry``: the formats package whose layers ``model`` holds (a host test's model
    holds the pack's own copy of it)."""
    copied = copy.deepcopy(base)
    for name, module in model.named_modules():
        if registry.of_layer(module) is not registry.PLAIN:
            copied.get_submodule(name).weight.data = registry.dequantised_weight(module).contiguous()
    return copied


def test_the_adapter_gives_peft_teacher_forced_logits(tiny_model_dir, adapter, base, inputs):
    folder, peft_model = adapter
    out, tokens, input_ids = greedy_generate_logits(peft_model, inputs, STEPS)
    expected = torch.cat(out.logits)
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    with applied(model, with_adapter(folder)):
        got = forced_logits(model, input_ids, inputs, tokens[:, :STEPS])
    assert (got - expected).abs().max() <= TOLERANCE
    assert (forced_logits(base, input_ids, inputs, tokens[:, :STEPS]) - expected).abs().max() > 100 * TOLERANCE


@pytest.mark.parametrize("fast", [False, True])
def test_the_adapter_samples_peft_tokens_per_seed(tiny_model_dir, base, inputs, tmp_path, fast):
    """On the peaked model (test_ar.py: every pick wins by far more than float noise), both decoders."""
    peaked = copy.deepcopy(base)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(PEAKED_SCALE)
    peft_model = make_adapter(peaked, tmp_path, **ADAPTERS["attention, a list, dropout"])
    expected = ar.generate_prior_tokens(peft_model.get_base_model(), inputs, seeded(4, 5), fast=False)
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKED_SCALE)
    got = ar.generate_prior_tokens(model, inputs, seeded(4, 5), fast=fast, loras=with_adapter(tmp_path))
    unadapted = ar.generate_prior_tokens(model, inputs, seeded(4, 5), fast=fast)
    assert torch.equal(got.target_ids, expected.target_ids)
    assert torch.equal(got.preview_ids, expected.preview_ids)
    assert not torch.equal(unadapted.target_ids, expected.target_ids)


def quantised_ar(weights, tiny_model_dir, request):
    """The AR in a weight format: full (float32), int8 (quantised while read), 4-bit (auto-round's), SDNQ (sdnq's)."""
    if weights == "4-bit":
        return load_ar_model(request.getfixturevalue("autoround_model_dir"), dtype=torch.float32)
    if weights == "SDNQ":
        return load_ar_model(request.getfixturevalue("sdnq_model_dir"), dtype=torch.float32)
    return load_ar_model(tiny_model_dir, dtype=torch.float32, quantisation="int8" if weights == "int8" else None)


@pytest.fixture(scope="module", params=["int8", "4-bit", "SDNQ"])
def quantised(request, tiny_model_dir):
    return quantised_ar(request.param, tiny_model_dir, request)


def test_over_quantised_weights_the_adapter_gives_peft_over_the_same_weights(quantised, base, inputs, tmp_path):
    """Nothing is merged into the quantised weights: the int8 or 4-bit projections compute what they stand for and
    the update beside them what PEFT's does (the merge this replaced rounded the int8 weight again: 1.9% there)."""
    peft_model = make_adapter(dequantised_copy(quantised, base), tmp_path, **ADAPTERS["attention, a list, dropout"])
    out, tokens, input_ids = greedy_generate_logits(peft_model, inputs, STEPS)
    with applied(quantised, with_adapter(tmp_path)):
        got = forced_logits(quantised, input_ids, inputs, tokens[:, :STEPS])
    assert (got - torch.cat(out.logits)).abs().max() <= TOLERANCE


@pytest.mark.parametrize("fast", [False, True])
def test_both_decoders_sample_peft_tokens_over_quantised_weights(quantised, inputs, base, tmp_path, fast):
    """On the peaked model (every pick wins by far more than float noise): the 4-bit or int8 AR with an adapter
    samples the tokens PEFT samples over the same weights."""
    reference = dequantised_copy(quantised, base)
    with torch.no_grad():
        reference.lm_head.weight.mul_(PEAKED_SCALE)
    peft_model = make_adapter(reference, tmp_path, **ADAPTERS["mlp, a regex, rslora"])
    expected = ar.generate_prior_tokens(peft_model.get_base_model(), inputs, seeded(4), fast=False)
    model = copy.deepcopy(quantised)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKED_SCALE)
    got = ar.generate_prior_tokens(model, inputs, seeded(4), fast=fast, loras=with_adapter(tmp_path))
    assert torch.equal(got.target_ids, expected.target_ids)


def relative_l2(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("weights", ["full", "int8", "4-bit", "SDNQ"])
def test_a_small_update_is_kept_whole_over_every_weight_format(
    tiny_model_dir, base, inputs, tmp_path, weights, request
):
    """An adapter at the strength that moves the weights by 0.2% (||s B A|| / ||W|| over its layers): merged, an
    int8 or 4-bit weight would round most of it away again (and a bf16 weight 61% of it). Unmerged, the change it
    makes to the logits stays within 1% of the change PEFT's own side path makes over the same weights."""
    model = quantised_ar(weights, tiny_model_dir, request)
    reference = dequantised_copy(model, base)
    peft_model = make_adapter(reference, tmp_path, **ADAPTERS["attention, a list, dropout"])
    layers = ar_lora.read_adapter(tmp_path)
    moved = sum(layer.delta().norm() for layer in layers.values())
    strength = 0.002 * sum(formats.dequantised_weight(model.get_submodule(m)).norm() for m in layers) / moved
    _, tokens, input_ids = greedy_generate_logits(peft_model, inputs, STEPS)

    def forced(m):
        return forced_logits(m, input_ids, inputs, tokens[:, :STEPS])

    for module in peft_model.modules():  # peft's LoRA layers keep their scaling per adapter
        if isinstance(getattr(module, "scaling", None), dict):
            module.scaling = {name: value * float(strength) for name, value in module.scaling.items()}
    with peft_model.disable_adapter():
        unadapted = forced(peft_model)
    expected = forced(peft_model) - unadapted
    plain = forced(model)
    with applied(model, with_adapter(tmp_path, float(strength))):
        got = forced(model) - plain
    print(
        f"{weights}: the logits move {got.norm() / plain.norm():.2g}, within {relative_l2(got, expected):.2g} of PEFT"
    )
    assert relative_l2(got, expected) <= 0.01


def test_the_update_beside_a_bf16_projection_keeps_what_a_merge_would_round_away():
    """A 1024 x 1024 bf16 weight and a rank-16 update of 0.2% of it: merged by rounding to nearest in bf16, most of
    the update is lost; computed beside the projection in float32, all of it is there."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
    down, up = torch.randn(16, 1024, generator=g), torch.randn(1024, 16, generator=g)
    scale = 0.002 * weight.float().norm() / (up @ down).norm()
    update = lora.ProjectionUpdate(down, up * scale)
    x = torch.randn(8, 1024, generator=g)
    exact = x @ (up @ down * scale).t()
    merged = (weight.float() + up @ down * scale).to(torch.bfloat16).float() - weight.float()
    lost = relative_l2(x @ merged.t(), exact)
    kept = relative_l2(update(x), exact)
    print(f"0.2% update on a bf16 weight: merged loses {lost:.0%}, beside it {kept:.1e}")
    assert lost > 0.3 and kept < 1e-5


@pytest.mark.parametrize("quantisation", [None, "int8"])
def test_a_generation_with_an_adapter_leaves_the_model_as_it_was(tiny_model_dir, inputs, base, tmp_path, quantisation):
    make_adapter(base, tmp_path, **ADAPTERS["attention, a list, dropout"])
    model = load_ar_model(tiny_model_dir, dtype=torch.float32, quantisation=quantisation)
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    for fast in (False, True):
        ar.generate_prior_tokens(model, inputs, seeded(1), fast=fast, loras=with_adapter(tmp_path))
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name
    assert not [m for m in model.modules() if m._forward_hooks]


def test_strength_zero_is_the_unadapted_model_and_strength_scales_the_update(base, tmp_path):
    make_adapter(base, tmp_path, **ADAPTERS["attention, a list, dropout"])
    module = "model.language_model.layers.1.self_attn.o_proj"
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    assert lora.projection_updates(with_adapter(tmp_path, 0.0), "cpu") == {}
    once = lora.projection_updates(with_adapter(tmp_path, 1.0), "cpu")[module](x)
    half = lora.projection_updates(with_adapter(tmp_path, -0.5), "cpu")[module](x)
    torch.testing.assert_close(half, -0.5 * once, rtol=1e-5, atol=1e-7)
    stacked = lora.projection_updates(with_adapter(tmp_path, 1.0) * 2, "cpu")[module](x)
    torch.testing.assert_close(stacked, 2 * once, rtol=1e-5, atol=1e-7)


def test_a_single_file_without_prefix_with_alpha_tensors_equals_the_folder(tiny_model_dir, base, tmp_path):
    make_adapter(base, tmp_path / "folder", **ADAPTERS["attention, a list, dropout"])
    tensors = load_file(tmp_path / "folder" / ar_lora.ADAPTER_WEIGHTS)
    single = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    single |= {k.replace(".lora_A.weight", ".alpha"): torch.tensor(8.0) for k in single if k.endswith(".lora_A.weight")}
    save_file(single, tmp_path / "adapter.safetensors")
    from_folder, from_file = (
        ar_lora.read_adapter(tmp_path / "folder"),
        ar_lora.read_adapter(tmp_path / "adapter.safetensors"),
    )
    assert from_folder.keys() == from_file.keys() and len(from_folder) == 4 * 2  # q/k/v/o of 2 layers
    for module, layer in from_folder.items():
        assert torch.equal(layer.delta(), from_file[module].delta())


def test_modules_to_save_is_refused_by_name(base, tmp_path):
    make_adapter(base, tmp_path, r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(InvalidInputError, match=r"modules_to_save \['lm_head'\]"):
        ar_lora.read_adapter(tmp_path)


def test_an_adapter_of_other_modules_is_refused_naming_its_keys(base, tmp_path):
    make_adapter(base, tmp_path, r=2, target_modules=["qkv", "q_proj"])  # the vision encoder's qkv, and q_proj
    with pytest.raises(InvalidInputError, match=r"4 of its 8 keys .*model\.visual\.blocks\.0\.attn\.qkv\.lora_A"):
        ar_lora.check_adapter(tmp_path)


def test_a_dit_lora_is_refused_naming_its_keys(tmp_path):
    save_file({"transformer.proj_out.lora_A.weight": torch.zeros(2, 64)}, tmp_path / "dit.safetensors")
    with pytest.raises(InvalidInputError, match=r"not a LoRA for GLM-Image's AR.*transformer\.proj_out\.lora_A"):
        ar_lora.check_adapter(tmp_path / "dit.safetensors")


def test_an_adapter_for_another_model_size_is_refused(tiny_model_dir, tmp_path):
    key = "model.language_model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.zeros(2, 99), f"{key}.lora_B.weight": torch.zeros(64, 2)},
        tmp_path / "x.safetensors",
    )
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    with pytest.raises(InvalidInputError, match=r"q_proj as \[64, 99\].*another model"):
        ar_lora.check_fits(model, ar_lora.read_adapter(tmp_path / "x.safetensors"), "x.safetensors")


def test_a_folder_without_its_config_is_refused(base, tmp_path):
    make_adapter(base, tmp_path, r=2, target_modules=["q_proj"])
    (tmp_path / ar_lora.ADAPTER_CONFIG).unlink()
    with pytest.raises(InvalidInputError, match=r"needs adapter_config\.json and adapter_model\.safetensors"):
        ar_lora.check_adapter(tmp_path)


def test_peft_writes_the_config_fields_the_reader_uses(base, tmp_path):
    make_adapter(base, tmp_path, **ADAPTERS["mlp, a regex, rslora"])
    config = json.loads((tmp_path / ar_lora.ADAPTER_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["peft_type"]) == (2, 3, True, "LORA")
    layers = ar_lora.read_adapter(tmp_path)
    assert {layer.scaling for layer in layers.values()} == {3 / 2**0.5}
