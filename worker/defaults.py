"""Named defaults, with their units, in one place."""

MAX_ATTEMPTS = 3  # task failures allowed per shard before it is marked failed
ATTEMPT_TIMEOUT = 3600.0  # seconds one attempt may run before its process group is killed
SLOTS = 1  # shards one worker runs at once

LEASE_SECONDS = 60.0  # local queue visibility timeout; extended while a task runs
HEARTBEAT_SECONDS = 10.0  # how often a running attempt extends its lease and uploads its log
CANCEL_CHECK_SECONDS = 2.0  # how often a running attempt looks whether its run was cancelled
LOG_UPLOAD_SECONDS = 15.0  # how often a running attempt's log is uploaded to a remote store
MAX_DELIVERIES = 10  # deliveries before a message is dead-lettered (messages that kill workers)
IDLE_TIMEOUT = 300.0  # seconds a worker may sit idle before it removes itself
POLL_SECONDS = 0.5  # how long an idle worker waits for work per receive call
MANIFEST_TTL = 30.0  # seconds a worker trusts a cached run manifest (cancellation latency)
BOOT_SECONDS = (
    900.0  # a VM listed running whose worker has not spoken this long is taken for frozen
)
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"  # the workers' and runner's
PREEMPT_GRACE = 5.0  # seconds a task gets between SIGTERM and SIGKILL when preempted

STORE_DIR = ".cflow"  # local backend root, relative to the working directory
# Files that mark CFlow's own folders, which a task folder's bundle leaves out (worker.bundle):
STORE_MARK = ".cflow-store"  # in a local store's root, made before its queue.db
RESULT_MARK = ".cflow-result.json"  # in a local --out folder: which run's result it holds
WATCH_POLL_SECONDS = 0.25  # runner's event poll interval
RECONCILE_SECONDS = 5.0  # runner's store reconciliation interval
PUBLISH_BATCH = 1000  # shards per publish batch
COMPUTE_OPERATION_SECONDS = (
    120.0  # a Compute mutation's operation may take this long, then it is said
)


def log_level(value: str) -> int | None:
    """``CFLOW_LOG_LEVEL``'s value as a logging level, in any case (None: no level)."""
    import logging

    number = logging.getLevelName(value.upper())
    return number if isinstance(number, int) else None


def no_log_level(value: str) -> str:
    """The one line for a ``CFLOW_LOG_LEVEL`` that is no level."""
    return f"error: CFLOW_LOG_LEVEL={value} is no log level (say DEBUG, INFO or WARNING)"
