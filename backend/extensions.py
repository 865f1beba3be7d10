"""Extensions: folders in `extensions/` whose `extension.py` defines `register(easel)`.

`register` receives an `ExtensionApi` and subscribes callbacks to a few named events. Each callback
gets one small dataclass, never the app:

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
result's warnings, and skipped; generation goes on. `extensions/<name>.disabled` (a file) or the
`disabled_extensions` setting turns one off. Extensions load in name order.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image

logger = logging.getLogger(__name__)

EVENTS = ("before_generation", "step", "guidance", "after_image")
ENTRY_POINT = "extension.py"


# -- event payloads ----------------------------------------------------------------------------------
@dataclass
class BeforeGeneration:
    request: Any  # backend.request.GenerationRequest; replace it to change the generation
    args: dict[str, Any]  # this extension's panel values for the request


@dataclass
class Step:
    step: int  # 1-based, within the current pass
    steps: int
    timestep: float
    latents: Any  # torch.Tensor (batch, channels, h, w); replace it to change sampling
    request: Any
    args: dict[str, Any]
    stop: bool = False  # set to end this pass's sampling after this step


@dataclass
class Guidance:
    step: int  # 0-based step index
    steps: int
    timestep: float
    cond: Any  # torch.Tensor: the prediction with the (weighted sum of) prompt(s)
    uncond: Any  # torch.Tensor: the prediction with the negative prompt
    prediction: Any  # torch.Tensor: uncond + cfg_scale * (cond - uncond); replace it to change guidance
    cfg_scale: float
    prediction_type: str  # "epsilon" or "v_prediction"
    alpha_bar: float  # the timestep's cumulative alpha (to convert predictions to x0)
    latents: Any  # the model input latents of this step (unscaled)
    args: dict[str, Any]


@dataclass
class AfterImage:
    image: Image.Image  # replace it to change the saved image
    index: int  # position in the whole job
    seed: int
    prompt: str
    request: Any
    parameters: dict[str, Any]  # add infotext entries here ({"My key": value})
    args: dict[str, Any]


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

    def args(self, script_args: dict[str, Any]) -> dict[str, Any]:
        """This script's values in a request's `script_args` (keyed by its title or extension name)."""
        return control_values(self.controls, _values_for((self.title, self.extension), script_args))


# -- extensions ----------------------------------------------------------------------------------------
@dataclass
class Extension:
    name: str
    path: Path
    enabled: bool = True
    error: str | None = None  # why it failed to load (it is then skipped), shown in the UI
    last_error: str | None = None  # the latest exception in a callback (the callback was skipped)
    callbacks: dict[str, list[Callable]] = field(default_factory=lambda: {event: [] for event in EVENTS})
    panel: Panel | None = None
    tabs: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    scripts: list[Script] = field(default_factory=list)
    routes: Any = None  # a fastapi.APIRouter



class ExtensionApi:
    """What `register(easel)` receives."""

    def __init__(self, extension: Extension):
        self._extension = extension

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
                   modes: tuple[str, ...] = ("txt2img", "img2img")) -> None:
        """A script, chosen from the "Script" dropdown (or the API's `script_name`), that makes the
        job's images itself through `run.generate(request)` (several generations, a grid, ...)."""
        self._extension.scripts.append(Script(title, tuple(controls), run, tuple(modes), self._extension.name))

    def add_tab(self, title: str, build: Callable[[], None]) -> None:
        """`build()` runs inside the tab while the UI is built, and may create gradio components."""
        self._extension.tabs.append((title, build))

    def add_routes(self, router) -> None:
        """A `fastapi.APIRouter`; it is mounted under `/easel/v1/ext/<name>` when the API is served."""
        self._extension.routes = router


class ExtensionRegistry:
    def __init__(self, folder: Path | None, disabled: set[str] | frozenset[str] = frozenset()):
        self.folder = Path(folder) if folder else None
        self.disabled = set(disabled)
        self.extensions: list[Extension] = []
        if self.folder is not None:
            self.load()

    def load(self) -> None:
        self.extensions = []
        if self.folder is None or not self.folder.is_dir():
            return
        for path in sorted(p for p in self.folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            extension = Extension(path.name, path)
            self.extensions.append(extension)
            if (self.folder / f"{path.name}.disabled").exists() or path.name in self.disabled:
                extension.enabled = False
                continue
            entry = path / ENTRY_POINT
            if not entry.is_file():
                extension.error = f"no {ENTRY_POINT} with a register(easel) function"
                logger.error("Extension %s skipped: %s", path.name, extension.error)
                continue
            try:
                module = _import(entry, f"easel_extensions.{_identifier(path.name)}")
                register = getattr(module, "register", None)
                if not callable(register):
                    raise TypeError(f"{ENTRY_POINT} has no register(easel) function")
                register(ExtensionApi(extension))
            except Exception as error:  # an extension must never stop the app
                extension.error = f"{type(error).__name__}: {error}"
                extension.callbacks = {event: [] for event in EVENTS}
                extension.panel, extension.tabs, extension.routes, extension.scripts = None, [], None, []
                logger.error("Extension %s failed to load and is skipped:\n%s", path.name, traceback.format_exc())

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


class InstallError(RuntimeError):
    pass


def install(url: str, folder: Path, public: bool, authenticated: bool, timeout: float = 120.0) -> Path:
    """`git clone` an extension into `folder`. Refused on a public server without a login (anyone
    could run code on it; A1111 refuses too); needs the network unless the URL is local."""
    if public and not authenticated:
        raise InstallError("installing extensions is refused on a public server without a login: add "
                           "--gradio-auth, or install by cloning into extensions/ on the machine")
    url = url.strip()
    name = re.sub(r"\.git$", "", url.rstrip("/").rsplit("/", 1)[-1])
    if not url or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name.startswith("."):
        raise InstallError(f"not a git repository URL: {url!r}")
    target = Path(folder) / name
    if target.exists():
        raise InstallError(f"extensions/{name} already exists; remove it first to reinstall")
    Path(folder).mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["git", "clone", "--depth", "1", "--", url, str(target)], capture_output=True,
                              text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise InstallError(f"git clone {url} failed: {error}") from None
    if done.returncode != 0:
        raise InstallError(f"git clone {url} failed (no network?): {done.stderr.strip()[-300:]}")
    if not (target / ENTRY_POINT).is_file():
        logger.warning("extensions/%s has no %s; it will be listed as failed", name, ENTRY_POINT)
    return target


NO_EXTENSIONS = ExtensionRegistry(None)
