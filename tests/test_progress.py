"""Progress ids, the two stores (one behaviour suite), the throttled listener
and the status app called directly. Live servers, threads and processes are
in test_progress_live.py."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple
from wsgiref.headers import Headers
from wsgiref.util import setup_testing_defaults

import pytest

from tests.support.memcached import MemcachedServer, memcached_server  # noqa: F401
from uploadkit.errors import BadProgressId, FileTooLarge, ProgressUnavailable, QuotaExceeded
from uploadkit.files import FileInfo
from uploadkit.limits import Limits
from uploadkit.pipeline import RequestContext
from uploadkit.progress import (
    NULL_PROGRESS,
    PROGRESS_ID_RE,
    MemcachedStore,
    MemoryStore,
    ProgressApp,
    ProgressListener,
    ProgressRefused,
    ProgressSettings,
    StoreProgress,
    progress_id_from_environ,
    validate_progress_id,
)

MiB = 1024 * 1024


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- ids ----------------------------------------------------------------------------

GOOD_IDS = ["a", "Z", "0", "-", "_", "abc-DEF_123", "x" * 64, "0123456789abcdef" * 4]
BAD_IDS = ["", "x" * 65, "a b", "a\n", "abc\n", "a\x00", "caf\u00e9", "a/b", "../etc", "a.b", "a:b",
           "a+b", "key with space", "\u0660", None, 123, b"abc"]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_good_ids_pass(value: str) -> None:
    assert validate_progress_id(value) == value
    assert PROGRESS_ID_RE.fullmatch(value)


@pytest.mark.parametrize("value", BAD_IDS)
def test_bad_ids_are_refused(value: Any) -> None:
    with pytest.raises(BadProgressId) as info:
        validate_progress_id(value)
    assert info.value.status == 400 and info.value.code == "bad_progress_id"
    assert len(info.value.message) < 200  # a huge id is not echoed whole


def environ(query: str = "", **headers: str) -> Dict[str, Any]:
    env: Dict[str, Any] = {"QUERY_STRING": query}
    env.update(headers)
    setup_testing_defaults(env)
    return env


def test_id_from_query_then_header() -> None:
    assert progress_id_from_environ(environ("X-Progress-ID=abc")) == "abc"
    assert progress_id_from_environ(environ("a=1&x-progress-id=q1")) == "q1"
    assert progress_id_from_environ(environ("", HTTP_X_PROGRESS_ID="h1")) == "h1"
    # The query wins over the header.
    assert progress_id_from_environ(environ("X-Progress-ID=q", HTTP_X_PROGRESS_ID="h")) == "q"
    assert progress_id_from_environ(environ("")) is None
    assert progress_id_from_environ(environ("progress=1&a=2")) is None
    assert progress_id_from_environ({}) is None


@pytest.mark.parametrize("env", [
    environ("X-Progress-ID="),
    environ("X-Progress-ID=a%20b"),
    environ("X-Progress-ID=" + "x" * 65),
    environ("X-Progress-ID=a%0A"),
    environ("", HTTP_X_PROGRESS_ID=""),
    environ("", HTTP_X_PROGRESS_ID="a b"),
])
def test_present_but_malformed_ids_raise(env: Dict[str, Any]) -> None:
    with pytest.raises(BadProgressId):
        progress_id_from_environ(env)


def test_null_listener_is_a_listener() -> None:
    assert isinstance(NULL_PROGRESS, ProgressListener)
    NULL_PROGRESS.advance(1, None)
    NULL_PROGRESS.processing()


# -- one behaviour suite for both stores -------------------------------------------

class StoreUnderTest:
    """A store plus a way to let its time pass (fake for memory, real for memcached)."""

    def __init__(self, store: Any, wait: Callable[[float], None], kind: str) -> None:
        self.store = store
        self.wait = wait
        self.kind = kind


@pytest.fixture(params=["memory", "memcached"])
def any_store(request: pytest.FixtureRequest) -> Iterator[StoreUnderTest]:
    if request.param == "memory":
        clock = FakeClock()
        yield StoreUnderTest(MemoryStore(clock=clock), clock.advance, "memory")
    else:
        server: MemcachedServer = request.getfixturevalue("memcached_server")
        store = MemcachedStore(server.address)
        yield StoreUnderTest(store, time.sleep, "memcached")
        store.close()


def test_store_unknown_id_is_none(any_store: StoreUnderTest) -> None:
    assert any_store.store.get("never-set") is None


def test_store_round_trip_and_replace(any_store: StoreUnderTest) -> None:
    s = any_store.store
    value = {"state": "uploading", "received": 10, "size": 100, "rate": None,
             "files": [{"field": "f", "filename": "\u00e9t\u00e9 \u2603.png", "received": 3, "done": False}]}
    s.set("u1", value, 60)
    assert s.get("u1") == value
    s.set("u1", {"state": "done", "received": 100, "size": 100}, 60)
    assert s.get("u1") == {"state": "done", "received": 100, "size": 100}
    assert s.get("u2") is None


def test_store_returns_copies(any_store: StoreUnderTest) -> None:
    s = any_store.store
    s.set("c", {"files": [{"done": False}]}, 60)
    got = s.get("c")
    got["files"][0]["done"] = True
    assert s.get("c") == {"files": [{"done": False}]}


def test_store_delete(any_store: StoreUnderTest) -> None:
    s = any_store.store
    s.set("d", {"state": "done"}, 60)
    s.delete("d")
    assert s.get("d") is None
    s.delete("d")  # unknown: no error


def test_store_entries_expire(any_store: StoreUnderTest) -> None:
    s = any_store.store
    s.set("short", {"state": "done"}, 1)
    s.set("long", {"state": "done"}, 60)
    assert s.get("short") == {"state": "done"}
    # memcached counts whole seconds: an item with ttl 1 is gone within 2 s.
    any_store.wait(2.05)
    assert s.get("short") is None
    assert s.get("long") == {"state": "done"}


def test_store_ttl_is_renewed_by_each_write(any_store: StoreUnderTest) -> None:
    s = any_store.store
    s.set("live", {"received": 1}, 3)
    any_store.wait(1.6)
    s.set("live", {"received": 2}, 3)
    any_store.wait(1.6)  # past the first write's expiry (at most 3 s), not the second's
    assert s.get("live") == {"received": 2}


def test_store_is_thread_safe(any_store: StoreUnderTest) -> None:
    s = any_store.store
    errors: List[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(40):
                s.set(f"t{n}", {"n": n, "i": i}, 60)
                got = s.get(f"t{n}")
                assert got == {"n": n, "i": i}
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors
    assert [s.get(f"t{n}") for n in range(8)] == [{"n": n, "i": 39} for n in range(8)]


def test_memory_store_is_bounded() -> None:
    store = MemoryStore(max_entries=3)
    for name in "abc":
        store.set(name, {"id": name}, 60)
    store.set("a", {"id": "a2"}, 60)  # rewritten: now the most recent
    store.set("d", {"id": "d"}, 60)  # evicts the least recently written: b
    assert len(store) == 3
    assert store.get("b") is None
    assert [store.get(n) for n in "acd"] == [{"id": "a2"}, {"id": "c"}, {"id": "d"}]
    for i in range(1000):
        store.set(f"abandoned-{i}", {"i": i}, 60)
    assert len(store) == 3


def test_memory_store_sweeps_expired_entries_on_write() -> None:
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    for i in range(100):
        store.set(f"old{i}", {}, 10)
    clock.advance(11)
    store.set("new", {}, 10)
    assert len(store) == 1


def test_memory_store_checks_its_bound() -> None:
    with pytest.raises(ValueError, match="max_entries"):
        MemoryStore(max_entries=0)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(max_bytes=10, max_value_bytes=100)


def test_memory_store_bounds_its_bytes_and_each_value() -> None:
    store = MemoryStore(max_bytes=10_000, max_value_bytes=5_000)
    with pytest.raises(ProgressRefused):
        store.set("big", {"x": "a" * 6_000}, 60)  # as memcached refuses an item over its size
    assert store.get("big") is None and store.nbytes == 0
    for i in range(20):
        store.set(f"k{i}", {"x": "a" * 3_000}, 60)
        assert store.nbytes <= 10_000
    assert len(store) == 3 and store.get("k19") is not None and store.get("k16") is None
    store.delete("k19")
    store.set("k18", {"x": 1}, 60)
    assert store.nbytes == len('{"x":"' + "a" * 3_000 + '"}') + len('{"x":1}')


def test_memcached_refusing_one_value_is_not_an_outage(memcached_server: MemcachedServer,  # noqa: F811
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """memcached answers SERVER_ERROR for an item over its size: that item's
    problem. The breaker stays closed; other ids read and write at once."""
    store = MemcachedStore(memcached_server.address, retry_after=60, max_value_bytes=8 << 20)
    try:
        store.set("small", {"state": "uploading", "received": 1}, 60)
        with caplog.at_level(logging.WARNING, logger="uploadkit"):
            with pytest.raises(ProgressRefused, match="too large"):  # the server's own words
                store.set("huge", {"x": "\x01" * 400_000}, 60)  # 2.4 MB of JSON
        assert store.available and "refused" in caplog.text and "failed" not in caplog.text
        assert store.get("small") == {"state": "uploading", "received": 1}
        store.set("after", {"state": "done"}, 60)
        assert store.get("after") == {"state": "done"}
    finally:
        store.close()
    # Refused before the network when over the store's own bound (1 MB by default).
    offline = MemcachedStore("127.0.0.1:9")
    with pytest.raises(ProgressRefused, match="limit is 1000000"):
        offline.set("huge", {"x": "a" * 1_000_001}, 60)
    assert offline.available


# -- memcached specifics --------------------------------------------------------------

def test_memcached_prefix_separates_sites(memcached_server: MemcachedServer) -> None:  # noqa: F811
    a = MemcachedStore(memcached_server.address, prefix="site-a:")
    b = MemcachedStore([("127.0.0.1", memcached_server.port)], prefix="site-b:")
    a.set("same", {"site": "a"}, 60)
    b.set("same", {"site": "b"}, 60)
    assert a.get("same") == {"site": "a"} and b.get("same") == {"site": "b"}
    from pymemcache.client.base import Client
    raw = Client(("127.0.0.1", memcached_server.port))
    assert json.loads(raw.get("site-a:same")) == {"site": "a"}
    raw.set("site-a:junk", b"not json{")
    assert a.get("junk") is None  # a foreign value is not trusted
    raw.close()
    a.close()
    b.close()


def test_a_memcached_restart_costs_no_call(memcached_server: MemcachedServer,  # noqa: F811
                                          caplog: pytest.LogCaptureFixture) -> None:
    """Once memcached is back, the connections pooled before its restart are
    passed over: no call fails and the breaker stays closed, however many
    connections several threads left in the pool."""
    store = MemcachedStore(memcached_server.address)
    ready = threading.Barrier(4)

    def writer(i: int) -> None:
        ready.wait(timeout=5)  # four calls at once: four pooled connections
        store.set(f"restart-{i}", {"state": "uploading", "received": i}, 60)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    memcached_server.stop()
    memcached_server.start()
    try:
        with caplog.at_level(logging.WARNING, logger="uploadkit"):
            for i in range(4):
                assert store.get(f"restart-{i}") is None  # a new, empty server
            store.set("restart-after", {"state": "done"}, 60)
            assert store.get("restart-after") == {"state": "done"}
        assert store.available and "failed" not in caplog.text
    finally:
        store.close()


def test_memcached_store_refuses_bad_ids_before_the_network() -> None:
    store = MemcachedStore("127.0.0.1:9")  # nothing listens there, nothing is sent
    for bad in ["a b", "x" * 65, "a\r\nflush_all"]:
        with pytest.raises(BadProgressId):
            store.set(bad, {}, 60)
        with pytest.raises(BadProgressId):
            store.get(bad)
    assert store.available


def test_memcached_store_checks_prefix() -> None:
    with pytest.raises(ValueError, match="prefix"):
        MemcachedStore(prefix="has space")


def test_memcached_several_servers_one_down() -> None:
    from tests.support.memcached import start_memcached
    a, b = start_memcached(), start_memcached()
    store = MemcachedStore([a.address, b.address], retry_after=60)
    try:
        ids = [f"k{i}" for i in range(40)]
        for i, key in enumerate(ids):
            store.set(key, {"i": i}, 60)
        assert [store.get(k) for k in ids] == [{"i": i} for i in range(40)]
        from pymemcache.client.base import Client
        raw = Client(("127.0.0.1", a.port))
        on_a = {k for k in ids if raw.get("uploadkit:" + k) is not None}
        raw.close()
        assert 0 < len(on_a) < 40  # spread over both
        b.stop()
        for key in ids:  # keys stay on their server: b's are unavailable, a's still work
            if key in on_a:
                assert store.get(key) is not None
                store.set(key, {"again": True}, 60)
            else:
                with pytest.raises(ProgressUnavailable):
                    store.get(key)
        assert not store.available
    finally:
        store.close()
        a.stop()
        b.stop()


def test_memcached_breaker_skips_then_recovers(caplog: pytest.LogCaptureFixture) -> None:
    from tests.support.memcached import find_memcached, free_port
    port = free_port()
    store = MemcachedStore(f"127.0.0.1:{port}", retry_after=0.3)
    caplog.set_level(logging.WARNING, logger="uploadkit.progress")
    with pytest.raises(ProgressUnavailable):
        store.set("x", {}, 60)
    assert not store.available
    t0 = time.perf_counter()
    for _ in range(1000):  # the breaker is open: no network, no waiting
        with pytest.raises(ProgressUnavailable):
            store.set("x", {}, 60)
    assert time.perf_counter() - t0 < 0.5
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    server = MemcachedServer(find_memcached(), port)
    server.start()
    try:
        time.sleep(0.35)
        store.set("x", {"back": True}, 60)
        assert store.available and store.get("x") == {"back": True}
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        store.close()
        server.stop()


# -- the listener -----------------------------------------------------------------------

class RecordingStore(MemoryStore):
    """A MemoryStore that keeps every value written, with its ttl."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.writes: List[Tuple[str, Dict[str, Any], int]] = []

    def set(self, progress_id: str, value: Dict[str, Any], ttl: int) -> None:
        self.writes.append((progress_id, json.loads(json.dumps(value)), ttl))
        super().set(progress_id, value, ttl)

    def states(self) -> List[str]:
        return [v["state"] for _, v, _ in self.writes]


