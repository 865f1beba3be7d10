"""`Cluster`: the front end's side of `--workers N` / `--ray-address`. It starts (or joins) Ray, deploys
the generation replicas and the registry, and runs each job on a replica: the front end's `DeviceQueue`
keeps the order and hands out N jobs at once; Serve picks the replica by the job's checkpoint.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import RayActorError, RayTaskError

from backend.cluster import worker
from backend.cluster.jobs import (
    APP_NAME,
    DEPLOYMENT_NAME,
    ERROR,
    NAMESPACE,
    PROGRESS,
    RESULT,
    STARTED,
    RemoteJob,
    ServerState,
)
from backend.cluster.registry import connect
from backend.errors import EaselError, InputError, UnavailableError
from backend.progress import JobControl
from backend.request import GenerationRequest, GenerationResult
from backend.settings import Settings

logger = logging.getLogger(__name__)

EASEL_ROOT = str(Path(__file__).resolve().parents[2])
STALE_S = 4 * worker.HEARTBEAT_S  # a replica silent this long is left out of the cluster view
OBJECT_STORE_BYTES = 256 * 1024**2  # images and progress previews only; the weights never travel


class WorkerLostError(UnavailableError):
    """The replica running a job died (killed, out of memory) and the job could not run again."""


class Cluster:
    def __init__(self, handle, registry, workers: int, owns_ray: bool):
        self.handle, self.registry, self.workers, self.owns_ray = handle, registry, workers, owns_ray

    @classmethod
    def start(cls, settings: Settings) -> Cluster:
        """Start a local Ray instance (or join `settings.ray_address`) and deploy `settings.workers`
        replicas (one per GPU when the cluster has GPUs, else an equal share of the CPUs each)."""
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_TQDM_PATCH_PRINT", "0")  # keep this process's own print()
        workers, owns_ray = max(1, settings.workers), not settings.ray_address
        _init_ray(settings, workers)
        try:
            options, threads = actor_options(ray.cluster_resources(), workers)
            registry = connect(detached=not owns_ray)
            if owns_ray:  # Easel's own server is the front door: no Serve HTTP proxy
                serve.start(proxy_location="Disabled")
            replica_settings = replace(settings, threads=settings.threads or threads, workers=0, ray_address=None)
            app = worker.deployment(workers, options).bind(replica_settings, settings.checkpoint_cache_size)
            logger.info("Starting %d generation worker(s) on Ray Serve (%s each)", workers, options)
            try:
                handle = serve.run(app, name=APP_NAME, route_prefix=None)
            except RuntimeError as error:  # a replica failed to start: its traceback is in Serve's logs
                raise UnavailableError(f"the generation workers did not start ({error}); see the replica logs "
                                       "under /tmp/ray/session_latest/logs/serve/") from None
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        return cls(handle, registry, workers, owns_ray)

    # -- jobs ------------------------------------------------------------------------------------
    def generate(self, request: GenerationRequest, control: JobControl, state: ServerState) -> GenerationResult:
        """Run `request` (its checkpoint named) on a replica; blocks the calling queue thread."""
        job = RemoteJob(control.job_id or uuid.uuid4().hex, request, state, control.preview_every)
        control.on_signal = lambda name: self.registry.signal.remote(job.id, name)
        if control.interrupted:  # interrupted while it waited
            self.registry.signal.remote(job.id, "interrupt")
        lost: list[str] = []
        try:
            while True:
                batches = [0]
                try:
                    result = self._run_once(job, control, batches)
                    break
                except RayActorError as error:
                    gone = control.worker or "?"
                    self.registry.forget.remote(gone)
                    lost.append(gone)
                    if len(lost) > 1 or batches[0] > 0 or control.interrupted:
                        raise WorkerLostError(_lost_message(gone, batches[0], len(lost), error)) from None
                    logger.warning("Worker %s died during job %s; running it again on another worker", gone, job.id)
        finally:
            control.on_signal = None
            self.registry.clear.remote(job.id)
        if lost:
            result.warnings.append(f"worker {lost[0]} stopped during this job (killed or out of memory); it ran "
                                   f"again from the start on worker {control.worker}")
        return result

    def _run_once(self, job: RemoteJob, control: JobControl, batches: list[int]) -> GenerationResult:
        """One attempt; `batches[0]` counts the batches the replica finished (saved images)."""
        stream = self.handle.options(stream=True, multiplexed_model_id=job.request.checkpoint).run.remote(job)
        final = None
        try:
            for event in stream:  # to its end: the replica is free again before the next job is sent
                if event.kind == STARTED:
                    control.worker = event.replica["id"]
                elif event.kind == PROGRESS:
                    batches[0] = max(batches[0], event.value.batch)
                    control.report(event.value)
                elif event.kind in (RESULT, ERROR):
                    final = event
        except RayTaskError as error:  # raised in the replica outside the job's own handling
            cause = error.cause if isinstance(getattr(error, "cause", None), Exception) else None
            raise (cause if isinstance(cause, EaselError) else RuntimeError(str(error))) from None
        if final is None:
            raise RayActorError(f"worker {control.worker} ended job {job.id} without a result")
        if final.kind == ERROR:
            raise final.value
        return final.value

    # -- what the replicas report ----------------------------------------------------------------
    def replicas(self) -> list[dict]:
        """The live replicas' heartbeats: id, pid, node, device, loaded checkpoint titles, loads, running."""
        beats = ray.get(self.registry.list.remote(), timeout=10)
        alive = _running_replicas()
        now = time.time()
        rows = [info for replica_id, info in beats.items()
                if now - info["seen"] < STALE_S and (alive is None or replica_id in alive)]
        return sorted(rows, key=lambda row: row["id"])

    def unload(self) -> None:
        """Every replica frees its checkpoints at its next heartbeat (after the job it runs)."""
        self.registry.request_unload.remote()

    def shutdown(self) -> None:
        """A local instance ends with the front end; on a cluster the replicas stay for the next one."""
        if self.owns_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def _init_ray(settings: Settings, workers: int) -> None:
    # Replicas import Easel from where this one runs (on a cluster: the same path on every node)
    paths = os.pathsep.join(filter(None, [EASEL_ROOT, os.environ.get("PYTHONPATH")]))
    runtime_env = {"env_vars": {"PYTHONPATH": paths}}
    if not settings.ray_address:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 object_store_memory=OBJECT_STORE_BYTES, _node_ip_address="127.0.0.1", namespace=NAMESPACE,
                 runtime_env=runtime_env)
        return
    _check_reachable(settings.ray_address)
    try:
        ray.init(address=settings.ray_address, namespace=NAMESPACE, log_to_driver=False, runtime_env=runtime_env)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise UnavailableError(f"cannot join the Ray cluster at {settings.ray_address}: {error}") from None


