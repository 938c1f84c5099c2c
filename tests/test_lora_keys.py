"""LoRA key names: every format's tensor keys find the layer they belong to, and foreign keys are named."""

from glm_image_core.lora import diffusers_lora_names, lora_layer_of, unmatched_lora_keys

WEIGHTS = ["transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.attn1.to_q.bias", "proj_out.weight"]


def test_diffusers_names_cover_every_trainer_prefix():
    names = diffusers_lora_names(WEIGHTS)
    for prefix in ("transformer.", "base_model.model.", ""):
        assert names[prefix + "transformer_blocks.0.attn1.to_q"] == "transformer_blocks.0.attn1.to_q.weight"
    assert not any(name.endswith("bias") for name in names)


def test_each_tensor_of_a_layer_finds_it():
    known = diffusers_lora_names(WEIGHTS) | {"lora_unet_proj_out": "proj_out.weight"}
    for key in (
        "transformer.transformer_blocks.0.attn1.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn1.to_q.alpha",
        "transformer_blocks.0.attn1.to_q_lora.up.weight",
    ):
        assert lora_layer_of(key, known) in (
            "transformer.transformer_blocks.0.attn1.to_q",
            "transformer_blocks.0.attn1.to_q",
        )
    assert lora_layer_of("lora_unet_proj_out.lora_down.weight", known) == "lora_unet_proj_out"


def test_keys_of_other_layers_are_unmatched():
    known = diffusers_lora_names(WEIGHTS)
    keys = ["transformer.proj_out.lora_A.weight", "transformer.single_blocks.0.linear1.lora_A.weight"]
    assert unmatched_lora_keys(keys, known) == ["transformer.single_blocks.0.linear1.lora_A.weight"]