class FailingStore:
    def __init__(self) -> None:
        self.calls = 0

    def get(self, progress_id: str) -> Optional[Dict[str, Any]]:
        raise ConnectionError("store is down")

    def set(self, progress_id: str, value: Dict[str, Any], ttl: int) -> None:
        self.calls += 1
        raise ConnectionError("store is down")

    def delete(self, progress_id: str) -> None:
        raise ConnectionError("store is down")


def ctx(length: Optional[int]) -> RequestContext:
    return RequestContext(limits=Limits(), content_length=length)


def file_info(name: str, index: int = 0, field: str = "file") -> FileInfo:
    return FileInfo(field_name=field, filename=name, raw_filename=name, declared_type="",
                    content_type="application/octet-stream", headers=Headers([]), index=index)


def listener(store: Any, settings: ProgressSettings = ProgressSettings(),
             clock: Optional[FakeClock] = None) -> Tuple[StoreProgress, FakeClock]:
    clock = clock or FakeClock()
    return StoreProgress(store, "up-1", settings, clock=clock, wall_clock=lambda: 1_700_000_000.0), clock


def test_listener_refuses_a_bad_id() -> None:
    with pytest.raises(BadProgressId):
        StoreProgress(MemoryStore(), "no spaces")


def test_first_and_final_states_always_written() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    p.start(ctx(1000))
    p.advance(1000, 1000)  # same instant: throttled
    p.processing()  # throttled too, and done comes first: never written
    p.done(ctx(1000))
    assert store.states() == ["uploading", "done"]
    first = store.writes[0][1]
    assert first["received"] == 0 and first["size"] == 1000 and first["started_at"] == 1_700_000_000.0
    done = store.get("up-1")
    assert done is not None
    assert (done["state"], done["received"], done["size"], done["eta"]) == ("done", 1000, 1000, 0.0)
    # ttl: long while uploading, short once final
    assert [ttl for *_, ttl in store.writes] == [300, 60]


