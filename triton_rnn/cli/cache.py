"""``triton-rnn cache``: look at and manage the autotuning cache.

The cache is one JSON file, ``$TRITON_RNN_CACHE_DIR/autotune.json``
(default directory: ``platformdirs.user_cache_dir("triton_rnn")``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

from . import CLIError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache", help="list, show, clear, export or import tuned kernel tiles",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cache_command", metavar="ACTION")
    sub.required = True

    s = sub.add_parser("list", help="a table of the cached entries",
                       description="List the cached entries, one row each. HIDDEN is the "
                                   "hidden size, with an LSTM's projection size after 'p' "
                                   "(1024p256: hidden 1024, proj_size 256). ID (or any unique "
                                   "part of KEY) can be given to 'cache show'.")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("show", help="print one entry as JSON",
                       description="Print one entry, with the timings of every candidate.")
    s.add_argument("key", metavar="KEY",
                   help="the entry's ID from 'cache list', its full key, its kernel key "
                        "(e.g. lstm:forward:bfloat16:h1024p256:b32:sm90), or a unique part of it")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("clear", help="delete every entry (asks first)",
                       description="Delete every cached entry. Asks for confirmation unless "
                                   "--yes is given.")
    s.add_argument("--yes", "-y", action="store_true", help="do not ask")
    s.set_defaults(func=cmd_clear)

    s = sub.add_parser("export", help="write the cache to FILE ('-': standard output)",
                       description="Write all valid entries to FILE as a cache document "
                                   "('-' writes it to standard output).")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import", help="validate FILE and merge it into the cache",
                       description="Validate FILE (a document written by 'cache export'; '-' "
                                   "reads standard input) and merge its entries; an imported "
                                   "entry replaces one with the same key. Entries for another "
                                   "Triton or triton_rnn version are skipped. Nothing is "
                                   "merged when FILE is invalid.")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("path", help="print the cache file's path",
                       description="Print the path of the cache file.")
    s.set_defaults(func=cmd_path)
    return p


def short_id(name: str) -> str:
    return hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]


def _cache():
    from ..autotune.cache import TuneCache
    return TuneCache()


def _load(cache):
    """The cache's entries; a one-line error when its file cannot be read at all (the
    library itself goes on without it, with a warning)."""
    parent = cache.path.parent
    if parent.exists() and not parent.is_dir():
        raise CLIError(f"cannot use {parent} as the cache directory: it is not a directory "
                       "(see $TRITON_RNN_CACHE_DIR)")
    try:
        if cache.path.exists():  # a directory, or a file we may not read, fails here
            with open(cache.path, "rb"):
                pass
        return cache.load()
    except OSError as e:
        raise CLIError(f"cannot read {cache.path}: {e.strerror or e}") from None


def cmd_path(args) -> int:
    from ..autotune.cache import cache_path
    print(cache_path())
    return 0


def cmd_list(args) -> int:
    from ..autotune.cache import split_entry_key
    from ..kernels.config import KernelConfig
    cache = _cache()
    entries = _load(cache)
    if not entries:
        print(f"no entries in {cache.path}")
        return 0
    header = ("ID", "CELL", "PASS", "DTYPE", "HIDDEN", "BATCH", "ARCH", "GPU", "TRITON",
              "CONFIG", "MS", "SPEEDUP")
    rows = []
    for name, e in sorted(entries.items()):
        p = split_entry_key(name)
        k = p["kernel_key"]
        ms = e.get("ms")
        sp = e.get("speedup")
        rows.append((short_id(name), k.cell, k.pass_, k.dtype, k.shape_label,
                     f"<={k.batch_bucket}", f"sm{k.arch}", p["gpu"], p["triton"],
                     KernelConfig.label_of(e.get("config")),
                     f"{ms:.4f}" if isinstance(ms, (int, float)) else "-",
                     f"{sp:.2f}x" if isinstance(sp, (int, float)) else "-"))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(rows)} entries in {cache.path}")
    return 0


def _kernel_key_hits(entries, want: str) -> list:
    """The entries of kernel key ``want`` (``lstm:forward:bf16:h1024p256:b32:sm90``, any
    spelling :meth:`KernelKey.parse` accepts), for every GPU and version; [] if not a key."""
    from ..autotune.cache import split_entry_key
    from ..autotune.space import KernelKey
    try:
        kkey = KernelKey.parse(want)
    except ValueError:
        return []
    return [n for n in entries if split_entry_key(n)["kernel_key"] == kkey]


def cmd_show(args) -> int:
    cache = _cache()
    entries = _load(cache)
    want = args.key
    if want in entries:
        name = want
    else:
        hits = [n for n in entries if short_id(n) == want.lower()] or \
               _kernel_key_hits(entries, want) or [n for n in entries if want in n]
        if not hits:
            raise CLIError(f"no entry matches {want!r} (see 'triton-rnn cache list')")
        if len(hits) > 1:
            ids = ", ".join(short_id(n) for n in sorted(hits)[:6])
            raise CLIError(f"{want!r} matches {len(hits)} entries (IDs {ids}"
                           f"{', ...' if len(hits) > 6 else ''}); give one ID or more of the key")
        name = hits[0]
    json.dump({"key": name, "id": short_id(name), **entries[name]}, sys.stdout, indent=2)
    print()
    return 0


def cmd_clear(args) -> int:
    cache = _cache()
    n = len(_load(cache))
    if n == 0:
        print(f"no entries in {cache.path}: nothing to delete")
        return 0
    if not args.yes:
        try:
            answer = input(f"Delete {n} entries from {cache.path}? [y/N] ")
        except (EOFError, RuntimeError, OSError):  # no stdin at all: nothing confirmed
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1
    try:
        n = cache.clear()
    except OSError as e:
        raise CLIError(f"cannot write {cache.path}: {e.strerror or e}") from None
    print(f"deleted {n} entries from {cache.path}")
    return 0


def cmd_export(args) -> int:
    from ..autotune.cache import document_text
    cache = _cache()
    if args.file != "-" and (not args.file or os.path.isdir(args.file)):
        raise CLIError(f"cannot write {args.file!r}: give a file name")
    entries = _load(cache)
    if args.file == "-":
        sys.stdout.write(document_text(entries))
        print(f"exported {len(entries)} entries to standard output", file=sys.stderr)
        return 0
    try:
        n = cache.export(args.file, entries)
    except OSError as e:
        raise CLIError(f"cannot write {args.file}: {e.strerror or e}") from None
    print(f"exported {n} entries to {args.file}")
    return 0


def cmd_import(args) -> int:
    from ..autotune.cache import CacheFormatError
    cache = _cache()
    _load(cache)
    try:
        counts = (cache.import_text(sys.stdin.read()) if args.file == "-"
                  else cache.import_file(args.file))
    except UnicodeDecodeError as e:
        raise CLIError(f"{args.file} is not a valid cache file: not UTF-8 text ({e.reason})") \
            from None
    except OSError as e:
        # Reading the source names it; anything else failed on the cache's side.
        if e.filename is not None and os.path.abspath(e.filename) == os.path.abspath(args.file):
            raise CLIError(f"cannot read {args.file}: {e.strerror or e}") from None
        raise CLIError(f"cannot write {cache.path}: {e.strerror or e}") from None
    except CacheFormatError as e:
        raise CLIError(f"{args.file} is not a valid cache file: {e}") from None
    msg = f"imported {counts['added']} new, {counts['replaced']} replaced entries into {cache.path}"
    if counts["skipped"]:
        msg += f"; skipped {counts['skipped']} for another Triton or triton_rnn version"
    print(msg)
    return 0
