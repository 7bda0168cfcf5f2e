#!/usr/bin/env python3
"""CDK entry point: read and validate settings, build the stack, run cdk-nag's AWS Solutions checks."""

from __future__ import annotations

import sys

import aws_cdk as cdk
from cdk_nag import AwsSolutionsChecks

from infra_stack.config import ConfigError, load_config
from infra_stack.stack import SpotforgeStack


def build_app(context: dict | None = None, outdir: str | None = None) -> cdk.App:
    """The app the CLI runs; tests pass their own context and output folder."""
    app = cdk.App(context=context, outdir=outdir) if context is not None else cdk.App()
    config = load_config(_spotforge_context(app))
    SpotforgeStack(app, config.stack_name, config=config, stack_name=config.stack_name)
    cdk.Validations.of(app).add_plugins(AwsSolutionsChecks(app))
    return app


def _spotforge_context(app: cdk.App) -> dict:
    """Every context value the CLI passed (cdk.json merged with -c), as one mapping."""
    return dict(app.node.get_all_context() or {})


def main() -> int:
    try:
        app = build_app()
    except ConfigError as error:
        print(f"spotforge: {error}", file=sys.stderr)
        return 2
    app.synth()
    return 0


if __name__ == "__main__":
    sys.exit(main())
