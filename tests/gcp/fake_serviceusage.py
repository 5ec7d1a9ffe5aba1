"""A fake of the Service Usage API's ``services:batchGet``, and of Pub/Sub's ``GetIamPolicy``.

Service Usage has no emulator; this serves ``GET /v1/projects/P/services:batchGet?names=...``
in the REST JSON of https://cloud.google.com/service-usage/docs/reference/rest/v1/services/batchGet
(``{"services": [{"name": "projects/<number>/services/<api>", "config": {"name": <api>},
"state": "ENABLED" | "DISABLED", "parent": "projects/<number>"}]}``), refusing more than 30
names in one request (400, the API's limit), names of another project (400), and, with
``disabled_api``, every request with 403 ``SERVICE_DISABLED`` as a project without the Service
Usage API answers.

The Pub/Sub emulator has no IAM (every IAM method is ``UNIMPLEMENTED``), so :class:`FakeIam`
serves ``google.iam.v1.IAMPolicy/GetIamPolicy`` over real gRPC, returning the bindings a test
gives per resource; a Pub/Sub client on its channel calls it as it calls the service.
"""

from __future__ import annotations

import json
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import grpc
from google.iam.v1 import iam_policy_pb2_grpc, policy_pb2

BATCH_GET_LIMIT = 30  # names per services:batchGet request
PROJECT_NUMBER = "123456789012"


class FakeServiceUsage:
    """``services:batchGet`` in a thread; ``endpoint`` is CFLOW_SERVICE_USAGE_ENDPOINT."""

    def __init__(self, *, project: str, enabled: set[str], disabled_api: bool = False) -> None:
        self.project, self.enabled, self.disabled_api = project, set(enabled), disabled_api
        self.requests: list[str] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeServiceUsage:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def handle(self, path: str) -> tuple[int, Any]:
        url = urlparse(path)
        self.requests.append(path)
        if self.disabled_api:
            return _error(
                403,
                "Service Usage API has not been used in project "
                f"{PROJECT_NUMBER} before or it is disabled.",
                "PERMISSION_DENIED",
            )
        if url.path != f"/v1/projects/{self.project}/services:batchGet":
            return _error(404, f"no such method {url.path}", "NOT_FOUND")
        names = parse_qs(url.query).get("names", [])
        if len(names) > BATCH_GET_LIMIT:
            return _error(400, f"At most {BATCH_GET_LIMIT} services", "INVALID_ARGUMENT")
        services = []
        for name in names:
            project, _, api = name.removeprefix("projects/").partition("/services/")
            if project != self.project or not api:
                return _error(400, f"Invalid service name {name}", "INVALID_ARGUMENT")
            services.append(
                {
                    "name": f"projects/{PROJECT_NUMBER}/services/{api}",
                    "config": {"name": api},
                    "state": "ENABLED" if api in self.enabled else "DISABLED",
                    "parent": f"projects/{PROJECT_NUMBER}",
                }
            )
        return 200, {"services": services}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                code, payload = fake.handle(self.path)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _error(code: int, message: str, status: str) -> tuple[int, Any]:
    return code, {"error": {"code": code, "message": message, "status": status}}


class FakeIam(iam_policy_pb2_grpc.IAMPolicyServicer):
    """``GetIamPolicy`` over gRPC: ``policies`` maps a resource to its bindings (role ->
    members); a resource not in it has an empty policy, as a new topic has."""

    def __init__(self, policies: dict[str, dict[str, list[str]]]) -> None:
        self.policies = policies
        self.asked: list[str] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        iam_policy_pb2_grpc.add_IAMPolicyServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def GetIamPolicy(self, request: Any, context: Any) -> policy_pb2.Policy:
        self.asked.append(request.resource)
        bindings = self.policies.get(request.resource, {})
        return policy_pb2.Policy(
            version=1,
            bindings=[policy_pb2.Binding(role=r, members=m) for r, m in bindings.items()],
            etag=b"BwX",
        )

    def start(self) -> FakeIam:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def clients(self) -> tuple[Any, Any]:
        """A Pub/Sub publisher and subscriber whose IAM calls reach this fake."""
        from google.cloud import pubsub_v1
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        host = f"127.0.0.1:{self.port}"
        publisher = pubsub_v1.PublisherClient(
            transport=PublisherGrpcTransport(channel=grpc.insecure_channel(host))
        )
        subscriber = pubsub_v1.SubscriberClient(
            transport=SubscriberGrpcTransport(channel=grpc.insecure_channel(host))
        )
        return publisher, subscriber
