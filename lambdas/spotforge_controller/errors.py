"""Error classes for the controller and the one place AWS errors are sorted into them.

Capacity shortfalls are outcomes the decision core plans around, throttling is retried on the
injected clock, missing permissions stop the run with a message naming what to grant, and state
conflicts (someone changed AWS under us) make the loop observe again. Anything else is re-raised
unchanged: an unknown error must be seen, not swallowed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from botocore.exceptions import ClientError

if TYPE_CHECKING:
    from .clock import Clock

T = TypeVar("T")

CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "Unsupported",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
    }
)
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "SlowDown",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
    }
)
PERMISSION_CODES = frozenset(
    {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "AuthFailure", "InvalidClientTokenId"}
)
# Codes that mean "AWS is not in the state we observed": the loop re-observes and decides again.
CONFLICT_CODES = frozenset(
    {
        "IncorrectState",
        "IncorrectInstanceState",
        "VolumeInUse",
        "InvalidAttachment.NotFound",
        "InvalidInstanceID.NotFound",
        "InvalidInstanceId",
        "InvalidInstanceID",
        "InvalidVolume.ZoneMismatch",
        "Resource.AlreadyAssociated",
        "ConditionalCheckFailedException",
    }
)


class ControllerError(Exception):
    """Base for every error the controller raises on purpose."""


class ConfigError(ControllerError, ValueError):
    """A Lambda environment variable is missing or malformed; the message names it."""


class CapacityError(ControllerError):
    """EC2 had no capacity for one launch choice. A normal outcome: try the next choice."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class ThrottledError(ControllerError):
    """Still throttled after every retry; the next scheduled run picks the work up."""


class PermissionDeniedError(ControllerError, PermissionError):
    """The controller's role lacks a permission. Terminal until someone fixes the IAM policy."""

    def __init__(self, permission: str, message: str) -> None:
        super().__init__(f"missing permission {permission}: {message}")
        self.permission = permission


class ConflictError(ControllerError):
    """AWS rejected a step because its state moved on since we observed it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def classify(permission: str, exc: ClientError) -> Exception:
    """Map a boto3 ClientError to the controller's error classes (the original when unknown)."""
    code = error_code(exc)
    message = str(exc.response.get("Error", {}).get("Message", ""))
    if code in CAPACITY_CODES:
        return CapacityError(code, message)
    if code in PERMISSION_CODES:
        return PermissionDeniedError(permission, message)
    if code in CONFLICT_CODES:
        return ConflictError(code, message)
    if code in THROTTLING_CODES:
        return ThrottledError(f"{permission} throttled: {message}")
    return exc


def aws_call(
    clock: Clock,
    permission: str,
    fn: Callable[..., T],
    /,
    *,
    attempts: int = 5,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    **kwargs: Any,
) -> T:
    """Call one AWS API, retrying throttling with exponential backoff on the injected clock.

    `permission` is the IAM action (e.g. "ec2:RunInstances"): it names the call in errors so a
    missing grant is obvious from the message alone.
    """
    delay = base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            sorted_error = classify(permission, exc)
            if isinstance(sorted_error, ThrottledError) and attempt < attempts:
                clock.sleep(delay)
                delay = min(delay * 2, max_delay)
                continue
            if sorted_error is exc:
                raise
            raise sorted_error from exc
    raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
