"""T2I-Adapter weights (TencentARC) as `controlnet_files` reads them: told from ControlNets by their tensors,
renamed from TencentARC's original layout to diffusers' `T2IAdapter` names, and their config (channels,
residual blocks, pixel-unshuffle factor, grey or colour input, adapter type) read from the shapes.

Pure functions over state dicts whose values are tensors or shapes; `controlnet_files` names the file in
its errors and builds the model. An `AdapterFormatError` says what a file is in a clause ("a T2I-Adapter
style model, ...") that the caller puts after "it is".
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import torch


class AdapterFormatError(ValueError):
    """T2I-Adapter weights that diffusers' `T2IAdapter` cannot hold; the message is a clause."""


# The pixel-unshuffle factors of the released adapters: 8 for SD 1.x (the full and the light adapter), 16 for
# SDXL's full_adapter_xl. The input is a colour map (3 channels) or, for canny and sketch, a grey one (1).
_DOWNSCALES = {8: ("full_adapter", "sd1"), 16: ("full_adapter_xl", "sdxl")}
_INPUT_CHANNELS = (3, 1)


def _shape(value) -> tuple[int, ...]:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)


def _indices(keys: Iterable[str], pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for key in keys if (m := regex.match(key))})


def is_adapter(keys: Iterable[str]) -> bool:
    """Whether weights are a T2I-Adapter's (full, light or style; either layout, `adapter.`-prefixed or not)."""
    keys = set(keys)
    bare = {k.removeprefix("adapter.") for k in keys}
    full = "conv_in.weight" in bare and any(k.startswith("body.0.") for k in bare)
    light = "body.0.in_conv.weight" in bare and ("body.0.out_conv.weight" in bare)
    return "style_embedding" in keys or full or light


def to_diffusers_layout(weights: Mapping) -> tuple[str, dict]:
    """('tencentarc' or 'diffusers', the weights under diffusers' `T2IAdapter` names)."""
    if "style_embedding" in weights:
        raise AdapterFormatError("a T2I-Adapter style model, which Easel does not apply (it steers the prompt through "
                                 "a CLIP vision encoder); for style, use a shuffle ControlNet")
    if any(k.startswith("adapter.body.") and ".resnets." in k for k in weights):  # TencentARC's never nest them
        return "diffusers", dict(weights)
    bare = {k.removeprefix("adapter."): v for k, v in weights.items()}
    variant = next((k for k in bare if ".skep." in k or ".down_opt." in k), None)
    if variant is not None:
        raise AdapterFormatError(f"a T2I-Adapter variant with skip or downsampling convolutions ({variant}), which "
                                 "diffusers' T2IAdapter cannot run; use the released sd14v1/sd15v2 adapters")
    if "conv_in.weight" in bare:
        return "tencentarc", _full_from_tencentarc(bare)
    return "tencentarc", _light_from_tencentarc(bare)


def _full_from_tencentarc(bare: Mapping) -> dict:
    """TencentARC's `Adapter` numbers its residual blocks through all levels (`body.{level * blocks + j}`);
    diffusers nests them (`body.{level}.resnets.{j}`), the level's channel change (`in_conv`) on the level."""
    numbers = _indices(bare, r"body\.(\d+)\.block1\.")
    if not numbers:
        raise KeyError("body.0.block1.weight")
    widths = [_shape(bare[f"body.{k}.block1.weight"])[0] for k in numbers]
    # Each level repeats its width `blocks` times; the levels' widths repeat too (1280, 1280), so the blocks
    # per level are the greatest common length of the runs of equal widths (2 in every released adapter).
    runs, count = [], 1
    for before, width in zip(widths, widths[1:]):
        if width == before:
            count += 1
        else:
            runs.append(count)
            count = 1
    blocks = math.gcd(*runs, count)
    converted = {}
    for key, value in bare.items():
        match = re.match(r"body\.(\d+)\.(.*)", key)
        if match is None:
            converted[f"adapter.{key}"] = value
            continue
        level, index = divmod(int(match.group(1)), blocks)
        rest = match.group(2)
        inner = rest if rest.startswith("in_conv.") else f"resnets.{index}.{rest}"
        converted[f"adapter.body.{level}.{inner}"] = value
    return converted


def _light_from_tencentarc(bare: Mapping) -> dict:
    """TencentARC's `Adapter_light`: `body.{level}.body.{j}` residual blocks between `in_conv` and `out_conv`;
    diffusers calls them `resnets`."""
    converted = {}
    for key, value in bare.items():
        renamed = re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", key)
        converted[f"adapter.{renamed}"] = value
    return converted


def _input(conv_in_channels: int) -> tuple[int, int]:
    """(input channels, unshuffle factor) from the first convolution's width: channels x factor^2."""
    for factor in _DOWNSCALES:
        for channels in _INPUT_CHANNELS:
            if conv_in_channels == channels * factor * factor:
                return channels, factor
    raise AdapterFormatError(f"a T2I-Adapter whose first convolution takes {conv_in_channels} channels (the released "
                             "ones take 64 or 192 for SD 1.x, 256 or 768 for SDXL), which Easel cannot read")


def derive_config(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """`T2IAdapter`'s config from diffusers-layout shapes (KeyError when weights are missing)."""
    keys = list(shapes)
    levels = _indices(keys, r"adapter\.body\.(\d+)\.")
    if not levels:
        raise KeyError("adapter.body.0")
    blocks = len(_indices(keys, r"adapter\.body\.0\.resnets\.(\d+)\."))
    if "adapter.conv_in.weight" in shapes:
        in_channels, factor = _input(shapes["adapter.conv_in.weight"][1])
        channels = [shapes[f"adapter.body.{level}.resnets.0.block1.weight"][0] for level in levels]
        adapter_type = _DOWNSCALES[factor][0]
    else:  # the light adapter: its last level repeats the one before
        in_channels, factor = _input(shapes["adapter.body.0.in_conv.weight"][1])
        channels = [shapes[f"adapter.body.{level}.out_conv.weight"][0] for level in levels[:-1]]
        adapter_type = "light_adapter"
        if factor != 8:
            raise AdapterFormatError("a light T2I-Adapter for SDXL, which does not exist as a release Easel knows")
    return dict(in_channels=in_channels, channels=channels, num_res_blocks=blocks, downscale_factor=factor,
                adapter_type=adapter_type)


def family(config: Mapping) -> str:
    """The base an adapter was trained for: its unshuffle factor tells SDXL (16) from SD 1.x (8)."""
    return "sdxl" if config["adapter_type"] == "full_adapter_xl" else "sd1"


def feature_channels(config: Mapping) -> list[int]:
    """The channels of the features an adapter gives, in the UNet's order (the light adapter repeats its last)."""
    channels = list(config["channels"])
    return channels + channels[-1:] if config["adapter_type"] == "light_adapter" else channels


def fits_unet(config: Mapping, unet_config: Mapping) -> bool:
    """Whether the features match the UNet's down blocks (one feature each), an SDXL adapter's last one its
    middle block (diffusers adds it there when its shape matches)."""
    features, levels = feature_channels(config), list(unet_config["block_out_channels"])
    return features[: len(levels)] == levels and all(c == levels[-1] for c in features[len(levels):]) \
        and len(features) <= len(levels) + 1


def hint_factor(config: Mapping) -> int:
    """The control map's size over the latents' size: the unshuffle factor, halved for SDXL's adapter, whose
    first feature is added after the UNet's first downsampling."""
    factor = int(config["downscale_factor"])
    return factor // 2 if config["adapter_type"] == "full_adapter_xl" else factor