def test_processing_is_written_at_once_when_the_throttle_allows() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    p.start(ctx(1000))
    clock.advance(0.3)
    p.advance(1000, 1000)
    clock.advance(0.3)  # the last write is an interval old
    p.processing()
    assert store.states() == ["uploading", "uploading", "processing"]
    processing = store.writes[-1][1]
    assert (processing["received"], processing["eta"]) == (1000, 0.0)
    p.done(ctx(1000))
    assert store.states()[-1] == "done"


def test_processing_held_by_the_throttle_is_written_by_the_flusher() -> None:
    # Real clock, so the flusher runs: a commit that outlasts the interval
    # shows as processing, at most an interval after it began.
    store = RecordingStore()
    p = StoreProgress(store, "slow-commit", ProgressSettings(interval=0.2))
    p.start(ctx(1000))
    p.advance(1000, 1000)
    began = time.monotonic()
    p.processing()  # within the interval of the first write
    assert store.states() == ["uploading"]
    deadline = began + 2.0
    while store.states()[-1] != "processing" and time.monotonic() < deadline:
        time.sleep(0.005)
    assert store.states() == ["uploading", "processing"]
    assert store.writes[-1][1]["received"] == 1000
    p.done(ctx(1000))
    assert store.states() == ["uploading", "processing", "done"]


def test_writes_are_throttled_by_time() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    total = 1000 * MiB
    p.start(ctx(total))
    for i in range(1, 1001):  # 1000 reads of 1 MiB, 1 ms apart: one second in all
        clock.advance(0.001)
        p.advance(i * MiB, total)
    p.processing()
    p.done(ctx(total))
    middle = [state for state in store.states()[1:-1] if state == "uploading"]
    # one write per 250 ms, not one per read
    assert 3 <= len(middle) <= 4, store.states()
    receiveds = [v["received"] for _, v, _ in store.writes]
    assert receiveds == sorted(receiveds)


