"""The registry: one small named actor (`easel_registry` in namespace `easel`) that every replica and
the front end reach by name. It carries interrupt and skip to the replica running a job (a Serve
handle cannot address one replica) and keeps each replica's latest heartbeat for `/easel/v1/cluster`."""

from __future__ import annotations

import time

from backend.cluster.jobs import NAMESPACE, REGISTRY_NAME


class Registry:
    def __init__(self) -> None:
        self.signals: dict[str, dict] = {}
        self.replicas: dict[str, dict] = {}
        self.unloads = 0  # A1111's unload-checkpoint calls so far: a replica frees its checkpoints on each

    def signal(self, job_id: str, name: str) -> None:
        """"interrupt" (stop, keep finished images) or "skip" (counted: each skip ends one batch)."""
        flags = self.signals.setdefault(job_id, {"interrupt": False, "skips": 0})
        if name == "skip":
            flags["skips"] += 1
        else:
            flags["interrupt"] = True

    def poll(self, job_id: str) -> dict:
        return dict(self.signals.get(job_id, {"interrupt": False, "skips": 0}))

    def clear(self, job_id: str) -> None:
        self.signals.pop(job_id, None)

    def heartbeat(self, replica_id: str, info: dict) -> int:
        """Record a replica's state; answers the unload count, which the replica compares with its own."""
        self.replicas[replica_id] = {**info, "seen": time.time()}
        return self.unloads

    def request_unload(self) -> None:
        self.unloads += 1

    def forget(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def list(self) -> dict[str, dict]:
        return dict(self.replicas)


def connect(detached: bool):
    """The registry actor, created by whoever comes first (a front end, or a replica deployed before its
    front end, as in a RayService); `detached` keeps it past its creator (a cluster, not a local run)."""
    import ray

    return ray.remote(num_cpus=0)(Registry).options(
        name=REGISTRY_NAME, namespace=NAMESPACE, get_if_exists=True,
        lifetime="detached" if detached else None).remote()
