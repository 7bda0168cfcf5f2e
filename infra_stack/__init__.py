"""The spotforge CDK app: one construct per concern, wired together by SpotforgeStack."""

import sys
from pathlib import Path

# The alarms are built from the controller's own metric list, so the controller package (shipped to
# Lambda from lambdas/) must be importable here too; it imports nothing heavy at module level.
_LAMBDAS = str(Path(__file__).resolve().parent.parent / "lambdas")
if _LAMBDAS not in sys.path:
    sys.path.insert(0, _LAMBDAS)
