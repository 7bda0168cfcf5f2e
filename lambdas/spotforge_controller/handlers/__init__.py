"""Lambda entry points, one module per function: parse, call the core, tell the user, log one line.

Each module exposes `handler(event, context, *, runtime=None)`; the Lambda handler string is
`spotforge_controller.handlers.<module>.handler`. Tests and the drill pass `runtime`.
"""