def test_small_moves_wait_for_min_percent_or_refresh() -> None:
    store = RecordingStore()
    p, clock = listener(store, ProgressSettings(interval=0.25, min_percent=1.0, refresh=2.0))
    total = 100_000
    p.start(ctx(total))
    # A slow client: 0.1% every 0.5 s. 1% takes 5 s; refresh forces one every 2 s.
    received = 0
    for _ in range(20):  # 10 s
        clock.advance(0.5)
        received += 100
        p.advance(received, total)
    times = [v["elapsed"] for _, v, _ in store.writes[1:]]
    assert times == [2.0, 4.0, 6.0, 8.0, 10.0]
    # a jump of 1% is written as soon as the interval allows
    clock.advance(0.3)
    p.advance(received + 1000, total)
    assert store.writes[-1][1]["received"] == received + 1000


def test_chunked_body_reports_bytes_seen_as_size() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    p.start(ctx(None))
    clock.advance(0.3)
    p.advance(5000, None)
    value = store.get("up-1")
    assert value is not None
    assert (value["received"], value["size"], value["eta"]) == (5000, 5000, None)
    p.processing()
    p.done(ctx(None))
    assert store.get("up-1") == {**store.get("up-1"), "state": "done", "received": 5000, "size": 5000}  # type: ignore[dict-item]


def test_rate_and_eta_at_a_steady_speed() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    total = 100 * MiB
    p.start(ctx(total))
    for i in range(1, 41):  # 1 MiB every 0.1 s: 10 MiB/s for 4 s
        clock.advance(0.1)
        p.advance(i * MiB, total)
    value = store.get("up-1")
    assert value is not None
    assert value["rate"] == pytest.approx(10 * MiB, rel=0.01)
    remaining = total - value["received"]
    assert value["eta"] == pytest.approx(remaining / (10 * MiB), abs=0.1)
    # the speed halves: the smoothed rate follows within a few time constants
    received = 40 * MiB
    for _ in range(300):
        clock.advance(0.2)
        received += MiB
        p.advance(received, total * 10)
    value = store.get("up-1")
    assert value is not None and value["rate"] == pytest.approx(5 * MiB, rel=0.05)


def test_per_file_detail() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    p.start(ctx(10_000))
    a, b = file_info("a.png"), file_info("b.txt", 1, "other")
    p.file_start(a)
    a.size = 3000
    clock.advance(0.3)
    p.advance(3200, 10_000)
    assert store.get("up-1")["files"] == [  # type: ignore[index]
        {"field": "file", "filename": "a.png", "received": 3000, "done": False}]
    p.file_end(a)
    p.file_start(b)
    b.size = 500
    clock.advance(0.3)
    p.advance(3900, 10_000)
    files = store.get("up-1")["files"]  # type: ignore[index]
    assert files == [{"field": "file", "filename": "a.png", "received": 3000, "done": True},
                     {"field": "other", "filename": "b.txt", "received": 500, "done": False}]
    clock.advance(0.3)
    p.processing()  # b had no file_end (skipped): still counted as done
    assert [f["done"] for f in store.get("up-1")["files"]] == [True, True]  # type: ignore[index]


def test_file_list_is_capped() -> None:
    store = RecordingStore()
    p, clock = listener(store, ProgressSettings(max_files=3))
    p.start(ctx(None))
    for i in range(10):
        info = file_info(f"f{i}", i)
        p.file_start(info)
        p.file_end(info)
    p.done(ctx(None))
    value = store.get("up-1")
    assert value is not None
    assert [f["filename"] for f in value["files"]] == ["f7", "f8", "f9"]
    assert value["file_count"] == 10

    store = RecordingStore()
    p, clock = listener(store, ProgressSettings(max_files=0))  # no per-file detail at all
    p.start(ctx(None))
    p.file_start(file_info("a"))
    p.done(ctx(None))
    value = store.get("up-1")
    assert value is not None and value["files"] == [] and value["file_count"] == 1


def test_error_state_is_final() -> None:
    store = RecordingStore()
    p, clock = listener(store)
    p.start(ctx(10 * MiB))
    clock.advance(1)
    p.advance(5 * MiB, 10 * MiB)
    exc = FileTooLarge("file 'a.bin' is larger than the limit of 4.0 MiB", field="file", limit=4 * MiB)
    p.error(exc)
    clock.advance(1)
    p.advance(6 * MiB, 10 * MiB)
    p.error(QuotaExceeded("later"))
    p.done(ctx(10 * MiB))
    assert store.states() == ["uploading", "uploading", "error"]
    value = store.get("up-1")
    assert value is not None
    assert value["state"] == "error" and value["status"] == 413
    assert value["error"] == exc.to_dict()["error"]
    assert store.writes[-1][2] == 60


def test_listener_never_raises_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    store = FailingStore()
    caplog.set_level(logging.DEBUG, logger="uploadkit.progress")
    for n in range(3):  # three uploads during one outage
        p, clock = listener(store, ProgressSettings(store_retry=5.0))
        p.start(ctx(100 * MiB))
        info = file_info("x")
        p.file_start(info)
        for i in range(100):
            clock.advance(0.1)
            p.advance(i * MiB, 100 * MiB)
        p.file_end(info)
        p.processing()
        p.done(ctx(100 * MiB))
        p.error(QuotaExceeded("x"))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "store is down" in warnings[0].getMessage()
    # per upload: start, then at most two retries in 10 s (every 5 s), processing, done
    assert store.calls <= 3 * 5


