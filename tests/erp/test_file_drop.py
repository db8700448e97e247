"""FileDropAdapter on a real directory: the files, their order, dedupe, and failures."""

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import resource
import signal
import stat
import subprocess
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
    ErpBatch,
    ErpLine,
    Feed,
    Transient,
)
from erp_bridge.adapters.file_drop import FORMAT_VERSION, FileDropAdapter
from erp_bridge.adapters.http import line_fields
from server.clock import FakeClock

# Local disk answers in milliseconds; a send that takes this long has hung.
TIMEOUT_S = 10.0
# The budget of the test whose write hangs: short, since it is waited out.
HANG_TIMEOUT_S = 0.1
# Polls for a released write to finish; 10 ms apart, so at most two seconds.
POLLS_MAX = 200
POLL_INTERVAL_S = 0.01

AdapterFactory = Callable[..., FileDropAdapter]


@pytest.fixture
async def open_adapter() -> AsyncIterator[AdapterFactory]:
    adapters: list[FileDropAdapter] = []

    def open_(directory: pathlib.Path, **settings: Any) -> FileDropAdapter:
        adapter = FileDropAdapter(directory=directory, **settings)
        adapters.append(adapter)
        return adapter

    yield open_
    for adapter in adapters:
        await adapter.close()


def line(line_id: str, **fields: Any) -> ErpLine:
    values: dict[str, Any] = {
        "line_id": line_id,
        "sku": "SKU-1",
        "location": "WH-1",
        "on_hand_delta": 0,
        "held_delta": 1,
        "reservation_id": "R-" + line_id,
        "channel": "web",
        "kind": "reserve",
    }
    return ErpLine(**(values | fields))


def batch(batch_id: str, *lines: ErpLine, stream: str = "bridge.s0") -> ErpBatch:
    return ErpBatch(batch_id=batch_id, stream=stream, feed=Feed.POSITIONS, lines=lines)


def names_in(directory: pathlib.Path) -> list[str]:
    return sorted(os.listdir(directory))


