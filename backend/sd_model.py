"""`StableDiffusionModel`: one loaded checkpoint's modules, placed on a device, with its VAE choice."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from backend import families
from backend.checkpoints import Components
from backend.devices import Placement
from backend.lora import LoraOverlay
from backend.model_index import ModelFile


@dataclass
class StableDiffusionModel:
    file: ModelFile
    model_hash: str | None
    components: Components
    placement: Placement
    vae_name: str | None = None  # file name of the VAE in use; None: the checkpoint's own
    vae_hash: str | None = None
    vae_tiling: str = "Automatic"  # when the VAE works in tiles (backend.options.VAE_TILING; see vae_codec)
    _baked_vae: Any = field(default=None, repr=False)
    lora_overlay: LoraOverlay = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._baked_vae = self.components.vae
        self._place()
        self.lora_overlay = LoraOverlay(self)  # LoRAs in force, over saved copies of the base weights

    # -- identity --------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.file.name

    @property
    def family(self) -> str:
        return self.components.spec.family

    @property
    def label(self) -> str:
        return self.components.spec.label

    @property
    def engine(self) -> families.Family:
        """The family's engine: what differs between SD 1.x, SDXL, FLUX.1, ..."""
        return families.get(self.family)

    @property
    def native_size(self) -> int:
        if self.components.native_size:
            return self.components.native_size
        spec = self.components.spec
        if spec.family == "sd2" and self.prediction_type == "v_prediction":
            return 768
        return spec.native_size

    # -- modules ---------------------------------------------------------------------------------
    @property
    def unet(self):
        return self.components.unet

    @property
    def vae(self):
        return self.components.vae

    @property
    def text_encoders(self) -> list:
        return self.components.text_encoders

    @property
    def tokenizers(self) -> list:
        return self.components.tokenizers

    @property
    def scheduler_config(self) -> dict:
        return self.components.scheduler_config

    @property
    def prediction_type(self) -> str:
        return self.components.prediction_type

    @property
    def is_inpainting(self) -> bool:
        return self.unet.config.in_channels == 9

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return self.engine.vae_dtype(self.placement.vae_dtype)

    def _place(self) -> None:
        for module in (self.unet, *(e for e in self.text_encoders if e is not None)):
            self._place_module(module, self.dtype)
        self._place_module(self.vae, self.vae_dtype)

    def _place_module(self, module, dtype: torch.dtype) -> None:
        storage = torch.device("cpu") if self.placement.offload != "none" else self.device
        current = next(module.parameters())
        if current.dtype != dtype and not getattr(module, "keeps_its_dtype", False):  # GGUF: quantised
            module.to(dtype=dtype)
        if current.device != storage:
            module.to(storage)
        if self.placement.offload == "sequential":
            from accelerate import cpu_offload

            cpu_offload(module, execution_device=self.device)

    def place_beside_unet(self, module) -> None:
        """Store and run a module that works beside the UNet (a ControlNet, an image encoder) as the UNet is:
        in its precision, on the CPU under --medvram (`use` brings it) or --lowvram (layer by layer)."""
        if not hasattr(module, "_hf_hook"):  # placed once: --lowvram's hooks are not stacked
            self._place_module(module, self.dtype)

    @contextlib.contextmanager
    def use(self, *modules):
        """Bring modules to the compute device for a block (--medvram moves them back afterwards)."""
        if self.placement.offload != "model":
            yield
            return
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def set_speed(self, compiled: bool, channels_last: bool) -> None:
        """Compile the UNet / transformer with torch.compile (in place: its weights, LoRAs and hooks stay; each new
        image shape compiles once, then is reused; `dynamic=None` lets torch switch a dimension that keeps
        changing to a dynamic one instead of compiling each size), and put it in channels-last layout."""
        network = self.unet
        if channels_last != getattr(network, "easel_channels_last", False):
            network.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            network.easel_channels_last = channels_last
        if compiled and getattr(network, "_compiled_call_impl", None) is None:
            network.compile(dynamic=None)
        elif not compiled and getattr(network, "_compiled_call_impl", None) is not None:
            network._compiled_call_impl = None  # back to the eager forward

    @contextlib.contextmanager
    def offloaded(self):
        """--medvram's placement for a block (out-of-memory retries): every part on the CPU, brought to the
        device for its use; then back as before."""
        placement = self.placement
        self.placement = Placement(placement.device, placement.dtype, placement.vae_dtype, "model")
        for module in (self.unet, self.vae, *(e for e in self.text_encoders if e is not None)):
            module.to("cpu")
        try:
            yield
        finally:
            self.placement = placement
            self._place()

    def set_vae(self, vae, name: str | None, vae_hash: str | None) -> None:
        """Use another VAE (None: back to the checkpoint's own one, which was kept)."""
        self.components.vae = vae if vae is not None else self._baked_vae
        self.vae_name, self.vae_hash = (name, vae_hash) if vae is not None else (None, None)
        if vae is not None:
            self._place_module(vae, self.vae_dtype)

    def upcast_vae(self) -> None:
        """Move the VAE to fp32 after it produced NaNs in half precision."""
        self.placement = Placement(self.placement.device, self.placement.dtype, torch.float32, self.placement.offload)
        self.vae.to(dtype=torch.float32)
