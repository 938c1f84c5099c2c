"""The one home of GLM-Image's geometry and sampling defaults: the nodes, the CLI, the pipeline and the benchmarks read
them here, so a changed default changes everywhere at once."""

# Geometry: how pixels map onto each stage's grid.
VAE_SCALE = 8  # pixels per latent cell (the VAE downsamples x8)
PATCH_STRIDE = 16  # pixels per DiT token (a 2x2 latent patch) and per prior token
AR_GRID_STRIDE = 32  # pixels per AR grid token; image sides are multiples of it
LATENT_CHANNELS = 16
MIN_SIDE = 512
MAX_SIDE = 2048
DEFAULT_SIDE = 1024  # the published model's default size; the DiT loader's model sampling is set for it

# Sampling: the published generation_config (AR) and pipeline defaults (DiT).
TEMPERATURE = 0.9
TOP_P = 0.75
STEPS = 50
GUIDANCE = 1.5  # classifier-free guidance scale; 1 disables CFG
