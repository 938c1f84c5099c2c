"""A tiny, randomly initialised GLM-Image folder laid out exactly like the published download.

``write_tiny_model(root)`` writes every component the real loaders read (docs/): the same sub-folders, file
names, shard layout and config keys as ``zai-org/GLM-Image``, with only the sizes shrunk (hidden sizes, layers,
heads, intermediate sizes, VAE channels). Every token id and vocabulary size is kept as published, so prompts,
grids and special tokens behave like the real model's; only the weights are random. The folder is ~30 MB and
builds in a few seconds on a laptop CPU.

The published files are copied from ``published/`` (``_VERBATIM``); the shrunk configs keep the published key order
with the published value in a comment where a size changed.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import save_file
from torch import nn

from .defaults import PUBLISHED_LATENTS_MEAN, PUBLISHED_LATENTS_STD
from .dependencies import glm_image_classes
from .loading import constructor_kwargs

# Token ids of GLM-Image (vision_language_encoder/config.json and processor/tokenizer.json).
PUBLISHED_CONFIGS = Path(__file__).parent / "published"  # the published config files as <subfolder>__<file>
VISION_VOCAB_SIZE = 16512  # `<|dit_token_N|>` is token N: 0..16383 VQ codes, 16384 image start, 16385 image end
TEXT_VOCAB_SIZE = 168064
PAD_TOKEN_ID = 167841  # `<|endoftext|>`; GLM-4's special tokens follow it in GLM-4's order
GLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",  # 167845
    "<eop>",  # 167846
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|image|>",  # 167855
    "<|video|>",
)

# Files written unchanged: the tiny folder's path -> the published copy in published/ (processor/*: the
# disty0-sdnq re-upload, which is what transformers 5 saves; generation_config.json: the int4-autoround re-upload,
# the only complete copy available).
_VERBATIM = {
    "model_index.json": "model_index.json",
    "scheduler/scheduler_config.json": "scheduler__scheduler_config.json",
    "processor/chat_template.jinja": "processor__chat_template.jinja",
    "processor/preprocessor_config.json": "processor__preprocessor_config.json",
    "processor/processor_config.json": "variant-disty0-sdnq__processor__processor_config.json",
    "processor/tokenizer_config.json": "variant-disty0-sdnq__processor__tokenizer_config.json",
    "vision_language_encoder/generation_config.json": "variant-intel-int4-autoround__vision_language_encoder__generation_config.json",
}

_VLE_CONFIG = {
    "architectures": ["GlmImageForConditionalGeneration"],
    "image_start_token_id": 16384,
    "image_end_token_id": 16385,
    "image_token_id": 167855,
    "model_type": "glm_image",
    "text_config": {
        "attention_dropout": 0.0,
        "eos_token_id": 16385,
        "pad_token_id": PAD_TOKEN_ID,
        "hidden_act": "silu",
        "hidden_size": 64,  # 4096
        "initializer_range": 0.02,
        "intermediate_size": 128,  # 13696
        "max_position_embeddings": 131072,
        "model_type": "glm_image_text",
        "num_attention_heads": 2,  # 32
        "num_hidden_layers": 2,  # 40
        "num_key_value_heads": 1,  # 2 (still grouped-query attention)
        "rms_norm_eps": 1e-05,
        "dtype": "bfloat16",
        "rope_parameters": {
            "rope_theta": 10000,
            "rope_type": "default",
            "mrope_section": [2, 3, 3],  # [8, 12, 12]
            "partial_rotary_factor": 0.5,
        },
        "use_cache": True,
        "vision_vocab_size": VISION_VOCAB_SIZE,
        "vocab_size": TEXT_VOCAB_SIZE,
    },
    "transformers_version": "5.0.0.dev0",
    "vision_config": {
        "attention_bias": True,
        "attention_dropout": 0.0,
        "depth": 2,  # 40
        "hidden_act": "gelu",
        "hidden_size": 32,  # 1536
        "image_size": 2048,
        "in_channels": 3,
        "intermediate_size": 64,  # 6144
        "layer_norm_eps": 1e-06,
        "model_type": "glm_image_vision",
        "num_heads": 2,  # 16
        "patch_size": 16,
    },
    "vq_config": {
        "embed_dim": 32,  # 2048
        "in_channels": 3,
        "initializer_range": 0.02,
        "latent_channels": 32,  # 1536 (= vision hidden_size)
        "model_type": "glm_image_vqmodel",
        "num_embeddings": 16384,
    },
}

# text_encoder/config.json: Glyph-ByT5 has the shape of google/byt5-small (d_model 1472, d_ff 3584, d_kv 64,
# 6 heads, 12 layers, vocab 384, gated-gelu), stored in float32.
_TEXT_ENCODER_CONFIG = {
    "architectures": ["T5EncoderModel"],
    "d_ff": 128,  # 3584
    "d_kv": 32,  # 64
    "d_model": 64,  # 1472 (= transformer text_embed_dim)
    "decoder_start_token_id": 0,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "dtype": "float32",
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": True,
    "is_gated_act": True,
    "layer_norm_epsilon": 1e-06,
    "model_type": "t5",
    "num_decoder_layers": 2,  # 4
    "num_heads": 2,  # 6
    "num_layers": 2,  # 12
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "tokenizer_class": "ByT5Tokenizer",
    "use_cache": True,
    "vocab_size": 384,
}

_TRANSFORMER_CONFIG = {
    "_class_name": "GlmImageTransformer2DModel",
    "_diffusers_version": "0.37.0.dev0",
    "attention_head_dim": 32,  # 128
    "condition_dim": 16,  # 256
    "in_channels": 16,
    "num_attention_heads": 2,  # 32
    "num_layers": 2,  # 30
    "out_channels": 16,
    "patch_size": 2,
    "prior_vq_quantizer_codebook_size": 16384,
    "text_embed_dim": 64,  # 1472
    "time_embed_dim": 32,  # 512
}

_VAE_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.37.0.dev0",
    "act_fn": "silu",
    "block_out_channels": [32, 32, 64, 64],  # [128, 512, 1024, 1024]
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 16,
    "latents_mean": list(PUBLISHED_LATENTS_MEAN),
    "latents_std": list(PUBLISHED_LATENTS_STD),
    "layers_per_block": 3,  # as published: exercises the third resnet the stock converter misses
    "mid_block_add_attention": False,
    "norm_num_groups": 8,  # 32
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "use_post_quant_conv": False,
    "use_quant_conv": False,
}


def write_tiny_model(root: Path, seed: int = 0) -> Path:
    """Write a complete tiny GLM-Image folder at ``root`` (created) and return ``root``.

    Weights are random but a pure function of ``seed``. The AR model and DiT are stored as safetensors shards
    with an index (as ``save_pretrained`` writes them); AR, DiT and VAE weights in bfloat16, the glyph encoder in
    float32, as published.
    """
    root = Path(root)
    generator = torch.Generator().manual_seed(seed)
    for relative, published in _VERBATIM.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PUBLISHED_CONFIGS / published, root / relative)
    _write_processor_tokenizer(root / "processor")
    _write_vision_language_encoder(root / "vision_language_encoder", generator)
    _write_text_encoder(root / "text_encoder", generator)
    _write_glyph_tokenizer(root / "tokenizer")
    _write_transformer(root / "transformer", generator)
    _write_vae(root / "vae", generator)
    return root


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


def _randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Overwrite every parameter with deterministic random values that keep activations O(1).

    Matrices and convolutions: N(0, 1/fan_in); embeddings: N(0, 1); norm scales: 1 + N(0, 0.1); biases:
    N(0, 0.05). Nothing is zero (adaLN and gates included), so every output depends on every input.
    """
    embedding_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1:
                value = noise * 0.05 if name.endswith("bias") else 1.0 + noise * 0.1
            elif id(param) in embedding_weights:
                value = noise
            else:
                value = noise / math.sqrt(param[0].numel())
            param.copy_(value)


