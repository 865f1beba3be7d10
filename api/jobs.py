"""Job control: A1111's `progress`, `interrupt` and `skip`, and Easel's job API (`/easel/v1/jobs`).

Every route here is `async` and does no blocking work, so it answers at once however many
generations are waiting. A client sees and stops only its own jobs, unless it is an admin.
"""

from __future__ import annotations

import datetime as dt

from fastapi import APIRouter, Depends, HTTPException, Query
from starlette.concurrency import run_in_threadpool

from api import convert, generation
from api import models as m
from api.access import Caller, require_admin
from api.context import ApiContext, api_context, caller
from api.errors import A1111Route
from backend.job_queue import CANCELLED, Job

router = APIRouter(dependencies=[Depends(caller)], route_class=A1111Route)


@router.get("/sdapi/v1/progress", response_model=m.ProgressResponse, tags=["jobs"])
async def progress(skip_current_image: bool = False, id_task: str | None = None,
                   job_id: str | None = Query(None, description="an Easel job id (default: your current job)"),
                   who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    device = api.runtime.device
    job = api.job_for(job_id or id_task, who) if job_id or id_task else _current_of(api, who)
    state = {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
             "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    body = {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None,
            "current_task": None, "queue_length": device.queue_length}
    if job is None:
        return body
    step = job.progress
    state.update(job=job.kind, job_count=device.queue_length + len(device.running),
                 job_timestamp=dt.datetime.fromtimestamp(job.created).strftime("%Y%m%d%H%M%S"),
                 interrupted=job.control.interrupted, job_no=step.batch if step else 0,
                 sampling_step=step.step if step else 0, sampling_steps=step.steps if step else 0)
    body.update(progress=job.fraction, eta_relative=job.eta or 0.0, current_task=job.id,
                textinfo=f"{job.status}, position {device.position(job)}" if not job.done else job.status)
    if not skip_current_image and step is not None and step.preview is not None:
        body["current_image"] = convert.encode_png(step.preview, None)
    return body


def _current_of(api: ApiContext, who: Caller) -> Job | None:
    """The caller's oldest unfinished job; for an admin without one, whatever runs."""
    device = api.runtime.device
    mine = [job for job in device.jobs_of(who.name) if not job.done]
    current = device.current
    return mine[0] if mine else current if current is not None and who.admin else None


@router.post("/sdapi/v1/interrupt", tags=["jobs"])
async def interrupt(job_id: str | None = None, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    for job in _targets(api, job_id, who):
        job.control.interrupt()
    return {}


@router.post("/sdapi/v1/skip", tags=["jobs"])
async def skip(job_id: str | None = None, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    for job in _targets(api, job_id, who):
        job.control.skip()
    return {}


def _targets(api: ApiContext, job_id: str | None, who: Caller) -> list[Job]:
    """The jobs an interrupt or skip reaches: the given one (if the caller may), else the caller's
    running jobs (one, unless `--workers` runs several at once), else (for an admin) whatever runs."""
    device = api.runtime.device
    if job_id:
        job = device.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        if not (who.admin or job.owner == who.name):
            raise HTTPException(403, f"job {job_id} belongs to another client; only it or an admin may stop it")
        return [job]
    running = device.running
    mine = [job for job in running if job.owner == who.name]
    return mine or (running if who.admin else [])


# -- Easel's job API -----------------------------------------------------------------------------------
@router.post("/easel/v1/jobs/txt2img", response_model=m.JobStatus, status_code=202, tags=["jobs"])
async def submit_txt2img(body: m.Txt2ImgRequest, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    job = await run_in_threadpool(generation.submit, api, body, "txt2img", who)
    return convert.job_status(job, api.runtime.device)


@router.post("/easel/v1/jobs/img2img", response_model=m.JobStatus, status_code=202, tags=["jobs"])
async def submit_img2img(body: m.Img2ImgRequest, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    job = await run_in_threadpool(generation.submit, api, body, "img2img", who)
    return convert.job_status(job, api.runtime.device)


@router.get("/easel/v1/jobs", response_model=list[m.JobStatus], tags=["jobs"])
async def list_jobs(who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    device = api.runtime.device
    return [convert.job_status(job, device) for job in device.jobs_of(None if who.admin else who.name)]


@router.get("/easel/v1/jobs/{job_id}", response_model=m.JobStatus, tags=["jobs"])
async def job_status(job_id: str, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    return convert.job_status(api.job_for(job_id, who), api.runtime.device)


@router.get("/easel/v1/jobs/{job_id}/result", response_model=m.GenerationResponse, tags=["jobs"])
async def job_result(job_id: str, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    job = api.job_for(job_id, who)
    if not job.done:
        raise HTTPException(409, f"job {job_id} is {job.status}; poll /easel/v1/jobs/{job_id}")
    if job.status == CANCELLED:
        raise HTTPException(409, f"job {job_id} was cancelled before it started")
    if not isinstance(job.request, m.Txt2ImgRequest):
        raise HTTPException(409, f"job {job_id} is not a generation submitted through this API")
    return await run_in_threadpool(generation.response, job, job.request)


@router.delete("/easel/v1/jobs/{job_id}", response_model=m.JobStatus, tags=["jobs"])
async def cancel_job(job_id: str, who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    device = api.runtime.device
    job = device.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    if not (who.admin or job.owner == who.name):
        raise HTTPException(403, f"job {job_id} belongs to another client; only it or an admin may cancel it")
    device.cancel(job)
    return convert.job_status(job, device)


@router.get("/easel/v1/cluster", response_model=m.ClusterStatus, tags=["jobs"])
async def cluster(who: Caller = Depends(caller), api: ApiContext = Depends(api_context)):
    """What generates: each worker replica with `--workers` (else this process, as `local`)."""
    require_admin(who, "see the workers")
    runtime = api.runtime
    return {"replicas": await run_in_threadpool(runtime.workers), "queued": runtime.device.queue_length}
