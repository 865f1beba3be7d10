"""IP-Adapters applied to a UNet for one generation pass, as h94's decoupled cross-attention: each
cross-attention layer adds, to its own output, attention over the adapters' image tokens.

- `IPAdapterUnit`: an adapter with its image's tokens and the unconditional ones, a weight, an optional mask
  (the unit acts only there) and a guidance range; `prepare_unit(adapter, encoding, ...)` makes one.
- `with applied(unet, units) as patch:` installs the layers' processors and restores the UNet's own in
  `finally`: nothing else is touched (no `encoder_hid_proj`, no config), so the UNet is unchanged after.
- Each UNet call passes `**patch.unet_kwargs(sample, uncond_rows, fraction)`: the rows of the negative
  prompt get the unconditional tokens; a unit outside its guidance range, or of weight 0, does nothing.
  With no unit acting the layers run exactly as without adapters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from backend.clip_vision import ImageEncoding
from backend.ip_adapter import IPAdapter, IPAdapterBaseError, cross_attention_layers


@dataclass
class IPAdapterUnit:
    """One IP-Adapter unit for a pass. Mutable: a caller may change `weight` between steps."""

    adapter: IPAdapter
    tokens: torch.Tensor  # (1, tokens, context): the image's
    uncond_tokens: torch.Tensor  # (1, tokens, context): for the negative prompt's rows
    weight: float = 1.0
    mask: torch.Tensor | None = None  # (H, W) or (1, 1, H, W) in [0, 1], any size: resized per layer
    guidance_start: float = 0.0
    guidance_end: float = 1.0

    def acts_at(self, fraction: float) -> bool:
        return self.weight != 0 and self.guidance_start <= fraction <= self.guidance_end


def prepare_unit(adapter: IPAdapter, encoding: ImageEncoding, weight: float = 1.0, mask: torch.Tensor | None = None,
                 guidance_start: float = 0.0, guidance_end: float = 1.0) -> IPAdapterUnit:
    """A unit from an adapter and its image's encoding (`ClipVisionEncoder.encode(image)`)."""
    tokens, uncond = adapter.image_tokens(encoding)
    if mask is not None:
        mask = mask.reshape(1, 1, *mask.shape[-2:]).float()
    return IPAdapterUnit(adapter, tokens, uncond, weight, mask, guidance_start, guidance_end)


@dataclass
class ImageTokens:
    """What one UNet call gives the patched layers: per acting unit (its index, its tokens for each row of the
    call, its weight, its mask), and the latents' size, from which each layer's token grid follows."""

    units: list[tuple[int, torch.Tensor, float, torch.Tensor | None]]
    latent_size: tuple[int, int]
    _masks: dict = field(default_factory=dict, repr=False)

    def mask_at(self, unit: int, mask: torch.Tensor, length: int, like: torch.Tensor) -> torch.Tensor:
        """`mask` on the grid of a layer with `length` tokens, as (1, length, 1)."""
        key = (unit, length)
        if key not in self._masks:
            height, width = self.latent_size
            while height * width > length and (height, width) != (1, 1):  # each down block halves, rounding up
                height, width = (height + 1) // 2, (width + 1) // 2
            if height * width != length:
                raise ValueError(f"cannot place an IP-Adapter mask on a layer of {length} tokens")
            mask = mask.to(like.device, torch.float32)
            if mask.shape[-2] >= height and mask.shape[-1] >= width:  # each token gets its area's share
                grid = F.interpolate(mask, size=(height, width), mode="area")
            else:
                grid = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
            self._masks[key] = grid.reshape(1, length, 1).to(like.dtype)
        return self._masks[key]


class DecoupledCrossAttention:
    """The processor of one cross-attention layer while adapters are applied: the layer's own processor runs
    unchanged; with image tokens given, the image attention of every acting unit is added to its output. The
    sum is what h94's processor computes: the output projection is linear, so to_out(text + w * image) =
    to_out(text) + w * (to_out(image) - to_out(0))."""

    def __init__(self, original, keys: Sequence[torch.nn.Linear], values: Sequence[torch.nn.Linear]):
        self.original, self.keys, self.values = original, list(keys), list(values)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 ip_hidden_states: ImageTokens | None = None):
        extra = {} if temb is None else {"temb": temb}
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **extra)
        if not isinstance(ip_hidden_states, ImageTokens) or not ip_hidden_states.units:
            return out
        return out + self._image_attention(attn, hidden_states, ip_hidden_states)

    def _image_attention(self, attn, hidden_states: torch.Tensor, call: ImageTokens) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, length, attn.heads, head_dim).transpose(1, 2)
        total = None
        for index, tokens, weight, mask in call.units:
            key = self.keys[index](tokens).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            value = self.values[index](tokens).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(query, key, value, scale=attn.scale)
            out = out.transpose(1, 2).reshape(batch, length, attn.heads * head_dim) * weight
            if mask is not None:
                out = out * call.mask_at(index, mask, length, out)
            total = out if total is None else total + out
        projection = attn.to_out[0]
        image = projection(total) - projection(total.new_zeros(1, 1, total.shape[-1]))
        return image / attn.rescale_output_factor


class IPAdapterPatch:
    """The units applied to a UNet; `unet_kwargs` gives each UNet call its extra keyword arguments."""

    def __init__(self, units: Sequence[IPAdapterUnit]):
        self.units = list(units)

    def unet_kwargs(self, sample: torch.Tensor, uncond_rows: slice | Sequence[int] | None = None,
                    fraction: float = 0.0) -> dict:
        """`{"cross_attention_kwargs": ...}` for a UNet call on `sample` whose `uncond_rows` are the negative
        prompt's, at `fraction` (step / steps) of the sampling; {} when no unit acts."""
        acting = [(i, unit) for i, unit in enumerate(self.units) if unit.acts_at(fraction)]
        if not acting:
            return {}
        rows, entries = sample.shape[0], []
        for index, unit in acting:
            tokens = unit.tokens.to(sample.device, sample.dtype).expand(rows, -1, -1)
            if uncond_rows is not None:
                tokens = tokens.clone()
                tokens[uncond_rows] = unit.uncond_tokens.to(sample.device, sample.dtype)
            entries.append((index, tokens, float(unit.weight), unit.mask))
        return {"cross_attention_kwargs": {"ip_hidden_states": ImageTokens(entries, tuple(sample.shape[-2:]))}}


@contextmanager
def applied(unet, units: Sequence[IPAdapterUnit]) -> Iterator[IPAdapterPatch]:
    """Install `units` on `unet`'s cross-attention layers for the block; the layers' own processors are
    put back in `finally`. With no units, nothing is installed (and `unet_kwargs` gives {})."""
    units = list(units)
    layers = cross_attention_layers(unet) if units else []
    for unit in units:
        if len(unit.adapter.to_k_ip) != len(layers):
            raise IPAdapterBaseError(f"{unit.adapter.info.path.name} has {len(unit.adapter.to_k_ip)} attention "
                                     f"layers; this UNet has {len(layers)} cross-attention layers: load it for this model")
    originals = [layer.processor for layer in layers]
    try:
        for i, layer in enumerate(layers):
            layer.set_processor(DecoupledCrossAttention(layer.processor, [u.adapter.to_k_ip[i] for u in units],
                                                        [u.adapter.to_v_ip[i] for u in units]))
        yield IPAdapterPatch(units)
    finally:
        for layer, original in zip(layers, originals):
            layer.set_processor(original)
