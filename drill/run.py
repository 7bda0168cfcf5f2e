"""The drill's command line: `python -m drill [--scenario warned|unwarned|all] [--seed N] [--json]`.

Runs the scenarios of drill/scenarios.py against the emulated region, prints the recovery
timeline, the measured downtime, RPO and the invariant checks, and exits non-zero when an
invariant fails or a budget is missed. Only loopback is touched; credentials are fake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TextIO

# Fake credentials before boto3 is imported anywhere: nothing here may find real ones.
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
SCENARIOS = ("warned", "unwarned")
EXIT_FAILED = 1
EXIT_ERROR = 2


def _isolate_from_aws() -> None:
    for key, value in _FAKE_AWS.items():
        os.environ[key] = value
    for key in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL"):
        os.environ.pop(key, None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m drill", description="Offline spot-interruption drill against an emulated AWS region."
    )
    parser.add_argument("--scenario", choices=(*SCENARIOS, "all"), default="all")
    parser.add_argument("--seed", type=int, default=0, help="shifts the disruption's moment (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    parser.add_argument("--log", type=Path, help="write the controller's log lines to this file")
    return parser


def print_text(result: object, out: TextIO) -> None:
    from drill.scenarios import ScenarioResult

    assert isinstance(result, ScenarioResult)
    verdict = "PASS" if result.passed else "FAIL"
    out.write(f"\n== {result.scenario} interruption (seed {result.seed}): {verdict}\n")
    market = f" ({result.new_market})" if result.new_market else ""
    out.write(f"old node {result.old_instance} -> new node {result.new_instance}{market}\n")
    out.write("timeline (virtual seconds from the disruption):\n")
    for t, what in result.timeline:
        out.write(f"  T{t:+7.1f}s  {what}\n")
    downtime = f"{result.downtime_s:.0f} s" if result.downtime_s is not None else "no recovery"
    out.write(
        f"downtime (drill probe every 1 s through the EIP): {downtime} (budget {result.budget_s:.0f} s)\n"
    )
    if result.controller_downtime_s is not None:
        out.write(f"downtime as the controller measured it: {result.controller_downtime_s:.1f} s\n")
    rpo = result.rpo
    backup = f"T{rpo.last_backup_at:+.0f}s" if rpo.last_backup_at is not None else "none"
    out.write(
        f"RPO: {rpo.missing} of {rpo.committed} committed rows missing "
        f"({rpo.committed_before_cut} committed before the cut; last backup {backup}; "
        f"{rpo.failed_writes} writes refused during the outage)\n"
    )
    out.write("checks:\n")
    for check in result.checks:
        detail = f" ({check.detail})" if check.detail else ""
        out.write(f"  [{'ok' if check.ok else 'FAIL'}] {check.name}{detail}\n")
    if result.notifications:
        out.write("notifications: " + "; ".join(result.notifications) + "\n")
    out.write(
        f"modeled on documented latencies (drill/emulator/latency.py, drill/node.py); "
        f"{result.virtual_seconds:.0f} virtual s in {result.real_seconds:.1f} real s\n"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _isolate_from_aws()
    from drill.scenarios import DrillError, run_scenario

    names = SCENARIOS if args.scenario == "all" else (args.scenario,)
    results = []
    try:
        for name in names:
            log = args.log.with_name(f"{args.log.stem}-{name}{args.log.suffix}") if args.log else None
            results.append(run_scenario(name, seed=args.seed, log_path=log))
    except DrillError as exc:
        sys.stderr.write(f"drill: could not run: {exc}\n")
        return EXIT_ERROR
    if args.json:
        json.dump(
            {"passed": all(r.passed for r in results), "scenarios": [r.to_dict() for r in results]},
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
    else:
        for result in results:
            print_text(result, sys.stdout)
    return 0 if all(r.passed for r in results) else EXIT_FAILED
