"""Easel as one Ray Serve application, for a Ray cluster with no Easel process of its own (a KubeRay
`RayService`, or `serve run serve_app:app flags="..."`): the front end (web UI, A1111 API, job API) is
the ingress deployment and the generation replicas are the second deployment, exactly as
`python app.py --workers N` runs them.

    serveConfigV2:
      applications:
        - import_path: serve_app:app
          args: {flags: "--listen --api --gradio-auth ... --checkpoint-cache 2", workers: 2}

`flags` are app.py's own, followed by those in the environment variable `EASEL_FLAGS` (passwords, from
a Kubernetes Secret); `workers` is the number of generation replicas (the deployment's `num_replicas` in
the same config must agree: the front end runs that many jobs at once).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import replace

from ray import serve

import app as easel
from backend.cluster import registry, worker
from backend.cluster.driver import Cluster
from backend.runtime import Runtime


@serve.deployment(name="EaselFrontend", num_replicas=1, max_ongoing_requests=256)
@serve.ingress()
class EaselFrontend:
    """The front end: a `Runtime` that generates nothing itself, holding the server's options and
    selections, its job queue with one slot per worker replica, and the replicas' handle."""

    def __init__(self, workers, settings, server, slots: int):
        runtime = Runtime.create(settings)
        runtime.use_cluster(Cluster(workers, registry.connect(detached=True), slots, owns_ray=False))
        try:
            runtime.select_checkpoint()
        except Exception as error:  # no checkpoint yet: the UI says so and lets the user pick one
            easel.logger.error("No checkpoint at start: %s", error)
        self.runtime, self.server = runtime, server

    def __serve_build_asgi_app__(self):
        from ui.launch import asgi_app

        return asgi_app(self.runtime, self.server)


def app(args: dict):
    """The application from serveConfigV2's `args`: app.py's `flags` and the number of `workers`."""
    flags = shlex.split(str(args.get("flags", ""))) + shlex.split(os.environ.get("EASEL_FLAGS", ""))
    parsed = easel.build_parser().parse_args(flags)
    settings = easel.settings_from_args(parsed)
    workers = int(args.get("workers", settings.workers or 1))
    gpus = float(args.get("gpus_per_worker", 1))
    local = replace(settings, workers=0, ray_address=None)
    generation = worker.deployment(workers, {"num_cpus": 1, "num_gpus": gpus} if gpus else {"num_cpus": 1})
    return EaselFrontend.bind(generation.bind(local, settings.checkpoint_cache_size), local,
                              easel.server_options(parsed), workers)