def test_listener_logs_recovery(caplog: pytest.LogCaptureFixture) -> None:
    class Flaky(RecordingStore):
        down = True

        def set(self, progress_id: str, value: Dict[str, Any], ttl: int) -> None:
            if self.down:
                raise OSError("flaky")
            super().set(progress_id, value, ttl)

    store = Flaky()
    caplog.set_level(logging.WARNING, logger="uploadkit.progress")
    p, clock = listener(store, ProgressSettings(store_retry=1.0))
    p.start(ctx(100))
    store.down = False
    clock.advance(0.5)
    p.advance(50, 100)
    assert store.writes == []  # still waiting out store_retry
    clock.advance(0.6)
    p.advance(60, 100)
    assert store.states() == ["uploading"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("flaky" in m for m in messages) and any("works again" in m for m in messages)


def test_advance_is_cheap_between_writes() -> None:
    p = StoreProgress(MemoryStore(), "fast")
    p.start(ctx(1 << 40))
    t0 = time.perf_counter()
    for i in range(200_000):
        p.advance(i, 1 << 40)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{elapsed:.3f} s for 200k advance calls"
    assert p.writes <= 1 + int(elapsed / 0.25) + 1


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="interval"):
        ProgressSettings(interval=0)
    with pytest.raises(ValueError, match="min_percent"):
        ProgressSettings(min_percent=101)
    with pytest.raises(ValueError, match="ttl"):
        ProgressSettings(ttl=31 * 86400)
    with pytest.raises(ValueError, match="sse_lifetime"):
        ProgressSettings(sse_lifetime=float("inf"))
    import dataclasses
    with pytest.raises(dataclasses.FrozenInstanceError):
        ProgressSettings().interval = 1.0  # type: ignore[misc]


def test_listener_through_the_reader() -> None:
    from uploadkit.multipart import encode_multipart
    from uploadkit.reader import read_multipart

    body, ctype = encode_multipart([("title", "t")], [("file", "a.bin", "application/octet-stream", b"a" * 300_000),
                                                       ("file", "b.bin", "application/octet-stream", b"b" * 5000)])
    store = RecordingStore()
    p = StoreProgress(store, "r1", ProgressSettings(interval=0.001))
    pipe = read_multipart(io.BytesIO(body), content_type=ctype, content_length=len(body), progress=p,
                          read_size=16384)
    pipe.close()
    value = store.get("r1")
    assert value is not None
    assert (value["state"], value["received"], value["size"]) == ("done", len(body), len(body))
    assert value["files"] == [
        {"field": "file", "filename": "a.bin", "received": 300_000, "done": True},
        {"field": "file", "filename": "b.bin", "received": 5000, "done": True}]
    # processing only when the throttle let it through before done.
    states = store.states()
    assert states[-1] == "done" and set(states[:-2]) <= {"uploading"}
    assert states[-2] in ("uploading", "processing")

    store2 = RecordingStore()
    p2 = StoreProgress(store2, "r2")
    with pytest.raises(FileTooLarge):
        read_multipart(io.BytesIO(body), content_type=ctype, content_length=len(body), progress=p2,
                       limits=Limits(max_file_size=100_000), read_size=16384)
    value = store2.get("r2")
    assert value is not None and value["state"] == "error" and value["status"] == 413
    assert value["error"]["code"] == "file_too_large"


# -- the status app, called directly ------------------------------------------------------

class Response:
    def __init__(self, app: Any, env: Dict[str, Any]) -> None:
        self.status = ""
        self.headers: Dict[str, str] = {}

        def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
            self.status = status
            self.headers = dict(headers)

        result = app(env, start_response)
        self.chunks = list(result)
        if hasattr(result, "close"):
            result.close()
        self.body = b"".join(self.chunks)

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def json(self) -> Any:
        return json.loads(self.body)


def call(app: Any, query: str = "", path: str = "/upload/progress", method: str = "GET",
         **headers: str) -> Response:
    env = environ(query, **headers)
    env["PATH_INFO"] = path
    env["REQUEST_METHOD"] = method
    return Response(app, env)


def test_app_unknown_id_is_starting() -> None:
    r = call(ProgressApp(MemoryStore()), "X-Progress-ID=nobody")
    assert r.code == 200 and r.json() == {"state": "starting"}
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "no-store"


def test_app_answers_the_stored_status() -> None:
    store = MemoryStore()
    store.set("abc", {"state": "uploading", "received": 5, "size": 10}, 60)
    app = ProgressApp(store)
    assert call(app, "X-Progress-ID=abc").json() == {"state": "uploading", "received": 5, "size": 10}
    assert call(app, "", HTTP_X_PROGRESS_ID="abc").json()["received"] == 5
    head = call(app, "X-Progress-ID=abc", method="HEAD")
    assert head.code == 200 and head.body == b"" and int(head.headers["Content-Length"]) > 0


@pytest.mark.parametrize("query,headers", [
    ("", {}),
    ("X-Progress-ID=", {}),
    ("X-Progress-ID=a%20b", {}),
    ("X-Progress-ID=" + "x" * 65, {}),
    ("", {"HTTP_X_PROGRESS_ID": "../../etc/passwd"}),
])
def test_app_bad_ids_are_400(query: str, headers: Dict[str, str]) -> None:
    r = call(ProgressApp(MemoryStore()), query, **headers)
    assert r.code == 400 and r.json()["error"]["code"] == "bad_progress_id"
    assert r.headers["Content-Type"] == "application/json"


def test_app_jsonp() -> None:
    store = MemoryStore()
    store.set("abc", {"state": "done", "received": 1, "size": 1}, 60)
    r = call(ProgressApp(store), "X-Progress-ID=abc&callback=jQuery3_1.cb$")
    assert r.code == 200
    assert r.headers["Content-Type"].startswith("application/javascript")
    assert r.body == b'/**/jQuery3_1.cb$({"state":"done","received":1,"size":1});'


@pytest.mark.parametrize("callback", ["", "alert(1)", "a;b", "1abc", "a..b", "a.", "<script>", "a b",
                                      "x" * 65, "a.b.c.d.e", "caf\u00e9", "a%0Ab"])
def test_app_bad_callbacks_are_400(callback: str) -> None:
    from urllib.parse import quote
    r = call(ProgressApp(MemoryStore()), "X-Progress-ID=abc&callback=" + quote(callback))
    assert r.code == 400 and r.json()["error"]["code"] == "bad_callback"
    assert r.headers["Content-Type"] == "application/json"


