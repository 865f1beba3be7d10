"""A1111's sampler names and schedule types, as the UI, the API and infotexts give them.

`resolve(sampler, schedule_type)` validates a pair (legacy names such as "DPM++ 2M Karras" split by their
suffix) and gives the schedule type A1111 writes. Every sampler runs as A1111 computes it
(`backend.k_sampling`); `backend.schedules` holds the table of what each one does.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend import schedules
from backend.errors import InputError

AUTOMATIC = schedules.AUTOMATIC
SCHEDULE_TYPES = schedules.SCHEDULE_TYPES  # every one of A1111's; the timestep samplers ignore it, as in A1111
SAMPLER_NAMES = schedules.SAMPLER_NAMES  # A1111's order: k-diffusion, then DDIM, DDIM CFG++, PLMS, UniPC, then LCM


class SamplerError(InputError):
    pass


@dataclass(frozen=True)
class Sampler:
    name: str
    aliases: tuple[str, ...] = ()


SAMPLERS = tuple(Sampler(name, schedules.sampler_aliases(name)) for name in SAMPLER_NAMES)
_BY_NAME = {key.lower(): s for s in SAMPLERS for key in (s.name, *s.aliases)}


def resolve(sampler_name: str, schedule_type: str = AUTOMATIC) -> tuple[Sampler, str]:
    """(sampler, the schedule type A1111 writes for it) for A1111 names; raises `SamplerError` listing
    the valid ones."""
    name = (sampler_name or "").strip()
    schedule = (schedule_type or AUTOMATIC).strip()
    sampler = _BY_NAME.get(name.lower())
    if sampler is None:
        # Legacy infotexts join the two: "DPM++ 2M Karras", "Euler a SGM Uniform".
        for label in sorted(SCHEDULE_TYPES[1:], key=len, reverse=True):
            if name.lower().endswith(" " + label.lower()):
                sampler = _BY_NAME.get(name[: -len(label) - 1].strip().lower())
                if sampler is not None:
                    if schedule == AUTOMATIC:
                        schedule = label
                    break
    if sampler is None:
        raise SamplerError(f"unknown sampler '{sampler_name}'; available: {', '.join(SAMPLER_NAMES)}")
    labels = {label.lower(): label for label in SCHEDULE_TYPES}
    if schedule.lower() not in labels:
        raise SamplerError(f"unknown schedule type '{schedule_type}'; available: {', '.join(SCHEDULE_TYPES)}")
    # as A1111 writes it: Automatic stays Automatic for a sampler without a default schedule of its own
    return sampler, schedules.sampler_schedule(sampler.name, labels[schedule.lower()]).infotext_schedule