def _save_sharded(state_dict: dict[str, torch.Tensor], folder: Path, weights_name: str, max_shard_mb: float) -> None:
    """Save ``state_dict`` as ``{stem}-0000i-of-0000n.safetensors`` shards plus ``{weights_name}.index.json``, with
    huggingface_hub's sharding (what transformers' and diffusers' ``save_pretrained`` use)."""
    stem = weights_name.removesuffix(".safetensors")
    save_torch_state_dict(
        state_dict, folder, filename_pattern=stem + "{suffix}.safetensors", max_shard_size=int(max_shard_mb * 2**20)
    )


def _write_processor_tokenizer(folder: Path) -> None:
    """processor/tokenizer.json: a byte-level tokenizer with GLM-Image's 168064 ids.

    ``<|dit_token_N|>`` is id N (N < 16512), the 256 byte symbols follow (16512..16767) in place of GLM-4's BPE
    vocabulary, GLM-4's special tokens sit at 167841.. (so `<sop>` 167845, `<eop>` 167846, `<|image|>` 167855),
    and unused ids are filled with `<|reserved_N|>` symbols that plain text never produces.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {f"<|dit_token_{i}|>": i for i in range(VISION_VOCAB_SIZE)}
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab.update({symbol: VISION_VOCAB_SIZE + i for i, symbol in enumerate(byte_symbols)})
    vocab.update({token: PAD_TOKEN_ID + i for i, token in enumerate(GLM_SPECIAL_TOKENS)})
    used = set(vocab.values())
    vocab.update({f"<|reserved_{i}|>": i for i in range(TEXT_VOCAB_SIZE) if i not in used})

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = [f"<|dit_token_{i}|>" for i in range(VISION_VOCAB_SIZE)] + list(GLM_SPECIAL_TOKENS)
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))


def _write_vision_language_encoder(folder: Path, generator: torch.Generator) -> None:
    GlmImageConfig, GlmImageForConditionalGeneration = glm_image_classes(
        "GlmImageConfig", "GlmImageForConditionalGeneration"
    )
    _write_json(folder / "config.json", _VLE_CONFIG)
    config = GlmImageConfig.from_pretrained(folder)
    model = GlmImageForConditionalGeneration(config)
    _randomize_(model, generator)
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    _save_sharded(state_dict, folder, "model.safetensors", max_shard_mb=4)  # 3 shards


def _write_text_encoder(folder: Path, generator: torch.Generator) -> None:
    from transformers import T5Config, T5EncoderModel

    _write_json(folder / "config.json", _TEXT_ENCODER_CONFIG)
    model = T5EncoderModel(T5Config.from_pretrained(folder))
    _randomize_(model, generator)
    # `encoder.embed_tokens` is tied to `shared`; checkpoints store the shared matrix once.
    state_dict = {k: v for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})


def _write_glyph_tokenizer(folder: Path) -> None:
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(folder)


def _write_transformer(folder: Path, generator: torch.Generator) -> None:
    from .dit import GlmImageTransformer2DModel

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", _TRANSFORMER_CONFIG)
    model = GlmImageTransformer2DModel(**constructor_kwargs(GlmImageTransformer2DModel, _TRANSFORMER_CONFIG))
    _randomize_(model, generator)
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    _save_sharded(state_dict, folder, "diffusion_pytorch_model.safetensors", max_shard_mb=0.25)  # 3 shards


def _write_vae(folder: Path, generator: torch.Generator) -> None:
    from .vae import AutoencoderKL

    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", _VAE_CONFIG)
    model = AutoencoderKL(**constructor_kwargs(AutoencoderKL, _VAE_CONFIG))
    _randomize_(model, generator)
    state_dict = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    save_file(state_dict, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
