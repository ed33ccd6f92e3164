"""`python -m purged.bench` runs the benchmark (`./dev bench`)."""

from purged.bench.runner import main

raise SystemExit(main())
