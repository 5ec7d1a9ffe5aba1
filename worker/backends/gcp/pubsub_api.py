"""What every Pub/Sub client of the worker shares: full resource paths, the API's limits, and
the :class:`~worker.errors.BackendError` a failed call on a topic or subscription becomes."""

from __future__ import annotations

from google.api_core import exceptions as gexc

from worker.errors import BackendError

ACK_IDS_PER_CALL = 1000  # ack ids per acknowledge / modify_ack_deadline request


def resource_path(project: str, kind: str, name: str) -> str:
    """``projects/P/<kind>/NAME`` from a bare name, or the full path unchanged."""
    if name.startswith("projects/"):
        return name
    return f"projects/{project}/{kind}/{name}"


def not_found_or_denied(exc: BaseException, what: str) -> BackendError:
    """The error to raise for ``exc`` from a call on ``what`` (a topic or subscription): a
    missing resource or a missing permission say what to check."""
    if isinstance(exc, gexc.NotFound):
        return BackendError(f"{what} does not exist; check the deployment (`runner doctor`)")
    if isinstance(exc, gexc.PermissionDenied | gexc.Forbidden | gexc.Unauthenticated):
        return BackendError(f"no permission to use {what}; check the credentials' roles")
    return BackendError(f"{what}: {exc}")
