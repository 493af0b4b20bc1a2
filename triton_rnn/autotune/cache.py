"""The on-disk cache of tuned tiles: one JSON file, never pickle.

Location: ``$TRITON_RNN_CACHE_DIR/autotune.json``, where the directory
defaults to ``platformdirs.user_cache_dir("triton_rnn")``
(``~/.cache/triton_rnn`` on Linux).

File layout (schema :data:`SCHEMA_VERSION`)::

    {"schema": 1, "triton_version": "3.9.0", "library_version": "0.1.0",
     "entries": {"<entry key>": {"config": {...}, "timings": [...], ...}}}

An *entry key* names the GPU, its compute capability, the Triton and
library versions, the kernel key and the batch bucket (see
:func:`entry_key`), e.g.
``gru:forward:bfloat16:h1024:b32:sm90|NVIDIA_H200|cc9.0|triton-3.9.0|triton_rnn-0.1.0``.

Safety:

* writes go to a temporary file in the same directory and are moved in place
  with ``os.replace`` (readers never see half a file);
* every read-modify-write runs under a ``filelock`` lock (``autotune.json.lock``),
  so concurrent tuners lose no entries;
* a corrupt or truncated file, a foreign schema, or a file written by another
  Triton version gives **one** :class:`CacheWarning`, is copied aside to
  ``autotune.json.bad-<timestamp>`` (so its entries are never silently lost)
  and is replaced by a fresh valid file. Malformed single entries are dropped
  the same way (the whole original file is copied aside) while the valid ones
  stay.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..kernels.config import KernelConfig
from .space import KernelKey

__all__ = [
    "SCHEMA_VERSION", "CACHE_FILENAME", "CacheWarning", "CacheFormatError",
    "cache_dir", "cache_path", "entry_key", "split_entry_key", "validate_entry",
    "triton_version", "library_version", "document_text", "TuneCache",
]

SCHEMA_VERSION = 1
CACHE_FILENAME = "autotune.json"
LOCK_TIMEOUT_S = 120.0


class CacheWarning(UserWarning):
    """The cache file was unusable (it has been copied aside and rebuilt)."""


_UMASK: Optional[int] = None


def _file_mode(path: Path) -> int:
    """The mode a rewrite of ``path`` gets: the existing file's, else 0o666 less the umask.

    ``mkstemp`` creates 0o600 files; a shared cache or an exported file must stay
    readable by whoever could read it before.
    """
    global _UMASK
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        pass
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return 0o666 & ~_UMASK


def document_text(entries: Dict[str, dict]) -> str:
    """A cache document holding ``entries``, as the JSON text the cache file has."""
    doc = _empty_doc()
    doc["entries"] = dict(sorted(entries.items()))
    return json.dumps(doc, indent=1, allow_nan=False) + "\n"


def _write_doc_atomically(path: Path, entries: Dict[str, dict]) -> None:
    """Write a cache document with ``entries`` to ``path``: a temporary file, then a rename."""
    text = document_text(entries)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp",
                               dir=str(path.parent) if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class CacheFormatError(ValueError):
    """A cache document or entry does not follow the schema."""


_DEFAULT_DIR: Optional[str] = None


def cache_dir() -> Path:
    """``$TRITON_RNN_CACHE_DIR``, else ``platformdirs.user_cache_dir("triton_rnn")``."""
    global _DEFAULT_DIR
    env = os.environ.get("TRITON_RNN_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    if _DEFAULT_DIR is None:
        import platformdirs
        _DEFAULT_DIR = platformdirs.user_cache_dir("triton_rnn")
    return Path(_DEFAULT_DIR)


def cache_path() -> Path:
    return cache_dir() / CACHE_FILENAME


_TRITON_VERSION: Optional[str] = None


def triton_version() -> str:
    """The installed Triton's version, without importing Triton when it isn't loaded."""
    global _TRITON_VERSION
    if _TRITON_VERSION is None:
        import sys
        mod = sys.modules.get("triton")
        v = getattr(mod, "__version__", None) if mod is not None else None
        if v is None:
            try:
                from importlib.metadata import version
                v = version("triton")
            except Exception:  # noqa: BLE001
                import triton
                v = triton.__version__
        _TRITON_VERSION = str(v)
    return _TRITON_VERSION


def library_version() -> str:
    from .. import __version__
    return __version__


def entry_key(key: KernelKey, gpu: str, capability: Tuple[int, int],
              triton: Optional[str] = None, library: Optional[str] = None) -> str:
    """The string an entry is stored under (kernel key + bucket, GPU, capability, versions)."""
    gpu_id = "_".join(str(gpu).split()) or "unknown"
    major, minor = (int(c) for c in capability)
    return (f"{key}|{gpu_id}|cc{major}.{minor}|triton-{triton or triton_version()}"
            f"|triton_rnn-{library or library_version()}")


def split_entry_key(text: str) -> dict:
    """Parse an entry key into its parts (raises :class:`CacheFormatError`)."""
    parts = text.split("|")
    if len(parts) != 5 or not parts[2].startswith("cc") or not parts[3].startswith("triton-") \
            or not parts[4].startswith("triton_rnn-"):
        raise CacheFormatError(f"malformed entry key {text!r}")
    try:
        kkey = KernelKey.parse(parts[0])
        major, minor = (int(v) for v in parts[2][2:].split("."))
    except ValueError as e:
        raise CacheFormatError(f"malformed entry key {text!r}: {e}") from None
    return {"kernel_key": kkey, "gpu": parts[1], "capability": (major, minor),
            "triton": parts[3][len("triton-"):], "library": parts[4][len("triton_rnn-"):]}


def _finite_or_none(v) -> bool:
    return v is None or (type(v) in (int, float) and math.isfinite(v))


def validate_entry(name: str, entry) -> None:
    """Check one entry; raises :class:`CacheFormatError` naming what is wrong.

    The key must be in the canonical form :func:`entry_key` writes (any other
    spelling could never be looked up), the config must pass
    :meth:`KernelConfig.from_dict`, and ``ms``/``default_ms``/``speedup`` and
    each timing's ``ms`` must be finite numbers when present.
    """
    if not isinstance(name, str):
        raise CacheFormatError(f"entry key {name!r} is not a string")
    parts = split_entry_key(name)
    canonical = entry_key(parts["kernel_key"], parts["gpu"], parts["capability"],
                          triton=parts["triton"], library=parts["library"])
    if name != canonical:
        raise CacheFormatError(f"entry key {name!r} is not canonical (expected {canonical!r})")
    if not isinstance(entry, dict):
        raise CacheFormatError(f"entry {name!r} is not an object")
    if "config" not in entry:
        raise CacheFormatError(f"entry {name!r} has no config")
    try:
        KernelConfig.from_dict(entry["config"])
    except Exception as e:  # noqa: BLE001 - any failure means a bad config
        raise CacheFormatError(f"entry {name!r} has a bad config: {e}") from None
    for field in ("ms", "default_ms", "speedup"):
        if not _finite_or_none(entry.get(field)):
            raise CacheFormatError(f"entry {name!r}: {field} must be a finite number, "
                                   f"got {entry.get(field)!r}")
    timings = entry.get("timings", [])
    if not isinstance(timings, list):
        raise CacheFormatError(f"entry {name!r}: timings must be a list")
    for t in timings:
        if not isinstance(t, dict) or "config" not in t or not _finite_or_none(t.get("ms")):
            raise CacheFormatError(f"entry {name!r}: malformed timing {t!r}"[:300])


def _empty_doc() -> dict:
    return {"schema": SCHEMA_VERSION, "triton_version": triton_version(),
            "library_version": library_version(), "entries": {}}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not allowed (strict JSON)")


def parse_document(text: str, *, check_triton: bool = True) -> Tuple[Dict[str, dict], list]:
    """Parse a cache document.

    Returns ``(valid entries, problems)``. A problem with the whole document
    (bad JSON, foreign schema, other Triton version) raises
    :class:`CacheFormatError`; bad single entries are left out and listed in
    ``problems``.
    """
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise CacheFormatError(f"not valid JSON ({e.msg} at line {e.lineno})") from None
    except (ValueError, RecursionError) as e:  # NaN, a 5000-digit number, deep nesting...
        raise CacheFormatError(f"not a usable JSON document ({type(e).__name__}: "
                               f"{str(e)[:200]})") from None
    if not isinstance(doc, dict):
        raise CacheFormatError("top level is not a JSON object")
    if type(doc.get("schema")) is not int or doc.get("schema") != SCHEMA_VERSION:
        raise CacheFormatError(f"schema {doc.get('schema')!r}, expected {SCHEMA_VERSION}")
    if check_triton and doc.get("triton_version") != triton_version():
        raise CacheFormatError(f"written by Triton {doc.get('triton_version')!r}, "
                               f"this is Triton {triton_version()}")
    entries = doc.get("entries")
    if not isinstance(entries, dict):
        raise CacheFormatError("'entries' is not an object")
    good, problems = {}, []
    for name, entry in entries.items():
        try:
            validate_entry(name, entry)
        except CacheFormatError as e:
            problems.append(str(e))
            continue
        good[name] = entry
    return good, problems


class TuneCache:
    """The cache file at ``path`` (default :func:`cache_path`)."""

    _warned: set = set()

    def __init__(self, path=None):
        path = Path(path) if path is not None else cache_path()
        # A symlinked cache file is updated where it points (and locked there), not
        # replaced by a regular file beside the link.
        self.path = Path(os.path.realpath(path)) if path.is_symlink() else path
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    # -- helpers ----------------------------------------------------------
    def _lock(self):
        from filelock import FileLock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S)

    def _write(self, entries: Dict[str, dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_doc_atomically(self.path, entries)

    def _copy_aside(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path.with_name(f"{self.path.name}.bad-{stamp}")
        n = 1
        while dest.exists():
            dest = self.path.with_name(f"{self.path.name}.bad-{stamp}-{n}")
            n += 1
        shutil.copy2(self.path, dest)
        return dest

    def _warn(self, msg: str) -> None:
        warnings.warn(f"triton_rnn autotune cache: {msg}", CacheWarning, stacklevel=4)

    def _read_locked(self) -> Dict[str, dict]:
        """Read the file; must hold the lock. Repairs a bad file (copy aside, rebuild)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="strict")
        except FileNotFoundError:
            return {}
        except UnicodeDecodeError:
            text = None
        try:
            if text is None:
                raise CacheFormatError("not UTF-8 text")
            entries, problems = parse_document(text)
        except CacheFormatError as e:
            dest = self._copy_aside()
            self._write({})
            self._warn(f"{self.path} is unusable ({e}); copied it to {dest.name} and started "
                       "a fresh cache")
            return {}
        if problems:
            dest = self._copy_aside()
            self._write(entries)
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            self._warn(f"{self.path}: dropped {len(problems)} malformed entries: "
                       f"{problems[0]}{more}; the original is kept as {dest.name}")
        return entries

    # -- public API --------------------------------------------------------
    def load(self) -> Dict[str, dict]:
        """All valid entries. Never raises for a bad file: warns once and rebuilds it."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (UnicodeDecodeError, OSError):
            text = None
        entries = {}
        if text is not None:
            try:
                entries, problems = parse_document(text)
                if not problems:
                    return entries
            except CacheFormatError:
                pass
        # Something is wrong: repair under the lock (another process may have already).
        try:
            with self._lock():
                return self._read_locked()
        except OSError as e:
            # A read-only cache (a shared one, say): keep using its valid entries.
            key = (str(self.path), "oserror")
            if key not in self._warned:
                self._warned.add(key)
                kept = f"using its {len(entries)} valid entries" if entries else "ignoring it"
                self._warn(f"cannot repair {self.path} ({e}); {kept}")
            return entries

    def get(self, name: str) -> Optional[dict]:
        return self.load().get(name)

    def update(self, fn: Callable[[Dict[str, dict]], Optional[Dict[str, dict]]]):
        """Read-modify-write under the lock: ``fn(entries)`` edits (or returns) the entries."""
        with self._lock():
            entries = self._read_locked()
            result = fn(entries)
            if result is not None:
                entries = result
            self._write(entries)
        return entries

    def put(self, name: str, entry: dict) -> None:
        validate_entry(name, entry)
        self.update(lambda entries: entries.__setitem__(name, entry))

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        count = [0]

        def wipe(entries):
            count[0] = len(entries)
            return {}
        self.update(wipe)
        return count[0]

    def export(self, dest, entries: Optional[Dict[str, dict]] = None) -> int:
        """Write the valid entries (``entries``, if already loaded) as a cache document to
        ``dest``; returns the count."""
        entries = self.load() if entries is None else entries
        _write_doc_atomically(Path(dest), entries)
        return len(entries)

    def import_file(self, src) -> dict:
        """Validate the document at ``src``, then merge it (imported entries win).

        Raises :class:`CacheFormatError` (nothing merged) when the document or any
        entry is invalid. Entries for another Triton or library version are
        skipped (they could never be looked up). Returns counts:
        ``{"added", "replaced", "skipped"}``.
        """
        try:
            text = Path(src).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CacheFormatError(f"not UTF-8 text ({e.reason})") from None
        return self.import_text(text)

    def import_text(self, text: str) -> dict:
        """:meth:`import_file` for a document already read (from standard input, say)."""
        entries, problems = parse_document(text, check_triton=False)
        if problems:
            raise CacheFormatError(problems[0])
        tv, lv = triton_version(), library_version()
        usable = {}
        skipped = 0
        for name, entry in entries.items():
            parts = split_entry_key(name)
            if parts["triton"] != tv or parts["library"] != lv:
                skipped += 1
                continue
            usable[name] = entry
        counts = {"added": 0, "replaced": 0, "skipped": skipped}

        def merge(current):
            for name, entry in usable.items():
                counts["replaced" if name in current else "added"] += 1
                current[name] = entry
        self.update(merge)
        return counts
