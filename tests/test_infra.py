"""Smoke tests of the integration-test infrastructure itself: every component runs for real."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer

from tests.support import unique
from tests.support.ats import TrafficServer, via_hit
from tests.support.broker import Broker, make_event
from tests.support.mcast import receiver_socket, send_htcp
from tests.support.origin import Origin
from tests.support.ports import free_port
from tests.support.recorder import RecordedRequest, Recorder
from tests.support.varnish import Varnish

# ATS can lose a PURGE that lands within ~1 ms of the GET miss that filled the object.
FILL_SETTLE = 0.02


def purge_request(path: str, host: str) -> bytes:
    return f"PURGE {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: purged\r\n\r\n".encode()


def read_responses(sock: socket.socket, n: int, timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """Read ``n`` HTTP/1.1 responses (Content-Length framed) from ``sock``: (status, body)."""
    sock.settimeout(timeout)
    buf = b""
    out: list[tuple[int, bytes]] = []
    while len(out) < n:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].decode("latin-1").split("\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            end = head_end + 4 + length
            if len(buf) >= end:
                out.append((int(head[0].split(" ")[1]), buf[head_end + 4 : end]))
                buf = buf[end:]
                continue
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"connection closed after {len(out)} of {n} responses")
        buf += data
    return out


def raw_exchange(addr: tuple[str, int] | str, payload: bytes, n: int) -> list[tuple[int, bytes]]:
    family = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(addr)
        s.sendall(payload)
        return read_responses(s, n)


# -- Kafka ----------------------------------------------------------------------------------


def test_broker_produce_consume_with_group(broker: Broker) -> None:
    topic, group = unique("infra-topic"), unique("infra-group")
    broker.create_topic(topic, partitions=3)
    uris = [f"https://en.wikipedia.org/wiki/Page_{i}" for i in range(30)]
    assert broker.produce(topic, (make_event(u) for u in uris)) == 30

    consumer = Consumer(broker.kafka_config(group, enable_auto_commit=False))
    try:
        consumer.subscribe([topic])
        got: list[str] = []
        partitions: set[int] = set()
        deadline = time.monotonic() + 15
        while len(got) < 30 and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            event = json.loads(msg.value())
            assert event["$schema"] == "/resource_change/1.0.0"
            assert event["meta"]["domain"] == "en.wikipedia.org"
            assert event["meta"]["dt"].endswith("Z")
            got.append(event["meta"]["uri"])
            partitions.add(msg.partition())
        assert sorted(got) == sorted(uris), broker.log_tail()
        assert partitions == {0, 1, 2}, "produce() must spread keyless messages"
        consumer.commit(asynchronous=False)
    finally:
        consumer.close()


def test_make_event_root_dt_and_config_file(broker: Broker, tmp_path) -> None:
    ev = json.loads(
        make_event("https://a.example/x", dt="bogus", root_dt="2020-05-07T09:48:24.065Z")
    )
    assert ev["meta"]["dt"] == "bogus"
    assert ev["root_event"]["dt"] == "2020-05-07T09:48:24.065Z"
    assert "root_event" not in json.loads(make_event("https://a.example/x"))
    path = broker.write_kafka_config(tmp_path / "kafka.json", "host1", client_id="purged")
    conf = json.loads(path.read_text())
    assert conf["bootstrap.servers"] == broker.bootstrap
    assert conf["group.id"] == "host1"
    assert conf["client.id"] == "purged"
    assert conf["session.timeout.ms"] == 2000


# -- caches ---------------------------------------------------------------------------------


def test_ats_forwards_any_host_and_keys_by_host(ats: TrafficServer, origin: Origin) -> None:
    path = f"/wiki/{unique('anyhost')}"
    assert ats.get(path, "en.wikipedia.org") == (200, False)
    again = ats.fetch(path, "en.wikipedia.org")
    assert (again.status, again.hit) == (200, True), (again.header("Via"), origin.requests[-3:])
    assert ats.get(path, "upload.wikimedia.org") == (200, False)  # another host, another object
    hosts = [r.host for r in origin.requests if r.path == path]
    assert hosts == ["en.wikipedia.org", "upload.wikimedia.org"]  # Host reaches the origin


def test_chain_miss_then_hit(varnish: Varnish, ats: TrafficServer, origin: Origin) -> None:
    path, host = f"/wiki/{unique('chain')}", "en.wikipedia.org"
    first = varnish.fetch(path, host)
    assert (first.status, first.hit) == (200, False)
    assert not via_hit(first.header("Via")), "ATS must have missed too"
    second = varnish.fetch(path, host)
    assert (second.status, second.hit) == (200, True)
    assert second.body == first.body
    assert ats.get(path, host) == (200, True)
    assert origin.hits(path) == 1


def test_ats_manual_purge(ats: TrafficServer, origin: Origin) -> None:
    path, host = f"/wiki/{unique('atspurge')}", "en.wikipedia.org"
    assert ats.get(path, host) == (200, False)
    assert ats.get(path, host) == (200, True)
    time.sleep(FILL_SETTLE)
    assert raw_exchange(("127.0.0.1", ats.port), purge_request(path, host), 1)[0][0] == 200
    assert ats.get(path, host) == (200, False)
    assert origin.hits(path) == 2
    # Absent object: 404.
    absent = f"/wiki/{unique('absent')}"
    assert raw_exchange(("127.0.0.1", ats.port), purge_request(absent, host), 1)[0][0] == 404


@pytest.mark.parametrize("via_unix", [False, True], ids=["tcp", "unix"])
def test_varnish_manual_purge(varnish: Varnish, via_unix: bool) -> None:
    path, host = f"/wiki/{unique('vpurge')}", "en.wikipedia.org"
    assert varnish.get(path, host) == (200, False)
    assert varnish.get(path, host) == (200, True)
    assert varnish.socket_path is not None
    addr: tuple[str, int] | str = varnish.socket_path if via_unix else ("127.0.0.1", varnish.port)
    assert raw_exchange(addr, purge_request(path, host), 1)[0][0] == 200
    assert varnish.get(path, host) == (200, False)
    # Varnish answers 200 also when the object is absent.
    assert raw_exchange(addr, purge_request(f"/{unique('absent')}", host), 1)[0][0] == 200


def test_ats_pipelined_purges_answered_in_order(ats: TrafficServer) -> None:
    host = "en.wikipedia.org"
    paths = [f"/wiki/{unique('atspipe')}" for _ in range(3)]
    ats.get(paths[0], host)
    ats.get(paths[2], host)  # paths[1] is never cached: its PURGE answers 404
    time.sleep(FILL_SETTLE)
    payload = b"".join(purge_request(p, host) for p in paths)
    statuses = [s for s, _ in raw_exchange(("127.0.0.1", ats.port), payload, 3)]
    assert statuses == [200, 404, 200]
    assert [ats.get(p, host)[1] for p in paths] == [False, False, False]


def test_varnish_pipelined_purges_answered_in_order(varnish: Varnish) -> None:
    host = "en.wikipedia.org"
    paths = [f"/wiki/{unique('vpipe')}" for _ in range(3)]
    for p in paths:
        varnish.get(p, host)
    # A GET of a cached object in the middle of the pipeline proves the answer order.
    middle = f"GET {paths[1]} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    payload = purge_request(paths[0], host) + middle + purge_request(paths[2], host)
    answers = raw_exchange(("127.0.0.1", varnish.port), payload, 3)
    assert [s for s, _ in answers] == [200, 200, 200]
    assert b"Purged" in answers[0][1] and b"Purged" in answers[2][1]
    assert answers[1][1].startswith(b"origin response")
    # Three PURGEs in one write.
    payload = b"".join(purge_request(p, host) for p in paths)
    answers = raw_exchange(("127.0.0.1", varnish.port), payload, 3)
    assert [s for s, _ in answers] == [200, 200, 200]
    assert [varnish.get(p, host)[1] for p in paths] == [False, False, False]


# -- recorder -------------------------------------------------------------------------------


def _numbered_status(req: RecordedRequest) -> int:
    return 404 if int(req.target.rsplit("/", 1)[1]) % 2 else 200


def _pipeline(n: int) -> bytes:
    return b"".join(purge_request(f"/p/{i}", f"h{i % 7}.example") for i in range(n))


def test_recorder_pipeline_one_write(recorder: Callable[..., Recorder]) -> None:
    rec = recorder()
    rec.status = _numbered_status
    answers = raw_exchange(("127.0.0.1", rec.port), _pipeline(1000), 1000)
    assert [s for s, _ in answers] == [404 if i % 2 else 200 for i in range(1000)]
    assert rec.targets() == [f"/p/{i}" for i in range(1000)]
    assert rec.requests[8][1:] == ("PURGE", "h1.example", "/p/8")
    assert rec.errors == []


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_recorder_split_writes(recorder: Callable[..., Recorder], tmp_path, unix: bool) -> None:
    rec = recorder(unix_path=tmp_path / "rec.sock") if unix else recorder()
    rec.status = _numbered_status
    payload = _pipeline(1000)
    family = socket.AF_UNIX if unix else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect(rec.unix_path if unix else ("127.0.0.1", rec.port))
        # Odd-sized chunks split request lines, headers and the blank line across writes.
        for i in range(0, len(payload), 997):
            s.sendall(payload[i : i + 997])
            if i % (997 * 40) == 0:
                time.sleep(0.001)
        answers = read_responses(s, 1000)
    assert [st for st, _ in answers] == [404 if i % 2 else 200 for i in range(1000)]
    assert rec.targets() == [f"/p/{i}" for i in range(1000)]
    assert rec.count() == 1000 and rec.errors == []


def test_recorder_knobs(recorder: Callable[..., Recorder]) -> None:
    rec = recorder()
    addr = ("127.0.0.1", rec.port)
    # close_after: 2 answered, then the connection closes mid-pipeline.
    rec.close_after = 2
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(_pipeline(5))
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200") == 2
    rec.close_after = None
    # delay: answers wait.
    rec.delay = 0.2
    t0 = time.monotonic()
    assert raw_exchange(addr, purge_request("/slow", "h"), 1)[0][0] == 200
    assert time.monotonic() - t0 >= 0.2
    rec.delay = 0
    # stall: requests are read and recorded, not answered, until released.
    rec.stall = True
    with socket.create_connection(addr, timeout=5) as s:
        s.sendall(purge_request("/stalled", "h"))
        before = rec.count()
        rec.wait_for(before, 2)
        s.settimeout(0.2)
        with pytest.raises(TimeoutError):
            s.recv(100)
        rec.stall = False
        assert read_responses(s, 1)[0][0] == 200
    assert rec.targets()[-1] == "/stalled"
    # refuse / accept.
    rec.refuse()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(addr, timeout=2).close()
    rec.accept()
    rec.status = 503
    assert raw_exchange(addr, purge_request("/back", "h"), 1)[0][0] == 503
    with pytest.raises(TimeoutError, match="of 10000 requests"):
        rec.wait_for(10_000, 0.05)


# -- multicast ------------------------------------------------------------------------------


def test_multicast_loopback() -> None:
    port = free_port()  # a free TCP port number is almost surely free for UDP too
    groups = ["239.128.0.112", "239.128.0.115"]
    with receiver_socket(groups, port) as r1, receiver_socket(groups[:1], port) as r2:
        r1.settimeout(2)
        r2.settimeout(2)
        assert send_htcp([b"one", b"two"], groups, port) == 4
        assert sorted(r1.recv(4096) for _ in range(4)) == [b"one", b"one", b"two", b"two"]
        assert [r2.recv(4096) for _ in range(2)] == [b"one", b"two"]
        r2.settimeout(0.1)
        with pytest.raises(TimeoutError):
            r2.recv(4096)  # not joined to the second group
