"""The GLM-Image VAE run by a stock `comfy.sd.VAE` (nodes/vae.py) decodes and encodes exactly like diffusers'
AutoencoderKL, through ComfyUI's own VAEDecode / VAEEncode nodes and their tiled variants, in fp32 on the CPU."""

import json
import logging

import pytest
import torch

from tests import comfy_host

comfy_host.require_comfyui()
pytestmark = [pytest.mark.host, pytest.mark.vram]

import comfy.cli_args  # noqa: E402
import comfy.sd  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

import nodes as comfy_nodes  # noqa: E402  ComfyUI's nodes.py
from glm_image_core import loading  # noqa: E402
from glm_image_core.tiny import PUBLISHED_CONFIGS  # noqa: E402

vae_module = comfy_host.import_pack_module("nodes.vae")
core_vae = comfy_host.import_pack_module("glm_image_core.vae")
latent_format = comfy_host.import_pack_module("nodes.latent_format")
ModelFilesError = comfy_host.import_pack_module("glm_image_core.errors").ModelFilesError

PUBLISHED_CONFIG = PUBLISHED_CONFIGS / "vae__config.json"
TINY = {  # the published config, shrunk: 4 levels, 3 resnets per block, 8 GroupNorm groups instead of 32
    "block_out_channels": [32, 64, 64, 64],
    "norm_num_groups": 8,
    "layers_per_block": 3,
    "latent_channels": 16,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "sample_size": 64,
}


