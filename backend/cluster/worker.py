"""One generation replica of the Ray Serve deployment: a `Runtime` of its own on its device (a GPU when
Ray gives it one), checkpoints kept by Serve's model multiplexing, and jobs streamed back as events.

The model id of a job is its checkpoint's file name. Serve routes a job to a replica that has it loaded
when one is free, else to the replica with the fewest loaded, and evicts a replica's least recently used
checkpoint (through `_Loaded.__del__`) before loading one more than `--checkpoint-cache`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket

import ray
from ray import serve

from backend import devices
from backend.cluster import registry
from backend.cluster.jobs import (
    DEPLOYMENT_NAME,
    ERROR,
    PROGRESS,
    RESULT,
    STARTED,
    Event,
    RemoteJob,
    ServerState,
)
from backend.errors import NotFoundError
from backend.progress import JobControl
from backend.runtime import Runtime
from backend.settings import Settings

logger = logging.getLogger(__name__)

HEARTBEAT_S = 2.0  # how often an idle replica tells the registry it is alive
POLL_S = 0.2  # how often a running job looks for an interrupt or skip
NOT_SYNCED = ("checkpoint_cache",)  # options a replica keeps as it was started


class GenerationWorker:
    """A Serve deployment class (see `deployment()`); `run` is its only request method."""

    async def __init__(self, settings: Settings, cache_size: int):
        devices.set_threads(settings.threads)
        self.runtime = Runtime.create(settings.with_changes(checkpoint_cache_size=cache_size))
        self.manager = self.runtime.manager
        self.running: str | None = None
        self._refreshes = 0
        # Built per replica (not a decorated method) so the cache size can come from the command line; a
        # plain function, since Serve keeps its cache as an attribute of what it wraps

        async def checkpoint(name: str) -> _Loaded:
            return await self._load(name)

        self._checkpoint = serve.multiplexed(max_num_models_per_replica=cache_size)(checkpoint)
        self.info = replica_info(self.manager)
        self._registry = registry.connect(detached=True)  # the front end's, when it started first
        self._beats = asyncio.get_running_loop().create_task(self._beat_forever())
        logger.info("Worker %s ready on %s", self.info["id"], self.info["device"])

    # -- checkpoints -----------------------------------------------------------------------------
    async def _load(self, checkpoint: str) -> _Loaded:
        await asyncio.to_thread(self._activate, checkpoint)
        await self._beat()
        return _Loaded(self, checkpoint)

    def _activate(self, checkpoint: str) -> None:
        try:
            try:
                self.manager.activate(checkpoint)
            except NotFoundError:  # a file added since this replica last looked
                self.manager.refresh()
                self.manager.activate(checkpoint)
        except NotFoundError as error:
            raise type(error)(f"worker {self.info['id']} on {self.info['node']}: {error}. Every worker reads the "
                              "same model folders: put the file at the same path on every node") from None

    def release(self, checkpoint: str) -> None:
        """Serve evicted `checkpoint` from this replica: free it here too."""
        try:
            self.manager.release(checkpoint)
        except NotFoundError:  # the file went away; nothing of it is loaded under another name
            pass
        self._send_beat()

    # -- jobs ------------------------------------------------------------------------------------
    async def run(self, job: RemoteJob):
        """Run one job; yields STARTED (this replica), PROGRESS..., then RESULT or ERROR."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        control = JobControl(on_progress=lambda progress: loop.call_soon_threadsafe(events.put_nowait, progress),
                             preview_every=job.preview_every)
        self.running = job.id
        await self._beat()
        yield Event(STARTED, replica=self.describe())
        watcher = loop.create_task(self._watch(job.id, control))
        work = None
        try:
            await asyncio.to_thread(self._sync, job.state)
            await self._checkpoint(job.request.checkpoint)
            work = loop.run_in_executor(None, self.runtime.generate, job.request, control)
            async for progress in _drain(events, work):
                yield Event(PROGRESS, progress)
            final = Event(RESULT, work.result())
        except asyncio.CancelledError:  # the front end went away: stop the sampler before freeing the slot
            control.interrupt()
            if work is not None:
                await asyncio.shield(asyncio.wait([work]))
            raise
        except Exception as error:  # the job's own failure, for its client
            final = Event(ERROR, portable(error))
        finally:
            watcher.cancel()
            self.running = None
        await self._beat()  # the registry knows this replica is free before the front end has the result
        yield final

    def _sync(self, state: ServerState) -> None:
        """Take the front end's options and VAE / text encoder picks (applied, not saved: the front end
        owns config.json)."""
        runtime, manager = self.runtime, self.manager
        changes = {key: value for key, value in state.options.items()
                   if key not in NOT_SYNCED and getattr(runtime.options, key, value) != value}
        with manager.lock:
            if state.refreshes != self._refreshes:  # the front end rescanned the folders: new LoRAs, VAEs...
                manager.refresh()
                self._refreshes = state.refreshes
            if changes:
                runtime.apply(changes, save=False)
            if tuple(state.text_encoders) != manager.text_encoder_choice:
                manager.set_text_encoders(list(state.text_encoders))
            if state.vae != manager.vae_choice:
                manager.set_vae(state.vae)

    async def _watch(self, job_id: str, control: JobControl) -> None:
        """Carry the registry's interrupt and skips for this job to its control."""
        if self._registry is None:
            return
        skips = 0
        try:
            while True:
                flags = await self._registry.poll.remote(job_id)
                if flags["interrupt"] and not control.interrupted:
                    control.interrupt()
                for _ in range(flags["skips"] - skips):
                    control.skip()
                skips = flags["skips"]
                await asyncio.sleep(POLL_S)
        except ray.exceptions.RayActorError:  # the front end (and its registry) is gone
            logger.warning("The registry went away: job %s can no longer be interrupted", job_id)

    # -- what the replica reports ----------------------------------------------------------------
    def describe(self) -> dict:
        index, files = self.manager.index, self.manager.loaded_files
        return {**self.info, "loaded": [index.title(file) for file in files], "loads": self.manager.load_count,
                "loaded_files": [file.filename for file in files], "running": self.running}

    async def _beat(self) -> int | None:
        """Tell the registry this replica's state; returns its unload count (None without a registry)."""
        if self._registry is not None:
            try:
                return await self._registry.heartbeat.remote(self.info["id"], self.describe())
            except ray.exceptions.RayActorError:
                self._registry = None
        return None

    def _send_beat(self) -> None:
        if self._registry is not None:
            self._registry.heartbeat.remote(self.info["id"], self.describe())

    async def _beat_forever(self) -> None:
        """Heartbeats; an unload asked for since the last one frees this replica's checkpoints (after the job
        it runs: that holds the model manager's lock)."""
        seen = None
        while True:
            unloads = await self._beat()
            if unloads is not None and seen is not None and unloads > seen:
                await asyncio.to_thread(self.manager.unload)
                logger.info("Worker %s unloaded its checkpoints", self.info["id"])
                await self._beat()
            seen = unloads if unloads is not None else seen
            await asyncio.sleep(HEARTBEAT_S)


