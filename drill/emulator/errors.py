"""Error classes for the emulator and the AWS-shaped error responses its hooks return.

An AWS refusal is returned to botocore as a parsed error response with an HTTP status, so botocore
raises exactly what it raises for the real service (ClientError, or the service's modeled exception
class such as SSM's InvalidInstanceId)."""

from __future__ import annotations

import uuid
from typing import Any

from botocore.awsrequest import AWSResponse


class EmulatorError(Exception):
    """Misuse of the emulator by a test (not something AWS would answer)."""


class UnknownInstanceError(EmulatorError):
    """A test named an instance the emulator never launched."""


class AwsRefusal(Exception):
    """Raised inside a rule to refuse a call the way AWS does; turned into an error response."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


# Server-side codes come with 5xx like AWS sends them.
_SERVER_CODES = {"InternalError": 500, "InternalFailure": 500, "Unavailable": 503, "ServiceUnavailable": 503}


def status_for(code: str) -> int:
    return _SERVER_CODES.get(code, 400)


def _http(status: int) -> AWSResponse:
    return AWSResponse("https://emulator.spotforge.invalid/", status, {}, None)


def _metadata(status: int) -> dict[str, Any]:
    return {"RequestId": str(uuid.uuid4()), "HTTPStatusCode": status, "HTTPHeaders": {}, "RetryAttempts": 0}


def error_response(refusal: AwsRefusal) -> tuple[AWSResponse, dict[str, Any]]:
    parsed = {
        "Error": {"Code": refusal.code, "Message": refusal.message},
        "ResponseMetadata": _metadata(refusal.status),
    }
    return _http(refusal.status), parsed


def ok_response(body: dict[str, Any]) -> tuple[AWSResponse, dict[str, Any]]:
    parsed = dict(body)
    parsed["ResponseMetadata"] = _metadata(200)
    return _http(200), parsed