def published_config() -> dict:
    return json.loads(PUBLISHED_CONFIG.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers AutoencoderKL (GroupNorm affines randomised too), saved in the published layout."""
    torch.manual_seed(0)
    model = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                m.bias.copy_(0.2 * torch.randn_like(m.bias))
    folder = tmp_path_factory.mktemp("tiny") / "vae"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def comfy_vae(reference):
    _, folder = reference
    weights = loading.read_checked_weights(folder, loading.VAE, as_stored=False)
    return vae_module.load_glm_image_vae(weights.state_dict, weights.config, dtype=torch.float32)


def report(what: str, value: float) -> None:
    print(f"{what} = {value:.3g}")


def test_published_checkpoint_keys_are_the_module_keys():
    """Every tensor of a full-size checkpoint (diffusers' own key names and shapes, built on the meta device) is a
    tensor of the module ComfyUI's VAE object runs, under the same name and shape, and nothing else is."""
    config = {k: v for k, v in published_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        diffusers_sd = AutoencoderKL(**config).state_dict()
    ours = core_vae.AutoencoderKL(**config, device="meta").state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in diffusers_sd.items()}


def test_tiny_weights_load_into_a_stock_vae_without_leftovers(reference, comfy_vae, caplog):
    model, folder = reference
    with caplog.at_level(logging.WARNING):
        weights = loading.read_checked_weights(folder, loading.VAE, as_stored=False)
        vae = vae_module.load_glm_image_vae(weights.state_dict, weights.config, dtype=torch.float32)
    assert not [r for r in caplog.records if "VAE keys" in r.getMessage()]

    assert isinstance(vae, comfy.sd.VAE)
    assert isinstance(vae.first_stage_model.vae, core_vae.AutoencoderKL)
    loaded = vae.get_sd()
    expected = model.state_dict()
    assert sorted(loaded) == sorted(expected)  # nothing missing, nothing unexpected
    assert all(torch.equal(loaded[k], expected[k]) for k in loaded)
    groups = {m.num_groups for m in vae.first_stage_model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}
    assert (vae.latent_channels, vae.downscale_ratio, vae.upscale_ratio, vae.vae_dtype) == (16, 8, 8, torch.float32)
    assert vae.patcher.model_size() == sum(t.numel() * t.element_size() for t in loaded.values())


def test_widths_that_are_not_multiples_of_32_load_and_decode_like_diffusers():
    """Any block width the published config family allows (a multiple of norm_num_groups) loads."""
    config = {**TINY, "block_out_channels": [24, 40, 40, 40], "norm_num_groups": 8}
    torch.manual_seed(5)
    model = AutoencoderKL(**config).eval()
    vae = vae_module.load_glm_image_vae(model.state_dict(), config, dtype=torch.float32)
    z = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        (ours,) = comfy_nodes.VAEDecode().decode(vae, {"samples": z})
        expected = ((model.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    diff = (ours - expected).abs().max().item()
    report("decode, widths [24, 40, 40, 40]: max |diff|", diff)
    assert diff <= 1e-5


def test_decode_node_matches_diffusers(reference, comfy_vae):
    model, _ = reference
    z = torch.randn(2, 16, 12, 20, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        (ours,) = comfy_nodes.VAEDecode().decode(comfy_vae, {"samples": z})  # [B, H, W, 3] in 0..1
        expected = ((model.decode(z).sample + 1) / 2).clamp(0, 1).movedim(1, -1)
    assert ours.shape == (2, 96, 160, 3)
    diff = (ours - expected).abs().max().item()
    report("decode: max |diff|", diff)
    assert diff <= 1e-5


def test_encode_node_matches_diffusers_mode(reference, comfy_vae):
    model, _ = reference
    pixels = torch.rand(2, 96, 160, 3, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        (ours,) = comfy_nodes.VAEEncode().encode(comfy_vae, pixels)
        expected = model.encode(pixels.movedim(-1, 1) * 2 - 1).latent_dist.mode()
    assert ours["samples"].shape == (2, 16, 12, 20)
    diff = (ours["samples"] - expected).abs().max().item()
    report("encode: max |diff|", diff)
    assert diff <= 1e-5


def test_tiled_decode_node_runs_and_stays_close(comfy_vae):
    z = torch.randn(1, 16, 40, 48, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        (full,) = comfy_nodes.VAEDecode().decode(comfy_vae, {"samples": z})
        (one_tile,) = comfy_nodes.VAEDecodeTiled().decode(comfy_vae, {"samples": z}, tile_size=1024, overlap=64)
        (tiled,) = comfy_nodes.VAEDecodeTiled().decode(comfy_vae, {"samples": z}, tile_size=256, overlap=64)
    assert one_tile.shape == tiled.shape == full.shape == (1, 320, 384, 3)
    report("tiled decode, one tile: max |diff|", (one_tile - full).abs().max().item())
    assert (one_tile - full).abs().max() <= 1e-5
    report("tiled decode, 256 px tiles: mean |diff|", (tiled - full).abs().mean().item())
    assert (tiled - full).abs().mean() < 0.02  # seams: random weights give the decoder a wide receptive field


def test_tiled_encode_node_runs_and_stays_close(comfy_vae):
    pixels = torch.rand(1, 320, 384, 3, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        (full,) = comfy_nodes.VAEEncode().encode(comfy_vae, pixels)
        (one_tile,) = comfy_nodes.VAEEncodeTiled().encode(comfy_vae, pixels, tile_size=1024, overlap=64)
        (tiled,) = comfy_nodes.VAEEncodeTiled().encode(comfy_vae, pixels, tile_size=512, overlap=64)
    full, one_tile, tiled = full["samples"], one_tile["samples"], tiled["samples"]
    assert one_tile.shape == tiled.shape == full.shape == (1, 16, 40, 48)  # latent_channels fixed to 16
    report("tiled encode, one tile: max |diff|", (one_tile - full).abs().max().item())
    assert (one_tile - full).abs().max() <= 1e-5
    report("tiled encode, 512 px tiles: mean |diff|", (tiled - full).abs().mean().item())
    assert (tiled - full).abs().mean() < 0.05 * full.abs().mean()


def test_fp16_is_never_used(reference, monkeypatch):
    model, _ = reference
    vae = vae_module.load_glm_image_vae(model.state_dict(), dict(TINY), dtype=torch.float16)
    assert vae.vae_dtype in (torch.bfloat16, torch.float32)
    monkeypatch.setattr(comfy.cli_args.args, "fp16_vae", True)  # what --fp16-vae does
    vae = vae_module.load_glm_image_vae(model.state_dict(), dict(TINY))
    assert vae.vae_dtype in (torch.bfloat16, torch.float32)
    assert torch.float16 not in vae.working_dtypes


def test_other_architectures_and_incomplete_weights_are_refused(reference):
    model, _ = reference
    with pytest.raises(ModelFilesError, match="mid_block_add_attention"):
        vae_module.load_glm_image_vae(model.state_dict(), {**TINY, "mid_block_add_attention": True})
    state_dict = dict(model.state_dict())
    del state_dict["decoder.up_blocks.1.resnets.3.conv1.weight"]
    with pytest.raises(ModelFilesError, match=r"decoder\.up_blocks\.1\.resnets\.3\.conv1\.weight"):
        vae_module.load_glm_image_vae(state_dict, dict(TINY))


def test_latent_format_normalises_with_the_published_statistics():
    config = published_config()
    fmt = latent_format.GlmImageLatentFormat()
    mean = torch.tensor(config["latents_mean"]).view(1, 16, 1, 1)
    std = torch.tensor(config["latents_std"]).view(1, 16, 1, 1)
    z = torch.randn(2, 16, 4, 6, dtype=torch.float64)
    assert fmt.latent_channels == 16 and fmt.latent_rgb_factors is None
    torch.testing.assert_close(fmt.process_in(z), (z - mean.double()) / std.double())
    torch.testing.assert_close(fmt.process_out(fmt.process_in(z)), z)
