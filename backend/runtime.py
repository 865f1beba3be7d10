"""`Runtime`: the one object a running Easel is made of. Built once by `app.py` from `Settings`, it owns
the persisted options, the model manager, the device queue, the loaded extensions and the styles.

Options change in one place, `apply()`, used by the Settings tab, `POST /sdapi/v1/options` and start-up
alike; requests take their option-derived defaults from one place, `request_defaults()`, for the UI,
the API and the CLI.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from backend.errors import InputError
from backend.extensions import ExtensionRegistry
from backend.generation import generate
from backend.job_queue import QUEUED, DeviceQueue
from backend.model_manager import ModelManager
from backend.options import (
    CONFIG_NAME,
    FOLDER_OPTIONS,
    Options,
    check_output_folder,
    clean_stale_temporaries,
    load_options,
    save_options,
)
from backend.progress import JobControl
from backend.request import GenerationRequest, GenerationResult
from backend.settings import Settings
from backend.styles import StyleDatabase

logger = logging.getLogger(__name__)

# A1111's option names for Easel's options of another name.
OPTION_ALIASES = {"samples_save": "save_images", "sd_checkpoint_cache": "checkpoint_cache",
                  "samples_filename_pattern": "filename_pattern", "show_progress_every_n_steps": "live_preview_every"}
OPTION_NAMES = tuple(sorted(f.name for f in fields(Options)))


def option_name(key: str) -> str | None:
    """Easel's name of an option given by Easel's or A1111's name; None if it is not an option."""
    name = OPTION_ALIASES.get(key, key)
    return name if name in OPTION_NAMES else None


