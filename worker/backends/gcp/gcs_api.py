"""What the Cloud Storage store's calls share: the page and pool sizes, ``gs://`` URIs, and the
API's errors in CFlow's words."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from google.api_core import exceptions as gexc

from worker.errors import BackendError, NotFound

LIST_PAGE_SIZE = 1000  # objects per listing page (the API's maximum)
HTTP_POOL_SIZE = 32  # connections kept per host; one client serves every slot of a worker
_WRITES = ("write", "upload", "create")


def parse_gs_uri(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/key`` into ``(bucket, key)``; raises BackendError when it is not one."""
    if not uri.startswith("gs://"):
        raise BackendError(f"{uri} is not a gs:// URI")
    bucket, _, key = uri[len("gs://") :].partition("/")
    if not bucket:
        raise BackendError(f"{uri} names no bucket; write gs://BUCKET/PATH")
    return bucket, key


@contextlib.contextmanager
def api_errors(bucket: str, action: str, key: str, *, missing_ok: bool = False) -> Iterator[None]:
    """Turn API errors into CFlow's: a missing object, bucket or permission in one line.

    A 412 (a precondition) passes through as it is: the caller's create or update reads it.
    """
    where = f"gs://{bucket}/{key}"
    try:
        yield
    except gexc.PreconditionFailed:
        raise
    except gexc.NotFound as exc:
        # A write can only 404 for want of a bucket; a read says which one is missing.
        if action in _WRITES or "bucket does not exist" in str(exc).lower():
            raise BackendError(
                f"bucket gs://{bucket} does not exist; check the deployment's bucket"
                " (`runner doctor`)"
            ) from None
        if missing_ok:
            raise
        raise NotFound(f"no object {where}") from None
    except (gexc.Forbidden, gexc.Unauthorized) as exc:
        raise BackendError(
            f"no permission to {action} {where}: {exc.message}; check the credentials' roles"
        ) from None
    except gexc.GoogleAPICallError as exc:
        raise BackendError(f"could not {action} {where}: {exc.message}") from None
    except gexc.GoogleAPIError as exc:  # RetryError: the retries ran out (a long outage)
        raise BackendError(f"could not {action} {where}: {exc}") from None
