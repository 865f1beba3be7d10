"""Easel's error taxonomy: every failure a user can act on derives from `EaselError`, and its class
says how each front end reports it (the API's status code; the UI and the CLI show the message).

Anything else is a bug: the API answers 500 with the class name, the UI logs the traceback.
"""

from __future__ import annotations


class EaselError(Exception):
    """A failure the user can act on; the message names the fix."""

    status = 422  # the API's answer


class InputError(EaselError, ValueError):
    """A request field, prompt, file or setting that Easel cannot use as given."""


class NotFoundError(EaselError, LookupError):
    """A named checkpoint, VAE, job, ... that does not exist."""

    status = 404


class ModelFileError(EaselError, RuntimeError):
    """A model file that exists but cannot be used (damaged, refused, foreign)."""


class PermissionDeniedError(EaselError, PermissionError):
    """Something this caller may not do (another user's job, a server-wide setting)."""

    status = 403


class ConflictError(EaselError):
    """The request is valid but not now (a job not finished, or cancelled)."""

    status = 409


class UnavailableError(EaselError, RuntimeError):
    """Something Easel needs is missing on this machine (a vocabulary, the network)."""

    status = 503


def http_status(error: BaseException) -> int | None:
    """The status code the API answers an error with; None for a bug (a 500)."""
    return error.status if isinstance(error, EaselError) else None


def describe(error: BaseException) -> str:
    """One line for a person: the message of an expected error, the class and message of a bug."""
    if isinstance(error, EaselError):
        return str(error)
    return f"{type(error).__name__}: {error}"
