"""Tiled VAE on tiny random VAEs (4 channels with quant convs, 16 without): tiled against untiled decode and
encode, seams, shapes, batches, the one-tile shortcut, blending weights and the restored GroupNorms."""

import pytest
import torch
import torch.nn.functional as F

from backend import random_flow_models, random_models, vae_tiling
from backend.vae_tiling import decode_tiled, encode_tiled

# A latent of 96 x 80 in tiles of 32 with 16 shared: 5 x 4 tiles (each decoded alone would shift colours).
HEIGHT, WIDTH, TILE, OVERLAP = 96, 80, 32, 16


@pytest.fixture(scope="module", params=["sd1", "flux"])
def vae(request):
    """f = 2; "sd1": 4 latent channels with quant convs, "flux": 16 without. Both have mid-block attention."""
    if request.param == "sd1":
        return random_models.build("sd1", seed=0)["vae"]
    return random_flow_models.tiny_vae("flux", seed=0)


def smooth(channels: int, height: int, width: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    """Smooth random values (a coarse grid upsampled): a random VAE decodes noise to noise, where a seam
    would not stand out; this has large areas that differ from tile to tile, as a picture does."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, channels, 6, 6, generator=generator)
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


def pixel_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute difference in [0, 1] pixel units, per pixel (mean over colours)."""
    return ((a - b).abs() / 2).mean(dim=1)


def near_tile_edges(length: int, tile: int, overlap: int, scale: int, reach: int) -> torch.Tensor:
    """Along one axis: output pixels within `reach` latent pixels of an edge between tiles."""
    position = (torch.arange(length * scale) + 0.5) / scale
    edges = [edge for span in vae_tiling._spans(length, tile, overlap) for edge in span if 0 < edge < length]
    return torch.stack([(position - edge).abs() < reach for edge in edges]).any(dim=0)


@torch.no_grad()
def test_tiled_decode_matches_untiled_and_has_no_seams(vae):
    latents = smooth(vae.config.latent_channels, HEIGHT, WIDTH)
    untiled = vae.decode(latents).sample
    tiled = decode_tiled(vae, latents, TILE, OVERLAP)
    assert tiled.shape == untiled.shape == (1, 3, HEIGHT * 2, WIDTH * 2)
    error = pixel_error(tiled, untiled)[0]
    # Whole-image GroupNorm statistics, whole-image attention and blending after every block: untiled up to
    # float rounding (measured: mean 1.6e-7, max 3e-6)
    assert error.mean() < 1e-5 and error.max() < 1e-4
    # No seams: near tile edges the error is no larger than elsewhere
    border = near_tile_edges(HEIGHT, TILE, OVERLAP, 2, 2)[:, None] | near_tile_edges(WIDTH, TILE, OVERLAP, 2, 2)
    assert error[border].mean() <= 2 * error[~border].mean() + 1e-6
    # What it fixes: tiles decoded alone with their own statistics (diffusers' tiling) are far off
    # (measured: mean 0.09-0.11 of the pixel range)
    alone = pixel_error(decode_tiled(vae, latents, TILE, OVERLAP, whole_image=False), untiled)
    assert alone.mean() > 0.03


@torch.no_grad()
def test_a_small_overlap_stays_close(vae):
    # A quarter of 8 latents does not cover what one block's convolutions see (3 latents), so a little
    # zero padding from tile edges remains (measured: mean 5e-4 to 1e-3, max 0.01 to 0.04)
    latents = smooth(vae.config.latent_channels, HEIGHT, WIDTH)
    error = pixel_error(decode_tiled(vae, latents, TILE, 8), vae.decode(latents).sample)
    assert error.mean() < 3e-3 and error.max() < 0.15


@torch.no_grad()
def test_a_latent_that_fits_one_tile_is_decoded_plainly(vae):
    latents = smooth(vae.config.latent_channels, 24, 32)
    assert torch.equal(decode_tiled(vae, latents, tile=32, overlap=8), vae.decode(latents).sample)


@torch.no_grad()
def test_tiled_encode_matches_untiled(vae):
    pixels = smooth(3, 192, 160, seed=1).clamp(-1, 1)
    untiled = vae.encode(pixels).latent_dist.mode()
    tiled = encode_tiled(vae, pixels, tile=64, overlap=16)
    assert tiled.shape == untiled.shape == (1, vae.config.latent_channels, 96, 80)
    # measured: mean 2e-7, max 6e-6, for latents of mean magnitude ~0.25
    assert (tiled - untiled).abs().mean() < 1e-5 and (tiled - untiled).abs().max() < 1e-4
    alone = encode_tiled(vae, pixels, tile=64, overlap=16, whole_image=False)
    assert (alone - untiled).abs().mean() > 0.03  # measured: 0.13-0.25


@torch.no_grad()
def test_shapes_for_sizes_that_are_not_square_or_multiples_of_the_tile(vae):
    channels = vae.config.latent_channels
    latents = smooth(channels, 37, 53)
    decoded = decode_tiled(vae, latents, tile=16, overlap=12)
    assert decoded.shape == (1, 3, 74, 106)
    assert pixel_error(decoded, vae.decode(latents).sample).mean() < 1e-5
    pixels = smooth(3, 88, 136).clamp(-1, 1)
    encoded = encode_tiled(vae, pixels, tile=32, overlap=24)
    assert encoded.shape == (1, channels, 44, 68)
    assert (encoded - vae.encode(pixels).latent_dist.mode()).abs().mean() < 1e-5


@torch.no_grad()
def test_a_batch_decodes_as_its_images_do_alone(vae):
    latents = smooth(vae.config.latent_channels, 40, 56, seed=3, batch=2)
    together = decode_tiled(vae, latents, tile=24, overlap=12)
    alone = torch.cat([decode_tiled(vae, latent[None], tile=24, overlap=12) for latent in latents])
    assert together.shape == (2, 3, 80, 112)
    assert (together - alone).abs().max() < 1e-5
    assert (together[0] - together[1]).abs().mean() > 0.01  # two different images


@torch.no_grad()
def test_group_norms_are_restored(vae):
    latents = smooth(vae.config.latent_channels, 40, 40)
    before = vae.decode(latents).sample
    decode_tiled(vae, latents, tile=24, overlap=12)
    norms = [module for module in vae.modules() if isinstance(module, torch.nn.GroupNorm)]
    assert norms and all("forward" not in norm.__dict__ for norm in norms)
    assert torch.equal(vae.decode(latents).sample, before)


@torch.no_grad()
def test_half_precision_vae():
    vae = random_models.build("sd1", seed=0)["vae"].to(torch.bfloat16)
    latents = smooth(4, 48, 40).to(torch.bfloat16)
    tiled = decode_tiled(vae, latents, tile=24, overlap=12)
    assert tiled.dtype == torch.bfloat16
    # bf16 rounds (measured: mean 1.8e-3 from the untiled bf16 decode; each is 2.6e-3 from the fp32 one)
    assert pixel_error(tiled.float(), vae.decode(latents).sample.float()).mean() < 1e-2


@torch.no_grad()
def test_vae_offloaded_layer_by_layer():
    """--lowvram: accelerate's hooks wrap every layer's forward; the patch goes inside them."""
    from accelerate import cpu_offload

    vae = random_models.build("sd1", seed=0)["vae"]
    latents = smooth(4, 48, 40)
    expected = decode_tiled(vae, latents, tile=24, overlap=12)
    cpu_offload(vae, execution_device=torch.device("cpu"))
    assert torch.allclose(decode_tiled(vae, latents, tile=24, overlap=12), expected, atol=1e-6)


@pytest.mark.parametrize("length, tile, overlap", [
    (96, 32, 16), (100, 24, 8), (33, 32, 0), (70, 32, 31), (200, 64, 16), (65, 64, 16),
])
@pytest.mark.parametrize("scale", [1, 2, 8])  # pixels per latent pixel: a layer of the decoder or encoder
def test_blending_weights_sum_to_one(length, tile, overlap, scale):
    spans = vae_tiling._spans(length, tile, overlap)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(end - start == tile for start, end in spans)
    assert all(spans[i][1] - spans[i + 1][0] >= overlap for i in range(len(spans) - 1))
    total = torch.zeros(length * scale)
    for index, (start, end) in enumerate(spans):
        total[start * scale:end * scale] += vae_tiling._axis_weights(spans, index, (end - start) * scale)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)


def test_defaults_fit_a_real_vae():
    defaults = vae_tiling.TILE_DEFAULTS
    assert defaults.decode_tile * 8 == defaults.encode_tile and defaults.decode_overlap * 8 == defaults.encode_overlap
    assert defaults.decode_overlap >= 12  # a quarter covers one block's reach: untiled up to rounding


def test_invalid_tiles_name_the_fix():
    vae = random_models.build("sd1", seed=0)["vae"]
    with pytest.raises(ValueError, match="lower the overlap"):
        decode_tiled(vae, torch.zeros(1, 4, 80, 80), tile=16, overlap=16)
    with pytest.raises(ValueError, match="multiple of 2"):
        encode_tiled(vae, torch.zeros(1, 3, 81, 80), tile=32, overlap=8)
    assert encode_tiled(vae, torch.zeros(1, 3, 31, 17), tile=32, overlap=8).shape[0] == 1  # one tile: plain
