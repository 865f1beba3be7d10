"""The model families Easel runs, one module each, found by name or recognised from a file's tensors."""

from __future__ import annotations

from backend import model_detection
from backend.families import flux, sd1, sd2, sd3, sdxl
from backend.families.base import Family, Shapes

# Order matters only for detection: the first family that claims a file gets it.
FAMILIES: dict[str, Family] = {family.name: family for family in (sd1.FAMILY, sd2.FAMILY, sdxl.FAMILY, flux.FAMILY,
                                                                  sd3.FAMILY)}


def get(name: str) -> Family:
    """The family of a loaded model (`ModelSpec.family`); KeyError for an unknown name."""
    return FAMILIES[name]


def detect(shapes: Shapes) -> Family | None:
    """The family whose checkpoints have these tensors, or None."""
    return next((family for family in FAMILIES.values() if family.claims(shapes)), None)


def identify(shapes: Shapes) -> Family:
    """The family of a checkpoint; `CheckpointFormatError` saying what the file is when no family claims it."""
    family = detect(shapes)
    if family is None:
        model_detection.detect(shapes)  # raises, explaining what the file is
        raise model_detection.CheckpointFormatError("not a checkpoint of a family Easel runs")
    return family


__all__ = ["FAMILIES", "Family", "detect", "get", "identify"]
