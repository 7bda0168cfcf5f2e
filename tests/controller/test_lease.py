"""The DynamoDB lease: one holder at a time, takeover after expiry, renewal, polite release."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import boto3
import pytest
from moto import mock_aws

from spotforge_controller.clock import ManualClock
from spotforge_controller.config import Config
from spotforge_controller.lease import Lease
from spotforge_controller.runtime import Runtime

CONFIG = Config(
    stack_name="sf",
    launch_template_id="lt-1",
    subnets={"us-east-1a": "subnet-a"},
    data_volume_id="vol-1",
    eip_allocation_id="eipalloc-1",
    backup_bucket="bucket",
    state_table="state",
    topic_arn="arn:aws:sns:us-east-1:123456789012:t",
    lease_seconds=120,
)


@pytest.fixture
def runtime() -> Iterator[Runtime]:
    with mock_aws():
        session = boto3.Session(region_name="us-east-1")
        session.client("dynamodb").create_table(
            TableName="state",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield Runtime(
            config=CONFIG, session=session, clock=ManualClock(datetime(2026, 12, 4, 12, tzinfo=UTC))
        )


def test_second_holder_is_refused_while_the_first_holds(runtime: Runtime) -> None:
    first, second = Lease(runtime), Lease(runtime)
    assert first.acquire()
    assert not second.acquire()
    assert not second.held


def test_two_racing_holders_get_exactly_one_lease(runtime: Runtime) -> None:
    contenders = [Lease(runtime) for _ in range(5)]
    winners = [lease for lease in contenders if lease.acquire()]
    assert len(winners) == 1


def test_expired_lease_is_taken_over(runtime: Runtime) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    crashed, successor = Lease(runtime), Lease(runtime)
    assert crashed.acquire()
    clock.advance(119)
    assert not successor.acquire()
    clock.advance(2)
    assert successor.acquire()
    assert not crashed.renew(), "the crashed holder must learn it lost the lease"


def test_renewal_keeps_the_lease_past_its_first_expiry(runtime: Runtime) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    holder, other = Lease(runtime), Lease(runtime)
    assert holder.acquire()
    clock.advance(100)
    assert holder.renew()
    clock.advance(100)
    assert not other.acquire()


def test_release_frees_the_lease_at_once(runtime: Runtime) -> None:
    holder, other = Lease(runtime), Lease(runtime)
    assert holder.acquire()
    holder.release()
    assert other.acquire()


def test_release_after_a_takeover_leaves_the_new_holder_alone(runtime: Runtime) -> None:
    clock = runtime.clock
    assert isinstance(clock, ManualClock)
    old, new, third = Lease(runtime), Lease(runtime), Lease(runtime)
    assert old.acquire()
    clock.advance(121)
    assert new.acquire()
    old.held = True  # the old run still believes it holds the lease
    old.release()
    assert not third.acquire()


def test_holder_may_reacquire_its_own_lease(runtime: Runtime) -> None:
    holder = Lease(runtime)
    assert holder.acquire()
    assert holder.acquire()