async def test_batch_is_written_as_jsonl_and_manifest(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    clock = FakeClock()
    clock.advance(1.5)
    adapter = open_adapter(tmp_path, clock=clock)
    sent = batch(
        "bridge.s0.0.0-7.1",
        line("L1", sku="Å-1", on_hand_delta=-3),
        line("L2", reservation_id="", channel=""),
    )

    ack = await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert ack == Acknowledgement(
        "bridge.s0.0.0-7.1", applied_lines=2, rejected=(), duplicate=False
    )
    assert names_in(tmp_path) == [
        "bridge.s0.0.0-7.1.jsonl",
        "bridge.s0.0.0-7.1.manifest.json",
    ]
    lines_bytes = (tmp_path / "bridge.s0.0.0-7.1.jsonl").read_bytes()
    assert [json.loads(x) for x in lines_bytes.decode().splitlines()] == [
        line_fields(x) for x in sent.lines
    ]
    assert lines_bytes.endswith(b"\n")
    manifest = json.loads((tmp_path / "bridge.s0.0.0-7.1.manifest.json").read_text())
    assert manifest == {
        "batch_id": "bridge.s0.0.0-7.1",
        "stream": "bridge.s0",
        "feed": "positions",
        "line_count": 2,
        "sha256": hashlib.sha256(lines_bytes).hexdigest(),
        "created_at": "2026-01-01T00:00:01.500000Z",
        "format_version": FORMAT_VERSION,
    }
    for name in names_in(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert adapter.endpoint == f"file://{tmp_path}"
    assert (adapter.stats.in_flight, adapter.stats.in_flight_peak) == (0, 1)


@contextlib.contextmanager
def file_size_limit(size_bytes: int) -> Iterator[None]:
    """Writes past size_bytes fail with EFBIG, in this whole process, for a moment."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


async def test_lines_are_in_place_before_the_manifest_is_written(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    # The lines file of this batch is smaller than its manifest, so a size limit
    # between the two lets the first write through and fails the second: the state
    # a crash between them would leave.
    adapter = open_adapter(tmp_path)
    sent = batch("B1", line("L1"))
    limit_bytes = len(orjson.dumps(line_fields(sent.lines[0])) + b"\n")

    with (
        file_size_limit(limit_bytes),
        pytest.raises(Transient, match="errno=EFBIG"),
    ):
        await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert names_in(tmp_path) == ["B1.jsonl"]
    assert len((tmp_path / "B1.jsonl").read_bytes()) == limit_bytes
    ack = await adapter.send(sent, timeout_s=TIMEOUT_S)
    assert ack.duplicate is False
    assert names_in(tmp_path) == ["B1.jsonl", "B1.manifest.json"]
    assert len((tmp_path / "B1.manifest.json").read_bytes()) > limit_bytes


async def test_a_watcher_never_sees_a_manifest_without_its_whole_lines_file(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    adapter = open_adapter(tmp_path)
    batches = 40
    lines_per_batch = 200
    stop = threading.Event()
    problems: list[str] = []
    looks = 0

    def watch() -> None:
        # What a picker waiting for manifests does, as fast as it can.
        nonlocal looks
        while not stop.is_set():
            looks += 1
            try:
                look()
            except Exception as error:
                problems.append(repr(error))

    def look() -> None:
        for name in os.listdir(tmp_path):
            if name.startswith("."):
                continue
            if not name.endswith((".jsonl", ".manifest.json")):
                problems.append(f"unexpected file {name}")
            if name.endswith(".manifest.json"):
                manifest = json.loads((tmp_path / name).read_bytes())
                data = (tmp_path / f"{manifest['batch_id']}.jsonl").read_bytes()
                if hashlib.sha256(data).hexdigest() != manifest["sha256"]:
                    problems.append(f"{name} came before its whole lines file")

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for b in range(batches):
            lines = [line(f"B{b}.L{i}") for i in range(lines_per_batch)]
            await adapter.send(batch(f"B{b}", *lines), timeout_s=TIMEOUT_S)
    finally:
        stop.set()
        await asyncio.to_thread(watcher.join)

    assert problems == []
    assert looks > 1
    assert len(names_in(tmp_path)) == 2 * batches
    assert not [n for n in names_in(tmp_path) if n.startswith(".")]


async def test_resent_batch_is_a_duplicate_and_rewrites_nothing(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    clock = FakeClock()
    adapter = open_adapter(tmp_path, clock=clock)
    sent = batch("B1", line("L1"), line("L2"))
    await adapter.send(sent, timeout_s=TIMEOUT_S)
    before = {n: (tmp_path / n).stat().st_ino for n in names_in(tmp_path)}
    manifest_before = (tmp_path / "B1.manifest.json").read_bytes()
    clock.advance(60)

    ack = await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert ack == Acknowledgement("B1", applied_lines=2, rejected=(), duplicate=True)
    assert {n: (tmp_path / n).stat().st_ino for n in names_in(tmp_path)} == before
    assert (tmp_path / "B1.manifest.json").read_bytes() == manifest_before


@pytest.mark.parametrize(
    "other",
    [
        batch("B1", line("L1"), line("L2", held_delta=2)),
        batch("B1", line("L1")),
        batch("B1", line("L1"), line("L2"), stream="bridge.s1"),
        ErpBatch("B1", "bridge.s0", Feed.LEDGER, (line("L1"), line("L2"))),
    ],
)
async def test_other_content_under_a_written_batch_id_is_a_conflict(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory, other: ErpBatch
) -> None:
    adapter = open_adapter(tmp_path)
    await adapter.send(batch("B1", line("L1"), line("L2")), timeout_s=TIMEOUT_S)
    files_before = {n: (tmp_path / n).read_bytes() for n in names_in(tmp_path)}

    with pytest.raises(BatchConflict, match="B1"):
        await adapter.send(other, timeout_s=TIMEOUT_S)

    assert {n: (tmp_path / n).read_bytes() for n in names_in(tmp_path)} == files_before


async def test_unreadable_manifest_under_the_batch_id_is_a_conflict(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    (tmp_path / "B1.manifest.json").write_text("{half a manifest")
    adapter = open_adapter(tmp_path)

    with pytest.raises(BatchConflict, match="not JSON"):
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert names_in(tmp_path) == ["B1.manifest.json"]


@pytest.mark.parametrize(
    "batch_id",
    ["../evil", "a/b", "/etc/passwd", ".hidden", "..", "", "x" * 129, "a\x00b", "é"],
)
async def test_batch_id_that_is_no_safe_file_name_is_refused(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory, batch_id: str
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    adapter = open_adapter(drop)

    with pytest.raises(BatchRefused, match="safe file name") as caught:
        await adapter.send(batch(batch_id, line("L1")), timeout_s=TIMEOUT_S)

    assert caught.value.line_index is None
    assert names_in(tmp_path) == ["drop"]
    assert names_in(drop) == []


@contextlib.contextmanager
def unwritable(directory: pathlib.Path) -> Iterator[None]:
    """The directory refuses new files, to root as well (root ignores permissions,
    but not the immutable attribute)."""
    directory.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


async def test_unwritable_directory_is_transient_with_the_errno(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    adapter = open_adapter(tmp_path)
    sent = batch("B1", line("L1"))

    with unwritable(tmp_path):
        with pytest.raises(PermissionError):
            (tmp_path / "probe").write_text("")
        with pytest.raises(Transient, match=r"errno=(EACCES|EPERM)") as caught:
            await adapter.send(sent, timeout_s=TIMEOUT_S)

    assert isinstance(caught.value.__cause__, PermissionError)
    assert names_in(tmp_path) == []
    ack = await adapter.send(sent, timeout_s=TIMEOUT_S)
    assert ack.duplicate is False
    assert names_in(tmp_path) == ["B1.jsonl", "B1.manifest.json"]


async def test_missing_directory_is_transient_with_the_errno(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    adapter = open_adapter(tmp_path / "not-mounted")

    with pytest.raises(Transient, match="errno=ENOENT") as caught:
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)

    assert isinstance(caught.value.__cause__, OSError)
    assert caught.value.__cause__.errno == errno.ENOENT


async def release(fifo: pathlib.Path) -> None:
    """Open the write end, which lets the blocked reader go with an empty file."""
    for _ in range(POLLS_MAX):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError as error:
            # ENXIO: the reader has not opened its end yet.
            assert error.errno == errno.ENXIO, error
        await asyncio.sleep(POLL_INTERVAL_S)
    pytest.fail("the write never opened the manifest")


async def test_hung_write_is_transient_and_holds_later_sends_until_it_ends(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    # Reading a manifest that is a FIFO blocks until someone writes to it: a disk
    # that hangs, made of real files.
    fifo = tmp_path / "B1.manifest.json"
    os.mkfifo(fifo)
    adapter = open_adapter(tmp_path)
    try:
        with pytest.raises(Transient, match="TimeoutError"):
            await adapter.send(batch("B1", line("L1")), timeout_s=HANG_TIMEOUT_S)
        with pytest.raises(Transient, match="still running"):
            await adapter.send(batch("B2", line("L2")), timeout_s=TIMEOUT_S)
        assert adapter.stats.in_flight == 1
    finally:
        await release(fifo)

    for _ in range(POLLS_MAX):
        if adapter.stats.in_flight == 0:
            break
        await asyncio.sleep(POLL_INTERVAL_S)
    else:
        pytest.fail("the released write never ended")
    ack = await adapter.send(batch("B2", line("L2")), timeout_s=TIMEOUT_S)
    assert ack.applied_lines == 1
    assert adapter.stats.in_flight_peak == 1


async def test_closed_adapter_and_bad_settings_are_caller_mistakes(
    tmp_path: pathlib.Path, open_adapter: AdapterFactory
) -> None:
    adapter = open_adapter(tmp_path)
    with pytest.raises(ValueError, match="timeout_s"):
        await adapter.send(batch("B1", line("L1")), timeout_s=0)
    await adapter.close()

    with pytest.raises(RuntimeError, match="closed"):
        await adapter.send(batch("B1", line("L1")), timeout_s=TIMEOUT_S)
    with pytest.raises(ValueError, match="file_mode"):
        FileDropAdapter(directory=tmp_path, file_mode=0o4777)
    assert names_in(tmp_path) == []
