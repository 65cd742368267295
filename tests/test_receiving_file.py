"""node.spool.ReceivingFile: a write that fails while a dataset arrives (the disk full) is
recorded, the partial file deleted at once, and the rest of the dataset dropped without an
error, so the C-STORE can be answered. The full disk itself, end to end, is
tests/test_fault_matrix.py::test_data_directory_filling_up_during_a_store (needs a tmpfs);
here a file size limit (RLIMIT_FSIZE: writes past it fail with EFBIG) fails the write on
any machine. Every test runs twice: with the file written in O_DIRECT blocks (where the
file system takes it, as the receive directory's does) and with buffered writes (where it
does not)."""

from __future__ import annotations

import errno
import hashlib
import os
import resource
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import node.spool
from node.spool import DIRECT_BLOCK_BYTES, HASH_BATCH_BYTES, QUEUED_JOBS, ReceivingFile

LIMIT = 64 << 10


@pytest.fixture(autouse=True, params=["direct", "buffered"])
def write_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "buffered":
        monkeypatch.setattr(node.spool, "_direct_io", lambda fd: False)
    return str(request.param)


def test_the_receive_directory_takes_direct_writes(tmp_path: Path, write_mode: str) -> None:
    receiving = ReceivingFile(tmp_path)
    assert receiving.direct == (write_mode == "direct"), (
        "O_DIRECT refused on the test's directory: received datasets would fill the page cache"
    )
    receiving.close()


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """Writes of this process past LIMIT bytes of a file fail (EFBIG, SIGXFSZ ignored)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, hard))
    try:
        yield LIMIT
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_dataset_that_fits_is_written_whole(tmp_path: Path) -> None:
    receiving = ReceivingFile(tmp_path)
    for _ in range(4):
        assert receiving.file.write(b"x" * 1000) == 1000
        receiving.file.flush()
    receiving.close()
    assert receiving.error is None and receiving.closed
    assert Path(receiving.name).parent == tmp_path
    assert Path(receiving.name).read_bytes() == b"x" * 4000
    assert Path(receiving.name).stat().st_mode & 0o777 == 0o600


def test_the_digest_is_of_exactly_the_bytes_in_the_file(tmp_path: Path) -> None:
    receiving = ReceivingFile(tmp_path)
    for i in range(50):
        receiving.write(bytes([i]) * (1000 + 37 * i))
        receiving.flush()
    digest = receiving.digest()
    receiving.close()
    stored = Path(receiving.name).read_bytes()
    assert digest == (hashlib.sha256(stored).hexdigest(), len(stored))


def test_a_failed_write_deletes_the_partial_file_and_drops_the_rest(
    tmp_path: Path, file_size_limit: int
) -> None:
    receiving = ReceivingFile(tmp_path)
    chunk = b"y" * 16384
    written = 0
    while receiving.error is None:
        assert receiving.write(chunk) == len(chunk)
        receiving.file.flush()
        written += len(chunk)
        # buffered writes fail at the limit; direct ones when the block holding it has been
        # written in the background, at most the background queue's blocks later
        bound = 4 * file_size_limit + (QUEUED_JOBS + 2) * DIRECT_BLOCK_BYTES
        assert written < bound, "the size limit did not fail the write"
    assert receiving.error.errno == errno.EFBIG
    assert not Path(receiving.name).exists(), "partial file left behind"
    assert receiving.write(chunk) == len(chunk)  # the rest of the dataset: dropped, no error
    assert receiving.digest() is None  # no file, so no digest of one
    receiving.file.flush()
    receiving.close()
    assert receiving.closed
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_cannot_be_created_is_an_error_not_an_exception(tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    receiving = ReceivingFile(missing)
    assert receiving.error is not None and receiving.error.errno == errno.ENOENT
    assert receiving.write(b"z" * 10) == 10
    receiving.close()
    assert not Path(receiving.name).exists() and not missing.exists()


def _write_in_batches(receiving: ReceivingFile, seed: int, chunks: int) -> bytes:
    written = b""
    for i in range(chunks):
        chunk = bytes([(seed + i) % 256]) * (HASH_BATCH_BYTES // 3 + 11 * i)
        receiving.write(chunk)
        receiving.flush()
        written += chunk
    return written


def test_files_of_many_hashing_batches_received_side_by_side_get_their_own_digests(
    tmp_path: Path,
) -> None:
    files = [ReceivingFile(tmp_path) for _ in range(3)]
    abandoned = ReceivingFile(tmp_path)  # a transfer that stops half-way: never digested
    _write_in_batches(abandoned, 99, 5)
    written = [b"", b"", b""]
    for round_ in range(4):  # interleaved, as concurrent associations write
        for n, receiving in enumerate(files):
            written[n] += _write_in_batches(receiving, 10 * n + round_, 3)
    for n, receiving in enumerate(files):
        digest = receiving.digest()
        receiving.close()
        stored = Path(receiving.name).read_bytes()
        assert stored == written[n]
        assert digest == (hashlib.sha256(stored).hexdigest(), len(stored))
    assert len(written[0]) > 4 * HASH_BATCH_BYTES


def test_a_forked_child_hashes_with_its_own_thread(tmp_path: Path) -> None:
    parent = ReceivingFile(tmp_path)
    _write_in_batches(parent, 1, 6)  # the parent's hashing thread is running
    assert parent.digest() is not None
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is not here; a digest must not hang
        signal.alarm(20)
        child = ReceivingFile(tmp_path)
        data = _write_in_batches(child, 2, 6)
        ok = child.digest() == (hashlib.sha256(data).hexdigest(), len(data))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_file_system_that_refuses_direct_writes_gets_buffered_ones(
    tmp_path: Path, write_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if write_mode != "direct":
        pytest.skip("about O_DIRECT writes")
    monkeypatch.setattr(node.spool, "_no_direct_devices", set())

    def refuse(*args: object) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(node.spool, "_write_at", refuse)
    first = ReceivingFile(tmp_path)
    assert first.direct
    first.write(b"x" * (DIRECT_BLOCK_BYTES + 10))  # a full block: the writing thread's
    assert first.digest() is None  # the file failed (its sender gets A700) and is gone
    assert first.error is not None and first.error.errno == errno.EINVAL
    assert not Path(first.name).exists()

    second = ReceivingFile(tmp_path)  # the same file system: buffered from now on
    assert not second.direct
    data = b"y" * (DIRECT_BLOCK_BYTES + 10)
    second.write(data)
    digest = second.digest()
    second.close()
    assert Path(second.name).read_bytes() == data
    assert digest == (hashlib.sha256(data).hexdigest(), len(data))


def test_a_bug_in_a_background_job_fails_its_file_and_not_the_next_one(
    tmp_path: Path,
    write_mode: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first background job (writing a block, or hashing a batch) raises something that
    is not a failed write: that file fails (EIO: never stored with a hole or a digest of
    part of it) and the error is logged; the thread goes on, so the next file is received."""
    name = "_write_at" if write_mode == "direct" else "_hash_all"
    real = getattr(node.spool, name)
    calls: list[object] = []

    def raise_once(*args: object) -> None:
        calls.append(args)
        if len(calls) == 1:
            raise ValueError("a bug")
        real(*args)

    monkeypatch.setattr(node.spool, name, raise_once)
    first = ReceivingFile(tmp_path)
    first.write(b"x" * (DIRECT_BLOCK_BYTES + 10))  # a full block, or hashing batch
    assert within_30_s(first.digest) is None
    assert first.error is not None and first.error.errno == errno.EIO
    assert not Path(first.name).exists()
    assert "job failed" in caplog.text and "ValueError: a bug" in caplog.text

    second = ReceivingFile(tmp_path)
    data = b"y" * (2 * DIRECT_BLOCK_BYTES + 10)
    second.write(data)
    assert within_30_s(second.digest) == (hashlib.sha256(data).hexdigest(), len(data))
    second.close()
    assert Path(second.name).read_bytes() == data


def within_30_s(call: Callable[[], object]) -> object:
    """``call()``, failing the test when it has not returned within 30 s (it waits for a
    background thread, which may be dead)."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(30)
    assert result, "still waiting for the background thread after 30 s"
    return result[0]