def test_app_refuses_other_methods() -> None:
    r = call(ProgressApp(MemoryStore()), "X-Progress-ID=abc", method="POST")
    assert r.code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    assert r.headers["Allow"] == "GET, HEAD"


def test_app_store_failure_is_503() -> None:
    r = call(ProgressApp(FailingStore()), "X-Progress-ID=abc")  # type: ignore[arg-type]
    assert r.code == 503 and r.json()["error"]["code"] == "progress_unavailable"
    assert "store is down" not in r.body.decode()  # internals stay in the log


def test_app_progress_key() -> None:
    store = MemoryStore()
    store.set("sess-42", {"state": "processing"}, 60)

    def key(env: Dict[str, Any]) -> Optional[str]:
        cookie = env.get("HTTP_COOKIE", "")
        return cookie.split("=", 1)[1] if cookie.startswith("sid=") else None

    app = ProgressApp(store, progress_key=key)
    assert call(app, "", HTTP_COOKIE="sid=sess-42").json() == {"state": "processing"}
    assert call(app, "X-Progress-ID=sess-42").code == 400  # the key replaces the default lookup
    assert call(app, "", HTTP_COOKIE="sid=bad id").json()["error"]["code"] == "bad_progress_id"


def test_app_serves_the_script() -> None:
    app = ProgressApp(MemoryStore())
    r = call(app, path="/upload/progress/uploadkit.js")
    assert r.code == 200
    assert r.headers["Content-Type"] == "application/javascript; charset=utf-8"
    assert b"uploadkit" in r.body and b"X-Progress-ID" in r.body
    again = call(app, path="/upload/progress/uploadkit.js", HTTP_IF_NONE_MATCH=r.headers["ETag"])
    assert again.code == 304 and again.body == b""
    assert call(app, path="/upload/progress/uploadkit.js", method="DELETE").code == 405


class ScriptedStore(MemoryStore):
    """Replays a list of values, one per get; None once exhausted means 'same as last'."""

    def __init__(self, values: List[Optional[Dict[str, Any]]]) -> None:
        super().__init__()
        self.values = list(values)
        self.last: Optional[Dict[str, Any]] = None
        self.reads = 0

    def get(self, progress_id: str) -> Optional[Dict[str, Any]]:
        self.reads += 1
        if self.values:
            self.last = self.values.pop(0)
        return self.last


def sse_events(body: bytes) -> List[str]:
    return [block for block in body.decode().split("\n\n") if block]


def test_sse_streams_changes_until_final() -> None:
    clock = FakeClock()
    store = ScriptedStore([None, None, {"state": "uploading", "received": 1, "size": 3},
                           {"state": "uploading", "received": 1, "size": 3},
                           {"state": "uploading", "received": 2, "size": 3},
                           {"state": "done", "received": 3, "size": 3}])
    app = ProgressApp(store, ProgressSettings(sse_poll=0.25), clock=clock, sleep=clock.advance)
    r = call(app, "X-Progress-ID=abc", HTTP_ACCEPT="text/event-stream")
    assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert r.headers["Cache-Control"] == "no-store"
    blocks = sse_events(r.body)
    assert blocks[0].startswith("retry: 1000\n")
    data = [json.loads(line[6:]) for b in blocks for line in b.split("\n") if line.startswith("data: ")]
    assert [d["state"] for d in data] == ["starting", "uploading", "uploading", "done"]
    assert [d.get("received") for d in data] == [None, 1, 2, 3]


def test_sse_heartbeats_and_bounded_lifetime() -> None:
    clock = FakeClock()
    store = ScriptedStore([None])
    app = ProgressApp(store, ProgressSettings(sse_poll=0.5, sse_heartbeat=2.0, sse_lifetime=10.0,
                                              sse_start_wait=60.0),  # the lifetime ends it
                      clock=clock, sleep=clock.advance)
    t0 = clock.now
    r = call(app, "X-Progress-ID=abc", HTTP_ACCEPT="text/event-stream")
    blocks = sse_events(r.body)
    assert blocks.count(": keepalive") == 4  # at 2, 4, 6, 8 s
    assert blocks[-1].startswith(": lifetime over")
    assert clock.now - t0 == pytest.approx(10.0)
    assert store.reads == 1 + 19  # at 0, then every 0.5 s until 9.5 s


def test_sse_store_failure_mid_stream() -> None:
    clock = FakeClock()

    class Dying(ScriptedStore):
        def get(self, progress_id: str) -> Optional[Dict[str, Any]]:
            value = super().get(progress_id)
            if self.reads > 2:
                raise ConnectionError("gone")
            return value

    app = ProgressApp(Dying([{"state": "uploading", "received": 1, "size": 2}]),
                      clock=clock, sleep=clock.advance)
    blocks = sse_events(call(app, "X-Progress-ID=abc", HTTP_ACCEPT="text/event-stream").body)
    assert blocks[-1].startswith("event: unavailable\ndata: ")
    assert json.loads(blocks[-1].split("data: ", 1)[1])["error"]["code"] == "progress_unavailable"


def test_sse_for_a_finished_upload_is_one_event() -> None:
    store = MemoryStore()
    store.set("abc", {"state": "error", "status": 413}, 60)
    r = call(ProgressApp(store), "X-Progress-ID=abc", HTTP_ACCEPT="text/event-stream")
    assert sse_events(r.body) == ['retry: 1000\ndata: {"state":"error","status":413}']


def test_bytes_held_back_by_the_throttle_are_written_when_the_client_stalls() -> None:
    # A burst inside one throttle window, then silence: no later read will
    # come to write the count, so the flusher must. (Real clock on purpose.)
    store = RecordingStore()
    p = StoreProgress(store, "stall", ProgressSettings(interval=0.1, min_percent=1.0, refresh=60.0))
    p.start(RequestContext(limits=Limits(), content_length=100 * 2**20))
    for mib in range(1, 17):
        p.advance(mib * 2**20, 100 * 2**20)
    assert store.get("stall")["received"] < 16 * 2**20  # held back by the throttle
    deadline = time.monotonic() + 3
    while store.get("stall")["received"] != 16 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert store.get("stall")["received"] == 16 * 2**20
    assert store.get("stall")["state"] == "uploading"
    writes = p.writes
    time.sleep(0.3)  # nothing new: the flusher does not write again
    assert p.writes == writes