@dataclass
class Runtime:
    settings: Settings
    options: Options
    options_path: Path
    manager: ModelManager
    extensions: ExtensionRegistry
    styles: StyleDatabase
    device: DeviceQueue = field(default_factory=DeviceQueue)
    cluster: Any = None  # backend.cluster.driver.Cluster with --workers / --ray-address: replicas generate

    def __post_init__(self) -> None:
        if self.extensions.extensions:  # (never the shared empty registry: it would keep this runtime alive)
            self.extensions.options = lambda: self.options  # what extensions read through `easel.option()`

    def generate(self, request: GenerationRequest, control: JobControl | None = None) -> GenerationResult:
        """Run a request on this runtime's models with its extensions, or on a worker replica with
        `--workers` (on the caller's thread either way: front ends queue this on `device`)."""
        if self.cluster is None:
            return generate(self.manager, request, control, extensions=self.extensions)
        request = replace(request, checkpoint=self.checkpoint_file(request.checkpoint))
        return self.cluster.generate(request, control or JobControl(), self.server_state())

    def use_cluster(self, cluster) -> None:
        """Generate on `cluster`'s replicas from now on, as many jobs at once as it has replicas."""
        self.cluster = cluster
        self.device = DeviceQueue(slots=cluster.workers)

    # -- the server's checkpoint -----------------------------------------------------------------
    def checkpoint_file(self, name: str | None = None) -> str:
        """The file name of checkpoint `name` (any name A1111 accepts), else of the server's current one,
        else of the first found: with `--workers`, a job's model id."""
        manager = self.manager
        name = name or manager.selected
        return (manager.index.resolve_checkpoint(name) if name else manager.default_checkpoint()).filename

    def select_checkpoint(self, name: str | None = None):
        """Make `name` (default: the current or first checkpoint) the server's current checkpoint. Loads
        it here and returns the model; with `--workers` only records it (the replicas load it on use) and
        returns None."""
        if self.cluster is None:
            return self.manager.select(name)
        self.manager.selected = self.checkpoint_file(name)
        return None

    def unload_checkpoints(self) -> None:
        """A1111's unload-checkpoint: free every loaded checkpoint here and, with `--workers`, on every
        replica (each within a heartbeat, after the job it runs)."""
        self.manager.unload()
        if self.cluster is not None:
            self.cluster.unload()

    def server_state(self):
        from backend.cluster.jobs import ServerState

        manager = self.manager
        return ServerState(asdict(self.options), manager.vae_choice, manager.text_encoder_choice, manager.refreshes)

    def workers(self) -> list[dict]:
        """What generates, for `/easel/v1/cluster`: each replica (or this process) with its pid, node,
        device, loaded checkpoints, loads since start, running job and the waiting jobs for what it holds."""
        waiting = [job.checkpoint for job in self.device.jobs_of() if job.status == QUEUED]
        if self.cluster is None:
            manager, running = self.manager, self.device.current
            rows = [{"id": "local", "pid": os.getpid(), "node": socket.gethostname(),
                     "device": str(manager.placement.device), "loaded": [manager.index.title(f, compute=False)
                                                                         for f in manager.loaded_files],
                     "loaded_files": [f.filename for f in manager.loaded_files], "loads": manager.load_count,
                     "running": running.id if running is not None else None}]
        else:
            rows = self.cluster.replicas()
        return [{key: row.get(key) for key in ("id", "pid", "node", "device", "loaded", "loads", "running")}
                | {"queued": sum(name in row.get("loaded_files", ()) for name in waiting)} for row in rows]

    @classmethod
    def create(cls, settings: Settings, config_path: Path | None = None,
               manager: ModelManager | None = None) -> Runtime:
        """Read the options, build the model manager and load the extensions (no model is loaded); with
        `settings.clustered`, start the worker replicas."""
        options_path = Path(config_path or Path(settings.data_dir) / CONFIG_NAME)
        clean_stale_temporaries(options_path.parent)
        options = load_options(options_path)
        options = _drop_unsafe_folders(options, settings)
        if settings.checkpoint_cache_size != 1:  # --checkpoint-cache wins over the saved option for this run
            options = replace(options, checkpoint_cache=settings.checkpoint_cache_size)
        elif options.checkpoint_cache != 1:
            settings = settings.with_changes(checkpoint_cache_size=options.checkpoint_cache)
        # --compile / --channels-last turn the options on for this run
        options = replace(options, torch_compile=options.torch_compile or settings.torch_compile,
                          channels_last=options.channels_last or settings.channels_last)
        manager = manager or ModelManager(settings)
        extensions = ExtensionRegistry(Path(settings.data_dir) / "extensions", set(options.disabled_extensions))
        runtime = cls(settings, options, options_path, manager, extensions, StyleDatabase(settings.styles_file))
        runtime._apply_to_parts(options)
        if settings.clustered:
            from backend import cluster

            runtime.use_cluster(cluster.start(settings))
        return runtime

    # -- options ---------------------------------------------------------------------------------
    def checked(self, changes: dict[str, Any]) -> Options:
        """The options with `changes` (A1111's names accepted), validated; nothing is saved or applied.
        An `InputError` names the first change that is not valid."""
        values = {OPTION_ALIASES.get(key, key): value for key, value in changes.items()}
        unknown = sorted(set(values) - set(OPTION_NAMES))
        if unknown:
            raise InputError(f"unknown option(s): {', '.join(unknown)}; known: {', '.join(OPTION_NAMES)}")
        for key, value in values.items():
            _check_type(key, value, getattr(self.options, key))
            if key in FOLDER_OPTIONS:
                check_output_folder(key, value, self.settings)
        try:
            candidate = replace(self.options, **values)
            candidate.validate()
        except (TypeError, ValueError) as error:
            raise InputError(f"options not applied: {error}") from None
        return candidate

    def apply(self, changes: dict[str, Any], save: bool = True) -> list[str]:
        """Check, save (atomically) and apply option changes; returns the option names changed.
        Nothing is saved or applied unless every change is valid."""
        candidate = self.checked(changes)
        if save:
            try:
                save_options(candidate, self.options_path)
            except OSError as error:
                raise InputError(f"options not saved to {self.options_path}: {error}") from None
        self.options = candidate
        self._apply_to_parts(candidate)
        return sorted(OPTION_ALIASES.get(key, key) for key in changes)

    def _apply_to_parts(self, options: Options) -> None:
        manager = self.manager
        if manager.settings.checkpoint_cache_size != options.checkpoint_cache:
            manager.set_cache_size(options.checkpoint_cache)
        manager.set_fp8_storage(options.fp8_storage)
        manager.set_vae_tiling(options.vae_tiling)
        manager.set_speed(compiled=options.torch_compile, channels_last=options.channels_last)
        if manager.controlnets.size != options.control_net_model_cache_size:
            with manager.lock:  # not while a generation uses the loaded ControlNets
                manager.controlnets.set_size(options.control_net_model_cache_size)
        manager.faces.release_after_use = options.face_restoration_unload
        manager.upscalers.release_after_use = options.upscaler_unload
        manager.upscalers.tile = options.upscaler_tile()

    # -- what requests start from ----------------------------------------------------------------
    def request_defaults(self, mode: str, controls: bool = False, options: Options | None = None) -> dict[str, Any]:
        """`GenerationRequest` fields that come from the options, for a txt2img or img2img request.

        `controls` adds the default sampler, steps and CFG scale (the UI's and the CLI's starting
        values; A1111's API has defaults of its own for those). `options`: a request's own (overridden).
        """
        o = options or self.options
        defaults: dict[str, Any] = dict(
            save_images=o.save_images, output_dir=self.output_dir(mode, o), filename_pattern=o.filename_pattern,
            save_txt=o.save_txt, emphasis=o.emphasis, same_wildcards=o.same_wildcards, randn_source=o.randn_source,
            face_restorer=o.face_restoration_model, codeformer_weight=o.code_former_weight,
            save_before_face_restoration=o.save_images_before_face_restoration,
            pad_cond_uncond=o.pad_cond_uncond, eta_noise_seed_delta=o.eta_noise_seed_delta,
            sampler_settings=o.settings(), use_old_scheduling=o.use_old_scheduling,
        )
        if controls:
            defaults.update(sampler=o.default_sampler, steps=o.default_steps, cfg_scale=o.default_cfg_scale)
        return defaults

    def output_dir(self, mode: str, options: Options | None = None) -> Path:
        """Where `mode`'s images go: the option's folder (a relative one under the data folder, as A1111
        reads it under its install), or A1111's `<outputs>/<mode>-images`."""
        mode = "img2img" if mode != "txt2img" else mode
        options = options or self.options
        chosen = options.outdir_txt2img if mode == "txt2img" else options.outdir_img2img
        if chosen.strip():
            return Path(self.settings.data_dir) / chosen.strip()  # an absolute folder replaces the base
        return self.settings.output_root / f"{mode}-images"

    def shutdown(self) -> None:
        self.device.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


def _check_type(key: str, value: Any, current: Any) -> None:
    number = isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool)
    if isinstance(value, type(current)) and not (isinstance(value, bool) and not isinstance(current, bool)) or number:
        if isinstance(current, list) and not all(isinstance(item, str) for item in value):
            raise InputError(f"option {key} takes a list of names, not {value!r}")
        return
    raise InputError(f"option {key} takes a {type(current).__name__}, not {value!r}")


def _drop_unsafe_folders(options: Options, settings: Settings) -> Options:
    """Folder options that fail the checks (a file edited by hand, an older Easel) fall back to the
    default folder, with a warning."""
    for key in FOLDER_OPTIONS:
        try:
            check_output_folder(key, getattr(options, key), settings)
        except InputError as error:
            logger.warning("Ignoring %s from the options: %s", key, error)
            options = replace(options, **{key: ""})
    return options
