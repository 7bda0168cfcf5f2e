"""The real HTTP probe, against loopback servers only."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from spotforge_controller.runtime import urllib_http_get


class _Healthz(BaseHTTPRequestHandler):
    seen_hosts: list[str] = []

    def do_GET(self) -> None:
        type(self).seen_hosts.append(self.headers.get("Host", ""))
        status = 200 if self.path == "/api/healthz" else 424
        body = json.dumps({"status": "pass" if status == 200 else "fail"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    _Healthz.seen_hosts = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_the_probe_names_the_domain_in_the_host_header_while_asking_the_address(server) -> None:
    port = server.server_address[1]
    response = urllib_http_get(f"http://127.0.0.1:{port}/api/healthz", 2.0, host="git.example.com")
    assert response.status == 200 and json.loads(response.body)["status"] == "pass"
    assert _Healthz.seen_hosts == ["git.example.com"]


def test_a_failing_check_is_read_from_the_424_body_not_raised(server) -> None:
    port = server.server_address[1]
    response = urllib_http_get(f"http://127.0.0.1:{port}/other", 2.0)
    assert response.status == 424 and json.loads(response.body)["status"] == "fail"


def test_nothing_listening_is_an_os_error() -> None:
    with pytest.raises(OSError):
        urllib_http_get("http://127.0.0.1:9/api/healthz", 1.0)
