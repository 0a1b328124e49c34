"""Files that many processes share (run folders, the dense cache): atomic writes, locks, leftovers of killed
writers, and reading back artefacts that may be damaged.

- :func:`atomic_torch_save` / :func:`atomic_write_json` write a temporary file ``.<name>.<pid>@<host>.<rand>.tmp``
  beside the target, fsync it, give it the permissions a plain ``open`` would (``0o666 & ~umask``: ``mkstemp``
  creates 0600, which would lock a group out of a shared cache), and rename it over the target: a reader sees
  the old file or the new one, never a part. A writer killed mid-way leaves only the temporary file;
  :func:`clean_stale_tmp` removes those whose writer is gone.
- :func:`file_lock` is an exclusive lock (``filelock``: ``flock`` where the filesystem has it, else a soft lock
  file) held for a block; :func:`try_lock` takes one without waiting.
- :func:`read_record` and :func:`load_torch` read JSON records and torch files that may be empty, truncated or
  garbage (a kill, a full disk, a bad copy): a damaged record is reported and treated as missing; a damaged
  torch file is moved aside (``<name>.damaged-<time>``, never loaded) so that the caller recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

_HOST = socket.gethostname().replace("/", "_")
# .<target name>.<pid>@<host>.<mkstemp's random part>.tmp  (the random part has no dot)
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>.+)\.[^.]+\.tmp$")
STALE_TMP_AGE_S = 60.0  # a temporary file of another host (or of the old naming) untouched this long is dead


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``: ``os.umask`` can only be read by
    setting it, which races with other threads creating files; used where /proc is missing)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic(Path(path), lambda f: torch.save(obj, f))


def _json_default(o: Any):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _finite(o: Any) -> Any:
    """JSON has no inf/nan: write them as ``null`` (what every JSON reader, pandas included, reads as a
    missing number). The writer records why a value is missing in an explicit flag next to it (e.g.
    ``compression_effective: null`` with ``layer_collapse: true``; docs/results-schema.md)."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def atomic_write_json(obj: Any, path: str | Path) -> None:
    text = json.dumps(_finite(obj), indent=2, default=_json_default, allow_nan=False)
    _atomic(Path(path), lambda f: f.write(text.encode()))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size and SHA-256 of a file: an input file replaced at the same path is another input."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


# leftovers of killed writers ---------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def is_stale_tmp(path: Path, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`_atomic` whose writer is gone: untouched for
    :data:`STALE_TMP_AGE_S` (a live writer updates the mtime with every write) and not written by a live
    process of this host (a slow live writer is never touched). The pid alone is not trusted to say the
    writer is dead: on a shared filesystem it may be another host's (or another pid namespace's) process."""
    m = _TMP_RE.match(path.name)
    if m is not None and m["host"] == _HOST and _pid_alive(int(m["pid"])):
        return False
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_TMP_AGE_S


def clean_stale_tmp(directory: str | Path, recursive: bool = True) -> list[Path]:
    """Remove the stale temporary files (:func:`is_stale_tmp`) under ``directory``; returns those removed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    candidates = d.rglob(".*.tmp") if recursive else d.glob(".*.tmp")
    removed = []
    for p in candidates:
        if p.is_file() and is_stale_tmp(p):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
                log.info("removed %s (left by a killed write)", p)
    return removed


# damaged files --------------------------------------------------------------------------------------------
def move_aside(path: Path, reason: str) -> Path | None:
    """Rename a damaged ``path`` to ``<name>.damaged-<UTC time>`` (kept for inspection, never read again) and
    log why. Returns the new path (None if another process moved it first)."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
        n += 1
    try:
        os.replace(path, target)
    except FileNotFoundError:
        return None
    log.warning("%s is damaged (%s): moved aside to %s; it will be recomputed", path, reason, target.name)
    return target


def read_record(path: str | Path, required: Iterable[str] = (), what: str = "record") -> dict | None:
    """The JSON object in ``path``, or None when it is missing or cannot be trusted: empty, truncated, not
    JSON, not an object, or without one of the ``required`` keys (a dotted key ``a.b`` requires the object
    ``a`` to hold ``b``). An untrusted record is reported with a warning naming the file and treated as
    missing: the caller recomputes it (and its atomic write replaces the bad file)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        log.warning("%s %s is unreadable (%s); ignoring it and recomputing", what, path, _short(e))
        return None
    if not isinstance(obj, dict):
        log.warning("%s %s holds %s, not a JSON object; ignoring it and recomputing", what, path,
                    type(obj).__name__)
        return None
    missing = [key for key in required if not _has(obj, key)]
    if missing:
        log.warning("%s %s lacks %s; ignoring it and recomputing", what, path, ", ".join(missing))
        return None
    return obj


