from __future__ import annotations

import dataclasses
import re

import pytest

from drill.emulator import SOURCES, LatencyModel


def test_every_latency_names_its_source_row_or_says_it_is_unsourced() -> None:
    names = {f.name for f in dataclasses.fields(LatencyModel)}
    assert names == set(SOURCES)
    for name, source in SOURCES.items():
        assert re.match(r"^\d[a-j] ", source) or source.startswith("UNSOURCED"), name


def test_default_figures_are_the_typical_values_of_the_research_table() -> None:
    model = LatencyModel.default()
    assert model.run_to_running == 16.5  # 2b
    assert model.warning_to_action == 120.0  # 5a
    assert model.shutting_down_to_terminated == 60.0  # 5d
    assert model.ssm_registered_after_running == 30.0  # 7c
    assert 1.0 <= model.attach <= 4.0 and 1.0 <= model.detach <= 4.0  # 3a
    assert 5.0 <= model.eip_move <= 6.0  # 4a
    assert model.is_unsourced("ssm_command_delivery") and not model.is_unsourced("attach")


def test_instant_model_has_no_latency_but_keeps_the_two_minute_warning() -> None:
    model = LatencyModel.instant()
    for f in dataclasses.fields(model):
        expected = 120.0 if f.name == "warning_to_action" else 0.0
        assert getattr(model, f.name) == expected


def test_a_negative_latency_is_refused_and_the_table_is_frozen() -> None:
    with pytest.raises(ValueError):
        LatencyModel.default().replace(attach=-1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        LatencyModel.default().attach = 1.0  # type: ignore[misc]
