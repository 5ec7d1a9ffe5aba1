"""Proxies in front of the emulators that fail calls the way Cloud Storage and Pub/Sub do.

Neither emulator fails on its own, so a proxy stands in front of each and asks a
``FaultPlan`` (tests/gcp/faults.py) about every call; at rate 0 both pass every byte through
unchanged. Point the clients at them as at the emulators: ``GcsFaultProxy.endpoint`` is
``STORAGE_EMULATOR_HOST``, ``PubSubFaultProxy.host`` is ``PUBSUB_EMULATOR_HOST``
(``FaultProxies.env`` has both, for runner and worker processes).

- Cloud Storage (JSON API over HTTP): 503 ``backendError``, 500 ``internalError`` and 429
  ``rateLimitExceeded`` in the service's JSON error shape
  (https://cloud.google.com/storage/docs/json_api/v1/status-codes); and, always, GCS's limit of
  one write per second to the same object name ("Maximum rate of writes to the same object name:
  one write per second", https://cloud.google.com/storage/quotas; writes are creates, updates,
  composes, copies and deletes): a second write to a name within a second of the last one that
  succeeded is refused with 429, as the service does
  (https://cloud.google.com/storage/docs/request-rate).
- Pub/Sub (gRPC): any call fails with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (the
  codes Google documents as retryable, https://cloud.google.com/pubsub/docs/reference/error-codes)
  and a streaming pull may be cut (ended with UNAVAILABLE, as the service ends streams it moves)
  after its first answer or ``plan.hang`` seconds. The proxy forwards raw bytes with grpcio's
  generic handlers, so every method of the emulator passes, unary and streaming alike.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import grpc

from tests.gcp.fault_compute import FakeServer
from tests.gcp.faults import GCS_KINDS, PUBSUB_KINDS, FaultPlan

NO_DEADLINE = 86400.0 * 365  # seconds: a gRPC call's time left beyond this means none was set
SAME_OBJECT_INTERVAL = 1.0  # seconds: GCS's one write per second to one object name
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}
_GCS_ERRORS = {
    "503": (503, "backendError", "Backend Error"),
    "500": (500, "internalError", "Internal Error"),
    "429": (
        429,
        "rateLimitExceeded",
        "The project exceeded the rate limit for CloudStorage and this operation.",
    ),
}
_OBJECT = re.compile(r"^/storage/v1/b/(?P<bucket>[^/]+)/o/(?P<name>[^/]+)(?P<rest>/.*)?$")
_COPY_TO = re.compile(r"/(?:copyTo|rewriteTo)/b/(?P<bucket>[^/]+)/o/(?P<name>[^/]+)$")
_UPLOAD = re.compile(r"^/upload/storage/v1/b/(?P<bucket>[^/]+)/o$")
_MULTIPART_NAME = re.compile(rb'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')


def gcs_error(code: int, reason: str, message: str) -> bytes:
    """A Cloud Storage JSON API error body."""
    error = {
        "code": code,
        "message": message,
        "errors": [{"message": message, "domain": "global", "reason": reason}],
    }
    return json.dumps({"error": error}).encode()


def written_object(
    method: str, path: str, query: dict[str, str], body: bytes
) -> tuple[str, str] | None:
    """``(bucket, name)`` of the object a JSON API call writes (creates, updates, composes,
    copies into or deletes), or None for a read."""
    if method == "POST" and (m := _UPLOAD.match(path)):
        if "name" in query:
            return m["bucket"], query["name"]
        found = _MULTIPART_NAME.search(body)
        return (m["bucket"], json.loads(b'"' + found[1] + b'"')) if found else None
    m = _OBJECT.match(path)
    if m is None:
        return None
    rest = m["rest"] or ""
    if method == "POST" and (copy := _COPY_TO.search(rest)):
        return unquote(copy["bucket"]), unquote(copy["name"])
    if (method == "POST" and rest == "/compose") or (
        method in ("PATCH", "PUT", "DELETE") and not rest
    ):
        return unquote(m["bucket"]), unquote(m["name"])
    return None


class GcsFaultProxy:
    """An HTTP proxy in front of fake-gcs-server (``upstream``: its ``http://host:port``)."""

    def __init__(
        self,
        upstream: str,
        plan: FaultPlan,
        *,
        same_object_interval: float = SAME_OBJECT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.upstream = urlparse(upstream)
        self.plan = plan
        self.same_object_interval = same_object_interval
        self.clock = clock
        self.refused_writes = 0  # writes refused for the one-per-second limit
        self._written: dict[tuple[str, str], float] = {}  # object -> when last written
        self._lock = threading.Lock()
        self._server = FakeServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> GcsFaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _refusal(self, method: str, raw_path: str, body: bytes) -> tuple[int, bytes] | None:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        fault = self.plan.draw(f"gcs:{method}", GCS_KINDS)
        if fault is not None:
            code, reason, message = _GCS_ERRORS[fault]
            return code, gcs_error(code, reason, message)
        target = written_object(method, url.path, query, body)
        if target is None:
            return None
        with self._lock:
            last = self._written.get(target)
            if last is None or self.clock() - last >= self.same_object_interval:
                return None
            self.refused_writes += 1
        message = (
            "The object exceeded the rate limit for object mutation operations (create, update, "
            "and delete). Please reduce your request rate. See https://cloud.google.com/storage/docs/gcs429."
        )
        return 429, gcs_error(429, "rateLimitExceeded", message)

    def _wrote(self, method: str, raw_path: str, body: bytes, status: int) -> None:
        url = urlparse(raw_path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        target = written_object(method, url.path, query, body)
        if target is not None and 200 <= status < 300:
            with self._lock:
                self._written[target] = self.clock()

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(
            self.upstream.hostname or "", self.upstream.port, timeout=60
        )
        try:
            conn.request(
                method, path, body=body or None, headers={**headers, "Host": self.upstream.netloc}
            )
            response = conn.getresponse()
            data = response.read()
            out = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in _HOP_BY_HOP | {"content-length"}
            ]
        finally:
            conn.close()
        mine = self.endpoint.removeprefix("http://").encode()
        data = data.replace(self.upstream.netloc.encode(), mine)
        out = [(k, v.replace(self.upstream.netloc, mine.decode())) for k, v in out]
        return response.status, out, data

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                refused = proxy._refusal(self.command, self.path, body)
                if refused is not None:
                    status, data = refused
                    out = [("Content-Type", "application/json; charset=UTF-8")]
                else:
                    status, out, data = proxy._forward(self.command, self.path, headers, body)
                    proxy._wrote(self.command, self.path, body, status)
                self.send_response(status)
                for key, value in out:
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


_PUBSUB_MESSAGES = {
    "UNAVAILABLE": "The service was unable to fulfill your request. Please try again. [code=8a75]",
    "DEADLINE_EXCEEDED": "Deadline exceeded",
    "RESOURCE_EXHAUSTED": "Request throttled due to user QPS limit being reached.",
}


class PubSubFaultProxy:
    """A gRPC proxy in front of the Pub/Sub emulator (``upstream``: its ``host:port``)."""

    def __init__(self, upstream: str, plan: FaultPlan):
        self.plan = plan
        self.cut_streams = 0  # streaming pulls cut
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=64))
        self._server.add_generic_rpc_handlers((_Forward(self),))
        self._port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._port}"

    def start(self) -> PubSubFaultProxy:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._channel.close()

    def fault(self, method: str, streaming: bool) -> str | None:
        kinds = PUBSUB_KINDS if streaming else PUBSUB_KINDS[:3]
        return self.plan.draw(f"pubsub:{method.rsplit('/', 1)[-1]}", kinds)

    def unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        forward = self._channel.unary_unary(method)

        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            if (fault := self.fault(method, streaming=False)) is not None:
                context.abort(getattr(grpc.StatusCode, fault), _PUBSUB_MESSAGES[fault])
            # A call made without a deadline (the IAM methods' default) gets one from grpc's
            # time_remaining() of about 9.2e18 s, which a client deadline overflows into one
            # already past: such a call is forwarded with no deadline, as it came.
            remaining = context.time_remaining()
            timeout = remaining if remaining < NO_DEADLINE else None
            try:
                return forward(request, timeout=timeout, metadata=_metadata(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
                raise  # abort raises; this line is for the type checker

        return call

    def stream(
        self, method: str
    ) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        forward = self._channel.stream_stream(method)

        def call(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            fault = self.fault(method, streaming=True)
            if fault is not None and fault != "cut_stream":
                context.abort(getattr(grpc.StatusCode, fault), _PUBSUB_MESSAGES[fault])
            upstream = forward(requests, metadata=_metadata(context))
            context.add_callback(upstream.cancel)
            cut = threading.Event()

            def cut_now() -> None:
                cut.set()
                upstream.cancel()

            timer = threading.Timer(self.plan.hang, cut_now)
            if fault == "cut_stream":
                timer.start()
            try:
                for response in upstream:
                    yield response
                    if fault == "cut_stream":
                        cut.set()
                        upstream.cancel()
                        break
            except grpc.RpcError as exc:
                if not cut.is_set():
                    context.abort(exc.code(), exc.details() or "")
            finally:
                timer.cancel()
            if cut.is_set():
                with self._lock:
                    self.cut_streams += 1
                context.abort(grpc.StatusCode.UNAVAILABLE, _PUBSUB_MESSAGES["UNAVAILABLE"])

        return call


class _Forward(grpc.GenericRpcHandler):
    def __init__(self, proxy: PubSubFaultProxy):
        self.proxy = proxy

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = str(handler_call_details.method)
        if method.endswith("/StreamingPull"):
            return grpc.stream_stream_rpc_method_handler(self.proxy.stream(method))
        return grpc.unary_unary_rpc_method_handler(self.proxy.unary(method))


def _metadata(context: grpc.ServicerContext) -> list[tuple[str, str | bytes]]:
    """The caller's request metadata that means something to the service (``x-goog-*``)."""
    return [(k, v) for k, v in context.invocation_metadata() if k.startswith("x-goog")]


class FaultProxies:
    """Both proxies in front of this process's emulators, on one plan."""

    def __init__(self, gcs_url: str, pubsub_host: str, plan: FaultPlan):
        self.plan = plan
        self.gcs = GcsFaultProxy(gcs_url, plan).start()
        self.pubsub = PubSubFaultProxy(pubsub_host, plan).start()

    @property
    def env(self) -> dict[str, str]:
        """What runner and worker processes need to go through the proxies."""
        return {
            "PUBSUB_EMULATOR_HOST": self.pubsub.host,
            "STORAGE_EMULATOR_HOST": self.gcs.endpoint,
        }

    def stop(self) -> None:
        self.gcs.stop()
        self.pubsub.stop()
