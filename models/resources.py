"""What the machine allows: files that are safe to read, and the memory a run may take.

* :func:`open_regular`: a file opened for reading only if it is a regular file of at
  most a given size. A FIFO would block ``open`` forever, a device such as /dev/zero
  or /dev/urandom never ends, a directory is not data: all are refused before a byte is
  read (the open itself uses O_NONBLOCK, so even a FIFO swapped in after the check
  cannot block it; the flag is cleared once the file is known to be regular).
* :func:`available_memory`: the bytes this process may still allocate, the least of
  the kernel's estimate of available memory (MemAvailable), the cgroup's limit less its
  usage, and the address-space and data-segment limits (``ulimit -v`` / ``-d``) less
  what the process already maps; :func:`check_memory` refuses, in one line, a need
  that exceeds it.

Every refusal is a :class:`~elbolab.models.errors.UsageError` (a ``DataError`` for files).
"""

from __future__ import annotations

import os
import resource
import stat

from elbolab.models.errors import DataError, UsageError

GiB = 1 << 30


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


def _human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def open_regular(path: str, max_bytes: int | None = None, what: str = "file"):
    """``path`` opened for binary reading (a file object) if it is a regular file (after
    following symbolic links) of at most ``max_bytes``; DataError naming ``path``
    otherwise: absent, unreadable, a directory, a FIFO, a device, a socket, too large."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise DataError(f"{path}: is a directory, expected a {what}")
        raise DataError(f"{path}: is {_kind(st.st_mode)}, not a regular file; only regular files are read")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the check and the open
            raise DataError(f"{path}: is {_kind(st.st_mode)}, not a regular file; only regular files are read")
        if max_bytes is not None and st.st_size > max_bytes:
            raise DataError(f"{path}: {_human(st.st_size)}, more than the {_human(max_bytes)} a {what} may hold here")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_kib(path: str, key: str) -> int | None:
    """A ``key: N kB`` line of a /proc file, in bytes (None if absent)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _cgroup_room() -> int | None:
    """The cgroup's memory limit less its usage (cgroup v2, else v1); None without a limit."""
    try:
        with open("/proc/self/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":  # v2
            base = os.path.join("/sys/fs/cgroup", parts[2].lstrip("/"))
            limit, used = _read_int(os.path.join(base, "memory.max")), _read_int(os.path.join(base, "memory.current"))
            if limit is not None:
                return limit - (used or 0)
    limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
    used = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
    if limit is not None and limit < 1 << 60:  # v1 reports "no limit" as a huge number
        return limit - (used or 0)
    return None


def available_memory() -> int | None:
    """Bytes this process may still allocate (see the module docstring); None if the
    system says nothing (not Linux)."""
    room = []
    avail = _read_kib("/proc/meminfo", "MemAvailable")
    if avail is not None:
        room.append(avail)
    cg = _cgroup_room()
    if cg is not None:
        room.append(cg)
    for limit, used_key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            room.append(soft - (_read_kib("/proc/self/status", used_key) or 0))
    return max(0, min(room)) if room else None


def check_memory(need: float, what: str) -> None:
    """UsageError if ``need`` bytes (an estimate of ``what``) exceed :func:`available_memory`."""
    room = available_memory()
    if room is not None and need > room:
        raise UsageError(f"{what} needs about {_human(need)} of memory, more than the {_human(room)} available")
