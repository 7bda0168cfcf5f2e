"""Synthesize the stack once per configuration (each synth costs seconds of jsii time)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Template

from app import build_app

PROJECT = Path(__file__).resolve().parents[2]


def default_context() -> dict[str, Any]:
    return dict(json.loads((PROJECT / "cdk.json").read_text())["context"])


class Synth:
    def __init__(self, outdir: Path, context: dict[str, Any]) -> None:
        assembly = build_app(context, outdir=str(outdir)).synth()
        self.stack_name = context.get("stackName", "spotforge")
        self.template_dict = assembly.get_stack_by_name(self.stack_name).template
        self.template = Template.from_json(self.template_dict)
        self.outdir = outdir
        self.template_path = self.outdir / f"{self.stack_name}.template.json"

    def validation_report(self) -> dict[str, Any]:
        path = self.outdir / "validation-report.json"
        return json.loads(path.read_text()) if path.exists() else {"pluginReports": []}


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Synth]:
    cache: dict[str, Synth] = {}

    def make(**overrides: Any) -> Synth:
        key = json.dumps(overrides, sort_keys=True)
        if key not in cache:
            cache[key] = Synth(tmp_path_factory.mktemp("cdk"), {**default_context(), **overrides})
        return cache[key]

    return make
