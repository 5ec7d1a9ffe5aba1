"""What the chaos soak found in its own harness: the fakes' and proxies' HTTP servers.

A VM or a runner killed mid-call (SIGKILL, as the soak does) resets its connections; the server
of the fake Compute API or of the Cloud Storage proxy must take that quietly, while a fake's own
error still shows its traceback.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import requests

from tests.gcp.fault_compute import FakeServer


class _Noted(FakeServer):
    """A fake's server that says when it has dealt with a failed connection."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.handled = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:
        super().handle_error(request, client_address)
        self.handled.set()


class _Broken(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        raise ValueError("a fake's own bug")


def _serve(server: _Noted, call: Callable[[int], None]) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        call(server.server_address[1])
        assert server.handled.wait(10), "the server never dealt with the connection"
    finally:
        server.shutdown()
        server.server_close()


def _reset(port: int) -> None:
    """Connect, then reset the connection before the request is whole (linger 0)."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(b"GET / HT")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_reset_is_quiet_and_a_fakes_own_error_is_not(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A VM or a runner killed mid-call resets its connections: that is the soak, not an error.
    _serve(_Noted(_Broken), _reset)
    assert capsys.readouterr().err == ""

    def get(port: int) -> None:
        with contextlib.suppress(requests.exceptions.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/", timeout=10)

    _serve(_Noted(_Broken), get)
    assert "ValueError: a fake's own bug" in capsys.readouterr().err
