"""Easel past one device: `python app.py --workers N` runs N generation replicas on Ray Serve and the
same UI and APIs in front of them (`--ray-address` joins an existing Ray cluster).

- `jobs.py`: what travels between the front end and a replica (a job, its events); no Ray import.
- `registry.py`: a small named actor that carries interrupt and skip to the replica running a job and
  the replicas' heartbeats (what each has loaded, what it runs).
- `worker.py`: one replica: its own `Runtime`, checkpoints kept per replica by Serve's model
  multiplexing (the model id of a job is its checkpoint), a job streamed back as events.
- `driver.py`: `Cluster`, held by the front end's `Runtime`: starts or joins Ray, deploys the replicas,
  runs a job on one (retrying once on another when its replica died before any image was made) and
  reports the replicas.
- `serve_app.py`: the same as one Serve application (front end as an ingress deployment), for a
  KubeRay `RayService` (`deploy/kuberay/rayservice.yaml`).

Nothing here is imported unless `--workers` or `--ray-address` is given.
"""

from __future__ import annotations

CLUSTER_REQUIREMENTS = "requirements-cluster.txt"


def start(settings):
    """The `Cluster` for `settings` (`--workers` / `--ray-address`), or a clear error without Ray."""
    from backend.errors import UnavailableError

    try:
        from backend.cluster.driver import Cluster
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] == "ray":
            raise UnavailableError(f"--workers and --ray-address run on Ray Serve, which is not installed: "
                                   f"pip install -r {CLUSTER_REQUIREMENTS}") from None
        raise
    return Cluster.start(settings)
