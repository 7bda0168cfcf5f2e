"""One controller at a time: a lease item in DynamoDB, taken and renewed by conditional writes.

Lambda reserved concurrency would do the same job but fails to deploy on accounts whose
concurrency quota is 10, so the lease is the lock. Expiry lets a new run take over from one that
crashed without releasing.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field

from .errors import ConflictError, aws_call
from .runtime import Runtime

LEASE_KEY = "lease"


@dataclass
class Lease:
    runtime: Runtime
    holder: str = field(default_factory=lambda: f"run-{uuid.uuid4()}")
    held: bool = False

    def _write(self, condition: str, *, with_now: bool) -> bool:
        now = self.runtime.clock.now().timestamp()
        values = {":me": {"S": self.holder}}
        if with_now:
            values[":now"] = {"N": repr(round(now, 3))}
        expires = now + self.runtime.config.lease_seconds
        try:
            aws_call(
                self.runtime.clock,
                "dynamodb:PutItem",
                self.runtime.dynamodb.put_item,
                TableName=self.runtime.config.state_table,
                Item={
                    "pk": {"S": LEASE_KEY},
                    "holder": {"S": self.holder},
                    "expires_at": {"N": repr(round(expires, 3))},
                },
                ConditionExpression=condition,
                ExpressionAttributeValues=values,
            )
        except ConflictError:
            return False
        return True

    def acquire(self) -> bool:
        """Take the lease if it is free, expired, or already ours."""
        self.held = self._write(
            "attribute_not_exists(pk) OR expires_at < :now OR holder = :me", with_now=True
        )
        return self.held

    def renew(self) -> bool:
        """Push the expiry forward; False when someone took over (we must stop acting)."""
        self.held = self._write("holder = :me", with_now=False)
        return self.held

    def release(self) -> None:
        if not self.held:
            return
        # A ConflictError means it expired and someone else holds it now: theirs to release.
        with contextlib.suppress(ConflictError):
            aws_call(
                self.runtime.clock,
                "dynamodb:DeleteItem",
                self.runtime.dynamodb.delete_item,
                TableName=self.runtime.config.state_table,
                Key={"pk": {"S": LEASE_KEY}},
                ConditionExpression="holder = :me",
                ExpressionAttributeValues={":me": {"S": self.holder}},
            )
        self.held = False
