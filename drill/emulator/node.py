"""A minimal simulated node for the emulator's own tests: a folder as its disk, a set of mounted
volumes, and an agent that answers `status`. The full node that runs the real agent lives elsewhere;
it only has to offer the same duck-typed methods."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .core import Emulator


class NodeResult(tuple):
    """(exit_code, stdout, stderr, duration_seconds); duration None means the command hangs."""

    __slots__ = ()

    def __new__(cls, exit_code: int, stdout: str, stderr: str, duration: float | None) -> NodeResult:
        return super().__new__(cls, (exit_code, stdout, stderr, duration))


class SimulatedNode(Protocol):
    def run_command(self, argv: list[str]) -> tuple[int, str, str, float | None]: ...


NodeFactory = Callable[[str, "Emulator"], Any]


class DirectoryNode:
    """Disk = `root/<instance-id>`; `mount`/`unmount` are called by tests (or by attach hooks)."""

    def __init__(
        self,
        instance_id: str,
        emu: Emulator,
        root: Path,
        command_seconds: float = 0.2,
        auto_mount: bool = False,
    ) -> None:
        self.instance_id = instance_id
        self.emu = emu
        self.disk = Path(root) / instance_id
        self.disk.mkdir(parents=True, exist_ok=True)
        self.command_seconds = command_seconds
        self.auto_mount = auto_mount
        self.mounted: set[str] = set()
        self.attached: dict[str, str] = {}
        self.commands: list[list[str]] = []
        self.shut_down = False

    @classmethod
    def factory(cls, root: Path, **kwargs: Any) -> NodeFactory:
        def make(instance_id: str, emu: Emulator) -> DirectoryNode:
            return cls(instance_id, emu, root, **kwargs)

        return make

    # --- hooks the emulator calls when they exist on a node -------------------------------
    def is_mounted(self, volume_id: str) -> bool:
        return volume_id in self.mounted

    def on_volume_attached(self, volume_id: str, device: str) -> None:
        self.attached[volume_id] = device
        if self.auto_mount:
            self.mount(volume_id)

    def on_volume_detached(self, volume_id: str) -> None:
        self.attached.pop(volume_id, None)
        self.mounted.discard(volume_id)

    def on_shutdown(self) -> None:
        self.shut_down = True
        self.mounted.clear()

    # --- what a test drives ----------------------------------------------------------------
    def mount(self, volume_id: str) -> None:
        if volume_id not in self.attached:
            raise RuntimeError(f"{volume_id} is not attached to {self.instance_id}")
        self.mounted.add(volume_id)

    def unmount(self, volume_id: str) -> None:
        self.mounted.discard(volume_id)

    def run_command(self, argv: list[str]) -> tuple[int, str, str, float | None]:
        self.commands.append(list(argv))
        if argv and argv[-1] == "status":
            body = {
                "phase": "serving" if self.mounted else "standby",
                "mounted": bool(self.mounted),
                "mount": "/srv/spotforge",
                "last_backup": None,
                "instance_id": self.instance_id,
            }
            return NodeResult(0, json.dumps(body) + "\n", "", self.command_seconds)
        name = argv[0] if argv else ""
        return NodeResult(127, "", f"{name}: command not found\n", self.command_seconds)
