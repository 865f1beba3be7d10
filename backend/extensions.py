"""Extensions: folders whose `extension.py` defines `register(easel)`: the built-ins shipped in
`<repo>/extensions-builtin/`, then the user's in `<data-dir>/extensions/` (where installs go).

`register` receives an `ExtensionApi` and subscribes callbacks to a few named events. Each callback
gets one small dataclass, never the app (defined in `backend.extension_events`, imported from here):

- `before_generation(BeforeGeneration)`: may replace `event.request` (prompts, settings).
- `step(Step)`: after each denoising step; sees the step, timestep and latents, may replace
  `event.latents`, may set `event.stop = True` to end sampling there.
- `guidance(Guidance)`: after classifier-free guidance combined a step's predictions; sees the
  conditional and unconditional predictions and the combination, may replace `event.prediction`.
- `after_image(AfterImage)`: per decoded image, before saving; may replace `event.image` and add
  infotext parameters to `event.parameters`.

An extension may also declare a panel of controls for txt2img/img2img (`add_panel`), whose values
reach its callbacks as `event.args` (and come from the API's `alwayson_scripts` with the same
arguments), a UI tab (`add_tab`) and API routes under `/easel/v1/ext/<name>` (`add_routes`).

A failing extension (an import error, an exception in a callback) is named in the log and in the
result's warnings, and skipped; generation goes on. `<name>.disabled` (a file) or the
`disabled_extensions` setting turns one off. Extensions load in name order, built-ins first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.errors import InputError
from backend.extension_events import AfterImage, BeforeGeneration, Guidance, Step  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)

EVENTS = ("before_generation", "step", "guidance", "after_image")
ENTRY_POINT = "extension.py"
BUILTIN_EXTENSIONS_DIR = Path(__file__).resolve().parents[1] / "extensions-builtin"
INSECURE_FLAG = "--enable-insecure-extension-access"


# -- panels ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Control:
    """One panel control: `kind` is "checkbox", "slider", "number", "dropdown" or "text"."""

    name: str
    label: str
    kind: str = "checkbox"
    default: Any = False
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Panel:
    title: str
    controls: tuple[Control, ...]
    modes: tuple[str, ...] = ("txt2img", "img2img")


def control_values(controls: tuple[Control, ...], values: Any) -> dict[str, Any]:
    """Control values from a request: a dict by control name, or A1111's positional `args` list (or a
    dict holding one); missing ones take their defaults. Without controls, a dict passes through."""
    defaults = {c.name: c.default for c in controls}
    if isinstance(values, dict) and isinstance(values.get("args"), (list, tuple)):
        values = values["args"]
    if isinstance(values, (list, tuple)):
        values = dict(zip(defaults, values))
    if not isinstance(values, dict):
        values = {}
    return {**defaults, **{k: v for k, v in values.items() if k in defaults or not defaults}}


def _values_for(names: tuple[str, ...], script_args: dict[str, Any] | None) -> Any:
    """The entry of `script_args` keyed by any of `names` (case-insensitive), else {}."""
    wanted = {name.lower() for name in names if name}
    return next((values for key, values in (script_args or {}).items() if key.lower() in wanted), {})


@dataclass
class ScriptRun:
    """What a script's `run` receives: it makes the job's images itself (A1111's "Script" dropdown)."""

    request: Any  # the request as the UI or API built it (script_name cleared)
    args: dict[str, Any]  # the script's control values
    generate: Callable[[Any], Any]  # GenerationRequest -> GenerationResult, with this job's interrupt
    control: Any  # backend.progress.JobControl: `interrupted` tells the script to stop
    result: Any  # the GenerationResult to return: append images, warnings, notes


@dataclass(frozen=True)
class Script:
    title: str
    controls: tuple[Control, ...]
    run: Callable[[ScriptRun], None]
    modes: tuple[str, ...] = ("txt2img", "img2img")
    extension: str = ""
    check: Callable[[dict[str, Any], Any], None] | None = None

    def args(self, script_args: dict[str, Any]) -> dict[str, Any]:
        """This script's values in a request's `script_args` (keyed by its title or extension name)."""
        return control_values(self.controls, _values_for((self.title, self.extension), script_args))


# -- extensions ----------------------------------------------------------------------------------------
@dataclass
class Extension:
    name: str
    path: Path
    enabled: bool = True
    builtin: bool = False  # shipped in extensions-builtin/ (not removable; can still be disabled)
    error: str | None = None  # why it failed to load (it is then skipped), shown in the UI
    last_error: str | None = None  # the latest exception in a callback (the callback was skipped)
    callbacks: dict[str, list[Callable]] = field(default_factory=lambda: {event: [] for event in EVENTS})
    panel: Panel | None = None
    tabs: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    routes: Any = None  # a fastapi.APIRouter


class ExtensionApi:
    """What `register(easel)` receives."""

    def __init__(self, extension: Extension, options: Callable[[], Any] = lambda: None):
        self._extension = extension
        self._options = options

    def option(self, name: str, default: Any = None) -> Any:
        """The current value of one of Easel's options (Settings, `config.json`), or `default` where
        there is none (an option Easel does not have, or no options at all, as in some tests)."""
        return getattr(self._options(), name, default)

    @property
    def name(self) -> str:
        return self._extension.name

    def on(self, event: str, callback: Callable) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event '{event}'; events: {', '.join(EVENTS)}")
        self._extension.callbacks[event].append(callback)

    def add_panel(self, title: str, controls: list[Control], modes: tuple[str, ...] = ("txt2img", "img2img")) -> None:
        self._extension.panel = Panel(title, tuple(controls), tuple(modes))

    def add_script(self, title: str, controls: list[Control], run: Callable[[ScriptRun], None],
                   modes: tuple[str, ...] = ("txt2img", "img2img"),
                   check: Callable[[dict[str, Any], Any], None] | None = None) -> None:
        """A script, chosen from the "Script" dropdown (or the API's `script_name`), that makes the
        job's images itself through `run.generate(request)` (several generations, a grid, ...).
        `check(args, request)` raises `RequestError` for values it refuses, before the job is queued
        (a 4xx for API clients); `run` should call it too, for callers that skip it."""
        self._extension.scripts.append(Script(title, tuple(controls), run, tuple(modes), self._extension.name,
                                              check))

    def add_tab(self, title: str, build: Callable[[], None]) -> None:
        """`build()` runs inside the tab while the UI is built, and may create gradio components."""
        self._extension.tabs.append((title, build))

    def add_routes(self, router) -> None:
        """A `fastapi.APIRouter`; it is mounted under `/easel/v1/ext/<name>` when the API is served."""
        self._extension.routes = router


class ExtensionRegistry:
    """The app's extensions: the built-ins in `builtin_folder` (always loaded unless disabled), then
    the user's in `folder` (`<data-dir>/extensions`, where installs go), each in name order."""

    def __init__(self, folder: Path | None, disabled: set[str] | frozenset[str] = frozenset(),
                 builtin_folder: Path | None = BUILTIN_EXTENSIONS_DIR):
        self.folder = Path(folder) if folder else None
        self.builtin_folder = Path(builtin_folder) if builtin_folder else None
        self.disabled = set(disabled)
        self.options: Callable[[], Any] = lambda: None  # the runtime's current options, for `easel.option()`
        self.load()

    def load(self) -> None:
        self.extensions: list[Extension] = []
        builtins = {path.name: path for path in _extension_folders(self.builtin_folder)}
        for path in builtins.values():
            self._load_one(Extension(path.name, path, builtin=True))
        for path in _extension_folders(self.folder):
            if path.name in builtins:
                logger.warning("Extension %s skipped: the built-in %s has the same name", path, builtins[path.name])
                continue
            self._load_one(Extension(path.name, path))

    def _is_disabled(self, extension: Extension) -> bool:
        """By the setting, or a `<name>.disabled` file beside it or in the (writable) user's folder."""
        markers = {extension.path.parent, *([self.folder] if self.folder is not None else [])}
        return extension.name in self.disabled or any((m / f"{extension.name}.disabled").exists() for m in markers)

    def _load_one(self, extension: Extension) -> None:
        self.extensions.append(extension)
        if self._is_disabled(extension):
            extension.enabled = False
            return
        entry = extension.path / ENTRY_POINT
        if not entry.is_file():
            extension.error = f"no {ENTRY_POINT} with a register(easel) function"
            logger.error("Extension %s skipped: %s", extension.name, extension.error)
            return
        try:
            module = _import(entry, f"easel_extensions.{_identifier(extension.name)}")
            register = getattr(module, "register", None)
            if not callable(register):
                raise TypeError(f"{ENTRY_POINT} has no register(easel) function")
            register(ExtensionApi(extension, lambda: self.options()))
        except Exception as error:  # an extension must never stop the app
            extension.error = f"{type(error).__name__}: {error}"
            extension.callbacks = {event: [] for event in EVENTS}
            extension.panel, extension.tabs, extension.routes, extension.scripts = None, [], None, []
            logger.error("Extension %s failed to load and is skipped:\n%s", extension.name, traceback.format_exc())

    # -- queries ------------------------------------------------------------------------------------
    @property
    def active(self) -> list[Extension]:
        return [e for e in self.extensions if e.enabled and e.error is None]

    def scripts(self, mode: str | None = None) -> list[Script]:
        return [s for e in self.active for s in e.scripts if mode is None or mode in s.modes]

    def script(self, title: str) -> Script | None:
        for script in self.scripts():
            if script.title.lower() == title.strip().lower():
                return script
        return None

    def panels(self, mode: str) -> list[Extension]:
        return [e for e in self.active if e.panel is not None and mode in e.panel.modes]

    def check_script(self, request) -> None:
        """Before queueing: the check of the script `request.script_name` names, with its values; its
        RequestError propagates. An unknown script is left for the generation to report."""
        name = getattr(request, "script_name", None)
        script = self.script(name) if name and name != "None" else None
        if script is not None and script.check is not None:
            script.check(script.args(request.script_args), request)

    # -- running ------------------------------------------------------------------------------------
    def has(self, event: str) -> bool:
        return any(e.callbacks[event] for e in self.active)

    def emit(self, event: str, make: Callable[[Extension], Any], warnings: list[str],
             after: Callable[[Any], None] | None = None) -> None:
        """Call every active extension's `event` callbacks in order, each with the payload
        `make(extension)` builds, then `after(payload)`; a raising callback is skipped (its changes
        dropped), named in `warnings` and the log, and the rest go on."""
        for extension in self.active:
            for callback in extension.callbacks[event]:
                payload = make(extension)
                try:
                    callback(payload)
                except Exception as error:
                    message = f"extension {extension.name} failed in {event} ({type(error).__name__}: {error}); skipped"
                    if message not in warnings:
                        warnings.append(message)
                    extension.last_error = message
                    logger.error("%s\n%s", message, traceback.format_exc())
                    continue
                if after is not None:
                    after(payload)

    def args(self, extension: Extension, script_args: dict[str, Any]) -> dict[str, Any]:
        """An extension's panel values in a request's `script_args` (keyed by its name or panel title)."""
        panel = extension.panel
        values = _values_for((extension.name, panel.title if panel else ""), script_args)
        return control_values(panel.controls if panel else (), values)


def _extension_folders(folder: Path | None) -> list[Path]:
    folders = folder.iterdir() if folder is not None and folder.is_dir() else ()
    return sorted(p for p in folders if p.is_dir() and not p.name.startswith((".", "_")))


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _import(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path, submodule_search_locations=[str(path.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


class InstallError(InputError):
    pass


def install(url: str, folder: Path, public: bool, allow_insecure: bool = False, timeout: float = 120.0) -> Path:
    """`git clone` an extension into `folder` (the user's), via a hidden folder beside the target renamed
    on success: a failed clone leaves nothing. As in A1111, refused on a `public` server (--listen,
    --share) unless started with --enable-insecure-extension-access (`allow_insecure`)."""
    # 1. Check the request
    if public and not allow_insecure:
        raise InstallError(f"installing extensions is refused on a server reachable from other machines "
                           f"(--listen or --share), because an extension runs code on it: start Easel with "
                           f"{INSECURE_FLAG} to allow it, or clone the extension into {folder} on the machine")
    url = url.strip()
    name = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1])
    if not url or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise InstallError(f"not a git repository URL: {url!r}")
    if (BUILTIN_EXTENSIONS_DIR / name).is_dir():
        raise InstallError(f"'{name}' is the name of a built-in extension; a copy in {folder} would be skipped")
    target = Path(folder) / name
    if target.exists():
        raise InstallError(f"{target} already exists; remove it first to reinstall")
    # 2. Clone beside the target, then move the finished clone into place
    Path(folder).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.installing-", dir=folder))
    try:
        _git_clone(url, staging / name, timeout)
        (staging / name).rename(target)
    except OSError as error:
        raise InstallError(f"cannot install {url} into {target}: {error}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if not (target / ENTRY_POINT).is_file():
        logger.warning("%s has no %s; it will be listed as failed", target, ENTRY_POINT)
    return target


def _git_clone(url: str, target: Path, timeout: float) -> None:
    """`git clone`, or InstallError; a timeout kills its process group (git's helpers would go on)."""
    command = ["git", "clone", "--depth", "1", "--", url, str(target)]
    environment = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}  # fail rather than wait for a password
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=environment, start_new_session=True)
    except OSError as error:
        raise InstallError(f"cannot run git to install {url}: {error}") from None
    try:
        _, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, AttributeError):  # no process groups on Windows
            os.killpg(process.pid, signal.SIGKILL)
        process.kill()
        process.communicate()
        raise InstallError(f"git clone {url} timed out after {timeout:g} s; nothing was installed") from None
    if process.returncode != 0:
        raise InstallError(f"git clone {url} failed (no network?): {errors.strip()[-300:]}")


NO_EXTENSIONS = ExtensionRegistry(None, builtin_folder=None)