def _has(obj: dict, dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in obj:
        return False
    return not rest or (isinstance(obj[head], dict) and _has(obj[head], rest))


def _short(e: BaseException) -> str:
    """``Type: first line`` of an error, without torch's advice to load with ``weights_only=False`` (wrong for a
    damaged file)."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if "weights_only" in first or "Weights only" in first:
        first = ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def torch_archive_error(path: str | Path) -> str | None:
    """Why ``path`` is not an intact torch file (None when it is). ``torch.save`` writes a zip archive with a
    CRC-32 per member, so a truncated, emptied or garbled file is found by reading the archive, without
    unpickling anything."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        return "truncated, empty or not a PyTorch file" if isinstance(e, zipfile.BadZipFile) else _short(e)
    except Exception as e:  # zipfile raises assorted errors on garbage (struct.error, NotImplementedError)
        return _short(e)
    return None if bad is None else f"corrupt member {bad} (CRC mismatch)"


def load_torch(path: str | Path, *, weights_only: bool = True, move: bool = True, required: Iterable[str] = (),
               what: str = "file") -> Any:
    """``torch.load(path)`` of an artefact this program wrote, or None when it is missing or damaged. A damaged
    file (not an intact archive, fails to load, or a dict without the ``required`` keys) is never loaded
    further: with ``move`` it is moved aside (:func:`move_aside`), otherwise only reported, and the caller
    recomputes it. ``weights_only=False`` (stage states holding modules) is used only after the archive's
    checksums matched, i.e. on exactly the bytes this program wrote."""
    path = Path(path)
    if not path.exists():
        return None
    reason = torch_archive_error(path)
    obj = None
    if reason is None:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
        except Exception as e:
            reason = _short(e)
    if reason is None and required:
        missing = [k for k in required if not (isinstance(obj, dict) and k in obj)]
        if missing:
            reason = f"lacks {', '.join(missing)}"
    if reason is None:
        return obj
    if move:
        move_aside(path, f"{what}: {reason}")
    else:
        log.warning("%s %s is damaged (%s); ignoring it", what, path, reason)
    return None


# locks and directories ------------------------------------------------------------------------------------
@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive lock held for the block (``filelock.FileLock``: ``flock`` where the filesystem supports it,
    a soft lock file elsewhere, e.g. on some network filesystems): one process pretrains, the others wait and
    then find the result. The lock file is created with the umask's permissions (group-shared caches)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def try_lock(path: str | Path) -> FileLock | None:
    """Take the exclusive lock ``path`` without waiting: the held lock (``release()`` it), or None when another
    process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _probe_prefix() -> str:
    # named like an atomic write's temporary file, so that a probe left by a kill is cleaned up like one
    return f".prunelab_probe.{os.getpid()}@{_HOST}."


def is_writable(directory: str | Path) -> bool:
    """Whether a file can be created in ``directory`` (an existing one), tried with a uniquely named probe
    (concurrent runs probing one folder never collide)."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=_probe_prefix(), suffix=".tmp"):
            pass
    except OSError:
        return False
    return True


def check_writable(directory: str | Path, option: str) -> Path:
    """Create ``directory`` if needed and make sure we can write there; a clear error otherwise."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=_probe_prefix(), suffix=".tmp") as f:
            f.write(b"ok")
    except OSError as e:
        raise PermissionError(f"{option}={d} is not writable ({e.strerror}); choose a writable directory") from e
    return d
