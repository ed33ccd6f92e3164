"""The benchmark: broker, a fast PURGE sink and the daemon, measured end to end.

`python -m purged.bench` (`./dev bench`) runs it; see `purged.bench.runner` for what is
measured and how, `purged.bench.sink` for the sink and `purged.bench.loadgen` for the
load generator that measures the sink's own limit.
"""
