"""Tiled VAE decode and encode for images too large for the GPU: the network runs block by block over overlapping
tiles blended after each block, with the whole image's GroupNorm statistics and mid-block attention, so the
result matches an untiled run."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Between blocks the image's activations wait here, so the GPU holds one tile's at a time.
STORAGE = torch.device("cpu")


@dataclass(frozen=True)
class TileSizes:
    """Tile sizes that suit SD-style VAEs (f = 8): a quarter of each overlap covers one block's reach."""

    decode_tile: int = 64  # latent pixels (512 image pixels at f = 8)
    decode_overlap: int = 16
    encode_tile: int = 512  # image pixels
    encode_overlap: int = 128


TILE_DEFAULTS = TileSizes()


def vae_scale_factor(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode_tiled(vae, latents: torch.Tensor, tile: int = TILE_DEFAULTS.decode_tile,
                 overlap: int = TILE_DEFAULTS.decode_overlap, whole_image: bool = True) -> torch.Tensor:
    """Unscaled latents (B, C, h, w) -> pixels (B, 3, h*f, w*f) in [-1, 1], as `vae.decode(latents).sample`,
    `tile` x `tile` latents at a time; a latent that fits one tile is decoded plainly.

    `whole_image`: give every GroupNorm the whole image's statistics, run the mid-block attention on the
    whole (latent-sized) image and blend the tiles after every block, so the result is close to untiled (the
    image's activations wait in CPU memory between blocks); False: each tile is decoded alone with its own
    statistics and only the outputs are blended (diffusers' way)."""
    _check_tiles(tile, overlap, "latent pixels")
    if latents.shape[-2] <= tile and latents.shape[-1] <= tile:
        return vae.decode(latents).sample
    stages = _decoder_stages(vae) if whole_image else None
    network = vae.decoder if stages is not None else None
    stages = stages or [_Stage([lambda x: vae.decode(x).sample])]
    return torch.cat([_tiled(stages, network, latent[None], tile, overlap, 1) for latent in latents])


@torch.no_grad()
def encode_tiled(vae, pixels: torch.Tensor, tile: int = TILE_DEFAULTS.encode_tile,
                 overlap: int = TILE_DEFAULTS.encode_overlap, whole_image: bool = True) -> torch.Tensor:
    """Pixels (B, 3, H, W) in [-1, 1] -> the latent distribution's mode (B, C, H/f, W/f), unscaled, as
    `vae.encode(pixels).latent_dist.mode()`, `tile` x `tile` pixels at a time (see `decode_tiled`)."""
    _check_tiles(tile, overlap, "pixels")
    if pixels.shape[-2] <= tile and pixels.shape[-1] <= tile:
        return vae.encode(pixels).latent_dist.mode()
    factor = vae_scale_factor(vae)
    for name, value in (("tile", tile), ("overlap", overlap), ("height", pixels.shape[-2]),
                        ("width", pixels.shape[-1])):
        if value % factor:
            raise ValueError(f"tiled VAE encoding needs a {name} that is a multiple of {factor} (got {value}); "
                             f"resize or crop the image to a multiple of {factor}")
    stages = _encoder_stages(vae) if whole_image else None
    network = vae.encoder if stages is not None else None
    stages = stages or [_Stage([lambda x: vae.encode(x).latent_dist.mode()])]
    return torch.cat([_tiled(stages, network, image[None], tile // factor, overlap // factor, factor)
                      for image in pixels])


def _check_tiles(tile: int, overlap: int, unit: str) -> None:
    if tile <= 0 or not 0 <= overlap < tile:
        raise ValueError(f"tiled VAE needs 0 <= overlap < tile (got tile {tile}, overlap {overlap} {unit}); "
                         "lower the overlap or raise the tile size")


# -- the networks as stages -------------------------------------------------------------------------------
@dataclass
class _Stage:
    steps: list  # functions, applied in turn
    whole_image: bool = False  # run on the whole image at once, the tiles joined first (the mid-block attention)


def _decoder_stages(vae) -> list[_Stage] | None:
    """AutoencoderKL's decoder as its forward runs it, cut so that each stage ends with a block holding
    GroupNorms; None for another architecture (then each tile is decoded whole, with its own statistics)."""
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D

    decoder = vae.decoder
    if not (isinstance(decoder, Decoder) and isinstance(decoder.mid_block, UNetMidBlock2D)
            and all(isinstance(block, UpDecoderBlock2D) for block in decoder.up_blocks)):
        logger.info("Tiled VAE: %s is not AutoencoderKL's decoder; tiles use their own GroupNorm statistics",
                    type(decoder).__name__)
        return None
    steps = [getattr(vae, "post_quant_conv", None), decoder.conv_in, *_mid_block_steps(decoder.mid_block)]
    for block in decoder.up_blocks:
        steps += [*map(_resnet_step, block.resnets), *(block.upsamplers or [])]
    steps += [decoder.conv_norm_out, decoder.conv_act, decoder.conv_out]
    # Upsamplers open the next stage: the tiles wait at the lower resolution, in a quarter of the memory.
    return _group_stages(steps, lead=True)


def _encoder_stages(vae) -> list[_Stage] | None:
    from diffusers.models.autoencoders.vae import Encoder
    from diffusers.models.unets.unet_2d_blocks import DownEncoderBlock2D, UNetMidBlock2D

    encoder = vae.encoder
    if not (isinstance(encoder, Encoder) and isinstance(encoder.mid_block, UNetMidBlock2D)
            and all(isinstance(block, DownEncoderBlock2D) for block in encoder.down_blocks)):
        logger.info("Tiled VAE: %s is not AutoencoderKL's encoder; tiles use their own GroupNorm statistics",
                    type(encoder).__name__)
        return None
    steps = [encoder.conv_in]
    for block in encoder.down_blocks:
        steps += [*map(_resnet_step, block.resnets), *(block.downsamplers or [])]
    steps += [*_mid_block_steps(encoder.mid_block), encoder.conv_norm_out, encoder.conv_act, encoder.conv_out,
              getattr(vae, "quant_conv", None), _distribution_mode]
    # Downsamplers close their stage: the tiles wait at the lower resolution.
    return _group_stages(steps, lead=False)


def _mid_block_steps(mid_block) -> list:
    """UNetMidBlock2D's forward as steps. Its attention runs on the whole image: it mixes every position with
    every other, so a tile alone would change it; at latent resolution the whole image is small."""
    steps = [_resnet_step(mid_block.resnets[0])]
    for attention, resnet in zip(mid_block.attentions, mid_block.resnets[1:]):
        steps += [_Stage([attention], whole_image=True) if attention is not None else None, _resnet_step(resnet)]
    return steps


def _resnet_step(resnet: torch.nn.Module) -> tuple:
    return functools.partial(resnet, temb=None), resnet  # VAEs have no time embedding


def _distribution_mode(moments: torch.Tensor) -> torch.Tensor:
    return moments.chunk(2, dim=1)[0]  # DiagonalGaussianDistribution's mean, its mode


def _group_stages(steps: list, lead: bool) -> list[_Stage]:
    """Steps (modules, functions, (function, module) pairs or whole stages; None skipped) -> stages, each
    holding one module with GroupNorms; a step without joins the next stage (`lead`) or the previous one."""
    stages, pending = [], []
    for item in (s for s in steps if s is not None):
        if isinstance(item, _Stage):
            stages += [_Stage(pending)] if pending else []
            stages.append(item)
            pending = []
            continue
        step, module = item if isinstance(item, tuple) else (item, item)
        if isinstance(module, torch.nn.Module) and any(isinstance(m, torch.nn.GroupNorm) for m in module.modules()):
            stages.append(_Stage([*pending, step]))
            pending = []
        elif lead or not stages:
            pending.append(step)
        else:
            stages[-1].steps.append(step)
    if not stages:
        return [_Stage(pending)]
    stages[-1].steps += pending
    return stages


# -- running tiles ----------------------------------------------------------------------------------------
def _tiled(stages: list[_Stage], network: torch.nn.Module | None, image: torch.Tensor, tile: int, overlap: int,
           in_scale: int) -> torch.Tensor:
    """One image (1, C, H, W) through the stages tile by tile. `tile` and `overlap` are in latent pixels, of
    which the input has `in_scale` per side. `network`: the one whose GroupNorms get whole-image statistics
    (None: tiles keep their own)."""
    height, width = image.shape[-2] // in_scale, image.shape[-1] // in_scale
    tiles = list(_grid((_spans(height, tile, overlap), _spans(width, tile, overlap))))
    whole = [(([(0, height)], [(0, width)]), (0, 0))]  # the whole image as one tile
    norms = _WholeImageGroupNorm(network)
    state = image
    with norms.patched():
        for stage in stages:
            state = _run_stage(stage.steps, state, whole if stage.whole_image else tiles, norms, image.device)
    return state.to(image.device)


def _run_stage(steps: list, source: torch.Tensor, tiles: list, norms: _WholeImageGroupNorm,
               device: torch.device) -> torch.Tensor:
    """Runs every tile of `source` (one image's activations) through one stage and blends the results into
    the next activations, kept in STORAGE. Blending after every stage replaces what zero padding spoiled at
    a tile's edges with its neighbour's values before the next stage spreads it further.

    A pass that reaches a GroupNorm whose statistics are not known yet gathers them over all tiles and stops
    there; the next pass goes one GroupNorm further, the last one finishes the stage."""
    (spans_y, spans_x), _ = tiles[0]
    in_scale = source.shape[-2] // spans_y[-1][1]
    while True:
        output, reached = None, False
        for tile_spans in tiles:
            norms.tile = tile_spans
            try:
                x = _crop(source, tile_spans, in_scale).to(device)
                for step in steps:
                    x = step(x)
            except _NormReached:
                reached = True
                continue
            if reached:
                raise RuntimeError("tiled VAE: tiles of one image took different paths through the network")
            if output is None:
                scale = x.shape[-2] // (spans_y[0][1] - spans_y[0][0])
                output = torch.zeros(1, x.shape[1], spans_y[-1][1] * scale, spans_x[-1][1] * scale,
                                     device=STORAGE, dtype=x.dtype)
            weights = _tile_weights(tile_spans, x.shape[-2], x.shape[-1]).to(x.device, x.dtype)
            _crop(output, tile_spans, scale).add_((x * weights).to(STORAGE))
        if not reached:
            return output
        norms.settle()


def _spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """The fewest tiles of `tile` covering `length` with at least `overlap` shared, evenly spaced."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [(start, start + tile) for start in (round(i * (length - tile) / (count - 1)) for i in range(count))]


def _grid(spans):
    """(spans_y, spans_x) -> each tile as ((spans_y, spans_x), (row, column))."""
    for row in range(len(spans[0])):
        for column in range(len(spans[1])):
            yield spans, (row, column)


def _bounds(tile_spans) -> tuple[tuple[int, int], tuple[int, int]]:
    (spans_y, spans_x), (row, column) = tile_spans
    return spans_y[row], spans_x[column]


def _crop(image: torch.Tensor, tile_spans, scale: int) -> torch.Tensor:
    (y0, y1), (x0, x1) = _bounds(tile_spans)
    return image[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale]


def _axis_weights(spans: list[tuple[int, int]], index: int, size: int) -> torch.Tensor:
    """Tile `index`'s blending weights along one axis, sampled at `size` points across the tile: linear ramps
    over the middle half of each overlap with a neighbour (the outer quarters, next to tile edges where the
    convolutions' zero padding shows, get none), divided by all tiles' ramps so they sum to 1 everywhere."""
    start, end = spans[index]
    position = start + (torch.arange(size, dtype=torch.float64) + 0.5) * (end - start) / size
    ramps = []
    for i, (s, e) in enumerate(spans):
        ramp = ((position >= s) & (position < e)).double()
        if i > 0:
            shared = spans[i - 1][1] - s
            ramp *= ((position - s - shared / 4) / max(shared / 2, 1e-9)).clamp(0, 1)
        if i < len(spans) - 1:
            shared = e - spans[i + 1][0]
            ramp *= ((e - shared / 4 - position) / max(shared / 2, 1e-9)).clamp(0, 1)
        ramps.append(ramp)
    return (ramps[index] / sum(ramps)).float()


def _tile_weights(tile_spans, height: int, width: int) -> torch.Tensor:
    (spans_y, spans_x), (row, column) = tile_spans
    return _axis_weights(spans_y, row, height)[:, None] * _axis_weights(spans_x, column, width)[None, :]


# -- GroupNorm over the whole image -----------------------------------------------------------------------
class _NormReached(Exception):
    """A pass reached a GroupNorm whose whole-image statistics are still being gathered."""


class _WholeImageGroupNorm:
    """Patches every GroupNorm of a network. A layer with known statistics normalises each tile with the whole
    image's; an unknown one adds the tile's per-group mean and variance (weighted by the blending weights, so
    each image position counts once) and stops the pass. `settle` makes what a pass gathered known."""

    def __init__(self, network: torch.nn.Module | None):
        modules = network.modules() if network is not None else ()
        self.layers = [module for module in modules if isinstance(module, torch.nn.GroupNorm)]
        self.moments: dict[torch.nn.Module, tuple] = {}  # layer -> (weight, mean, m2), each (G,), float32
        self.gathering: dict[torch.nn.Module, tuple] = {}
        self.tile = None  # the tile being run, as _grid yields it

    def settle(self) -> None:
        self.moments.update(self.gathering)
        self.gathering = {}

    @contextlib.contextmanager
    def patched(self):
        # accelerate's offload hooks wrap `forward` and call `_old_forward` with the weights in place
        saved = []
        for layer in self.layers:
            attribute = "_old_forward" if hasattr(layer, "_old_forward") else "forward"
            saved.append((layer, attribute, layer.__dict__.get(attribute)))
            setattr(layer, attribute, self._forward(layer))
        try:
            yield
        finally:
            for layer, attribute, previous in saved:
                if previous is None:
                    delattr(layer, attribute)
                else:
                    setattr(layer, attribute, previous)

    def _forward(self, layer):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if layer not in self.moments:
                self._gather(layer, x)
                raise _NormReached
            weight, mean, m2 = self.moments[layer]
            per_group = x.shape[1] // layer.num_groups
            scale = torch.rsqrt(m2 / weight + layer.eps).repeat_interleave(per_group)
            if layer.weight is not None:
                scale = scale * layer.weight.float()
            shift = -mean.repeat_interleave(per_group) * scale
            if layer.bias is not None:
                shift = shift + layer.bias.float()
            view = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(x.dtype)
        return forward

    def _gather(self, layer, x: torch.Tensor) -> None:
        """Adds this tile's weighted moments to the layer's, per group (Chan et al.'s parallel update)."""
        height, width = self._spatial_shape(x)
        weights = _tile_weights(self.tile, height, width).to(x.device).reshape(1, 1, -1)
        values = x.float().reshape(layer.num_groups, -1, height * width)
        tile_weight = weights.sum() * values.shape[1]
        tile_mean = (values * weights).sum(dim=(1, 2)) / tile_weight
        tile_m2 = ((values - tile_mean[:, None, None]).square() * weights).sum(dim=(1, 2))
        if layer not in self.gathering:
            self.gathering[layer] = (tile_weight, tile_mean, tile_m2)
            return
        weight, mean, m2 = self.gathering[layer]
        total = weight + tile_weight
        delta = tile_mean - mean
        self.gathering[layer] = (total, mean + delta * tile_weight / total,
                                 m2 + tile_m2 + delta.square() * weight * tile_weight / total)

    def _spatial_shape(self, x: torch.Tensor) -> tuple[int, int]:
        """(height, width) of a GroupNorm input: (1, C, H, W), or (1, C, H*W) inside attention."""
        if x.dim() == 4:
            return x.shape[-2], x.shape[-1]
        (y0, y1), (x0, x1) = _bounds(self.tile)
        ratio = math.sqrt(x.shape[-1] / ((y1 - y0) * (x1 - x0)))  # this layer's pixels per latent pixel
        height, width = round((y1 - y0) * ratio), round((x1 - x0) * ratio)
        if height * width != x.shape[-1]:
            raise ValueError(f"tiled VAE: cannot tell the shape of a {tuple(x.shape)} GroupNorm input")
        return height, width