def test_a_flush_never_lands_after_the_final_state() -> None:
    store = RecordingStore()
    p = StoreProgress(store, "fin", ProgressSettings(interval=0.1, min_percent=1.0, refresh=60.0))
    ctx = RequestContext(limits=Limits(), content_length=10 * 2**20)
    p.start(ctx)
    for mib in range(1, 11):
        p.advance(mib * 2**20, 10 * 2**20)
    p.processing()
    p.done(ctx)
    time.sleep(0.3)
    assert store.get("fin")["state"] == "done"
    assert store.get("fin")["received"] == 10 * 2**20


def test_the_flusher_keeps_to_the_throttle() -> None:
    # A slow upload: 1 MB every 50 ms of 1,000 MB. The rule allows a write per
    # 1% (10 MB) or per refresh (0.5 s): the flusher must not add one per interval.
    store = RecordingStore()
    p = StoreProgress(store, "slow", ProgressSettings(interval=0.05, min_percent=1.0, refresh=0.5))
    p.start(RequestContext(limits=Limits(), content_length=1000 * 10**6))
    for step in range(1, 31):
        time.sleep(0.05)
        p.advance(step * 10**6, 1000 * 10**6)
    time.sleep(0.6)  # the stall: the last count is written once the refresh allows
    assert store.get("slow")["received"] == 30 * 10**6
    # start, 2 by percent (10 and 20 MB), about 3 refreshes over 1.5 s, the stall's flush
    assert len(store.writes) <= 9, [w[1]["received"] for w in store.writes]


@pytest.mark.parametrize("spec, expected", [
    ("127.0.0.1:11211", ("127.0.0.1", 11211)), ("localhost", ("localhost", 11211)),
    ("::1", ("::1", 11211)), ("[::1]:5000", ("::1", 5000)), ("[::1]", ("::1", 11211)),
    (("127.0.0.1", 1), ("127.0.0.1", 1)),
])
def test_memcached_server_specs(spec: Any, expected: Tuple[str, int]) -> None:
    from uploadkit.progress import _parse_server

    assert _parse_server(spec) == expected


# -- bounds, liveness, held final states, stream cap --------------------------------------

HOSTILE_NAME = "\x01" * 7900  # JSON spends six bytes on each


def test_a_status_is_bounded_whatever_the_names() -> None:
    store = RecordingStore()
    settings = ProgressSettings()
    p, clock = listener(store, settings)
    p.start(ctx(800_000))
    for i in range(100):
        info = file_info(f"{i:03}{HOSTILE_NAME}", i, field=HOSTILE_NAME)
        p.file_start(info)
        p.file_end(info)
    p.error(FileTooLarge(f"file {HOSTILE_NAME!r} is too large", field=HOSTILE_NAME, limit=1))
    value = store.get("up-1")
    assert value is not None
    assert all(len(json.dumps(v, separators=(",", ":"))) <= settings.max_status_bytes for _, v, _ in store.writes)
    # Six bytes a character: not all 100 files fit; the newest are kept, the count stays.
    assert 0 < len(value["files"]) < 100 and value["file_count"] == 100
    assert value["files"][-1]["filename"].startswith("099")
    first = value["files"][0]
    assert len(first["field"]) == len(first["filename"]) == 200 and first["field"].endswith("\u2026")
    assert len(value["error"]["message"]) == 800 and len(value["error"]["field"]) == 200
    assert value["error"]["code"] == "file_too_large" and value["status"] == 413

    # A tighter bound: the oldest files go first, the count stays.
    store = RecordingStore()
    p, clock = listener(store, ProgressSettings(max_status_bytes=4096))
    p.start(ctx(None))
    for i in range(100):
        info = file_info(f"{HOSTILE_NAME}{i:03}", i)
        p.file_start(info)
        p.file_end(info)
    p.done(ctx(None))
    value = store.get("up-1")
    assert value is not None and value["state"] == "done" and value["file_count"] == 100
    assert 0 < len(value["files"]) < 100 and value["files"][-1]["filename"].endswith("\u2026")
    assert all(len(json.dumps(v, separators=(",", ":"))) <= 4096 for _, v, _ in store.writes)


def test_a_status_silent_too_long_reads_as_stopped() -> None:
    now = [1_700_000_100.0]
    store = MemoryStore()
    app = ProgressApp(store, ProgressSettings(stale_after=30.0), wall_clock=lambda: now[0])
    for state in ("uploading", "processing", "starting"):
        store.set("a", {"state": state, "received": 5, "size": 10, "rate": 3, "eta": 2.0,
                        "updated_at": 1_700_000_075.0}, 60)
        assert call(app, "X-Progress-ID=a").json()["state"] == state  # 25 s: alive
    now[0] = 1_700_000_106.0  # 31 s without a write
    value = call(app, "X-Progress-ID=a").json()
    assert (value["state"], value["status"], value["received"], value["size"]) == ("error", 502, 5, 10)
    assert value["error"]["code"] == "upload_stopped" and value["error"]["limit"] == 30.0
    assert value["error"]["message"] == ("the upload stopped: the server receiving it has not reported "
                                         "for 31 s (the limit is 30 s)")
    assert value["rate"] is None and value["eta"] is None
    events = sse_events(call(app, "X-Progress-ID=a", HTTP_ACCEPT="text/event-stream").body)
    assert len(events) == 1 and '"upload_stopped"' in events[0]  # final: the stream ends
    store.set("b", {"state": "done", "received": 1, "size": 1, "updated_at": 1.0}, 60)
    assert call(app, "X-Progress-ID=b").json()["state"] == "done"  # final states never go stale
    store.set("c", {"state": "uploading", "received": 1, "size": 2}, 60)
    assert call(app, "X-Progress-ID=c").json()["state"] == "uploading"  # no mark: an older writer


