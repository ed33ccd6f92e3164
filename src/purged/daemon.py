"""The daemon: wires sources, pipeline and caches on one event loop, and shuts down in order.

Startup: metrics server, cache connections, then the sources. Shutdown (SIGTERM/SIGINT) is
the reverse: stop the sources, let the purges in flight finish (at most -shutdown_timeout),
commit the finished offsets, close the caches. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass

from confluent_kafka import KafkaException
from prometheus_client import start_http_server

from purged import metrics
from purged.cache import CacheLayer
from purged.config import Config, ConfigError
from purged.kafka import FatalKafkaError, KafkaSource
from purged.logs import log
from purged.multicast import HtcpSource
from purged.pipeline import Pipeline
from purged.systemd import Notifier

HOUSEKEEPING_INTERVAL = 0.25  # seconds between gauge updates and readiness checks
CLOSE_TIMEOUT = 5.0  # seconds for the final commit and leaving the group, after the drain
FORCED_CLOSE_TIMEOUT = 1.0  # the same after a second signal


@dataclass
class _Outcome:
    exit_code: int = 0


async def serve(config: Config) -> int:
    """Run the daemon until a signal or a fatal error; return the exit status."""
    metrics.initialise()
    pipeline = Pipeline(max_pending=config.max_pending, host_regex=config.host_regex)
    depth = config.pipeline_depth
    backend = CacheLayer(
        "backend",
        config.backend,
        workers=config.backend_workers,
        depth=depth,
        timeout=config.cache_timeout,
        delay=0.0,
        on_done=pipeline.backend_done,
    )
    frontend = CacheLayer(
        "frontend",
        config.frontend,
        workers=config.frontend_workers,
        depth=depth,
        timeout=config.cache_timeout,
        delay=config.frontend_delay,
        on_done=pipeline.frontend_done,
        on_superseded=pipeline.superseded,
    )
    pipeline.connect(backend, frontend)
    kafka = None
    if config.topics:
        try:
            kafka = KafkaSource(pipeline, list(config.topics), config.kafka, config.purge_max_age)
        except KafkaException as error:
            raise ConfigError(f"-kafkaConfig: {error.args[0].str()}") from None
    htcp = None
    if config.mcast_groups:
        htcp = HtcpSource(
            pipeline,
            list(config.mcast_groups),
            port=config.mcast_port,
            iface=config.mcast_iface,
            bufsize=config.mcast_bufsize,
        )
    try:
        server, server_thread = start_http_server(
            config.prometheus_port, config.prometheus_host or "0.0.0.0", registry=metrics.REGISTRY
        )
    except OSError as error:
        log.error(
            "cannot serve metrics on %s:%d: %s",
            config.prometheus_host,
            config.prometheus_port,
            error,
        )
        if kafka is not None:
            kafka.consumer.close()
        return 1

    notifier = Notifier()
    outcome = _Outcome()
    stop = asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("second %s: exiting without waiting", signal.Signals(signum).name)
            force.set()
        else:
            log.info("%s: stopping", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    log.info(
        "purged started: backend %s (%d connections), frontend %s (%d connections), "
        "frontend delay %g ms, metrics at %s:%d/metrics",
        config.backend,
        config.backend_workers,
        config.frontend,
        config.frontend_workers,
        config.frontend_delay * 1000,
        config.prometheus_host,
        config.prometheus_port,
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            layers = [tasks.create_task(backend.run()), tasks.create_task(frontend.run())]
            keeper = tasks.create_task(
                _housekeeping(pipeline, backend, frontend, kafka, htcp, notifier)
            )
            kafka_task = htcp_task = None
            if kafka is not None:
                kafka_task = tasks.create_task(_consume(kafka, outcome, stop))
            if htcp is not None:
                htcp_task = tasks.create_task(_listen(htcp, outcome, stop))

            await stop.wait()
            notifier.notify("STOPPING=1")
            if kafka is not None:
                kafka.stop()  # the consumer stays open: the drain ends with a commit
            if htcp_task is not None:
                htcp_task.cancel()
            await asyncio.gather(
                *(t for t in (kafka_task, htcp_task) if t is not None), return_exceptions=True
            )
            if outcome.exit_code == 0:
                await _drain(pipeline, config.shutdown_timeout, force)
                if force.is_set():
                    outcome.exit_code = 1
            if kafka is not None:
                if outcome.exit_code == 0 or force.is_set():
                    # Commits what is finished, nothing else; bounded, because librdkafka
                    # waits for an unreachable coordinator. After a second signal, barely.
                    forced = force.is_set()
                    await kafka.close(
                        FORCED_CLOSE_TIMEOUT if forced else CLOSE_TIMEOUT,
                        give_up=None if forced else force,
                    )
                    if force.is_set():
                        outcome.exit_code = 1
                log.info("kafka: %d consumed messages left for the next start", kafka.unfinished)
            for task in [*layers, keeper]:
                task.cancel()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        server.shutdown()
        server_thread.join(timeout=5)
        notifier.close()
    log.info("purged stopped (exit status %d)", outcome.exit_code)
    return outcome.exit_code


async def _consume(kafka: KafkaSource, outcome: _Outcome, stop: asyncio.Event) -> None:
    try:
        await kafka.run()
    except FatalKafkaError as error:
        log.error("kafka: fatal error, exiting so that the service is restarted: %s", error)
        outcome.exit_code = 1
        stop.set()


async def _listen(htcp: HtcpSource, outcome: _Outcome, stop: asyncio.Event) -> None:
    try:
        await htcp.run()
    except OSError as error:
        # A group or interface that cannot be joined is a configuration error, not a crash.
        log.error(
            "cannot listen for HTCP (-mcast_addrs, -mcast_iface): %s", error.strerror or error
        )
        outcome.exit_code = 2
        stop.set()


async def _drain(pipeline: Pipeline, timeout: float, force: asyncio.Event) -> None:
    if pipeline.idle.is_set():
        return
    log.info("draining %d purges in flight (at most %g s)", pipeline.pending, timeout)
    started = time.monotonic()
    done = asyncio.ensure_future(pipeline.idle.wait())
    forced = asyncio.ensure_future(force.wait())
    try:
        await asyncio.wait([done, forced], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done.cancel()
        forced.cancel()
    if pipeline.idle.is_set():
        log.info("drained in %.2f s", time.monotonic() - started)
    else:
        log.warning("%d purges did not finish; their offsets are not committed", pipeline.pending)


async def _housekeeping(
    pipeline: Pipeline,
    backend: CacheLayer,
    frontend: CacheLayer,
    kafka: KafkaSource | None,
    htcp: HtcpSource | None,
    notifier: Notifier,
) -> None:
    """Publish the gauges, tell systemd when we are ready, and feed its watchdog."""
    backend_backlog = metrics.backlog.labels("backend")
    frontend_backlog = metrics.backlog.labels("frontend")
    ready = False
    next_watchdog = 0.0
    while True:
        backend_backlog.set(backend.backlog)
        frontend_backlog.set(frontend.backlog)
        metrics.pending.set(pipeline.pending)
        if htcp is not None:
            htcp.count_kernel_drops()
        if not ready:
            # Every configured source: the HTCP socket has joined, Kafka has partitions.
            consuming = (htcp is None or htcp.ready.is_set()) and (kafka is None or kafka.consuming)
            connected = all(
                any(c.ready for c in layer.connections) for layer in (backend, frontend)
            )
            if consuming and connected:
                ready = True
                notifier.notify("READY=1")
                log.info("ready: consuming, and both caches connected")
        if notifier.watchdog_interval and time.monotonic() >= next_watchdog:
            notifier.notify("WATCHDOG=1")
            next_watchdog = time.monotonic() + notifier.watchdog_interval
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)
