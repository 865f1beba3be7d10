"""FP8 weight storage (Forge's "fp8 e4m3fn"): Linear weights kept as float8_e4m3fn and cast to the compute
dtype in each call, which halves a bf16 FLUX.1 transformer (23.8 GB -> 12.0 GB) for a small loss of precision."""

from __future__ import annotations

import itertools
import logging
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from backend.model_detection import CheckpointFormatError

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
# 448. e4m3fn has no infinity: older torch casts turned anything beyond into NaN (2.14's CPU cast saturates),
# so we clamp first and every torch build and device stores the same values.
FP8_MAX = torch.finfo(FP8).max
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Kept in the compute dtype: the layers that take the model's input and make its output, and the timestep,
# guidance and pooled-text embedders. They are 0.5% of FLUX.1's weights (64M of 11.9B parameters), and keeping
# the first parameter in the compute dtype lets diffusers' `model.dtype` (the first float parameter's dtype)
# still report the dtype pipelines must feed. Unlike diffusers' layerwise casting we do not skip "norm": in
# FLUX that pattern also matches the AdaLN modulation Linears (`norm1.linear`, ...), 3.2B parameters that Forge
# stores in fp8 too, and keeping them would cost 3.2 GB more.
DEFAULT_SKIP_PATTERNS = ("embed", r"^proj_(in|out)$", r"^norm_out\.")


def default_skip(name: str, module: torch.nn.Module) -> bool:
    """True for a layer `store_fp8` leaves in the compute dtype by default (see DEFAULT_SKIP_PATTERNS)."""
    return any(re.search(pattern, name) for pattern in DEFAULT_SKIP_PATTERNS)


# ComfyUI's scaled fp8 files: a `scaled_fp8` marker and, beside each fp8 weight, its `scale_weight` (the weight is
# `stored * scale_weight`, one scale per tensor or per row); `scale_input` only scales activations in fp8 matmuls.
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_SUFFIXES = (".scale_weight", ".scale_input")


def dequantized(key: str, value: torch.Tensor, scale: torch.Tensor | None, dtype) -> torch.Tensor:
    """One tensor cast straight to `dtype`, times its scaled-fp8 scale when it has one."""
    if scale is None:
        return value.to(dtype)
    if scale.numel() == 1:
        return value.to(dtype) * scale.reshape(()).to(dtype)
    if scale.numel() == value.shape[0]:  # one scale per output row
        return value.to(dtype) * scale.reshape(-1, *([1] * (value.dim() - 1))).to(dtype)
    raise CheckpointFormatError(f"the scaled fp8 weight {key} has a scale of shape {tuple(scale.shape)}, "
                                "which Easel does not read; use the fp16 or fp8_e4m3fn version")


def unscaled(state_dict: dict, dtype) -> dict:
    """A scaled fp8 state dict's weights multiplied back, in `dtype`, without the scale entries; other tensors
    as they are (a state dict without scales is returned unchanged)."""
    if SCALED_FP8_MARKER not in state_dict and not any(k.endswith(SCALE_SUFFIXES) for k in state_dict):
        return state_dict
    out = {}
    for key, value in state_dict.items():
        if key == SCALED_FP8_MARKER or key.endswith(SCALE_SUFFIXES):
            continue
        scale = state_dict.get(key.removesuffix("weight") + "scale_weight") if key.endswith(".weight") else None
        out[key] = value if scale is None else dequantized(key, value, scale, dtype)
    return out


