"""Everything the controller touches outside itself, bundled so tests and the drill can swap it."""

from __future__ import annotations

import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config as BotoConfig

from .clock import Clock, SystemClock
from .config import Config


@dataclass(frozen=True)
class HttpResponse:
    status: int
    body: bytes


# (url, timeout seconds, host=Host header) -> response; raises OSError when nothing answers.
HttpGet = Callable[..., HttpResponse]
# (hostname, timeout seconds) -> certificate notAfter (tz-aware UTC); raises OSError/ssl.SSLError.
CertExpiry = Callable[[str, float], datetime]

# botocore's own retries would sleep on the wall clock; throttling is retried in errors.aws_call on
# the injected clock instead, so the emulator's virtual time stays the only time.
_BOTO_CONFIG = BotoConfig(
    retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=5, read_timeout=20
)


def urllib_http_get(url: str, timeout: float, host: str | None = None) -> HttpResponse:
    """GET `url`. With `host`, the request goes to the address in `url` but names `host` (the Host
    header Traefik routes on) and does not verify the certificate: this judges Forgejo's health on
    the node the Elastic IP reaches, whether or not DNS and Let's Encrypt are in place yet; the
    certificate itself is checked separately against the domain (cert_expiry)."""
    headers = {"User-Agent": "spotforge-controller"}
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if host:
        headers["Host"] = host
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            return HttpResponse(status=response.status, body=response.read(65536))
    except urllib.error.HTTPError as exc:
        # Forgejo answers 424 with a JSON body when a check fails: that body is the diagnosis.
        return HttpResponse(status=exc.code, body=exc.read(65536) if exc.fp else b"")
    except urllib.error.URLError as exc:
        raise OSError(str(exc.reason)) from exc


def socket_cert_expiry(hostname: str, timeout: float) -> datetime:
    context = ssl.create_default_context()
    with (
        socket.create_connection((hostname, 443), timeout=timeout) as sock,
        context.wrap_socket(sock, server_hostname=hostname) as tls,
    ):
        cert = tls.getpeercert()
    not_after = cert.get("notAfter") if cert else None
    if not isinstance(not_after, str):
        raise ssl.SSLError(f"{hostname} presented no certificate expiry")
    return datetime.fromtimestamp(ssl.cert_time_to_seconds(not_after), UTC)


@dataclass(frozen=True)
class Runtime:
    config: Config
    session: boto3.Session
    clock: Clock
    http_get: HttpGet = urllib_http_get
    cert_expiry: CertExpiry = socket_cert_expiry
    _clients: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_environment(cls) -> Runtime:
        return cls(config=Config.from_env(os.environ), session=boto3.Session(), clock=SystemClock())

    def client(self, service: str) -> Any:
        # Created on first use: Lambda init stays fast and nothing is built at import time.
        if service not in self._clients:
            self._clients[service] = self.session.client(service, config=_BOTO_CONFIG)
        return self._clients[service]

    @property
    def ec2(self) -> Any:
        return self.client("ec2")

    @property
    def ssm(self) -> Any:
        return self.client("ssm")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def dynamodb(self) -> Any:
        return self.client("dynamodb")

    @property
    def sns(self) -> Any:
        return self.client("sns")

    @property
    def cloudwatch(self) -> Any:
        return self.client("cloudwatch")
