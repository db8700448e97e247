"""The ERP as a directory: each batch becomes two files that an ERP job picks up.

Design note. Batch B is written as `B.jsonl`, one JSON object per line with the same
fields as the HTTP contract, and `B.manifest.json`, which names the batch id, stream,
feed, line count, the SHA-256 of the .jsonl bytes, created_at and format_version. Each
file is written whole under a hidden temporary name in the same directory, flushed,
fsynced and renamed into place, and then the directory is fsynced so that the rename
itself survives a crash. The .jsonl is durable before the manifest is even written,
so a picker that waits for the manifest never reads half a batch, after a crash
neither.

The manifest is also the dedupe record: a resend of a batch id whose manifest holds
the same content is acknowledged as a duplicate and rewrites nothing, other content
is a conflict.

An acknowledgement means "written durably", no more. ERP teams that import files
report refused lines out of band (a reply file, a mail to someone); this adapter
reads none of that, so such lines never reach the bridge's dead letters and it never
reports a rejection.

Blocking file work runs on one worker thread of this adapter. A thread cannot be
cancelled, so a write that outlives its budget goes on; until it ends, later sends
fail at once as Transient instead of queueing behind a hung disk.

Known shortcomings: dedupe holds only while the manifest stays in the directory; a
picker that moves or deletes files after importing them must itself skip batch ids
it has seen, or a resend after a lost acknowledgement is imported twice. And the
temporary files of a write cut short by a crash stay behind (hidden, ending in
`.tmp`); pickers ignore them, and nothing removes them.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import enum
import errno
import hashlib
import logging
import os
import re
import tempfile

import orjson

from erp_bridge.adapters import (
    Acknowledgement,
    BatchConflict,
    BatchRefused,
    ErpBatch,
    Transient,
)
from erp_bridge.adapters.http import line_fields
from server.clock import Clock, SystemClock

logger = logging.getLogger(__name__)

# Batch ids become file names: letters, digits, '.', '-' and '_' only, never a leading
# '.', so that no id can climb out of the directory or pass for a temporary file.
# 128 characters is the longest id an ERP is asked to store; with the suffixes that
# stays far below the 255 bytes a file name may have.
BATCH_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Bumped when the meaning of either file changes, so a picker can refuse what it does
# not understand.
FORMAT_VERSION = 1
# A manifest is a few hundred bytes; one far larger was not written by this adapter.
MANIFEST_BYTES_MAX = 64 * 1024
# Readable by the ERP's picker, which typically runs as another user of the group or
# the host; mkstemp alone would create files only their owner can read.
FILE_MODE_DEFAULT = 0o644
# One write at a time: the files of a batch are written in order, and a hung disk
# then holds one thread rather than one per retry.
WRITES_IN_FLIGHT_MAX = 1

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)


class _Found(enum.Enum):
    """What the directory held under a batch id before this send."""

    NOTHING = "nothing"
    SAME = "same"
    OTHER = "other"


@dataclasses.dataclass(frozen=True, slots=True)
class _Written:
    found: _Found
    # Why an existing manifest counts as other content; empty otherwise.
    detail: str


@dataclasses.dataclass
class FileDropStats:
    """Writes running now, the most at once so far, and the limit."""

    in_flight: int = 0
    in_flight_peak: int = 0
    in_flight_max: int = WRITES_IN_FLIGHT_MAX


class FileDropAdapter:
    """An ErpAdapter that drops each batch into `directory` as .jsonl plus manifest.

    `file_mode` is the permission of the files written; `clock` stamps created_at.
    """

    def __init__(
        self,
        *,
        directory: str | os.PathLike[str],
        file_mode: int = FILE_MODE_DEFAULT,
        clock: Clock | None = None,
    ) -> None:
        if not 0 <= file_mode <= 0o777:
            raise ValueError(f"file_mode must be permission bits, got {file_mode:o}")
        self._directory = os.path.abspath(directory)
        self.endpoint = f"file://{self._directory}"
        self._file_mode = file_mode
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=WRITES_IN_FLIGHT_MAX, thread_name_prefix="erp-file-drop"
        )
        self._in_flight: concurrent.futures.Future[_Written] | None = None
        self._closed = False
        self.stats = FileDropStats()

    async def send(self, batch: ErpBatch, *, timeout_s: float) -> Acknowledgement:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if self._closed:
            raise RuntimeError(f"the adapter for {self.endpoint} is closed")
        if not BATCH_ID_PATTERN.fullmatch(batch.batch_id):
            raise BatchRefused(
                f"batch id {batch.batch_id!r} is not a safe file name: "
                f"expected {BATCH_ID_PATTERN.pattern}",
                line_index=None,
            )
        if self._in_flight is not None and not self._in_flight.done():
            raise Transient(
                f"an earlier write to {self.endpoint} is still running; "
                f"batch {batch.batch_id} not written"
            )

        created_at = _timestamp(self._clock.now_us())
        written = await self._run(batch, created_at=created_at, timeout_s=timeout_s)

        if written.found is _Found.OTHER:
            raise BatchConflict(
                f"{self.endpoint} holds other content under batch id "
                f"{batch.batch_id}: {written.detail}"
            )
        logger.debug(
            "batch dropped: endpoint=%s batch_id=%s lines=%d duplicate=%s",
            self.endpoint,
            batch.batch_id,
            len(batch.lines),
            written.found is _Found.SAME,
        )
        return Acknowledgement(
            batch_id=batch.batch_id,
            applied_lines=len(batch.lines),
            rejected=(),
            duplicate=written.found is _Found.SAME,
        )

    async def close(self) -> None:
        # A write still running finishes on its own; waiting for it here could hang
        # on the very disk that made it slow.
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(
        self, batch: ErpBatch, *, created_at: str, timeout_s: float
    ) -> _Written:
        """Write the batch on the worker thread within timeout_s; OSError -> Transient."""
        # Counted before the thread can finish, so the count never dips below zero.
        self.stats.in_flight += 1
        self.stats.in_flight_peak = max(self.stats.in_flight_peak, self.stats.in_flight)
        future = self._executor.submit(self._write, batch, created_at)
        self._in_flight = future
        future.add_done_callback(self._count_done)

        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.wrap_future(future)
        except OSError as error:
            # TimeoutError is an OSError too, without an errno: the write may still
            # complete, which a resend then finds as a duplicate.
            code = errno.errorcode.get(error.errno or 0, "no errno")
            raise Transient(
                f"batch {batch.batch_id} not written to {self.endpoint}: "
                f"errno={code} {type(error).__name__} {error}".rstrip()
            ) from error

    def _count_done(self, future: concurrent.futures.Future[_Written]) -> None:
        # Runs on the worker thread; a plain integer decrement is atomic under the GIL
        # and only ever read for statistics.
        self.stats.in_flight -= 1

    def _write(self, batch: ErpBatch, created_at: str) -> _Written:
        """The blocking part, on the worker thread: dedupe, then both files in order."""
        lines_bytes = b"".join(
            orjson.dumps(line_fields(line)) + b"\n" for line in batch.lines
        )
        manifest: dict[str, object] = {
            "batch_id": batch.batch_id,
            "stream": batch.stream,
            "feed": batch.feed.value,
            "line_count": len(batch.lines),
            "sha256": hashlib.sha256(lines_bytes).hexdigest(),
            "created_at": created_at,
            "format_version": FORMAT_VERSION,
        }
        lines_path = os.path.join(self._directory, f"{batch.batch_id}.jsonl")
        manifest_path = os.path.join(self._directory, f"{batch.batch_id}.manifest.json")

        earlier = _read_manifest(manifest_path)
        if earlier is not None:
            return _compare(earlier, manifest)

        _replace_durably(lines_path, lines_bytes, mode=self._file_mode)
        _fsync_directory(self._directory)
        manifest_bytes = orjson.dumps(manifest, option=orjson.OPT_INDENT_2) + b"\n"
        _replace_durably(manifest_path, manifest_bytes, mode=self._file_mode)
        _fsync_directory(self._directory)
        return _Written(_Found.NOTHING, "")


def _read_manifest(path: str) -> dict[str, object] | str | None:
    """The manifest at path, a text saying why it is unreadable, or None if absent."""
    try:
        with open(path, "rb") as file:
            raw = file.read(MANIFEST_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MANIFEST_BYTES_MAX:
        return f"its manifest is over {MANIFEST_BYTES_MAX} bytes"
    try:
        manifest: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "its manifest is not JSON"
    if not isinstance(manifest, dict):
        return "its manifest is not a JSON object"
    return manifest


def _compare(earlier: dict[str, object] | str, manifest: dict[str, object]) -> _Written:
    # Our manifests are written whole, so an unreadable one was put there by someone
    # else: another batch, as far as this adapter can tell.
    if isinstance(earlier, str):
        return _Written(_Found.OTHER, earlier)
    for key in ("sha256", "line_count", "feed", "stream"):
        if earlier.get(key) != manifest[key]:
            return _Written(
                _Found.OTHER, f"{key} {earlier.get(key)!r} there, {manifest[key]!r} now"
            )
    return _Written(_Found.SAME, "")


def _replace_durably(path: str, data: bytes, *, mode: int) -> None:
    """Put data at path whole or not at all, and on disk before returning."""
    directory, name = os.path.split(path)
    # A leading '.' hides the temporary file from pickers that glob for batches.
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), mode)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _timestamp(now_us: int) -> str:
    """RFC 3339 in UTC with microseconds, e.g. 2026-01-01T00:00:00.000000Z."""
    when = _EPOCH + datetime.timedelta(microseconds=now_us)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")
