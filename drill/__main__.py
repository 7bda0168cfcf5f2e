"""`python -m drill`: the offline drill (see drill/run.py)."""

import sys

from drill.run import main

sys.exit(main())
