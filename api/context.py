"""What every route works with: the runtime, who may call, and the command line (for `cmd-flags`),
kept on the app (`app.state.easel_api`) so routes are plain module-level functions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import HTTPException, Request

from api.access import ApiAccess, Caller
from backend.job_queue import Job
from backend.runtime import Runtime


@dataclass
class ApiContext:
    runtime: Runtime
    access: ApiAccess = field(default_factory=ApiAccess)
    flags: dict[str, Any] = field(default_factory=dict)

    def job_for(self, job_id: str, caller: Caller) -> Job:
        """A job the caller may see (its own, or any for an admin); 404 otherwise."""
        job = self.runtime.device.get(job_id)
        if job is None or not (caller.admin or job.owner == caller.name):
            raise HTTPException(404, f"no job {job_id} (finished jobs are kept for a while, then forgotten)")
        return job


def api_context(request: Request) -> ApiContext:
    return request.app.state.easel_api


async def caller(request: Request) -> Caller:
    return await api_context(request).access.identify(request)