def test_a_heartbeat_keeps_a_stalled_upload_alive() -> None:
    # Real clock on purpose: the flusher writes the heartbeats.
    store = RecordingStore()
    p = StoreProgress(store, "beat", ProgressSettings(heartbeat=0.05, stale_after=0.5, refresh=60.0))
    c = RequestContext(limits=Limits(), content_length=10 * MiB)
    p.start(c)
    p.advance(MiB, 10 * MiB)  # and then the client stalls: no read, no advance
    deadline = time.monotonic() + 5
    while len(store.writes) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(store.writes) >= 6, store.writes
    marks = [v["updated_at"] for _, v, _ in store.writes]
    assert marks == sorted(marks) and marks[-1] - marks[0] > 0.15
    assert {v["state"] for _, v, _ in store.writes} == {"uploading"}
    p.done(c)
    writes = len(store.writes)
    time.sleep(0.3)
    assert len(store.writes) == writes and store.get("beat")["state"] == "done"  # type: ignore[index]


def test_a_final_state_the_store_failed_to_take_is_written_once_it_answers() -> None:
    from uploadkit import progress as progress_mod

    class Down(RecordingStore):
        down = True

        def set(self, progress_id: str, value: Dict[str, Any], ttl: int) -> None:
            if self.down:
                raise ConnectionError("store is down")
            super().set(progress_id, value, ttl)

    store = Down()
    settings = ProgressSettings(store_retry=0.05)
    for n in range(3):
        p = StoreProgress(store, f"held-{n}", settings)
        c = RequestContext(limits=Limits(), content_length=100)
        p.start(c)
        p.advance(100, 100)
        if n == 2:
            p.error(FileTooLarge("too large", limit=1))
        else:
            p.done(c)
    time.sleep(0.2)
    assert store.writes == []
    store.down = False
    deadline = time.monotonic() + 5
    while len(store.writes) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted((pid, v["state"], ttl) for pid, v, ttl in store.writes) == [
        ("held-0", "done", 60), ("held-1", "done", 60), ("held-2", "error", 60)]
    assert store.get("held-0")["received"] == 100  # type: ignore[index]
    assert [key for key in progress_mod._PENDING._held if key[0] == id(store)] == []
    time.sleep(0.2)
    assert len(store.writes) == 3  # written once


def test_event_streams_are_capped_and_end_without_an_upload() -> None:
    clock = FakeClock()
    store = MemoryStore()
    store.set("up", {"state": "uploading", "received": 1, "size": 9}, 60)
    app = ProgressApp(store, ProgressSettings(sse_max_streams=2, sse_poll=0.5, sse_start_wait=3.0),
                      clock=clock, sleep=clock.advance)

    def open_stream(pid: str) -> Tuple[str, Dict[str, str], Any]:
        seen: Dict[str, Any] = {}

        def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> None:
            seen.update(status=status, headers=dict(headers))

        env = environ(f"X-Progress-ID={pid}", HTTP_ACCEPT="text/event-stream")
        env["PATH_INFO"] = "/upload/progress"
        body = app(env, start_response)
        return seen["status"], seen["headers"], body

    _, h1, s1 = open_stream("up")
    _, h2, s2 = open_stream("up")
    assert h1["Content-Type"].startswith("text/event-stream") and app.open_streams == 2
    status, h3, s3 = open_stream("up")  # over the cap: the poll answer
    assert status == "200 OK" and h3["Content-Type"] == "application/json"
    assert json.loads(b"".join(s3)) == {"state": "uploading", "received": 1, "size": 9}
    s1.close()  # closed by the server before its first chunk: the slot comes back
    assert app.open_streams == 1
    next(iter(s2))
    s2.close()
    assert app.open_streams == 0
    # An id with no upload ends after sse_start_wait, not sse_lifetime.
    t0 = clock.now
    _, h4, s4 = open_stream("nobody")
    blocks = sse_events(b"".join(s4))
    assert blocks[-1] == ": no upload with this id, reconnect" and clock.now - t0 == pytest.approx(3.0)
    assert app.open_streams == 0
    r = call(ProgressApp(store, ProgressSettings(sse_max_streams=0)), "X-Progress-ID=up",
             HTTP_ACCEPT="text/event-stream")
    assert r.headers["Content-Type"] == "application/json"  # 0: every client polls


def test_new_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="stale_after"):
        ProgressSettings(heartbeat=5.0, stale_after=9.0)
    with pytest.raises(ValueError, match="max_status_bytes"):
        ProgressSettings(max_status_bytes=2_000_000)
    with pytest.raises(ValueError, match="max_name_length"):
        ProgressSettings(max_name_length=0)
    with pytest.raises(ValueError, match="sse_max_streams"):
        ProgressSettings(sse_max_streams=-1)
    with pytest.raises(ValueError, match="sse_start_wait"):
        ProgressSettings(sse_start_wait=0)


def test_reads_between_writes_skip_the_throttle_and_still_get_written() -> None:
    # Real clock, so the flusher runs: between two writes a read returns before
    # the lock (the flusher already looks at the throttle's next chance), and
    # the count of the last reads is written by the flusher once it may be.
    store = RecordingStore()
    p = StoreProgress(store, "fast-1", ProgressSettings(interval=0.05, min_percent=0))
    p.start(ctx(100_000_000))
    received = 0
    calls = 0
    until = time.monotonic() + 0.3
    while time.monotonic() < until:
        received += 1000
        calls += 1
        p.advance(received, 100_000_000)
    deadline = time.monotonic() + 2.0
    while store.writes[-1][1]["received"] != received and time.monotonic() < deadline:
        time.sleep(0.01)
    counts = [w[1]["received"] for w in store.writes]
    assert counts[-1] == received, counts
    assert counts == sorted(counts)
    # Throttled: one write at the start, then about one per 50 ms, not one per read.
    assert 3 <= len(counts) <= 0.3 / 0.05 + 4 < calls, (len(counts), calls)
    p.done(ctx(100_000_000))
    assert store.writes[-1][1]["state"] == "done"
