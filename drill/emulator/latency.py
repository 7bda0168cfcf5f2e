"""Latency model: how long each asynchronous AWS transition takes in the emulator.

Every figure names its row in /work/shared/research/aws-latencies.md ("3a" and so on). Rows that
the research marks UNSOURCED are labelled UNSOURCED here too, so a drill report can say which of
its numbers rest on estimates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# field name -> where the typical figure comes from
SOURCES: dict[str, str] = {
    "event_delivery": "1b UNSOURCED estimate 1-3 s (EC2 -> default bus), plus 1a P50 0.15 s to the Lambda",
    "run_to_running": "2b pending->running 16.5 s (brevdev/ec2-coldboot-research); 2f says t4g is UNSOURCED",
    "ssm_registered_after_running": "7c SSM agent registers ~30 s after a cold boot (CIROH-UA PR #111)",
    "attach": "3a 'most attach/detach operations finish within 1-4 seconds' (aws-ebs-csi-driver); 2.5 s",
    "detach": "3a same comment as attach; 2.5 s",
    "eip_move": "4a 5-6 s until traffic reaches the new instance (nginx keepalived guide); 5.5 s",
    "warning_to_action": "5a 120 s, documented (spot-instance-termination-notices)",
    "shutting_down_to_terminated": "5d ~60 s after TerminateInstances (packer-plugin-amazon #682)",
    "stopping_to_stopped": "UNSOURCED estimate: taken equal to 5d, 60 s",
    "ssm_command_delivery": "7a UNSOURCED estimate 1-3 s for a warm agent; 2 s",
    "ssm_invocation_visible": "UNSOURCED estimate 0.5 s before GetCommandInvocation stops answering "
    "InvocationDoesNotExist (7b gives no split)",
}


@dataclass(frozen=True)
class LatencyModel:
    """Seconds of virtual time for each transition; see SOURCES for each figure's origin."""

    event_delivery: float
    run_to_running: float
    ssm_registered_after_running: float
    attach: float
    detach: float
    eip_move: float
    warning_to_action: float
    shutting_down_to_terminated: float
    stopping_to_stopped: float
    ssm_command_delivery: float
    ssm_invocation_visible: float

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value < 0:
                raise ValueError(f"latency {f.name} must not be negative, got {value}")

    @classmethod
    def default(cls) -> LatencyModel:
        """Typical figures from the research table."""
        return cls(
            event_delivery=2.0,
            run_to_running=16.5,
            ssm_registered_after_running=30.0,
            attach=2.5,
            detach=2.5,
            eip_move=5.5,
            warning_to_action=120.0,
            shutting_down_to_terminated=60.0,
            stopping_to_stopped=60.0,
            ssm_command_delivery=2.0,
            ssm_invocation_visible=0.5,
        )

    @classmethod
    def instant(cls) -> LatencyModel:
        """Every transition completes at the next clock step. The two-minute warning stays 120 s
        because it is AWS's contract, not a latency; the virtual clock makes it free anyway."""
        return cls(
            event_delivery=0.0,
            run_to_running=0.0,
            ssm_registered_after_running=0.0,
            attach=0.0,
            detach=0.0,
            eip_move=0.0,
            warning_to_action=120.0,
            shutting_down_to_terminated=0.0,
            stopping_to_stopped=0.0,
            ssm_command_delivery=0.0,
            ssm_invocation_visible=0.0,
        )

    def replace(self, **changes: float) -> LatencyModel:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def sources() -> dict[str, str]:
        return dict(SOURCES)

    def is_unsourced(self, name: str) -> bool:
        return "UNSOURCED" in SOURCES[name]
