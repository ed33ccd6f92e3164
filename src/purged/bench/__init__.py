"""The benchmark: broker, a fast PURGE sink and the daemon, measured end to end.

`python -m purged.bench` (`./dev bench`) runs it. `runner` says what is measured and how;
`sink` is the PURGE sink (its own process), `loadgen` the load generator that measures the
sink's own limit, `floor` a plain Kafka consumer giving the latency floor, and `components`
starts the daemon and reads /proc (the broker and the caches are `purged.embedded`'s).
"""
