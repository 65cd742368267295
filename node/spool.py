"""The spool: received instances on disk, written atomically and fsynced.

Layout: ``<data_dir>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``;
a later revision of the same SOP instance (different bytes) is ``<SOP>.r<N>.dcm``. A file
is fsynced where it was received (or, from another disk, copied to ``*.part`` and
fsynced), then renamed to its final name, and the directory is fsynced: after a crash a
file either exists complete or not at all.
Directories are created 0700 and files 0600 (:mod:`node.datadir`): they hold patient data.

Datasets arrive in ``<data_dir>/receiving/`` (the SCP's chunked receive writes there, not to
$TMPDIR, through :class:`ReceivingFile`) and are moved into the spool: on the spool's disk, a
move needs no space, and what an interrupted transfer leaves behind is found and removed at
the next start. A write that fails there (the disk full) deletes the partial file at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import mmap
import os
import queue
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from node.datadir import PRIVATE_FILE, open_private, private_dirs

log = logging.getLogger("medgemma.spool")

# PS3.5 9.1: components of digits separated by dots, no leading zeros, at most 64 chars.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CHUNK = 1 << 20
#: Lock files that serialise the storing of one SOP instance (:meth:`Spool.instance_lock`):
#: a SOP Instance UID maps to one of this many, so their number stays small.
INSTANCE_LOCK_BUCKETS = 64
#: errno values that mean the disk (or the user's quota on it) is full.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: A file being received has its written bytes sent on to the disk every this many bytes
#: (:func:`start_writeback`), so the fsync before the C-STORE response waits for the last
#: few MiB instead of the whole dataset.
WRITEBACK_BYTES = 4 << 20
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start write-out of dirty pages, do not wait


def _sync_file_range() -> object | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):  # not Linux (glibc/musl)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_range: Any = _sync_file_range()


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing ``length`` bytes of ``fd`` from ``offset`` to the disk, without waiting
    (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``; nothing elsewhere). Only earlier:
    durability still comes from the fsync, which then has less left to write."""
    if _sync_range is not None:
        _sync_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


#: A file being received with buffered writes hands what it wrote to the hashing thread
#: in batches of this many bytes; at most QUEUED_JOBS jobs wait there (then the receiving
#: thread waits).
HASH_BATCH_BYTES = 1 << 20
QUEUED_JOBS = 32


