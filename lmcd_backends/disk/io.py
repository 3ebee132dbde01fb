"""Blocking file operations of the disk tier (run in worker threads).

Nothing here touches the tier's index: each function gets what it needs and
returns a result that the Trio thread applies. Direct I/O (O_DIRECT) needs
buffers, offsets and lengths aligned to `BLOCK`; the header, the payload's
last partial block and any unaligned caller buffer go through small
per-thread aligned buffers ("bounce" buffers, anonymous maps, so page
aligned).
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import errno
import itertools
import mmap
import os
import re
import threading
from collections.abc import Iterable, Sequence

import attrs
from crc32c import crc32c

from lmcd_backends.disk.format import (
    BLOCK,
    FormatError,
    check_journal_header,
    decode_header,
    decode_records,
    encode_header,
    encode_journal_header,
    encode_record,
    header_size,
)
from lmcd_backends.protocol import ObjectId

CHUNKS_DIR = "chunks"
JOURNAL = "index.jnl"
TEMP_SUFFIX = ".tmp"
STREAM_BYTES = 4 << 20  # bounce size for unaligned direct I/O
_NAME = re.compile("[0-9a-f]{32}")
NAME_LEN = 32
_O_DIRECT = getattr(os, "O_DIRECT", 0)
# Unique temporary names within this process (next() on a count is atomic
# under the GIL); a previous process's are removed when the tier opens.
_temp_serial = itertools.count()


def subdir_names() -> list[str]:
    return [f"{i:02x}" for i in range(256)]


def chunk_path(root: str, name: str) -> str:
    return os.path.join(root, CHUNKS_DIR, name[:2], name)


def is_chunk_name(name: str, subdir: str) -> bool:
    return (
        len(name) == NAME_LEN
        and name.startswith(subdir)
        and _NAME.fullmatch(name) is not None
    )


def probe_direct(root: str) -> bool:
    """Whether the filesystem under `root` accepts O_DIRECT reads and writes
    of BLOCK-aligned buffers (tmpfs and some overlay setups do not)."""
    if not _O_DIRECT:
        return False
    path = os.path.join(root, f".direct-probe-{os.getpid()}{TEMP_SUFFIX}")
    block = mmap.mmap(-1, BLOCK)
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC | _O_DIRECT, 0o644)
    except OSError:
        return False
    try:
        return os.pwrite(fd, block, 0) == BLOCK and os.preadv(fd, [block], 0) == BLOCK
    except OSError:
        return False
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        block.close()


class Bounce(threading.local):
    """Per-thread aligned scratch buffers (each thread gets its own)."""

    def __init__(self) -> None:
        self.head: mmap.mmap | None = None
        self.tail: mmap.mmap | None = None
        self.stream: mmap.mmap | None = None

    def header(self, size: int) -> memoryview:
        if self.head is None or len(self.head) < size:
            self.head = mmap.mmap(-1, max(size, BLOCK))
        return memoryview(self.head)[:size]

    def last_block(self) -> memoryview:
        if self.tail is None:
            self.tail = mmap.mmap(-1, BLOCK)
        return memoryview(self.tail)

    def streaming(self) -> memoryview:
        if self.stream is None:
            self.stream = mmap.mmap(-1, STREAM_BYTES)
        return memoryview(self.stream)


def address(view: memoryview) -> int | None:
    """The address of a writable buffer; None for a read-only one (whose
    address ctypes cannot take), which then counts as unaligned."""
    if view.readonly:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def aligned(view: memoryview) -> bool:
    addr = address(view)
    return addr is not None and addr % BLOCK == 0


def _pwritev_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    pending = [v for v in views if len(v)]
    while pending:
        n = os.pwritev(fd, pending, offset)
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        offset += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]


def _preadv_all(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """Fill `views` from `offset`; returns the bytes read (short at EOF)."""
    pending = [v for v in views if len(v)]
    total = 0
    while pending:
        n = os.preadv(fd, pending, offset)
        if n <= 0:
            break
        total += n
        offset += n
        while pending and n >= len(pending[0]):
            n -= len(pending[0])
            pending.pop(0)
        if n:
            pending[0] = pending[0][n:]
    return total


class Journal:
    """The append-only index journal: one record per chunk written.

    Appends come from worker threads; a lock serializes them with
    `rewrite`, which replaces the file with one record per live id.
    """

    def __init__(self, root: str, fsync: bool) -> None:
        self.path = os.path.join(root, JOURNAL)
        self.fsync = fsync
        self.records = 0
        self._lock = threading.Lock()
        self._fd: int | None = None

    def read(self) -> tuple[list[ObjectId], int] | None:
        """The ids recorded (up to a torn tail) and the offset where the
        valid records end; None if there is no journal of this version."""
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if not check_journal_header(data):
            return None
        return decode_records(data, len(encode_journal_header()))

    def reopen(self, end: int, records: int) -> None:
        """Append to the journal as it is, after its last valid record at
        `end` (a torn tail is cut off first): the cheap alternative to
        `rewrite` when every record still names a chunk."""
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            if os.fstat(fd).st_size != end:
                os.ftruncate(fd, end)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            old, self._fd = self._fd, fd
            self.records = records
        if old is not None:
            os.close(old)

    def rewrite(self, ids: Iterable[ObjectId]) -> None:
        """Replace the journal with one record per id (temporary, rename)."""
        data = bytearray(encode_journal_header())
        count = 0
        for oid in ids:
            data += encode_record(oid)
            count += 1
        temp = f"{self.path}.{os.getpid()}{TEMP_SUFFIX}"
        fd = os.open(temp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            _pwritev_all(fd, [memoryview(data)], 0)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        with self._lock:
            os.rename(temp, self.path)
            old, self._fd = self._fd, os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self.records = count
        if old is not None:
            os.close(old)

    def append(self, oid: ObjectId) -> None:
        record = encode_record(oid)
        with self._lock:
            if self._fd is None:
                raise OSError(errno.EBADF, "journal is closed")
            # One write with O_APPEND: records from threads never interleave.
            os.write(self._fd, record)
            self.records += 1

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


@attrs.frozen
class WriteOptions:
    root: str
    direct: bool
    fsync: bool


def write_chunk(
    opts: WriteOptions,
    journal: Journal,
    name: str,
    oid: ObjectId,
    payload: memoryview,
    bounce: Bounce,
) -> None:
    """Write `payload` as `oid`'s chunk file under `name`, so that no reader
    ever sees a partial file under the final name: write a temporary file,
    record the id in the journal, rename. Raises `OSError` (the temporary
    file is then removed)."""
    crc = crc32c(payload)
    header = encode_header(oid, crc)
    final = chunk_path(opts.root, name)
    temp = f"{final}.{os.getpid()}-{next(_temp_serial)}{TEMP_SUFFIX}"
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
    fd = os.open(temp, flags | (_O_DIRECT if opts.direct else 0), 0o644)
    try:
        try:
            if opts.direct:
                _write_direct(fd, header, payload, bounce)
            else:
                pad = -len(payload) % BLOCK
                views = [memoryview(header), payload, memoryview(bytes(pad))]
                _pwritev_all(fd, views, 0)
            if opts.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        journal.append(oid)
        os.rename(temp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    if opts.fsync:
        dfd = os.open(os.path.dirname(final), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_direct(fd: int, header: bytes, payload: memoryview, bounce: Bounce) -> None:
    body = len(payload) // BLOCK * BLOCK
    rest = len(payload) - body
    head = bounce.header(len(header))
    head[:] = header
    if aligned(payload):
        views = [head, payload[:body]]
        if rest:
            tail = bounce.last_block()
            tail[:rest] = payload[body:]
            tail[rest:] = bytes(BLOCK - rest)
            views.append(tail)
        _pwritev_all(fd, views, 0)
        return
    # An unaligned caller buffer: stream it through an aligned one.
    _pwritev_all(fd, [head], 0)
    stream = bounce.streaming()
    offset = len(header)
    done = 0
    while done < len(payload):
        n = min(len(stream), len(payload) - done)
        stream[:n] = payload[done : done + n]
        padded = -n % BLOCK
        if padded:
            stream[n : n + padded] = bytes(padded)
        _pwritev_all(fd, [stream[: n + padded]], offset)
        offset += n + padded
        done += n


class ReadOutcome(enum.Enum):
    OK = "ok"
    MISSING = "missing"  # no file under the name
    IO_ERROR = "io error"
    CORRUPT = "corrupt"  # failed a check: magic, version, id, length, checksum


@attrs.frozen
class ReadResult:
    outcome: ReadOutcome
    reason: str = ""


def read_chunk(
    root: str, direct: bool, name: str, oid: ObjectId, out: memoryview, bounce: Bounce
) -> ReadResult:
    """Read and verify `oid`'s chunk into `out` (`oid.nbytes` bytes).

    Every check runs on every read: file length, magic and version, header
    checksum, the full id, the payload checksum. A file that fails one (or
    cannot be read) is removed, unless the name meanwhile holds another file.
    """
    path = chunk_path(root, name)
    hsize = header_size(oid)
    try:
        fd = os.open(path, os.O_RDONLY | (_O_DIRECT if direct else 0))
    except FileNotFoundError:
        return ReadResult(ReadOutcome.MISSING, "no file")
    except OSError as e:
        return ReadResult(ReadOutcome.IO_ERROR, str(e))
    st: os.stat_result | None = None
    try:
        st = os.fstat(fd)
        expected = hsize + -(-oid.nbytes // BLOCK) * BLOCK
        if st.st_size != expected:
            result = ReadResult(
                ReadOutcome.CORRUPT, f"{st.st_size} bytes on disk, expected {expected}"
            )
        else:
            result = _read_verified(fd, direct, hsize, oid, out, bounce)
    except OSError as e:
        result = ReadResult(ReadOutcome.IO_ERROR, str(e))
    finally:
        os.close(fd)
    if result.outcome is not ReadOutcome.OK and st is not None:
        # Unreadable or bad: it can never be served, so it must not keep
        # taking room that the tier no longer counts.
        remove_if_same(path, st.st_dev, st.st_ino)
    return result


def _read_verified(
    fd: int, direct: bool, hsize: int, oid: ObjectId, out: memoryview, bounce: Bounce
) -> ReadResult:
    head = bounce.header(hsize)
    n = oid.nbytes
    body = n // BLOCK * BLOCK
    rest = n - body
    if not direct:
        got = _preadv_all(fd, [head, out], 0)
        want = hsize + n
        tail = None
    elif aligned(out):
        tail = bounce.last_block() if rest else None
        views = [head, out[:body]] + ([tail] if tail is not None else [])
        want = hsize + body + (BLOCK if rest else 0)
        got = _preadv_all(fd, views, 0)
    else:
        got = _preadv_all(fd, [head], 0)
        want = hsize
        if got == want:
            got, want = _read_streamed(fd, hsize, out, bounce)
        tail = None
    if got != want:
        return ReadResult(ReadOutcome.CORRUPT, f"short read: {got} of {want} bytes")
    try:
        header = decode_header(head)
    except FormatError as e:
        return ReadResult(ReadOutcome.CORRUPT, str(e))
    if header.oid != oid:
        return ReadResult(ReadOutcome.CORRUPT, "file holds another chunk")
    crc = crc32c(out) if tail is None else crc32c(tail[:rest], crc32c(out[:body]))
    if crc != header.payload_crc:
        return ReadResult(ReadOutcome.CORRUPT, "payload checksum mismatch")
    if tail is not None:
        out[body:] = tail[:rest]
    return ReadResult(ReadOutcome.OK)


def _read_streamed(
    fd: int, offset: int, out: memoryview, bounce: Bounce
) -> tuple[int, int]:
    stream = bounce.streaming()
    done = 0
    while done < len(out):
        n = min(len(stream), len(out) - done)
        padded = n + (-n % BLOCK)
        got = _preadv_all(fd, [stream[:padded]], offset)
        if got != padded:
            return done + got, len(out)
        out[done : done + n] = stream[:n]
        offset += padded
        done += n
    return done, len(out)


def remove_if_same(path: str, dev: int, ino: int) -> None:
    """Unlink `path` if it is still the file (dev, ino): a concurrent write
    may have renamed a fresh chunk over the bad one."""
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == (dev, ino):
            os.unlink(path)
    except OSError:
        pass


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def read_header(path: str) -> ObjectId | None:
    """The id in the header of the file at `path`, if it is a valid chunk
    file of this format whose length matches its header; None otherwise."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(BLOCK)
            try:
                header = decode_header(head)
            except FormatError:
                if len(head) < BLOCK:
                    return None
                # A header longer than one block (a long key): read it all.
                size = int.from_bytes(head[12:16], "little")
                if size > 32 * BLOCK:
                    return None
                head += f.read(size - len(head))
                header = decode_header(head)
            size = os.fstat(f.fileno()).st_size
    except (OSError, FormatError):
        return None
    if size != header.header_size + -(-header.oid.nbytes // BLOCK) * BLOCK:
        return None
    return header.oid


def root_temporaries(root: str) -> list[str]:
    """Temporary files a previous process left at the top of `root`."""
    return [os.path.join(root, n) for n in os.listdir(root) if n.endswith(TEMP_SUFFIX)]


@attrs.frozen
class Listing:
    names: set[str]
    temporaries: list[str]
    foreign: list[str]


def list_chunks(root: str) -> Listing:
    """The chunk names under `root` (by file name only, no header reads),
    left-over temporary files, and files that are neither."""
    names: set[str] = set()
    temps: list[str] = []
    foreign: list[str] = []
    base = os.path.join(root, CHUNKS_DIR)
    for sub in subdir_names():
        directory = os.path.join(base, sub)
        try:
            entries = os.scandir(directory)
        except FileNotFoundError:
            continue
        with entries:
            for entry in entries:
                if is_chunk_name(entry.name, sub):
                    names.add(entry.name)
                elif entry.name.endswith(TEMP_SUFFIX):
                    temps.append(entry.path)
                else:
                    foreign.append(entry.path)
    return Listing(names, temps, foreign)
