"""AR LoRA adapters (glm_image_core.ar_lora) against PEFT itself: adapters made by peft's get_peft_model +
save_pretrained on transformers' GlmImageForConditionalGeneration; PeftModel's teacher-forced logits and sampled
tokens are the reference for the pack's merged adapter, with float32 and with int8 decoder weights."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GlmImageForConditionalGeneration, GlmImageProcessor

from glm_image_core import ar, ar_lora
from glm_image_core.errors import InvalidInputError
from glm_image_core.formats import int8
from glm_image_core.loading import load_ar_model
from tests.test_ar import PEAKED_SCALE, greedy_generate_logits, seeded

STEPS = 6
# Merged (W + s B A) vs PEFT's side path (W x + s B (A x)) in float32: the same sums in another order (~1e-6).
MERGE_TOLERANCE = 1e-4

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
    return [ar_lora.ArLora(ar_lora.read_adapter(path), strength, str(path))]


def test_merged_adapter_gives_peft_teacher_forced_logits(tiny_model_dir, adapter, base, inputs):
    folder, peft_model = adapter
    out, tokens, input_ids = greedy_generate_logits(peft_model, inputs, STEPS)
    expected = torch.cat(out.logits)
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    with ar_lora.merged(model, with_adapter(folder)):
        got = forced_logits(model, input_ids, inputs, tokens[:, :STEPS])
    assert (got - expected).abs().max() <= MERGE_TOLERANCE
    assert (forced_logits(base, input_ids, inputs, tokens[:, :STEPS]) - expected).abs().max() > 100 * MERGE_TOLERANCE


@pytest.mark.parametrize("fast", [False, True])
def test_merged_adapter_samples_peft_tokens_per_seed(tiny_model_dir, base, inputs, tmp_path, fast):
    """On the peaked model (test_ar.py: every pick wins by far more than float noise), both decoders."""
    peaked = copy.deepcopy(base)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(PEAKED_SCALE)
    peft_model = make_adapter(peaked, tmp_path, **ADAPTERS["attention, a list, dropout"])
    expected = ar.generate_prior_tokens(peft_model.get_base_model(), inputs, seeded(4, 5), fast=False)
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(PEAKED_SCALE)
    with ar_lora.merged(model, with_adapter(tmp_path)):
        got = ar.generate_prior_tokens(model, inputs, seeded(4, 5), fast=fast)
    unadapted = ar.generate_prior_tokens(model, inputs, seeded(4, 5), fast=fast)
    assert torch.equal(got.target_ids, expected.target_ids)
    assert torch.equal(got.preview_ids, expected.preview_ids)
    assert not torch.equal(unadapted.target_ids, expected.target_ids)


def dequantised_copy(model_int8, base):
    """transformers' model with the int8 model's decoder projections as float32 weights: what int8 stands for."""
    model = copy.deepcopy(base)
    for name, module in model_int8.named_modules():
        if isinstance(module, int8.Int8Linear):
            model.get_submodule(name).weight.data = int8.dequantise_int8(module.weight, module.weight_scale)
    return model


# int8 weights: the merge rounds the merged weight to int8 once more (per-row scales). Bounded by the int8 format's
# own error on this model (README, Memory: logits within 3.5% relative L2 per step of float32). Measured: 1.9%
# (the int8 model alone against float32, no adapter: 1.7%).
INT8_MERGE_TOLERANCE = 0.035


def relative_l2_per_step(got, expected):
    return ((got - expected).norm(dim=-1) / expected.norm(dim=-1)).max()


def test_with_int8_weights_the_merge_gives_peft_over_the_int8_weights(tiny_model_dir, base, inputs, tmp_path):
    model = load_ar_model(tiny_model_dir, dtype=torch.float32, quantisation="int8")
    peft_model = make_adapter(dequantised_copy(model, base), tmp_path, **ADAPTERS["attention, a list, dropout"])
    out, tokens, input_ids = greedy_generate_logits(peft_model, inputs, STEPS)
    expected = torch.cat(out.logits)
    with ar_lora.merged(model, with_adapter(tmp_path)):
        assert model.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.int8
        got = forced_logits(model, input_ids, inputs, tokens[:, :STEPS])
    assert relative_l2_per_step(got, expected) <= INT8_MERGE_TOLERANCE


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_the_model_has_its_own_tensors_again_after_the_run(tiny_model_dir, base, tmp_path, quantization):
    make_adapter(base, tmp_path, **ADAPTERS["attention, a list, dropout"])
    model = load_ar_model(tiny_model_dir, dtype=torch.float32, quantisation=quantization)
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    with ar_lora.merged(model, with_adapter(tmp_path)):
        q_proj = model.model.language_model.layers[0].self_attn.q_proj
        assert not torch.equal(q_proj.weight, before["model.language_model.layers.0.self_attn.q_proj.weight"][1])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys()
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name


def test_strength_zero_is_the_unadapted_model_and_strength_scales_the_update(tiny_model_dir, base, inputs, tmp_path):
    make_adapter(base, tmp_path, **ADAPTERS["attention, a list, dropout"])
    model = load_ar_model(tiny_model_dir, dtype=torch.float32)
    weight = lambda: model.model.language_model.layers[1].self_attn.o_proj.weight.detach().clone()  # noqa: E731
    plain = weight()
    with ar_lora.merged(model, with_adapter(tmp_path, 0.0)):
        assert torch.equal(weight(), plain)
    with ar_lora.merged(model, with_adapter(tmp_path, 1.0)):
        once = weight() - plain
    with ar_lora.merged(model, with_adapter(tmp_path, -0.5)):
        torch.testing.assert_close(weight() - plain, -0.5 * once, rtol=1e-4, atol=1e-6)


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
        assert torch.equal(layer.delta("cpu"), from_file[module].delta("cpu"))


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
