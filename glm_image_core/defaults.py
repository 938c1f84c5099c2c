"""The one home of GLM-Image's constants: its geometry, its token ids, the AR decoder's layer names and the sampling
defaults. The nodes, the CLI, the pipeline and the benchmarks read them here, so a changed value changes everywhere
at once."""

# Geometry: how pixels map onto each stage's grid.
VAE_SCALE = 8  # pixels per latent cell (the VAE downsamples x8)
PATCH_STRIDE = 16  # pixels per DiT token (a 2x2 latent patch) and per prior token
AR_GRID_STRIDE = 32  # pixels per AR grid token; image sides are multiples of it
LATENT_CHANNELS = 16
MIN_SIDE = 512
MAX_SIDE = 2048
DEFAULT_SIDE = 1024  # the published model's default size; the DiT loader's model sampling is set for it

# The AR model's vocabulary: `<|dit_token_N|>` is token N.
NUM_VQ_CODES = 16384  # legal grid tokens are 0..16383 (the VQ codebook; the DiT's prior embedding has as many rows)
IMAGE_START_ID = 16384  # `<|dit_token_16384|>`: opens every image, and ends the prompt (the model's bos)
IMAGE_END_ID = 16385  # `<|dit_token_16385|>`: closes a reference image; the model's eos

# The AR's text decoder (transformers' GlmImageForConditionalGeneration): its layers and their linear projections,
# the ones that the weight formats quantise and that an AR LoRA updates.
AR_DECODER_LAYERS_PREFIX = "model.language_model.layers."
AR_DECODER_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_up_proj",
    "mlp.down_proj",
)

# Sampling: the published generation_config (AR) and pipeline defaults (DiT).
TEMPERATURE = 0.9
TOP_P = 0.75
STEPS = 50
GUIDANCE = 1.5  # classifier-free guidance scale; 1 disables CFG

# The latent statistics: `latents_mean` / `latents_std` of the published vae/config.json (zai-org/GLM-Image); the DiT
# works in (z - mean) / std. Used where a config does not say (single files without metadata, ComfyUI's latent format).
PUBLISHED_LATENTS_MEAN = (
    -0.2080078125,
    1.875,
    -0.470703125,
    -1.265625,
    -1.421875,
    0.77734375,
    -0.3671875,
    -0.9453125,
    0.318359375,
    0.7734375,
    -0.1884765625,
    -0.022216796875,
    -0.220703125,
    -1.59375,
    -0.81640625,
    -0.255859375,
)
PUBLISHED_LATENTS_STD = (
    3.0625,
    2.203125,
    2.265625,
    4.84375,
    2.5,
    3.9375,
    2.203125,
    3.03125,
    2.1875,
    2.046875,
    2.71875,
    2.390625,
    2.390625,
    2.453125,
    2.25,
    2.15625,
)