class _BackgroundThread:
    """One daemon thread that runs queued jobs in the order they were queued. A process has
    two (:data:`_writer`: the blocks of files received with O_DIRECT; :data:`_hasher`: the
    SHA-256 of every received chunk), so the receiving threads neither wait for the disk
    nor hash, and writing one block overlaps hashing the one before (both release the GIL:
    on other cores, they overlap receiving). Started on first use, and again in a forked
    child (threads do not survive a fork)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[Callable[[], object]] = queue.Queue(QUEUED_JOBS)
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, args=(self._queue,), name=self.name, daemon=True
                )
                self._thread.start()
        self._queue.put(job)

    def wait(self) -> None:
        """Return once every job submitted before this call has run."""
        done = threading.Event()
        self.submit(done.set)
        done.wait()

    @staticmethod
    def _run(work: queue.Queue[Callable[[], object]]) -> None:
        while True:
            job = work.get()
            try:
                job()
            except Exception:  # a bug: logged; the thread goes on, or every wait() would hang
                log.exception("a %s job failed", threading.current_thread().name)
            del job


def _hash_all(sha256: Any, chunks: list[bytes | memoryview]) -> None:
    for chunk in chunks:
        sha256.update(chunk)


_writer = _BackgroundThread("medgemma-write")
_hasher = _BackgroundThread("medgemma-hash")

#: A dataset being received goes to its file in blocks of this many bytes, written with
#: O_DIRECT (:class:`ReceivingFile`); the last block is padded to :data:`_DIRECT_ALIGN` and
#: the file cut to its size.
DIRECT_BLOCK_BYTES = 1 << 20
#: The start of a received file the kernel is asked to read back into the page cache once
#: its first block is written (the C-STORE handler parses the file meta and header there).
HEADER_READ_AHEAD = 256 << 10
_DIRECT_ALIGN = 4096  # a multiple of every logical block size (512, 4096)
_POOLED_BLOCKS = 48  # blocks kept for reuse: the hashing queue's and a few more


class _BlockPool:
    """Page-aligned blocks of :data:`DIRECT_BLOCK_BYTES` (anonymous private mappings), kept
    for reuse: memory written again and again stays mapped, where a new block would be new
    memory for the kernel (and for a virtual machine's host) every time."""

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def get(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, DIRECT_BLOCK_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def put(self, block: mmap.mmap) -> None:
        with self._lock:
            if len(self._free) < _POOLED_BLOCKS:
                self._free.append(block)


_blocks = _BlockPool()


#: File systems (st_dev) whose O_DIRECT writes failed with EINVAL although they took the
#: flag (some FUSE and network file systems): later files there are written buffered.
_no_direct_devices: set[int] = set()


def _direct_io(fd: int) -> bool:
    """Switch ``fd`` to O_DIRECT (Linux; not every file system takes it)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        if os.fstat(fd).st_dev in _no_direct_devices:
            return False
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | flag)
    except OSError:
        return False
    return True


def _refuses_direct_writes(fd: int, exc: OSError) -> None:
    """After EINVAL from an O_DIRECT write, write later files on that file system buffered
    (the file at hand has failed: its sender gets A700 and may send it again)."""
    if exc.errno != errno.EINVAL:
        return
    try:
        device = os.fstat(fd).st_dev
    except OSError:
        return
    if device not in _no_direct_devices:
        _no_direct_devices.add(device)
        log.warning(
            "O_DIRECT writes refused (EINVAL) on the file system of the receive directory: "
            "datasets are received with buffered writes from now on"
        )


class SpoolError(Exception):
    """The spool cannot take a file (disk full, unsafe UID)."""


class OutOfSpace(SpoolError):
    """Free space is below the configured watermark."""


def is_valid_uid(uid: str) -> bool:
    """True for a well-formed DICOM UID (also what keeps spool paths inside the spool)."""
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


@dataclass(frozen=True)
class StoredFile:
    path: Path
    relative_path: str
    sha256: str
    size_bytes: int


def sha256_of(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size in bytes of a file."""
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


def _make_durable(path: Path) -> None:
    """Make a file private (a moved file keeps its old mode) and fsync it."""
    with path.open("rb+") as f:
        os.fchmod(f.fileno(), PRIVATE_FILE)
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` (mode 0600, its new directories 0700) through ``<path>.part`` + fsync +
    rename + directory fsync."""
    private_dirs(path.parent)
    part = path.with_name(path.name + ".part")
    try:
        with os.fdopen(open_private(part), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
        _fsync_dir(path.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


class ReceivingFile:
    """A dataset being written into the receive directory, as it arrives (the binary file
    object pynetdicom's chunked receive writes to and flushes; ``file`` is itself).

    Where the file system takes O_DIRECT (ext4, xfs; tmpfs too since Linux 6.6), what is
    written is gathered in page-aligned blocks of :data:`DIRECT_BLOCK_BYTES` (reused:
    :class:`_BlockPool`), and each full block is written to the disk directly, by the
    process's writing thread (:class:`_BackgroundThread`) while the next one fills;
    :meth:`digest` or :meth:`close` writes the last, partial block (padded, then the file is
    cut to its size). So the received bytes are not copied into new page-cache memory,
    which cost up to 30 ms of system CPU per 10 MB file on the receiving thread here (a
    direct write: about 2 ms), and the fsync before the C-STORE response has little left to
    write (docs/performance.md, "Direct writes"). Elsewhere writes are buffered, and the
    written bytes are sent on to the disk every :data:`WRITEBACK_BYTES`
    (:func:`start_writeback`). Either way the file holds everything written once
    :meth:`digest` or :meth:`close` has returned; the stored instance is durable only after
    the spool's fsync (:meth:`Spool.store_file`).

    The SHA-256 of what is written is computed as it is written (:meth:`digest`), so the
    stored file is not read a second time to hash it: every byte of the file passes through
    :meth:`write`, in order, and nothing else writes to it. The hashing runs in the
    process's hashing thread, a block (or a batch of :data:`HASH_BATCH_BYTES` of buffered
    writes) at a time, in order; a file smaller than one is hashed in :meth:`digest`. What
    is written must not change afterwards (pynetdicom hands over bytes, or views of a PDU it
    never touches again).

    A failing write (disk full: ENOSPC, EDQUOT; any OSError, creating the file too) does not
    stop the transfer: the first error is kept in :attr:`error`, the partial file is deleted
    at once (its space freed), and the rest of the dataset is dropped as it comes, so the
    C-STORE completes and its handler can answer Out of Resources on an association that
    goes on. A block the writing thread fails to write fails the file at the next :meth:`write`,
    :meth:`digest` or :meth:`close`. The file is created 0600 (``tempfile.mkstemp``), like
    the spool's.
    """

    def __init__(self, directory: Path, prefix: str = "rx-", suffix: str = ".dcm") -> None:
        self.error: OSError | None = None
        self._file: BinaryIO | None = None
        self._sha256 = hashlib.sha256()
        self._size = 0
        self._unhashed: list[bytes | memoryview] = []  # written, not yet handed to hashing
        self._unhashed_bytes = 0
        self._handed_over = False  # whether the writing or hashing thread has had any of it
        self._written_back = 0  # bytes handed to start_writeback so far
        self._block: mmap.mmap | None = None  # direct: the block being filled
        self._used = 0  # direct: bytes of the current block filled
        self._direct = False
        self._finished = False  # direct: the last block is written, the file cut to size
        self._block_error: OSError | None = None  # a background job of this file failed
        try:
            fd, name = tempfile.mkstemp(suffix=suffix, prefix=prefix, dir=directory)
        except OSError as exc:
            self.error = exc
            # a name no file has: the receiver deletes whatever path it is given afterwards
            self.name = str(directory / f"{prefix}not-created-{secrets.token_hex(8)}{suffix}")
            return
        self.name = name
        if _direct_io(fd):
            self._direct = True
            self._file = os.fdopen(fd, "wb", buffering=0)
            self._block = _blocks.get()
        else:
            self._file = os.fdopen(fd, "wb")

    @property
    def file(self) -> ReceivingFile:
        return self

    @property
    def closed(self) -> bool:
        return self._file is None or self._file.closed

    @property
    def direct(self) -> bool:
        """Whether the file is written with O_DIRECT, in blocks."""
        return self._direct

    def write(self, data: bytes | memoryview) -> int:
        """Write ``data``; after a failure, drop it. Returns ``len(data)`` either way."""
        if self.error is None:
            self._failed_in_background()
        if self._file is None or self.error is not None:
            return len(data)
        if self._direct:
            self._gather(data)
            return len(data)
        try:
            self._file.write(data)  # buffered: all of it, or an OSError
        except OSError as exc:
            self._fail(exc)
        else:
            self._unhashed.append(data)
            self._unhashed_bytes += len(data)
            if self._unhashed_bytes >= HASH_BATCH_BYTES:
                self._hand_over()
            self._size += len(data)
            if self._size - self._written_back >= WRITEBACK_BYTES:
                self._write_back()
        return len(data)

    def _gather(self, data: bytes | memoryview) -> None:
        """Copy ``data`` into the current block; hand each full block to the background
        thread, to be written and hashed."""
        with memoryview(data) as view:
            count = len(view)
            pos = 0
            while pos < count:
                assert self._block is not None
                take = min(count - pos, DIRECT_BLOCK_BYTES - self._used)
                self._block[self._used : self._used + take] = view[pos : pos + take]
                self._used += take
                self._size += take
                pos += take
                if self._used == DIRECT_BLOCK_BYTES:
                    offset = self._size - DIRECT_BLOCK_BYTES
                    _writer.submit(partial(self._guarded, self._store_block, self._block, offset))
                    self._handed_over = True
                    self._block = _blocks.get()
                    self._used = 0

    def _store_block(self, block: mmap.mmap, offset: int) -> None:
        """In the writing thread: write a full block at ``offset`` and hand it to the
        hashing thread (which gives it back to the pool); after a failure, only give it
        back."""
        try:
            if self._block_error is None and self.error is None:
                assert self._file is not None
                fd = self._file.fileno()
                _write_at(fd, block, DIRECT_BLOCK_BYTES, offset)
                if offset == 0:
                    # the C-STORE handler reads the file meta and the header from here, and
                    # a direct write leaves nothing in the page cache: have the kernel read
                    # it back while the rest arrives, not when the handler asks
                    _read_ahead(fd, HEADER_READ_AHEAD)
                _hasher.submit(partial(self._guarded, self._hash_block, block))
                return
        except OSError as exc:
            assert self._file is not None
            _refuses_direct_writes(self._file.fileno(), exc)
            self._block_error = exc
        _blocks.put(block)

    def _guarded(self, job: Callable[..., object], *args: object) -> None:
        """Run one of this file's jobs in a background thread; an exception that is not a
        failed write (a bug) fails the file too (EIO), so it is never stored with a hole or a
        wrong digest, and is raised on for the thread to log."""
        try:
            job(*args)
        except Exception as exc:
            if self._block_error is None:
                self._block_error = OSError(errno.EIO, f"received data not written: {exc!r}")
            raise

    def _failed_in_background(self) -> bool:
        """Fail the file if one of its background jobs failed (call it after waiting for
        them, or before a write); whether it did."""
        if self._block_error is None:
            return False
        self._fail(self._block_error)
        return True

    def _hash_block(self, block: mmap.mmap) -> None:
        """In the hashing thread: add a written block to the digest, give it back."""
        try:
            with memoryview(block) as view:
                self._sha256.update(view)
        finally:
            _blocks.put(block)

    def _finish(self) -> None:
        """Direct: once the writing thread is done with this file's blocks, write the last,
        partial block and cut the file to its size, then wait for the hashing thread (once;
        nothing after a failure)."""
        if not self._direct or self._finished or self.error is not None:
            return
        if self._handed_over:
            _writer.wait()
        if self._failed_in_background():
            return
        assert self._file is not None and self._block is not None
        block, used = self._block, self._used
        if self._handed_over:
            # hashed in the hashing thread (after the blocks before it) while it is written
            _hasher.submit(partial(self._guarded, self._hash_tail, block, used))
        failed: OSError | None = None
        try:
            if used:
                _write_at(self._file.fileno(), block, used, self._size - used)
            os.ftruncate(self._file.fileno(), self._size)
        except OSError as exc:
            _refuses_direct_writes(self._file.fileno(), exc)
            failed = exc
        if self._handed_over:
            _hasher.wait()  # every block, the last one too, is in the digest (or failed)
        if failed is not None:
            self._fail(failed)  # the hashing thread is done with the block: it may go back
            return
        if self._failed_in_background():
            return
        if not self._handed_over:
            with memoryview(block) as view:
                self._sha256.update(view[:used])
        self._release_block()
        self._finished = True

    def _hash_tail(self, block: mmap.mmap, used: int) -> None:
        """In the hashing thread: add the last, partial block to the digest (the block
        stays the file's until :meth:`_finish` is done with it)."""
        with memoryview(block) as view:
            self._sha256.update(view[:used])

    def _write_back(self) -> None:
        assert self._file is not None
        try:
            self._file.flush()
        except OSError as exc:
            self._fail(exc)
            return
        start_writeback(self._file.fileno(), self._written_back, self._size - self._written_back)
        self._written_back = self._size

    def _hand_over(self) -> None:
        _hasher.submit(partial(self._guarded, _hash_all, self._sha256, self._unhashed))
        self._unhashed = []
        self._unhashed_bytes = 0
        self._handed_over = True

    def digest(self) -> tuple[str, int] | None:
        """(SHA-256 hex digest, size in bytes) of everything written so far, or None after
        a failed write (the file is gone). Direct: the file is complete afterwards, and takes
        no more writes."""
        if self._direct:
            self._finish()
        if self.error is not None or self._file is None:
            return None
        if self._direct:
            return self._sha256.hexdigest(), self._size
        if self._handed_over:
            if self._unhashed:
                self._hand_over()
            _hasher.wait()
            if self._failed_in_background():
                return None
        else:
            _hash_all(self._sha256, self._unhashed)
            self._unhashed = []
            self._unhashed_bytes = 0
        return self._sha256.hexdigest(), self._size

    def flush(self) -> None:
        """Buffered: flush. Direct: nothing (blocks are written as they fill)."""
        if self._file is not None and self.error is None and not self._direct:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)

    def close(self) -> None:
        if self._file is not None and self.error is None:
            self._finish()
            if self.error is not None:
                return
            try:
                self._file.close()
            except OSError as exc:
                self._fail(exc)

    def _release_block(self) -> None:
        if self._block is not None:
            _blocks.put(self._block)
            self._block = None

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        self._unhashed = []  # no digest after a failure
        if self._handed_over:
            _writer.wait()  # no block of this file is being written when it is closed
        if self._file is not None:
            try:
                self._file.close()  # the buffered bytes fail to flush again; the fd is closed
            except OSError:
                pass
        self._release_block()
        Path(self.name).unlink(missing_ok=True)


def _read_ahead(fd: int, length: int) -> None:
    """Ask the kernel to read the first ``length`` bytes of ``fd`` into the page cache (a
    hint: nothing happens where it is not taken)."""
    try:
        os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass


def _write_at(fd: int, block: mmap.mmap, length: int, offset: int) -> None:
    """Write ``length`` bytes of a block at ``offset`` of an O_DIRECT file, padded to
    _DIRECT_ALIGN (the caller cuts the file to its size afterwards)."""
    padded = -(-length // _DIRECT_ALIGN) * _DIRECT_ALIGN
    with memoryview(block) as view:
        done = 0
        while done < padded:
            done += os.pwrite(fd, view[done:padded], offset + done)


@dataclass(frozen=True)
class Leftovers:
    """Partial received datasets removed at start: how many files, how many bytes."""

    files: int
    size_bytes: int


class Spool:
    def __init__(
        self, root: Path, min_free_bytes: int = 0, receive_dir: Path | None = None
    ) -> None:
        """``receive_dir``: where datasets are written while they arrive (default: the
        ``receiving`` directory beside ``root``); it should be on the spool's file system."""
        self.root = root
        self.min_free_bytes = min_free_bytes
        self.receive_dir = receive_dir if receive_dir is not None else root.parent / "receiving"
        self.lock_dir = root.parent / "spool-locks"
        private_dirs(self.root)
        private_dirs(self.receive_dir)
        private_dirs(self.lock_dir)

    @contextlib.contextmanager
    def instance_lock(self, sop_instance_uid: str) -> Iterator[None]:
        """Hold while deciding the revision of, storing and recording one SOP instance.

        Two associations (threads or receiving processes of this node) storing the same new
        SOP Instance UID with different bytes would otherwise both see no stored revision,
        both write ``<SOP>.dcm`` (the second replacing the first's acknowledged bytes) and
        only one ledger row would stand. Under this lock the second sees the first's row and
        stores a revision 2, or answers an identical duplicate. An ``flock`` on a bucket file:
        it holds across the node's processes and its threads alike (each call opens the file
        itself), and is released when the holder dies.
        """
        bucket = hashlib.sha256(sop_instance_uid.encode()).digest()[0] % INSTANCE_LOCK_BUCKETS
        fd = os.open(
            self.lock_dir / f"instance-{bucket:02d}.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming_bytes: int) -> None:
        """Raise OutOfSpace when storing ``incoming_bytes`` would cross the watermark."""
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise OutOfSpace(
                f"free space {free // 2**20} MiB minus {incoming_bytes // 2**20} MiB incoming "
                f"is below the watermark of {self.min_free_bytes // 2**20} MiB "
                f"on {self.root}"
            )

    def relative_path(self, study_uid: str, series_uid: str, sop_uid: str, revision: int) -> str:
        for what, uid in (("Study", study_uid), ("Series", series_uid), ("SOP Instance", sop_uid)):
            if not is_valid_uid(uid):
                raise SpoolError(f"{what} Instance UID {uid!r} is not a valid DICOM UID")
        name = f"{sop_uid}.dcm" if revision == 1 else f"{sop_uid}.r{revision}.dcm"
        return f"{study_uid}/{series_uid}/{name}"

    def path_of(self, relative_path: str) -> Path:
        return self.root / relative_path

    def store_file(self, source: Path, relative_path: str, sha256: str, size: int) -> StoredFile:
        """Move (or, across file systems, copy) ``source`` into the spool durably.

        The source is consumed: renamed when it is on the spool's file system, else copied.
        A file on the spool's disk (the receive directory) already takes its space: the
        free-space check counts it as used, and adds only what a copy would write.
        """
        same_disk = source.stat().st_dev == self.root.stat().st_dev
        self.check_space(0 if same_disk else size)
        final = self.root / relative_path
        private_dirs(final.parent)
        part = final.with_name(final.name + ".part")
        try:
            moved = False
            if same_disk:
                # fsynced where it is, then renamed once: after a crash the final name holds
                # the whole file or is not there (a file left in the receive directory is
                # removed at the next start)
                _make_durable(source)
                try:
                    os.replace(source, final)
                    moved = True
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # the same device, another mount: copied
                        raise
            if not moved:
                with source.open("rb") as src, os.fdopen(open_private(part), "wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                _make_durable(part)
                os.replace(part, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno in DISK_FULL:
                raise OutOfSpace(f"disk full while writing {relative_path}") from exc
            raise SpoolError(f"cannot write {relative_path}: {exc.strerror}") from exc
        return StoredFile(final, relative_path, sha256, size)

    def remove_leftovers(self) -> Leftovers:
        """Delete what interrupted transfers left in the receive directory (a peer killed
        mid-C-STORE, a node crash). Only at start: while the SCP runs, files there are
        arriving."""
        files = size = 0
        for path in self.receive_dir.iterdir():
            if path.is_file() or path.is_symlink():
                size += path.lstat().st_size
                path.unlink(missing_ok=True)
                files += 1
        return Leftovers(files, size)

    def remove_orphan_parts(self) -> int:
        """Delete ``*.part`` files left by a crash (never a complete ``.dcm``); return how many."""
        count = 0
        for part in self.root.rglob("*.part"):
            part.unlink(missing_ok=True)
            count += 1
        return count
