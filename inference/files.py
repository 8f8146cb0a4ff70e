"""Files written so that a reader (or a crash) never sees half of one.

``atomic_write(path)`` writes to a temporary file in the same directory, fsyncs it
and renames it over ``path``: the old file or the new one, never a mixture; if the
write fails (a full disk), the old file stays and the temporary is removed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Any, Iterator


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


TMP_PREFIX = ".tmp-"  # atomic_write's temporaries; a crash (SIGKILL) can leave one behind


@contextlib.contextmanager
def atomic_write(path: str, binary: bool = False) -> Iterator[Any]:
    """Write ``path`` through a temporary in its directory: fsync, then rename over it.

    A failed write (a full disk: ``OSError``) removes the temporary, leaves the old
    file as it was, and is re-raised naming ``path``. A process killed mid-write
    leaves ``path`` intact and at most one ``.tmp-*`` file beside it, which no
    reader opens (run directories remove them when their lock is taken).
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1], dir=directory)
        os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:  # one line naming the file
            raise type(e)(e.errno, f"cannot write it ({e.strerror}); its previous version is kept", path) from e
        raise
    with contextlib.suppress(OSError):  # some file systems cannot fsync a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def remove_temporaries(directory: str) -> list[str]:
    """Delete the ``.tmp-*`` files a killed writer left in ``directory`` (call it only
    while no other process writes there, e.g. holding the run directory's lock)."""
    removed = []
    for name in os.listdir(directory):
        p = os.path.join(directory, name)
        if name.startswith(TMP_PREFIX) and os.path.isfile(p) and not os.path.islink(p):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
                removed.append(name)
    return removed


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # JSON has no NaN/inf: null
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def save_json(obj: Any, path: str) -> None:
    """JSON (NaN and infinities as null), written atomically."""
    with atomic_write(path) as f:
        json.dump(_jsonable(obj), f, indent=2)
        f.write("\n")
