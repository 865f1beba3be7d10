"""`ModelManager`: the one owner of loaded weights. Activates checkpoints by name, keeps a small LRU
of loaded ones, frees evicted ones for real, and applies the VAE choice.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch

from backend import checkpoints, devices, diffusers_folder, families, fp8_storage
from backend.checkpoints import CheckpointLoadError, Components
from backend.clip_vision import ClipVisionCache, ClipVisionLibrary
from backend.controlnet_library import ControlNetCache, ControlNetLibrary
from backend.embeddings import EmbeddingLibrary
from backend.faces import FaceRestorers
from backend.families.parts import MissingPartError, Parts
from backend.lora_files import LoraLibrary
from backend.model_detection import CheckpointFormatError
from backend.model_index import ModelFile, ModelIndex, ModelNotFoundError
from backend.sd_model import StableDiffusionModel
from backend.settings import Settings
from backend.upscalers import UPSCALER_FOLDERS, UpscalerLibrary

logger = logging.getLogger(__name__)

LARGE_FAMILIES = ("sdxl", "flux", "sd3")
VAE_AUTOMATIC = "Automatic"
VAE_NONE = "None"

Loader = Callable[[ModelFile, Path, object, Parts | None], Components]


def load_components(file: ModelFile, cache_dir: Path, dtype, parts: Parts | None = None) -> Components:
    """A checkpoint's modules: a diffusers folder, or a single file loaded by the family its tensors show,
    with the parts it lacks from `parts`."""
    if file.is_diffusers_folder:
        return diffusers_folder.load_diffusers_folder(file.path, cache_dir, dtype)
    if file.path.suffix.lower() not in (".safetensors", ".gguf"):  # pickled: SD 1.x/2.x/SDXL only
        return checkpoints.load_single_file(file.path, cache_dir, dtype)
    family = families.identify(file_shapes(file.path))
    return family.load(file.path, cache_dir, dtype, parts or Parts(Path(), Path()))


def file_shapes(path: Path) -> dict:
    """The tensor shapes of a `.safetensors` or `.gguf` file, from its header."""
    if path.suffix.lower() == ".gguf":
        from backend import gguf_files

        return gguf_files.gguf_shapes(path)
    return checkpoints.read_shapes(path)


class NoCheckpointError(ModelNotFoundError):
    pass


class ModelManager:
    """Thread-safe: one lock serialises loads, switches and generation's use of the active model."""

    def __init__(self, settings: Settings, index: ModelIndex | None = None, loader: Loader = load_components):
        self.settings = settings
        self.index = index or ModelIndex(settings)
        self.loras = LoraLibrary(settings.model_dir("lora"), self.index.hashes, settings.lora_cache_mb)
        self.embeddings = EmbeddingLibrary(settings.model_dir("embeddings"), self.index.hashes)
        self.placement = devices.placement(settings)
        self.upscalers = UpscalerLibrary([settings.model_dir(kind) for kind in UPSCALER_FOLDERS],
                                         self.placement.device, half=self.placement.dtype == torch.float16,
                                         download_folder=settings.model_dir("realesrgan") if settings.allow_downloads
                                         else None)
        self.faces = FaceRestorers(settings.model_dir("gfpgan"), settings.model_dir("codeformer"),
                                   self.placement.device, allow_download=settings.allow_downloads)
        self.controlnets = ControlNetCache(
            ControlNetLibrary(settings.model_dir("controlnet")), settings=settings,
            encoders=ClipVisionCache(ClipVisionLibrary(settings.model_dir("clip_vision"))))
        self._loader = loader
        self._cache: OrderedDict[Path, StableDiffusionModel] = OrderedDict()
        self._active: StableDiffusionModel | None = None
        self._vae_choice = VAE_AUTOMATIC
        self._text_encoder_choice: tuple[str, ...] = tuple(settings.text_encoders)  # Forge's picks (file names)
        self.fp8_storage = "Disable"  # A1111's "FP8 weight" option (see set_fp8_storage)
        self.vae_tiling = "Automatic"  # when the VAE works in tiles (see vae_codec)
        self.speed = {"compiled": False, "channels_last": False}  # see set_speed
        self.lock = threading.RLock()
        self.load_count = 0
        self.refreshes = 0  # folder rescans so far (worker replicas rescan when the front end has)
        # The server's current checkpoint (A1111's `sd_model_checkpoint` option): what a request that
        # names none runs on, even after another request switched to its own checkpoint.
        self.selected: str | None = None

    # -- queries ---------------------------------------------------------------------------------
    @property
    def active(self) -> StableDiffusionModel | None:
        return self._active

    @property
    def loaded(self) -> list[str]:
        return [model.name for model in self._cache.values()]

    @property
    def loaded_files(self) -> list[ModelFile]:
        return [model.file for model in list(self._cache.values())]

    @property
    def vae_choice(self) -> str:
        return self._vae_choice

    @property
    def text_encoder_choice(self) -> tuple[str, ...]:
        """Forge's text encoder picks (file names in models/text_encoder) for FLUX.1 and SD 3.5 files."""
        return self._text_encoder_choice

    def file_native_size(self, name: str) -> int:
        """A checkpoint's native size from its file's header, without loading it (what the UI starts at
        with --workers, where nothing loads here): its ModelSpec resolution, else its family's size."""
        file = self.index.resolve_checkpoint(name)
        if file.is_diffusers_folder or file.path.suffix.lower() not in (".safetensors", ".gguf"):
            return 512
        _, size = checkpoints.modelspec(checkpoints.read_metadata(file.path))
        return size or families.identify(file_shapes(file.path)).native_size

    def text_encoder_options(self) -> list[str]:
        return [file.filename for file in self.index.text_encoders]

    def set_text_encoders(self, names) -> None:
        """Pick text encoders (an empty list: each role's only file in the folder). Loaded models that take
        text encoders from the folder are freed, so the next use loads them with the new picks."""
        with self.lock:
            chosen = tuple(self.index.resolve_text_encoder(name).filename for name in names)
            if chosen == self._text_encoder_choice:
                return
            self._text_encoder_choice = chosen
            for key, model in list(self._cache.items()):
                if model.engine.encodes_prompts:
                    self._evict(key)

    def vae_options(self) -> list[str]:
        return [VAE_AUTOMATIC, VAE_NONE] + [vae.filename for vae in self.index.vaes]

    def refresh(self) -> None:
        """Rescan the model folders (new files appear without a restart)."""
        self.refreshes += 1
        self.index.refresh()
        self.loras.refresh()
        self.embeddings.refresh()
        self.upscalers.refresh()

    # -- activation ------------------------------------------------------------------------------
    def default_checkpoint(self) -> ModelFile:
        if self.settings.default_checkpoint:
            return self.index.resolve_checkpoint(self.settings.default_checkpoint)
        files = self.index.checkpoints
        if not files:
            folder = self.settings.model_dir("checkpoints")
            raise NoCheckpointError(
                f"no checkpoints found in {folder}; put a .safetensors or .ckpt Stable Diffusion model there "
                "(or point --ckpt-dir at an existing models/Stable-diffusion folder)"
            )
        return files[0]

    def activate(self, name: str | None = None, vae: str | None = None) -> StableDiffusionModel:
        """Make `name` (default: the active or first checkpoint) the active model, with `vae` for this
        use only (default: the server's VAE choice); idempotent.

        On a failed load the error names the file and the previously active model stays usable; a VAE
        that fails to load leaves the model's previous VAE in place.
        """
        with self.lock:
            if name is None and self._active is not None:
                file = self._active.file
            else:
                file = self.index.resolve_checkpoint(name) if name else self.default_checkpoint()
            model = self._cache.get(file.path)
            if model is None:
                model = self._load(file, vae)
            self._cache.move_to_end(file.path)
            self._active = model
            self._apply_vae(model, self._vae_choice if vae is None else vae)
            return model

    def select(self, name: str | None = None) -> StableDiffusionModel:
        """Activate `name` and make it the server's current checkpoint."""
        with self.lock:
            model = self.activate(name)
            self.selected = model.file.filename
            return model

    def _load(self, file: ModelFile, vae: str | None = None) -> StableDiffusionModel:
        if not file.is_diffusers_folder and file.path.suffix.lower() in (".safetensors", ".gguf"):
            # Refuse a broken or foreign file before evicting anything for it.
            try:
                families.identify(file_shapes(file.path))
            except (CheckpointFormatError, KeyError) as exc:
                raise CheckpointFormatError(f"{file.filename}: {exc}") from exc
        parts = self.parts(vae)  # a pick that is gone fails here, before anything is freed
        previous = self._active.file if self._active is not None else None
        while len(self._cache) >= self.settings.checkpoint_cache_size:
            self._evict(next(iter(self._cache)))
        logger.info("Loading %s", file.path)
        try:
            components = self._loader(file, self.settings.cache_dir, self.placement.dtype, parts)
        except (CheckpointLoadError, CheckpointFormatError, MissingPartError):
            self._restore(previous)
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            self._restore(previous)
            raise CheckpointLoadError(f"could not load {file.filename}: {exc}") from exc
        self.load_count += 1
        if self._stores_fp8(components.spec.family):
            count = fp8_storage.store_fp8(components.unet, self.placement.dtype)
            logger.info("%s: %d layers stored in fp8", file.name, count)
        model_hash = None if file.is_diffusers_folder else self.index.hashes.short_hash(file.path)
        model = StableDiffusionModel(file=file, model_hash=model_hash, components=components, placement=self.placement,
                                     vae_tiling=self.vae_tiling)
        model.set_speed(**self.speed)
        self._cache[file.path] = model
        return model

    def _stores_fp8(self, family: str) -> bool:
        """A1111's "Enable for SDXL" is taken to mean the large models: SDXL, FLUX.1 and SD 3.x."""
        return self.fp8_storage == "Enable" or (self.fp8_storage == "Enable for SDXL" and family in LARGE_FAMILIES)

    def set_speed(self, compiled: bool, channels_last: bool) -> None:
        """torch.compile and channels-last for the UNet / transformer of every model, loaded and to come."""
        with self.lock:
            self.speed = {"compiled": compiled, "channels_last": channels_last}
            for model in self._cache.values():
                model.set_speed(**self.speed)

    def set_vae_tiling(self, mode: str) -> None:
        with self.lock:
            self.vae_tiling = mode
            for model in self._cache.values():
                model.vae_tiling = mode

    def set_fp8_storage(self, choice: str) -> None:
        """Store linear weights in fp8 from the next load on; loaded models it changes are freed."""
        with self.lock:
            if choice == self.fp8_storage:
                return
            before = {key: self._stores_fp8(model.family) for key, model in self._cache.items()}
            self.fp8_storage = choice
            for key, stored in before.items():
                if stored != self._stores_fp8(self._cache[key].family):
                    self._evict(key)

    def parts(self, vae: str | None = None) -> Parts:
        """Where a checkpoint finds what it lacks: the text encoder picks and the VAE choice (`vae`: this
        request's), then the folders. A pick whose file is gone is left out (the folders then decide)."""
        vae = self._vae_choice if vae is None else vae
        picks = [(self.index.resolve_text_encoder, name) for name in self._text_encoder_choice]
        picks += [(self.index.resolve_vae, vae)] if vae not in (VAE_AUTOMATIC, VAE_NONE) else []
        chosen = []
        for resolve, name in picks:
            try:
                chosen.append(resolve(name).path)
            except ModelNotFoundError as error:
                logger.warning("%s", error)
        return Parts(self.settings.model_dir("text_encoder"), self.settings.model_dir("vae"),
                     [f.path for f in self.index.text_encoders], [f.path for f in self.index.vaes], chosen,
                     allow_downloads=self.settings.allow_downloads,
                     fp8_families=tuple(name for name in families.FAMILIES if self._stores_fp8(name)))

    def _restore(self, previous: ModelFile | None) -> None:
        """After a failed load: keep (or reload) the model that was active before."""
        if previous is None:
            self._active = None
            return
        if previous.path in self._cache:
            self._active = self._cache[previous.path]
            return
        logger.warning("Reloading %s after the failed switch", previous.name)
        self._active = self._load(previous)
        self._apply_vae(self._active, self._vae_choice)

    def _evict(self, key: Path) -> None:
        model = self._cache.pop(key)
        if model is self._active:
            self._active = None
        logger.info("Unloading %s", model.name)
        del model
        gc.collect()
        devices.empty_cache()

    def set_cache_size(self, size: int) -> None:
        """Keep up to `size` checkpoints loaded from now on; extra ones (least recently used first,
        never the active one) are freed at once."""
        with self.lock:
            self.settings = self.settings.with_changes(checkpoint_cache_size=size)
            for key in list(self._cache):
                if len(self._cache) <= size:
                    break
                if self._cache[key] is not self._active:
                    self._evict(key)

    def release(self, name: str) -> bool:
        """Free one loaded checkpoint (by any name `resolve_checkpoint` takes); False if it was not loaded."""
        with self.lock:
            path = self.index.resolve_checkpoint(name).path
            if path not in self._cache:
                return False
            self._evict(path)
            return True

    def unload(self) -> None:
        """Free every loaded checkpoint (A1111's unload-checkpoint)."""
        with self.lock:
            for key in list(self._cache):
                self._evict(key)

    # -- VAE ------------------------------------------------------------------------------------
    def set_vae(self, choice: str) -> None:
        """The server's VAE choice (A1111's `sd_vae`); unchanged when `choice` is unknown or fails to load."""
        with self.lock:
            if choice not in (VAE_AUTOMATIC, VAE_NONE):
                self.index.resolve_vae(choice)  # fail early with the list of VAEs
            if self._active is not None:
                self._apply_vae(self._active, choice)
            self._vae_choice = choice

    def _apply_vae(self, model: StableDiffusionModel, choice: str) -> None:
        if choice == VAE_NONE:
            file = None
        elif choice == VAE_AUTOMATIC:
            file = self.index.sidecar_vae(model.file)
        else:
            file = self.index.resolve_vae(choice)
        if file is None:
            if model.vae_name is not None:
                model.set_vae(None, None, None)
            return
        if model.vae_name == file.filename:
            return
        try:
            vae = checkpoints.load_vae_file(file.path, model.family, model.placement.vae_dtype)
        except (CheckpointLoadError, CheckpointFormatError):
            raise
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointLoadError(f"could not load the VAE {file.filename}: {exc}; the previous VAE stays "
                                      "in use") from exc
        model.set_vae(vae, file.filename, self.index.hashes.short_hash(file.path))
