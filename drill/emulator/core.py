"""The Emulator: moto in-process, made strict by botocore hooks on one boto3 Session.

How it works: every client made from `emu.session` carries three hooks.
- `before-parameter-build.<service>`: keeps a copy of the caller's API parameters in the request
  context (the before-call hook only sees the serialized query body).
- `before-call.<service>`: runs transitions now due, applies injected faults and AWS's rules. A rule
  either refuses (returns an AWS-shaped error response, so botocore raises what it raises for AWS),
  answers the call itself (asynchronous operations moto makes instant), or lets moto answer.
- `after-call.<service>`: adjusts moto's fresh objects (pending state, attaching, spot lifecycle)
  and schedules the transitions on the virtual clock.
Refusals skip botocore's retry handler, as if every retry had failed: code under test sees each
injected throttle.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shlex
import tempfile
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from moto import mock_aws
from moto.core import DEFAULT_ACCOUNT_ID

from . import events as ev
from .clock import VirtualClock
from .errors import AwsRefusal, EmulatorError, UnknownInstanceError, error_response, ok_response
from .faults import Faults
from .latency import LatencyModel
from .node import DirectoryNode, NodeFactory

DATA_ROLE_TAG = ("spotforge:role", "data")
_STATE_CODES = {
    "pending": 0,
    "running": 16,
    "shutting-down": 32,
    "terminated": 48,
    "stopping": 64,
    "stopped": 80,
}
# One loader for every emulator in the process: parsing EC2's service model costs a few hundred
# milliseconds per fresh session, which adds up over a test suite.
_SHARED_LOADER = botocore.loaders.create_loader()
_OUTPUT_LIMIT = 24000  # GetCommandInvocation truncates StandardOutputContent at 24,000 characters
_PLUGIN_OUTPUT_LIMIT = 2500  # ListCommandInvocations Details: Output is the first 2,500 characters
_USER_SHUTDOWN = ("Client.UserInitiatedShutdown", "Client.UserInitiatedShutdown: User initiated shutdown")
_SPOT_TERMINATION = (
    "Server.SpotInstanceTermination",
    "Server.SpotInstanceTermination: Spot instance termination",
)
_SPOT_SHUTDOWN = ("Server.SpotInstanceShutdown", "Server.SpotInstanceShutdown: Spot instance shutdown")


@dataclass(frozen=True)
class Violation:
    """Something the product promised never to do; scenario tests assert `emu.violations == []`."""

    time: datetime
    kind: str
    detail: str


@dataclass
class _InstanceInfo:
    instance_id: str
    market: str
    client_token: str | None
    node: Any = None
    ssm_ready: bool = False
    instance_action: dict[str, str] | None = None
    rebalance: dict[str, str] | None = None
    interruption_timer: Any = None


@dataclass
class _Invocation:
    command_id: str
    instance_id: str
    comment: str
    document_name: str
    requested: datetime
    visible_at: datetime
    argv_list: list[list[str]]
    execution_timeout: float
    status: str = "Pending"
    details: str = "Pending"
    response_code: int = -1
    stdout: str = ""
    stderr: str = ""
    started: datetime | None = None
    finished: datetime | None = None
    timers: list[Any] = field(default_factory=list)


@dataclass
class _Command:
    command_id: str
    document_name: str
    comment: str
    parameters: dict[str, list[str]]
    instance_ids: list[str]
    requested: datetime
    timeout_seconds: int
    invocations: dict[str, _Invocation]


@dataclass
class _Route:
    target: str | None
    previous: str | None
    effective_at: datetime


class Emulator:
    """See drill/emulator/__init__.py for the API and drill/README.md for the rules."""

    def __init__(
        self,
        region: str = "us-east-1",
        clock: VirtualClock | None = None,
        latency: LatencyModel | None = None,
        account_id: str = DEFAULT_ACCOUNT_ID,
        load_default_amis: bool = False,
    ) -> None:
        self.region = region
        self.load_default_amis = load_default_amis
        self.account_id = account_id
        self.clock = clock or VirtualClock()
        self.latency = latency or LatencyModel.default()
        self.faults = Faults()
        self.violations: list[Violation] = []
        self.events: list[dict[str, Any]] = []
        self.session: boto3.Session
        self._mock: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._node_factory: NodeFactory | None = None
        self._instances: dict[str, _InstanceInfo] = {}
        self._tokens: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
        self._commands: dict[str, _Command] = {}
        self._routes: dict[str, _Route] = {}
        self._detach_timers: dict[str, Any] = {}
        self._deleted_tags: dict[str, dict[str, str]] = {}
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Emulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._mock = mock_aws()
        with self._no_default_amis():
            self._mock.start()
            _ = self.ec2_backend  # built now, while the switch is set
        self._tmp = tempfile.TemporaryDirectory(prefix="spotforge-emu-")
        core_session = botocore.session.Session()
        core_session.register_component("data_loader", _SHARED_LOADER)
        self.session = boto3.Session(
            botocore_session=core_session,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            aws_session_token="testing",
        )
        events = self.session.events
        for service in ("ec2", "ssm"):
            events.register(f"before-parameter-build.{service}", self._keep_params)
            events.register(f"before-call.{service}", self._before_call)
            events.register(f"after-call.{service}", self._after_call)

    @contextlib.contextmanager
    def _no_default_amis(self) -> Any:
        """moto builds ~1,300 sample AMIs per EC2 backend (and again on reset), half a second each
        time; the product names its AMI through the launch template, so the emulator skips them."""
        if self.load_default_amis:
            yield
            return
        saved = os.environ.get("MOTO_EC2_LOAD_DEFAULT_AMIS")
        os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = "false"
        try:
            yield
        finally:
            if saved is None:
                del os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"]
            else:
                os.environ["MOTO_EC2_LOAD_DEFAULT_AMIS"] = saved

    def stop(self) -> None:
        if self._mock is not None:
            with self._no_default_amis():
                self._mock.stop()
            self._mock = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------------ public helpers
    @property
    def ec2_backend(self) -> Any:
        from moto.ec2.models import ec2_backends

        return ec2_backends[self.account_id][self.region]

    def set_node_factory(self, factory: NodeFactory) -> None:
        self._node_factory = factory

    def node(self, instance_id: str) -> Any:
        return self._info(instance_id).node

    def market_of(self, instance_id: str) -> str:
        return self._info(instance_id).market

    def drain_events(self) -> list[dict[str, Any]]:
        with self._lock:
            out = list(self.events)
            self.events.clear()  # in place: callers may hold a reference to emu.events
            return out

    def record_violation(self, kind: str, detail: str) -> None:
        """Also for simulated nodes: e.g. formatting a volume that already has a filesystem."""
        self.violations.append(Violation(self.clock.now(), kind, detail))

    def imds_instance_action(self, instance_id: str) -> dict[str, str] | None:
        """IMDS spot/instance-action document, or None where IMDS answers 404."""
        doc = self._info(instance_id).instance_action
        return dict(doc) if doc else None

    def imds_rebalance(self, instance_id: str) -> dict[str, str] | None:
        doc = self._info(instance_id).rebalance
        return dict(doc) if doc else None

    def address_target(self, public_ip: str) -> str | None:
        """The instance the network delivers `public_ip` traffic to right now."""
        self.clock.run_due()
        route = self._routes.get(public_ip)
        if route is None:
            return None
        target = route.target if self.clock.now() >= route.effective_at else route.previous
        if target is None or self._state(target) != "running":
            return None
        return target

    def interrupt(self, instance_id: str, action: str = "terminate") -> dict[str, Any]:
        """Spot interruption as AWS (and FIS) does it: rebalance + warning now, action 120 s later."""
        if action not in ("terminate", "stop", "hibernate"):
            raise EmulatorError(f"unknown instance-action {action!r}")
        info = self._info(instance_id)
        if info.market != "spot":
            raise EmulatorError(f"{instance_id} is not a spot instance")
        if self._state(instance_id) != "running":
            raise EmulatorError(f"{instance_id} is not running")
        now = self.clock.now()
        action_time = now + timedelta(seconds=self.latency.warning_to_action)
        info.rebalance = {"noticeTime": ev.iso(now)}
        info.instance_action = {"action": action, "time": ev.iso(action_time)}
        self._emit(ev.rebalance_recommendation(self.account_id, self.region, now, instance_id))
        warning = ev.interruption_warning(self.account_id, self.region, now, instance_id, action)
        self._emit(warning)

        def act() -> None:
            if self._state(instance_id) != "running":
                return
            if action == "terminate":
                self._begin_termination(instance_id, _SPOT_TERMINATION)
            else:
                self._begin_stop(instance_id, _SPOT_SHUTDOWN)

        info.interruption_timer = self.clock.call_at(action_time, act, f"spot {action} {instance_id}")
        return copy.deepcopy(warning)

    def lose(self, instance_id: str) -> None:
        """Unwarned spot reclaim: shutting-down at once, no warning, no IMDS notice."""
        self._info(instance_id)
        if self._state(instance_id) in ("shutting-down", "terminated"):
            return
        self._begin_termination(instance_id, _SPOT_TERMINATION)

    # ------------------------------------------------------------------ hook plumbing
    def _keep_params(self, params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["spotforge_params"] = copy.deepcopy(params)

    def _before_call(self, model: Any, context: dict[str, Any], **_: Any) -> Any:
        service = model.service_model.endpoint_prefix
        op = model.name
        params = context.get("spotforge_params", {})
        self.clock.run_due()
        try:
            self.faults.check_call(service, op)
            rule = self._BEFORE.get((service, op))
            if rule is None or params.get("DryRun"):
                # moto answers DryRun itself (DryRunOperation); the rules must not act on it.
                return None
            body = rule(self, params)
        except AwsRefusal as refusal:
            return error_response(refusal)
        except Exception as exc:  # moto's own refusals raised while a rule read its backend
            translated = _from_moto(exc)
            if translated is None:
                raise
            return error_response(translated)
        if body is None:
            return None
        context["spotforge_answered"] = True
        return ok_response(body)

    def _after_call(
        self, model: Any, parsed: dict[str, Any], http_response: Any, context: dict[str, Any], **_: Any
    ) -> None:
        params = context.get("spotforge_params", {})
        if http_response.status_code >= 300 or context.get("spotforge_answered") or params.get("DryRun"):
            return
        service = model.service_model.endpoint_prefix
        rule = self._AFTER.get((service, model.name))
        if rule is not None:
            rule(self, params, parsed)

    def _emit(self, event: dict[str, Any]) -> None:
        """Events reach `emu.events` after the model's delivery latency, stamped with the time the
        change happened (EventBridge's `time` is the source time, not the delivery time)."""

        def deliver() -> None:
            with self._lock:
                self.events.append(event)

        self.clock.call_later(self.latency.event_delivery, deliver, f"deliver {event['detail-type']}")

    # ------------------------------------------------------------------ lookups
    def _info(self, instance_id: str) -> _InstanceInfo:
        try:
            return self._instances[instance_id]
        except KeyError:
            raise UnknownInstanceError(instance_id) from None

    def _instance(self, instance_id: str) -> Any:
        for reservation in self.ec2_backend.reservations.values():
            for instance in reservation.instances:
                if instance.id == instance_id:
                    return instance
        return None

    def _require_instance(self, instance_id: str) -> Any:
        instance = self._instance(instance_id)
        if instance is None:
            raise AwsRefusal("InvalidInstanceID.NotFound", f"The instance ID '{instance_id}' does not exist")
        return instance

    def _require_volume(self, volume_id: str) -> Any:
        volume = self.ec2_backend.volumes.get(volume_id)
        if volume is None:
            raise AwsRefusal("InvalidVolume.NotFound", f"The volume '{volume_id}' does not exist.")
        return volume

    def _state(self, instance_id: str) -> str:
        instance = self._instance(instance_id)
        return instance._state.name if instance is not None else "terminated"

    def _set_state(self, instance: Any, state: str) -> None:
        instance._state.name = state
        instance._state.code = _STATE_CODES[state]
        self._emit(ev.state_change(self.account_id, self.region, self.clock.now(), instance.id, state))

    def _node_call(self, instance_id: str, method: str, *args: Any) -> Any:
        info = self._instances.get(instance_id)
        node = info.node if info else None
        fn = getattr(node, method, None)
        return fn(*args) if callable(fn) else None

    # ------------------------------------------------------------------ EC2: RunInstances
    def _launch_spec(self, params: dict[str, Any]) -> tuple[str, str, str]:
        """(instance type, AZ, market) the launch would use, template values included."""
        template: dict[str, Any] = {}
        spec = params.get("LaunchTemplate")
        if spec:
            try:
                template = self.ec2_backend._get_template_from_args(spec).data
            except IndexError:  # moto indexes an empty lookup result
                if "LaunchTemplateId" in spec:
                    raise AwsRefusal(
                        "InvalidLaunchTemplateId.NotFound",
                        f"The specified launch template, with template ID {spec['LaunchTemplateId']}, "
                        "does not exist.",
                    ) from None
                raise AwsRefusal(
                    "InvalidLaunchTemplateName.NotFoundException",
                    f"The specified launch template, with template name {spec.get('LaunchTemplateName')}, "
                    "does not exist.",
                ) from None
        instance_type = params.get("InstanceType") or template.get("InstanceType") or "m1.small"
        market_opts = params.get("InstanceMarketOptions") or template.get("InstanceMarketOptions") or {}
        market = "spot" if market_opts.get("MarketType") == "spot" else "on-demand"
        subnet_id = params.get("SubnetId")
        for nic in params.get("NetworkInterfaces") or template.get("NetworkInterfaces") or []:
            subnet_id = subnet_id or nic.get("SubnetId")
        az = (params.get("Placement") or {}).get("AvailabilityZone") or (template.get("Placement") or {}).get(
            "AvailabilityZone"
        )
        if subnet_id:
            az = self.ec2_backend.get_subnet(subnet_id).availability_zone
        return instance_type, az or f"{self.region}a", market

    def _before_run_instances(self, params: dict[str, Any]) -> dict[str, Any] | None:
        token = params.get("ClientToken")
        if token and token in self._tokens:
            first_params, first_response = self._tokens[token]
            if first_params != params:
                raise AwsRefusal(
                    "IdempotentParameterMismatch",
                    "The client token you have provided is associated with a resource that is already "
                    "deleted or the request parameters differ from the original request.",
                )
            # AWS answers a repeated token with the original launch and starts nothing new.
            body = copy.deepcopy(first_response)
            body.pop("ResponseMetadata", None)
            return body
        instance_type, az, market = self._launch_spec(params)
        self.faults.check_capacity(instance_type, az, market)
        return None

    def _after_run_instances(self, params: dict[str, Any], parsed: dict[str, Any]) -> None:
        _, _, market = self._launch_spec(params)
        token = params.get("ClientToken")
        for item in parsed.get("Instances", []):
            instance = self._instance(item["InstanceId"])
            instance.launch_time = self.clock.now().replace(tzinfo=None)
            if market == "spot":
                instance.lifecycle = "spot"
                item["InstanceLifecycle"] = "spot"
            item["State"] = {"Code": 0, "Name": "pending"}
            self._instances[instance.id] = _InstanceInfo(instance.id, market, token)
            self._set_state(instance, "pending")
            self.clock.call_later(
                self.latency.run_to_running,
                lambda i=instance.id: self._become_running(i),
                f"running {instance.id}",
            )
        if token:
            self._tokens[token] = (copy.deepcopy(params), copy.deepcopy(parsed))

    def _become_running(self, instance_id: str) -> None:
        instance = self._instance(instance_id)
        if instance is None or instance._state.name != "pending":
            return
        self._set_state(instance, "running")
        info = self._info(instance_id)
        if info.node is None:  # a restarted instance keeps its node (and its disk)
            factory = self._node_factory or DirectoryNode.factory(Path(self._tmp.name) / "nodes")  # type: ignore[union-attr]
            info.node = factory(instance_id, self)
        else:
            self._node_call(instance_id, "on_boot")

        def register() -> None:
            if self._state(instance_id) == "running":
                info.ssm_ready = True

        self.clock.call_later(self.latency.ssm_registered_after_running, register, f"ssm agent {instance_id}")

    # ------------------------------------------------------------------ EC2: termination and stop
    def _before_terminate_instances(self, params: dict[str, Any]) -> dict[str, Any]:
        ids = params.get("InstanceIds", [])
        instances = [self._require_instance(i) for i in ids]
        result = []
        for instance in instances:
            previous = instance._state.name
            if previous not in ("shutting-down", "terminated"):
                self._begin_termination(instance.id, _USER_SHUTDOWN)
            result.append(_state_change(instance, previous))
        return {"TerminatingInstances": result}

    def _before_stop_instances(self, params: dict[str, Any]) -> dict[str, Any]:
        instances = [self._require_instance(i) for i in params.get("InstanceIds", [])]
        result = []
        for instance in instances:
            previous = instance._state.name
            if previous in ("shutting-down", "terminated"):
                raise AwsRefusal(
                    "IncorrectInstanceState",
                    f"This instance '{instance.id}' is not in a state from which it can be stopped.",
                )
            if previous in ("pending", "running"):
                self._begin_stop(instance.id, _USER_SHUTDOWN)
            result.append(_state_change(instance, previous))
        return {"StoppingInstances": result}

    def _before_start_instances(self, params: dict[str, Any]) -> dict[str, Any]:
        instances = [self._require_instance(i) for i in params.get("InstanceIds", [])]
        for instance in instances:
            if instance._state.name not in ("stopped", "pending", "running"):
                raise AwsRefusal(
                    "IncorrectInstanceState",
                    f"The instance '{instance.id}' is not in a state from which it can be started.",
                )
        result = []
        for instance in instances:
            previous = instance._state.name
            if previous == "stopped":
                from moto.ec2.models.instances import StateReason

                instance.state_reason = StateReason()
                instance._reason = ""
                self._set_state(instance, "pending")
                self.clock.call_later(
                    self.latency.run_to_running,
                    lambda i=instance.id: self._become_running(i),
                    f"running {instance.id}",
                )
            result.append(_state_change(instance, previous))
        return {"StartingInstances": result}

    def _set_reason(self, instance: Any, reason: tuple[str, str]) -> None:
        from moto.ec2.models.instances import StateReason

        instance.state_reason = StateReason(reason[1], reason[0])
        who = "User" if reason[0].startswith("Client.") else "Service"
        instance._reason = f"{who} initiated ({self.clock.now().strftime('%Y-%m-%d %H:%M:%S GMT')})"

    def _attachments_of(self, instance_id: str) -> list[Any]:
        return [
            v.attachment
            for v in self.ec2_backend.volumes.values()
            if v.attachment is not None and v.attachment.instance.id == instance_id
        ]

    def _shutdown_node(self, instance_id: str) -> None:
        info = self._instances.get(instance_id)
        if info is not None:
            info.ssm_ready = False
        self._node_call(instance_id, "on_shutdown")
        for command in self._commands.values():
            inv = command.invocations.get(instance_id)
            if inv is not None and inv.status in ("Pending", "InProgress", "Delayed"):
                self._finish_invocation(inv, "Failed", "Failed", -1, inv.stdout, inv.stderr)

    def _begin_termination(self, instance_id: str, reason: tuple[str, str]) -> None:
        instance = self._instance(instance_id)
        if instance._state.name in ("shutting-down", "terminated"):
            return
        info = self._instances.get(instance_id)
        if info and info.interruption_timer is not None:
            info.interruption_timer.cancel()
        self._set_reason(instance, reason)
        self._set_state(instance, "shutting-down")
        self._shutdown_node(instance_id)
        for attachment in self._attachments_of(instance_id):
            attachment.status = "detaching"

        def finish() -> None:
            released = [a.volume.id for a in self._attachments_of(instance_id)]
            # moto's terminate detaches every volume and deletes the DeleteOnTermination ones.
            self.ec2_backend.terminate_instances([instance_id])
            for volume_id in released:
                timer = self._detach_timers.pop(volume_id, None)
                if timer is not None:
                    timer.cancel()
                self._node_call(instance_id, "on_volume_detached", volume_id)
            self._set_reason(instance, reason)
            for address in self.ec2_backend.addresses:
                if address.instance is not None and address.instance.id == instance_id:
                    address.instance = None
                    address.eni = None
                    address.association_id = None
            self._set_state(instance, "terminated")

        self.clock.call_later(self.latency.shutting_down_to_terminated, finish, f"terminated {instance_id}")

    def _begin_stop(self, instance_id: str, reason: tuple[str, str]) -> None:
        instance = self._instance(instance_id)
        self._set_reason(instance, reason)
        self._set_state(instance, "stopping")
        self._shutdown_node(instance_id)

        def finish() -> None:
            if instance._state.name != "stopping":
                return
            self._set_state(instance, "stopped")
            self._set_reason(instance, reason)

        self.clock.call_later(self.latency.stopping_to_stopped, finish, f"stopped {instance_id}")

    # ------------------------------------------------------------------ EC2: volumes
    def _before_attach_volume(self, params: dict[str, Any]) -> None:
        volume = self._require_volume(params["VolumeId"])
        instance = self._require_instance(params["InstanceId"])
        if volume.attachment is not None:
            if volume.attachment.status == "detaching":
                raise AwsRefusal("IncorrectState", f"Volume '{volume.id}' is in the 'detaching' state.")
            raise AwsRefusal(
                "VolumeInUse",
                f"{volume.id} is already attached to an instance ({volume.attachment.instance.id})",
            )
        if instance._state.name not in ("running", "stopped"):
            raise AwsRefusal("IncorrectState", f"Instance '{instance.id}' is not 'running'.")
        if volume.zone.name != instance.placement.zone:
            raise AwsRefusal(
                "InvalidVolume.ZoneMismatch",
                f"The volume '{volume.id}' is not in the same availability zone as instance '{instance.id}'",
            )
        device = params.get("Device")
        if device in instance.block_device_mapping:
            raise AwsRefusal(
                "InvalidParameterValue",
                f"Invalid value '{device}' for unixDevice. Attachment point {device} is already in use",
            )
        return None

    def _after_attach_volume(self, params: dict[str, Any], parsed: dict[str, Any]) -> None:
        volume = self.ec2_backend.volumes[params["VolumeId"]]
        attachment = volume.attachment
        attachment.status = "attaching"
        attachment.attach_time = self.clock.now().replace(tzinfo=None)
        instance_id = attachment.instance.id

        def attached() -> None:
            if volume.attachment is attachment and attachment.status == "attaching":
                attachment.status = "attached"
                self._node_call(instance_id, "on_volume_attached", volume.id, attachment.device)

        self.clock.call_later(self.latency.attach, attached, f"attached {volume.id}")

    def _before_detach_volume(self, params: dict[str, Any]) -> dict[str, Any]:
        volume = self._require_volume(params["VolumeId"])
        attachment = volume.attachment
        if attachment is None:
            raise AwsRefusal("IncorrectState", f"Volume '{volume.id}' is in the 'available' state.")
        instance_id = attachment.instance.id
        if params.get("InstanceId") and params["InstanceId"] != instance_id:
            raise AwsRefusal(
                "InvalidAttachment.NotFound",
                f"Volume '{volume.id}' can not be detached from instance '{params['InstanceId']}' "
                "because it is not attached to it.",
            )
        force = bool(params.get("Force"))
        body = {
            "VolumeId": volume.id,
            "InstanceId": instance_id,
            "Device": attachment.device,
            "State": "detaching",
            "AttachTime": attachment.attach_time.replace(tzinfo=UTC),
        }
        live = self._state(instance_id) in ("running", "pending", "stopping")
        if force and live and self._node_call(instance_id, "is_mounted", volume.id):
            self.record_violation(
                "force-detach-mounted",
                f"{volume.id} force-detached from {instance_id} while the node still had it mounted",
            )
        if attachment.status == "detaching" and not force:
            return body  # already on its way; repeating the call changes nothing
        attachment.status = "detaching"
        old = self._detach_timers.pop(volume.id, None)
        if old is not None:
            old.cancel()

        def try_finish() -> None:
            if volume.attachment is not attachment:
                return
            still_live = self._state(instance_id) in ("running", "pending", "stopping")
            if not force and still_live and self._node_call(instance_id, "is_mounted", volume.id):
                # A mounted volume stays 'detaching' (busy) until the node lets go of it (3e).
                self._detach_timers[volume.id] = self.clock.call_later(1.0, try_finish, f"busy {volume.id}")
                return
            self._complete_detach(volume.id)

        self._detach_timers[volume.id] = self.clock.call_later(
            self.latency.detach, try_finish, f"detach {volume.id}"
        )
        return body

    def _complete_detach(self, volume_id: str) -> None:
        volume = self.ec2_backend.volumes.get(volume_id)
        if volume is None or volume.attachment is None:
            return
        attachment = volume.attachment
        timer = self._detach_timers.pop(volume_id, None)
        if timer is not None:
            timer.cancel()
        self.ec2_backend.detach_volume(volume_id, attachment.instance.id, attachment.device)
        self._node_call(attachment.instance.id, "on_volume_detached", volume_id)

    def _before_delete_volume(self, params: dict[str, Any]) -> None:
        volume = self._require_volume(params["VolumeId"])
        if volume.attachment is not None:
            raise AwsRefusal(
                "VolumeInUse", f"Volume {volume.id} is currently attached to {volume.attachment.instance.id}"
            )
        return None

    def _after_delete_volume(self, params: dict[str, Any], parsed: dict[str, Any]) -> None:
        tags = self._deleted_tags.pop(params["VolumeId"], {})
        if tags.get(DATA_ROLE_TAG[0]) == DATA_ROLE_TAG[1]:
            self.record_violation("data-volume-deleted", f"data volume {params['VolumeId']} was deleted")

    # ------------------------------------------------------------------ EC2: Elastic IP
    def _before_associate_address(self, params: dict[str, Any]) -> None:
        instance_id = params.get("InstanceId")
        if instance_id:
            instance = self._require_instance(instance_id)
            if instance._state.name not in ("running", "stopped"):
                raise AwsRefusal(
                    "IncorrectInstanceState",
                    f"The {instance._state.name} instance '{instance_id}' is not in a valid state for this operation.",
                )
        return None

    def _after_associate_address(self, params: dict[str, Any], parsed: dict[str, Any]) -> None:
        backend = self.ec2_backend
        if params.get("AllocationId"):
            address = backend.address_by_allocation([params["AllocationId"]])[0]
        else:
            address = backend.address_by_ip([params["PublicIp"]])[0]
        new_target = address.instance.id if address.instance is not None else None
        current = self._routes.get(address.public_ip)
        previous = None
        if current is not None:
            previous = current.target if self.clock.now() >= current.effective_at else current.previous
        if previous == new_target:
            self._routes[address.public_ip] = _Route(new_target, previous, self.clock.now())
            return
        effective = self.clock.now() + timedelta(seconds=self.latency.eip_move)
        self._routes[address.public_ip] = _Route(new_target, previous, effective)

    def _before_disassociate_address(self, params: dict[str, Any]) -> None:
        backend = self.ec2_backend
        for address in backend.addresses:
            if (params.get("AssociationId") and address.association_id == params["AssociationId"]) or (
                params.get("PublicIp") and address.public_ip == params["PublicIp"]
            ):
                self._routes[address.public_ip] = _Route(None, None, self.clock.now())
        return None

    # ------------------------------------------------------------------ SSM Run Command
    def _ssm_ready(self, instance_id: str) -> bool:
        info = self._instances.get(instance_id)
        return bool(info and info.ssm_ready and self._state(instance_id) == "running")

    def _before_send_command(self, params: dict[str, Any]) -> dict[str, Any]:
        document = params.get("DocumentName", "")
        if document != "AWS-RunShellScript":
            raise AwsRefusal("InvalidDocument", f"Document {document} is not supported by the emulator")
        instance_ids = list(params.get("InstanceIds") or [])
        if not instance_ids:
            raise AwsRefusal("InvalidParameters", "InstanceIds is required (Targets is not emulated)")
        bad = [i for i in instance_ids if not self._ssm_ready(i)]
        if bad:
            listed = ", ".join(bad)
            raise AwsRefusal(
                "InvalidInstanceId",
                f"Instances [[{listed}]] not in a valid state for account {self.account_id}",
            )
        parameters = params.get("Parameters") or {}
        lines = [c for c in parameters.get("commands", []) if c.strip()]
        if not lines:
            raise AwsRefusal("InvalidParameters", 'Parameter "commands" is required')
        timeout = float((parameters.get("executionTimeout") or ["3600"])[0])
        argv_list = [shlex.split(line) for line in lines]
        now = self.clock.now()
        command_id = str(uuid.uuid4())
        comment = params.get("Comment", "")
        command = _Command(
            command_id,
            document,
            comment,
            parameters,
            instance_ids,
            now,
            int(params.get("TimeoutSeconds", 3600)),
            {},
        )
        for instance_id in instance_ids:
            inv = _Invocation(
                command_id,
                instance_id,
                comment,
                document,
                now,
                now + timedelta(seconds=self.latency.ssm_invocation_visible),
                argv_list,
                timeout,
            )
            command.invocations[instance_id] = inv
            inv.timers.append(
                self.clock.call_later(
                    self.latency.ssm_command_delivery,
                    lambda inv=inv: self._start_invocation(inv),
                    f"ssm deliver {command_id} {instance_id}",
                )
            )
        self._commands[command_id] = command
        return {"Command": self._command_body(command)}

    def _start_invocation(self, inv: _Invocation) -> None:
        if inv.status != "Pending":
            return
        if not self._ssm_ready(inv.instance_id):
            self._finish_invocation(inv, "Failed", "Undeliverable", -1, "", "")
            return
        node = self._instances[inv.instance_id].node
        inv.status, inv.details, inv.started = "InProgress", "InProgress", self.clock.now()
        exit_code, stdout, stderr, total = 0, "", "", 0.0
        hung = False
        for argv in inv.argv_list:
            code, out, err, seconds = node.run_command(argv)
            stdout += out
            stderr += err
            exit_code = code
            if seconds is None:
                hung = True
                break
            total += seconds
        if hung or total > inv.execution_timeout:
            inv.timers.append(
                self.clock.call_later(
                    inv.execution_timeout,
                    lambda: self._finish_invocation(inv, "TimedOut", "ExecutionTimedOut", -1, stdout, stderr),
                    f"ssm timeout {inv.command_id}",
                )
            )
            return
        status = "Success" if exit_code == 0 else "Failed"
        inv.timers.append(
            self.clock.call_later(
                total,
                lambda: self._finish_invocation(inv, status, status, exit_code, stdout, stderr),
                f"ssm done {inv.command_id}",
            )
        )

    def _finish_invocation(
        self, inv: _Invocation, status: str, details: str, code: int, out: str, err: str
    ) -> None:
        if inv.status not in ("Pending", "InProgress", "Delayed"):
            return
        for timer in inv.timers:
            timer.cancel()
        inv.status, inv.details, inv.response_code = status, details, code
        inv.stdout, inv.stderr, inv.finished = out, err, self.clock.now()

    def _find_invocation(self, command_id: str, instance_id: str) -> _Invocation:
        command = self._commands.get(command_id)
        inv = command.invocations.get(instance_id) if command else None
        if inv is None or self.clock.now() < inv.visible_at:
            # AWS sends this code with an empty message, also for an unknown command id.
            raise AwsRefusal("InvocationDoesNotExist", "")
        return inv

    def _before_get_command_invocation(self, params: dict[str, Any]) -> dict[str, Any]:
        inv = self._find_invocation(params["CommandId"], params["InstanceId"])
        elapsed = (inv.finished or self.clock.now()) - inv.started if inv.started else timedelta()
        return {
            "CommandId": inv.command_id,
            "InstanceId": inv.instance_id,
            "Comment": inv.comment,
            "DocumentName": inv.document_name,
            "DocumentVersion": "$DEFAULT",
            "PluginName": "aws:runShellScript",
            "ResponseCode": inv.response_code,
            "ExecutionStartDateTime": _ssm_time(inv.started),
            "ExecutionElapsedTime": _elapsed(elapsed),
            "ExecutionEndDateTime": _ssm_time(inv.finished),
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputContent": inv.stdout[:_OUTPUT_LIMIT],
            "StandardOutputUrl": "",
            "StandardErrorContent": inv.stderr[:_OUTPUT_LIMIT],
            "StandardErrorUrl": "",
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }

    def _invocation_item(self, inv: _Invocation, details: bool) -> dict[str, Any]:
        item: dict[str, Any] = {
            "CommandId": inv.command_id,
            "InstanceId": inv.instance_id,
            "InstanceName": "",
            "Comment": inv.comment,
            "DocumentName": inv.document_name,
            "DocumentVersion": "$DEFAULT",
            "RequestedDateTime": inv.requested,
            "Status": inv.status,
            "StatusDetails": inv.details,
            "StandardOutputUrl": "",
            "StandardErrorUrl": "",
            "CommandPlugins": [],
            "ServiceRole": "",
            "NotificationConfig": {},
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
        }
        if details:
            plugin: dict[str, Any] = {
                "Name": "aws:runShellScript",
                "Status": inv.status,
                "StatusDetails": inv.details,
                "ResponseCode": inv.response_code,
                "Output": (inv.stdout + inv.stderr)[:_PLUGIN_OUTPUT_LIMIT],
                "StandardOutputUrl": "",
                "StandardErrorUrl": "",
            }
            if inv.started:
                plugin["ResponseStartDateTime"] = inv.started
            if inv.finished:
                plugin["ResponseFinishDateTime"] = inv.finished
            item["CommandPlugins"] = [plugin]
        return item

    def _before_list_command_invocations(self, params: dict[str, Any]) -> dict[str, Any]:
        now = self.clock.now()
        items = []
        for command in self._commands.values():
            if params.get("CommandId") and command.command_id != params["CommandId"]:
                continue
            for inv in command.invocations.values():
                if params.get("InstanceId") and inv.instance_id != params["InstanceId"]:
                    continue
                if now >= inv.visible_at:
                    items.append(self._invocation_item(inv, bool(params.get("Details"))))
        return {"CommandInvocations": items}

    def _command_body(self, command: _Command) -> dict[str, Any]:
        invs = list(command.invocations.values())
        statuses = {i.status for i in invs}
        done = [i for i in invs if i.status not in ("Pending", "InProgress", "Delayed")]
        if len(done) < len(invs):
            status = "InProgress" if any(i.status != "Pending" for i in invs) else "Pending"
        elif statuses == {"Success"}:
            status = "Success"
        elif len(statuses) == 1:
            status = statuses.pop()
        else:
            status = "Failed"
        return {
            "CommandId": command.command_id,
            "DocumentName": command.document_name,
            "DocumentVersion": "$DEFAULT",
            "Comment": command.comment,
            "ExpiresAfter": command.requested + timedelta(seconds=command.timeout_seconds),
            "Parameters": command.parameters,
            "InstanceIds": command.instance_ids,
            "Targets": [],
            "RequestedDateTime": command.requested,
            "Status": status,
            "StatusDetails": status,
            "MaxConcurrency": "50",
            "MaxErrors": "0",
            "TargetCount": len(invs),
            "CompletedCount": len(done),
            "ErrorCount": sum(1 for i in done if i.status != "Success"),
            "DeliveryTimedOutCount": 0,
            "ServiceRole": "",
            "NotificationConfig": {},
            "CloudWatchOutputConfig": {"CloudWatchLogGroupName": "", "CloudWatchOutputEnabled": False},
            "TimeoutSeconds": command.timeout_seconds,
        }

    def _before_list_commands(self, params: dict[str, Any]) -> dict[str, Any]:
        commands = [
            c
            for c in self._commands.values()
            if (not params.get("CommandId") or c.command_id == params["CommandId"])
            and (not params.get("InstanceId") or params["InstanceId"] in c.invocations)
        ]
        return {"Commands": [self._command_body(c) for c in commands]}

    def _before_delete_volume_wrapper(self, params: dict[str, Any]) -> None:
        # Remember the tags now: after a successful delete moto no longer knows them.
        volume = self._require_volume(params["VolumeId"])
        self._deleted_tags[volume.id] = {t["key"]: t["value"] for t in volume.get_tags()}
        return self._before_delete_volume(params)

    _BEFORE: dict[tuple[str, str], Callable[[Emulator, dict[str, Any]], dict[str, Any] | None]] = {}
    _AFTER: dict[tuple[str, str], Callable[[Emulator, dict[str, Any], dict[str, Any]], None]] = {}


def _from_moto(exc: Exception) -> AwsRefusal | None:
    """moto backend errors (InvalidSubnetID.NotFound, a missing launch template ...) carry AWS's
    code; answer with it instead of leaking a moto exception to the caller."""
    message = getattr(exc, "message", None)
    # Older-style moto errors: error_type is AWS's code and code the HTTP status.
    code = getattr(exc, "error_type", None)
    status = getattr(exc, "code", 400)
    if code is None:  # ServiceException: code is AWS's code
        code, status = getattr(exc, "code", None), 400
    if isinstance(code, str) and isinstance(message, str):
        return AwsRefusal(code, message, status if isinstance(status, int) else 400)
    return None


def _ssm_time(when: datetime | None) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z" if when else ""


def _elapsed(delta: timedelta) -> str:
    return f"PT{delta.total_seconds():.3f}S"


Emulator._BEFORE = {
    ("ec2", "RunInstances"): Emulator._before_run_instances,
    ("ec2", "TerminateInstances"): Emulator._before_terminate_instances,
    ("ec2", "StopInstances"): Emulator._before_stop_instances,
    ("ec2", "StartInstances"): Emulator._before_start_instances,
    ("ec2", "AttachVolume"): Emulator._before_attach_volume,
    ("ec2", "DetachVolume"): Emulator._before_detach_volume,
    ("ec2", "DeleteVolume"): Emulator._before_delete_volume_wrapper,
    ("ec2", "AssociateAddress"): Emulator._before_associate_address,
    ("ec2", "DisassociateAddress"): Emulator._before_disassociate_address,
    ("ssm", "SendCommand"): Emulator._before_send_command,
    ("ssm", "GetCommandInvocation"): Emulator._before_get_command_invocation,
    ("ssm", "ListCommandInvocations"): Emulator._before_list_command_invocations,
    ("ssm", "ListCommands"): Emulator._before_list_commands,
}
Emulator._AFTER = {
    ("ec2", "RunInstances"): Emulator._after_run_instances,
    ("ec2", "AttachVolume"): Emulator._after_attach_volume,
    ("ec2", "DeleteVolume"): Emulator._after_delete_volume,
    ("ec2", "AssociateAddress"): Emulator._after_associate_address,
}


def _state_change(instance: Any, previous: str) -> dict[str, Any]:
    """One entry of a Terminate/Stop/StartInstances reply, as EC2 shapes it."""
    return {
        "InstanceId": instance.id,
        "CurrentState": {"Code": instance._state.code, "Name": instance._state.name},
        "PreviousState": {"Code": _STATE_CODES[previous], "Name": previous},
    }
