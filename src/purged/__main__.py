"""`python -m purged` is the `purged` command."""

from purged.cli import main

raise SystemExit(main())
