"""Cold import time of each controller Lambda handler, and the size of the zipped `lambdas/` asset.

    .venv/bin/python bench/lambda_bench.py [--runs 5] [--python PATH] [--top 8]

Budgets (ARCHITECTURE.md section 7): each handler imports in <= 300 ms (median), the asset zip is
<= 1 MB. Exit status 1 when a budget is broken, 2 when the environment cannot measure.

How it mirrors Lambda: the asset is copied to a temporary folder without __pycache__ (Lambda's
/var/task is read-only, so the controller's own modules are compiled on every cold start), each
run is a fresh interpreter with -B (writes no bytecode), and boto3 / aws_lambda_powertools come
precompiled from site-packages as they do from the runtime and the layer. Interpreter start-up is
not counted: only the `import` of the handler module, timed with perf_counter around it. One
untimed run first warms the OS file cache, as a real host would have it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSET = ROOT / "lambdas"
HANDLERS = ("interruption", "rebalance", "reconcile", "health", "lifecycle")
IMPORT_BUDGET_MS = 300.0
ASSET_BUDGET_BYTES = 1_000_000
_SKIP_DIRS = frozenset({"__pycache__", ".pytest_cache", ".ruff_cache"})

_TIMER = (
    "import time, importlib\n"
    "t = time.perf_counter()\n"
    "for name in {modules!r}: importlib.import_module(name)\n"
    "print(repr((time.perf_counter() - t) * 1000.0))\n"
)
# What any Powertools Lambda that uses boto3 pays before its own code: shown for comparison.
BASELINE = ("boto3", "aws_lambda_powertools")


@dataclass(frozen=True)
class ImportTiming:
    module: str
    runs_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.runs_ms)


def asset_files(asset: Path) -> list[Path]:
    files = []
    for path in sorted(asset.rglob("*")):
        if any(part in _SKIP_DIRS for part in path.relative_to(asset).parts):
            continue
        if path.is_file() and path.suffix not in (".pyc", ".pyo"):
            files.append(path)
    return files


def zipped_size(asset: Path) -> tuple[int, int]:
    """(bytes of the deflated zip, number of files), as the CDK asset would package them."""
    buffer = BytesIO()
    files = asset_files(asset)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in files:
            archive.write(path, path.relative_to(asset).as_posix())
    return len(buffer.getvalue()), len(files)


def copy_asset(asset: Path, target: Path) -> None:
    for path in asset_files(asset):
        destination = target / path.relative_to(asset)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, destination)


def time_import(python: str, module: str, code_dir: Path, *, importtime: bool = False) -> tuple[float, str]:
    """Milliseconds to import `module` (several joined by "+") in a fresh interpreter, and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(code_dir)
    # Handlers build nothing at import, so no configuration is needed here; keep the network out.
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    # -B: write no bytecode (like the read-only /var/task); -s: ignore the user's site-packages.
    args = [python, "-B", "-s"]
    if importtime:
        args += ["-X", "importtime"]
    args += ["-c", _TIMER.format(modules=module.split("+"))]
    done = subprocess.run(
        args, env=env, cwd=code_dir, capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise RuntimeError(f"importing {module} failed:\n{done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1]), done.stderr


def top_imports(stderr: str, count: int) -> list[tuple[int, str]]:
    """The slowest imports by cumulative microseconds from `-X importtime` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        # "import time:  <self us> | <cumulative us> | <indented module name>"
        parts = line[len("import time:") :].split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        rows.append((int(parts[1].strip()), parts[2].strip()))
    rows.sort(reverse=True)
    return rows[:count]


def check_environment(python: str) -> str | None:
    probe = subprocess.run(
        [python, "-c", "import boto3, aws_lambda_powertools; print(boto3.__version__)"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return "boto3 and aws_lambda_powertools must be importable (Lambda has them from the runtime/layer)"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per handler (median is reported)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure with")
    parser.add_argument("--top", type=int, default=0, help="also show the N slowest imports per handler")
    args = parser.parse_args(argv)

    problem = check_environment(args.python)
    if problem:
        print(f"cannot measure: {problem}", file=sys.stderr)
        return 2

    zip_bytes, file_count = zipped_size(ASSET)
    details: dict[str, list[tuple[int, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="spotforge-asset-") as tmp:
        code_dir = Path(tmp)
        copy_asset(ASSET, code_dir)
        modules = [f"spotforge_controller.handlers.{name}" for name in HANDLERS]
        baseline_key = "+".join(BASELINE)
        samples: dict[str, list[float]] = {key: [] for key in [*modules, baseline_key]}
        try:
            for key in samples:
                time_import(args.python, key, code_dir)  # warm the file cache, untimed
            # Round-robin, so a burst of load from elsewhere on the machine spreads over all rows.
            for _ in range(args.runs):
                for key in samples:
                    samples[key].append(time_import(args.python, key, code_dir)[0])
            if args.top:
                for name, module in zip(HANDLERS, modules, strict=True):
                    stderr = time_import(args.python, module, code_dir, importtime=True)[1]
                    details[name] = top_imports(stderr, args.top)
        except RuntimeError as exc:
            print(str(exc), file=sys.stderr)
            return 2
        timings = [ImportTiming(module, tuple(samples[module])) for module in modules]
        base_runs = tuple(samples[baseline_key])
        baseline = ImportTiming(" + ".join(BASELINE), base_runs)

    failed = False
    print(f"{'handler module':<46} {'median ms':>10} {'min':>8} {'max':>8}  budget {IMPORT_BUDGET_MS:.0f} ms")
    for timing in timings:
        over = timing.median_ms > IMPORT_BUDGET_MS
        failed |= over
        print(
            f"{timing.module:<46} {timing.median_ms:>10.1f} {min(timing.runs_ms):>8.1f} "
            f"{max(timing.runs_ms):>8.1f}  {'OVER' if over else 'ok'}"
        )
        for cumulative_us, imported in details.get(timing.module.rsplit(".", 1)[-1], []):
            print(f"    {cumulative_us / 1000.0:>8.1f} ms  {imported}")
    print(
        f"{'(baseline: ' + baseline.module + ')':<46} {baseline.median_ms:>10.1f} {min(base_runs):>8.1f} "
        f"{max(base_runs):>8.1f}  not budgeted: the runtime's own cost"
    )
    asset_over = zip_bytes > ASSET_BUDGET_BYTES
    failed |= asset_over
    print(
        f"{'lambdas/ asset (zip, no __pycache__)':<46} {zip_bytes / 1000.0:>9.1f} kB  {file_count} files"
        f"  budget {ASSET_BUDGET_BYTES / 1e6:.0f} MB  {'OVER' if asset_over else 'ok'}"
    )
    print(f"python: {args.python}; runs per handler: {args.runs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
