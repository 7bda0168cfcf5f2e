"""Injected faults: capacity shortages for RunInstances and N-times failures of any operation."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .errors import AwsRefusal, status_for

# Launch errors a capacity rule may raise; all are documented RunInstances outcomes.
CAPACITY_CODES = frozenset(
    {"InsufficientInstanceCapacity", "SpotMaxPriceTooLow", "MaxSpotInstanceCountExceeded", "Unsupported"}
)

_THROTTLE_CODE = {"ec2": "RequestLimitExceeded", "ssm": "ThrottlingException"}


@dataclass(frozen=True)
class CapacityRule:
    instance_type: str | None
    az: str | None
    market: str | None
    code: str

    def matches(self, instance_type: str, az: str, market: str) -> bool:
        return (
            (self.instance_type is None or self.instance_type == instance_type)
            and (self.az is None or self.az == az)
            and (self.market is None or self.market == market)
        )


@dataclass
class _CallFault:
    operation: str
    service: str | None
    code: str
    message: str
    remaining: int | None  # None: fails until cleared


def _capacity_message(code: str, instance_type: str, az: str, market: str) -> str:
    if code == "InsufficientInstanceCapacity":
        return (
            f"We currently do not have sufficient {instance_type} capacity in the Availability Zone you "
            f"requested ({az}). Our system will be working on provisioning additional capacity."
        )
    if code == "SpotMaxPriceTooLow":
        return f"Your Spot request price is lower than the current Spot price for {instance_type} in {az}."
    if code == "MaxSpotInstanceCountExceeded":
        return "Max spot instance count exceeded"
    return f"Your requested instance type ({instance_type}) is not supported in your requested AZ ({az})."


class Faults:
    """Fault switchboard held by the Emulator as `emu.faults`."""

    def __init__(self) -> None:
        self._capacity: list[CapacityRule] = []
        self._calls: list[_CallFault] = []
        self._lock = threading.Lock()

    def capacity(
        self,
        instance_type: str | None = None,
        az: str | None = None,
        market: str | None = None,
        code: str = "InsufficientInstanceCapacity",
    ) -> CapacityRule:
        """Refuse launches matching type/AZ/market (None matches any) until `restore_capacity`."""
        if code not in CAPACITY_CODES:
            raise ValueError(f"capacity code must be one of {sorted(CAPACITY_CODES)}")
        if market not in (None, "spot", "on-demand"):
            raise ValueError("market must be 'spot', 'on-demand' or None")
        rule = CapacityRule(instance_type, az, market, code)
        with self._lock:
            self._capacity.append(rule)
        return rule

    def restore_capacity(self, rule: CapacityRule | None = None) -> None:
        with self._lock:
            if rule is None:
                self._capacity.clear()
            else:
                self._capacity.remove(rule)

    def fail(
        self,
        operation: str,
        code: str,
        times: int | None = 1,
        message: str | None = None,
        service: str | None = None,
    ) -> None:
        """The next `times` calls of `operation` (e.g. "AttachVolume") fail with `code`;
        times=None fails every call until `clear()`."""
        if times is not None and times < 1:
            raise ValueError("times must be positive or None")
        with self._lock:
            self._calls.append(
                _CallFault(operation, service, code, message or f"Injected fault: {code}", times)
            )

    def throttle(self, operation: str, times: int = 1, service: str = "ec2") -> None:
        """Throttle with the service's own code: RequestLimitExceeded (EC2), ThrottlingException (SSM)."""
        code = _THROTTLE_CODE[service]
        self.fail(
            operation,
            code,
            times,
            "Rate exceeded" if service == "ssm" else "Request limit exceeded.",
            service,
        )

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()
            self._capacity.clear()

    def check_call(self, service: str, operation: str) -> None:
        """Raise the first matching injected fault and use up one of its calls."""
        with self._lock:
            for fault in self._calls:
                if fault.operation != operation or fault.service not in (None, service):
                    continue
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._calls.remove(fault)
                raise AwsRefusal(fault.code, fault.message, status_for(fault.code))

    def check_capacity(self, instance_type: str, az: str, market: str) -> None:
        with self._lock:
            for rule in self._capacity:
                if rule.matches(instance_type, az, market):
                    raise AwsRefusal(rule.code, _capacity_message(rule.code, instance_type, az, market))
