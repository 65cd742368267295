"""The data directory holds patient data: directories 0700, files 0600, whatever the umask.

Everything the node writes under ``storage.data_dir`` (spool, results, the SQLite ledger
and its WAL/SHM files, logs, the Subscription key) is created through these helpers, and
:func:`wide_modes` finds what an older version (or an operator) left readable by others,
for the warning at start and ``medgemma-node status``.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

PRIVATE_DIR: Final = 0o700
PRIVATE_FILE: Final = 0o600
#: Most a process of the node lets others have on what it creates (CLI: os.umask).
PRIVATE_UMASK: Final = 0o077

log = logging.getLogger("medgemma.datadir")

#: Paths already warned about in this process (one warning per path).
_warned: set[Path] = set()


def private_dirs(path: Path) -> Path:
    """Create ``path`` and its missing parents, each 0700; return it."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:  # another process was first
            continue
        os.chmod(d, PRIVATE_DIR)  # mkdir's mode is masked by the umask
    return path


def create_private_file(path: Path) -> bool:
    """Create ``path`` empty with mode 0600 if it does not exist; True when created."""
    private_dirs(path.parent)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)
    return True


def open_private(path: Path) -> int:
    """A new or truncated file opened for writing, mode 0600 (an fd: wrap it with os.fdopen)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)
    return fd


def _too_wide(mode: int, is_dir: bool) -> bool:
    return bool(stat.S_IMODE(mode) & ~(PRIVATE_DIR if is_dir else PRIVATE_FILE))


def wide_modes(data_dir: Path) -> list[tuple[Path, int]]:
    """(path, mode) of the data directory, its top-level entries and the files directly in
    them (logs, the ledger, secrets) that others may read: wider than 0700 / 0600.

    Only two levels: the spool and results trees are large; their roots are checked.
    """
    if not data_dir.exists():
        return []
    found: list[tuple[Path, int]] = []
    candidates = [data_dir]
    try:
        top = sorted(data_dir.iterdir())
    except OSError:
        top = []
    for entry in top:
        candidates.append(entry)
        if entry.is_dir() and entry.name not in ("spool", "results"):
            try:
                candidates.extend(sorted(entry.iterdir()))
            except OSError:
                continue
    for p in candidates:
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISLNK(st.st_mode):
            continue
        if _too_wide(st.st_mode, stat.S_ISDIR(st.st_mode)):
            found.append((p, stat.S_IMODE(st.st_mode)))
    return found


def _sentence(path: Path, mode: int) -> str:
    fix = "700" if stat.S_ISDIR(path.lstat().st_mode) else "600"
    return (
        f"{path} is readable by other users (mode {mode:04o}; the data directory holds "
        f"patient data): chmod {fix} {path}"
    )


def wide_mode_warnings(data_dir: Path) -> list[str]:
    """One sentence per path in the data directory that others may read."""
    return [_sentence(p, mode) for p, mode in wide_modes(data_dir)]


def warn_wide_modes(data_dir: Path) -> list[str]:
    """Log a warning (once per path in this process) for each path others may read."""
    lines = []
    for p, mode in wide_modes(data_dir):
        if p in _warned:
            continue
        _warned.add(p)
        line = _sentence(p, mode)
        log.warning("%s", line)
        lines.append(line)
    return lines


__all__ = [
    "PRIVATE_DIR",
    "PRIVATE_FILE",
    "PRIVATE_UMASK",
    "create_private_file",
    "open_private",
    "private_dirs",
    "warn_wide_modes",
    "wide_mode_warnings",
    "wide_modes",
]
