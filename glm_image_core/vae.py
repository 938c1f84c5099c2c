"""The GLM-Image VAE: diffusers' `AutoencoderKL` geometry (no mid-block attention, no quant convs), written for this
project with attribute names equal to the published `vae/` keys, plus the latent normalisation the DiT works in."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError

DOWN, UP = ["DownEncoderBlock2D"], ["UpDecoderBlock2D"]  # the only block types of the published config


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=1e-6, **kw)
        self.conv1 = operations.Conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=1e-6, **kw)
        self.conv2 = operations.Conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = operations.Conv2d(in_channels, out_channels, 1, **kw)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Sampler(nn.Module):
    """`downsamplers.0` / `upsamplers.0`: a conv after an asymmetric pad (down) or a nearest x2 upsample (up)."""

    def __init__(self, channels, down: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.down = down
        self.conv = operations.Conv2d(
            channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1, dtype=dtype, device=device
        )

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _block(in_ch, out_ch, layers, groups, sampler: str | None, **kw) -> nn.Module:
    block = nn.Module()
    block.resnets = nn.ModuleList(
        ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, groups, **kw) for i in range(layers)
    )
    if sampler is not None:
        samplers = nn.ModuleList([Sampler(out_ch, sampler == "down", **kw)])
        setattr(block, f"{sampler}samplers", samplers)
    return block


def _mid_block(channels, groups, **kw) -> nn.Module:
    return _block(channels, channels, 2, groups, None, **kw)


def _run(block: nn.Module, x):
    for resnet in block.resnets:
        x = resnet(x)
    for sampler in getattr(block, "downsamplers", getattr(block, "upsamplers", [])):
        x = sampler(x)
    return x


class Encoder(nn.Module):
    def __init__(self, in_channels, latent_channels, block_out_channels, layers_per_block, groups, **kw):
        super().__init__()
        ops = kw["operations"]
        conv_kw = dict(dtype=kw["dtype"], device=kw["device"])
        self.conv_in = ops.Conv2d(in_channels, block_out_channels[0], 3, padding=1, **conv_kw)
        last = len(block_out_channels) - 1
        self.down_blocks = nn.ModuleList(
            _block(block_out_channels[max(i - 1, 0)], ch, layers_per_block, groups, None if i == last else "down", **kw)
            for i, ch in enumerate(block_out_channels)
        )
        self.mid_block = _mid_block(block_out_channels[-1], groups, **kw)
        self.conv_norm_out = ops.GroupNorm(groups, block_out_channels[-1], eps=1e-6, **conv_kw)
        self.conv_out = ops.Conv2d(block_out_channels[-1], 2 * latent_channels, 3, padding=1, **conv_kw)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = _run(block, x)
        x = _run(self.mid_block, x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, out_channels, latent_channels, block_out_channels, layers_per_block, groups, **kw):
        super().__init__()
        ops = kw["operations"]
        conv_kw = dict(dtype=kw["dtype"], device=kw["device"])
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = ops.Conv2d(latent_channels, reversed_channels[0], 3, padding=1, **conv_kw)
        self.mid_block = _mid_block(reversed_channels[0], groups, **kw)
        last = len(reversed_channels) - 1
        self.up_blocks = nn.ModuleList(
            _block(
                reversed_channels[max(i - 1, 0)], ch, layers_per_block + 1, groups, None if i == last else "up", **kw
            )
            for i, ch in enumerate(reversed_channels)
        )
        self.conv_norm_out = ops.GroupNorm(groups, block_out_channels[0], eps=1e-6, **conv_kw)
        self.conv_out = ops.Conv2d(block_out_channels[0], out_channels, 3, padding=1, **conv_kw)

    def forward(self, z):
        x = _run(self.mid_block, self.conv_in(z))
        for block in self.up_blocks:
            x = _run(block, x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Constructor arguments are the keys of the published `vae/config.json` (unused ones are accepted and ignored,
    the geometry-changing ones that GLM-Image does not use are refused)."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 16,
        block_out_channels: Sequence[int] = (128, 512, 1024, 1024),
        layers_per_block: int = 3,
        norm_num_groups: int = 32,
        latents_mean: Sequence[float] | None = None,
        latents_std: Sequence[float] | None = None,
        act_fn: str = "silu",
        mid_block_add_attention: bool = False,
        use_quant_conv: bool = False,
        use_post_quant_conv: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        operations=nn,
        **unused_config,
    ):
        super().__init__()
        levels = len(block_out_channels)
        refused = {  # config key -> (found, what this module builds)
            "act_fn": (act_fn, "silu"),
            "mid_block_add_attention": (mid_block_add_attention, False),
            "use_quant_conv": (use_quant_conv, False),
            "use_post_quant_conv": (use_post_quant_conv, False),
            "down_block_types": (list(unused_config.get("down_block_types", DOWN * levels)), DOWN * levels),
            "up_block_types": (list(unused_config.get("up_block_types", UP * levels)), UP * levels),
        }
        for key, (found, expected) in refused.items():
            if found != expected:
                raise InvalidInputError(
                    f"This VAE config is not GLM-Image's: {key} is {found!r}, expected {expected!r}."
                )
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise InvalidInputError(
                f"This VAE config is not GLM-Image's: block_out_channels {list(block_out_channels)} must be multiples "
                f"of norm_num_groups={norm_num_groups}; {bad} are not."
            )
        if dtype == torch.float16:
            raise InvalidInputError(
                "The GLM-Image VAE overflows in float16 (black/NaN images); use bfloat16 or float32."
            )
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.dtype = dtype
        self.latent_channels = latent_channels
        self.scale_factor = 2 ** (len(block_out_channels) - 1)
        self.encoder = Encoder(
            in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups, **kw
        )
        self.decoder = Decoder(
            out_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups, **kw
        )
        mean = latents_mean if latents_mean is not None else [0.0] * latent_channels
        std = latents_std if latents_std is not None else [1.0] * latent_channels
        self.register_buffer(
            "latents_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer("latents_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """image [B, 3, H, W] in [-1, 1] -> the posterior mode [B, C, H/8, W/8] (raw VAE space)."""
        return self.encoder(image)[:, : self.latent_channels]

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent [B, C, h, w] -> image [B, 3, 8h, 8w] in about [-1, 1]."""
        return self.decoder(latent)

    def normalize(self, latent: torch.Tensor) -> torch.Tensor:
        """Raw VAE latent -> the DiT's latent space: (z - mean) / std per channel."""
        return (latent - self.latents_mean.to(latent)) / self.latents_std.to(latent)

    def denormalize(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.latents_std.to(latent) + self.latents_mean.to(latent)