class _Loaded:
    """What Serve's multiplexing caches for a checkpoint; Serve calls `__del__` when it evicts it (and
    Python may again at collection, so it acts once)."""

    def __init__(self, worker: GenerationWorker, checkpoint: str):
        self.worker, self.checkpoint = worker, checkpoint

    def __del__(self) -> None:
        worker, self.worker = getattr(self, "worker", None), None
        if worker is not None:
            worker.release(self.checkpoint)


async def _drain(events: asyncio.Queue, work: asyncio.Future):
    """The queued progress events until `work` is done, then the rest."""
    while not work.done():
        getter = asyncio.ensure_future(events.get())
        done, _ = await asyncio.wait({getter, work}, return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            yield getter.result()
        else:
            getter.cancel()
    while not events.empty():
        yield events.get_nowait()


def portable(error: BaseException) -> BaseException:
    """`error` if it survives pickling (Easel's errors do), else a RuntimeError with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def replica_info(manager) -> dict:
    context = serve.get_replica_context()
    device = str(manager.placement.device)
    if device.startswith("cuda"):
        import torch

        device += f" ({torch.cuda.get_device_name(manager.placement.device)})"
    ip = ray.util.get_node_ip_address()
    return {"id": context.replica_id.unique_id, "pid": os.getpid(), "node": f"{socket.gethostname()} ({ip})",
            "node_id": ray.get_runtime_context().get_node_id(), "device": device}


def deployment(workers: int, actor_options: dict, health_check_s: float = 2.0):
    """The replicas' deployment: one job at a time each (a busy replica refuses, so Serve routes the job
    elsewhere rather than queueing it behind a long generation)."""
    return serve.deployment(GenerationWorker, name=DEPLOYMENT_NAME, num_replicas=workers, max_ongoing_requests=1,
                            health_check_period_s=health_check_s, ray_actor_options=actor_options)