def _check_reachable(address: str) -> None:
    """Fail at once, naming the fix, for a HOST:PORT (or ray://HOST:PORT) nothing listens on: Ray itself
    retries such an address for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as error:
        raise UnavailableError(f"cannot reach the Ray cluster at {address} ({error}): start it there with "
                               "`ray start --head`, or check the address (auto, HOST:6379, ray://HOST:10001)") from None


def actor_options(resources: dict, workers: int) -> tuple[dict, int | None]:
    """Each replica's Ray resources, and its torch threads on the CPU: a whole GPU each when there are
    GPUs (a replica asking for one that does not exist would wait for ever), else a share of the CPUs."""
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    if gpus:
        if gpus < workers:
            raise InputError(f"--workers {workers} needs {workers} GPUs (one each); this cluster has {gpus}: "
                             f"use --workers {gpus}")
        return {"num_cpus": 1, "num_gpus": 1}, None
    share = max(1, cpus // workers)
    return {"num_cpus": share}, share


def _running_replicas() -> set[str] | None:
    """Replica ids Serve reports RUNNING (None when this Ray version does not say)."""
    try:
        details = serve.context._get_global_client().get_serve_details()
        replicas = details["applications"][APP_NAME]["deployments"][DEPLOYMENT_NAME]["replicas"]
        return {row["replica_id"] for row in replicas if row.get("state") == "RUNNING"}
    except Exception:  # a private API: the heartbeats' age still drops dead replicas
        return None


def _lost_message(worker_id: str, batches: int, attempts: int, error: BaseException) -> str:
    if attempts > 1:
        why = "it had already died once on another worker, so it was not run a third time"
    elif batches:
        why = f"{batches} batch(es) had already been saved, so it was not run again (that would save them twice)"
    else:
        why = "it was interrupted, so it was not run again"
    return (f"the worker running this job ({worker_id}) died (killed or out of memory): {why}. The server "
            f"goes on and Ray Serve starts a new worker; send the request again. ({type(error).__name__})")
