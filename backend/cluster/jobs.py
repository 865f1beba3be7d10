"""What a front end sends to a worker replica and what comes back, as plain picklable values (no Ray
import: the front end builds these before it knows whether a cluster runs them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from backend.request import GenerationRequest

APP_NAME = "easel"
DEPLOYMENT_NAME = "EaselWorker"
REGISTRY_NAME = "easel_registry"
NAMESPACE = "easel"

STARTED, PROGRESS, RESULT, ERROR = "started", "progress", "result", "error"


@dataclass(frozen=True)
class ServerState:
    """What a replica must agree with the front end on before it runs a job: the options (a replica
    applies changed ones without saving them) and the server's VAE and text encoder picks."""

    options: dict[str, Any]
    vae: str = "Automatic"
    text_encoders: tuple[str, ...] = ()
    refreshes: int = 0  # the front end's folder rescans: a replica behind rescans its own


@dataclass(frozen=True)
class RemoteJob:
    id: str
    request: GenerationRequest  # its `checkpoint` is the file name, the job's model id
    state: ServerState
    preview_every: int = 0


@dataclass(frozen=True)
class Event:
    kind: str  # STARTED, PROGRESS, RESULT or ERROR
    value: Any = None  # the replica's info, a Progress, a GenerationResult or the exception
    replica: dict = field(default_factory=dict)