def saturate_fp8(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as float8_e4m3fn, values beyond +-448 (infinities included) clamped to +-448 instead of NaN."""
    if tensor.dtype == FP8:
        return tensor
    return tensor.clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _keep_fp8(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """`fn` (what Module.to/half/cuda apply to each tensor) applied to fp8 tensors through their bytes: to
    `fn` they are not floating point, so a dtype cast passes them by and a device move still moves them."""

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != FP8:
            return fn(tensor)
        moved = fn(tensor.view(torch.uint8))
        if moved.dtype != torch.uint8:
            raise TypeError(f"an fp8-stored layer was given a conversion that turns integer tensors into "
                            f"{moved.dtype}; use module.to(dtype) to change the compute dtype instead")
        return moved.view(FP8)

    return apply


class Fp8Linear(torch.nn.Linear):
    """An nn.Linear whose weight is stored as float8_e4m3fn and cast to `compute_dtype` in each call.

    `store_fp8` makes one by swapping the class of an existing layer, so parameter names, state_dict keys and
    `isinstance(layer, nn.Linear)` are unchanged, and accelerate's offload hooks move its fp8 weight as they
    would any other. `.to(dtype)` or `.half()` of a model sets the layer's compute dtype and casts its bias; the
    weight stays fp8 (re-quantising is a separate, explicit `store_fp8`). Device moves work as usual.
    """

    compute_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(input.to(dtype), self.weight.to(dtype), bias)

    def _apply(self, fn, recurse=True):
        # The probe learns what `fn` does to a floating point tensor without touching the weight.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device="cpu"))
        if probe.dtype in COMPUTE_DTYPES:  # `.to(torch.float8_e4m3fn)` leaves the compute dtype alone
            self.compute_dtype = probe.dtype
        return super()._apply(_keep_fp8(fn), recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A bf16/fp32 checkpoint loads as it would into an fp8 layer with saturation, never as NaN.
        # `state_dict` here is load_state_dict's own shallow copy, so the caller's tensors are untouched.
        key = prefix + "weight"
        if key in state_dict:
            state_dict[key] = saturate_fp8(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, storage=float8_e4m3fn, compute_dtype={self.compute_dtype}"


def _check_compute_dtype(dtype: torch.dtype) -> None:
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise ValueError(f"fp8-stored layers compute in one of {names}, not {dtype}")


def _set_compute_dtype(layer: Fp8Linear, dtype: torch.dtype) -> None:
    layer.compute_dtype = dtype
    if layer.bias is not None:
        layer.bias.data = layer.bias.data.to(dtype)


@torch.no_grad()
def store_fp8(module: torch.nn.Module, compute_dtype: torch.dtype,
              skip: Callable[[str, torch.nn.Module], bool] | None = None) -> int:
    """Store the weight of every nn.Linear in `module` as float8_e4m3fn, in place; the layers then compute in
    `compute_dtype`, their biases kept in it. Returns the number of layers converted.

    `skip(name, layer)` keeps a layer as it is (default: `default_skip`). Norms, embeddings and convolutions
    are never converted, nor subclasses of nn.Linear, whose forward a class swap would lose. Layers already
    stored in fp8 are not counted again; they switch to `compute_dtype`. Call this before accelerate's
    `cpu_offload`, whose hooks keep the forward they found. fp8 storage is for inference: weights stop
    requiring grad.
    """
    _check_compute_dtype(compute_dtype)
    skip = default_skip if skip is None else skip
    converted = 0
    for name, layer in module.named_modules():
        if isinstance(layer, Fp8Linear):
            _set_compute_dtype(layer, compute_dtype)
            continue
        if type(layer) is not torch.nn.Linear or skip(name, layer):
            _unstore(layer, compute_dtype)  # an fp8 file's tensor in a layer kept in full precision
            continue
        if hasattr(layer, "_hf_hook"):
            raise ValueError(f"layer '{name}' already has an accelerate offload hook; call store_fp8 before "
                             "cpu_offload / enable_sequential_cpu_offload")
        layer.weight.data = saturate_fp8(layer.weight.data)
        layer.weight.requires_grad_(False)
        layer.__class__ = Fp8Linear
        _set_compute_dtype(layer, compute_dtype)
        converted += 1
    logger.info("Stored %d Linear weights as fp8 (computing in %s)", converted, compute_dtype)
    return converted


def _unstore(layer: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    for parameter in layer.parameters(recurse=False):
        if parameter.dtype == FP8:
            parameter.data = parameter.data.to(compute_dtype)


def stored_bytes(module: torch.nn.Module) -> int:
    """Bytes taken by the parameters and buffers of `module` (each shared tensor counted once)."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def is_fp8(linear: torch.nn.Module) -> bool:
    """True when `linear` stores its weight in fp8 and casts it per call (made by `store_fp8`)."""
    return isinstance(linear, Fp8Linear) and linear.weight.dtype == FP8


def _check_materialised(linear: torch.nn.Module) -> None:
    if linear.weight.is_meta:
        raise ValueError("this layer's weight is held by an offload hook (it is on the meta device here); "
                         "update the tensor in the hook's weights map instead")


def weight_for_update(linear: torch.nn.Module) -> torch.Tensor:
    """A new tensor holding the layer's weight in its compute dtype, for merging an update (a LoRA) into;
    write the result back with `set_weight`. Changing it in place changes nothing in the layer."""
    _check_materialised(linear)
    if isinstance(linear, Fp8Linear):
        return linear.weight.detach().to(linear.compute_dtype)
    return linear.weight.detach().clone()


@torch.no_grad()
def set_weight(linear: torch.nn.Module, new_weight: torch.Tensor) -> None:
    """Make `new_weight` the layer's weight, in its storage dtype and on its device.

    On an fp8 layer the weight is quantised (saturated, then rounded to float8_e4m3fn), so a merged LoRA is
    only as exact as fp8 allows; keep the exact base tensors elsewhere to undo it. The previous weight
    tensor is replaced, never written to, so a reference to it stays a bit-exact backup.
    """
    _check_materialised(linear)
    if new_weight.shape != linear.weight.shape:
        raise ValueError(f"the new weight has shape {tuple(new_weight.shape)}; this layer's weight has "
                         f"{tuple(linear.weight.shape)}")
    device = linear.weight.device
    if is_fp8(linear):
        linear.weight.data = saturate_fp8(new_weight.detach().to(device))
    else:
        linear.weight.data = new_weight.detach().to(device=device, dtype=linear.weight.dtype)
