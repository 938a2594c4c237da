"""`python -m flux_day`: see `flux_day.cli`."""

import sys

from flux_day.cli import main

sys.exit(main())
