"""`python -m flux_day`: see `flux_day.cli`."""

from flux_day.cli import main

raise SystemExit(main())
