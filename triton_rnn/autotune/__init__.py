"""Per-shape tile selection for the persistent kernels.

* :mod:`~triton_rnn.autotune.space`: kernel keys, batch buckets, candidate
  tiles and the default rule;
* :mod:`~triton_rnn.autotune.tuner`: static pruning (compiler, no GPU),
  GPU timing and selection;
* :mod:`~triton_rnn.autotune.cache`: the JSON cache on disk.

The launchers call :func:`lookup_config` for every launch. It reads the cache
file once per process (and again after this process tunes or calls
:func:`reload`), so it costs a dictionary look-up. It never raises: a broken
cache gives one warning and ``None`` (the launcher then uses its default).
A batch whose bucket has no entry takes the tile of the nearest tuned bucket
of the same kernel (same cell, pass, dtype, hidden size, LSTM projection
size, GPU and versions; ties go to the larger bucket), so a new batch size,
such as the short last batch of an epoch, neither re-tunes nor compiles
another kernel variant.
It tunes only when ``TRITON_RNN_AUTOTUNE=1``, the device is a CUDA device and
no bucket of the kernel is tuned yet; otherwise training code never tunes on
the hot path (``triton-rnn tune --batch N`` tunes further buckets
beforehand). On-the-fly tuning times a unidirectional layer at the call's
batch size and :data:`AUTOTUNE_SEQ_LEN` steps.

Batches above :data:`~triton_rnn.autotune.space.BATCH_CAP` use the top
bucket's tile; the launcher bounds the number of batch-tile programs by what
can be resident (programs loop over batch tiles), so the grid does not grow
with the batch.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Optional

from ..kernels.config import KernelConfig
from .cache import CacheWarning, TuneCache, cache_path, entry_key, split_entry_key
from .space import BATCH_CAP, KernelKey, batch_bucket, candidate_configs, heuristic_config

__all__ = [
    "lookup_config", "reload", "KernelKey", "batch_bucket", "candidate_configs",
    "heuristic_config", "TuneCache", "cache_path", "CacheWarning", "BATCH_CAP",
    "AUTOTUNE_SEQ_LEN",
]

#: Sequence length used when ``TRITON_RNN_AUTOTUNE=1`` tunes a shape on first use.
AUTOTUNE_SEQ_LEN = 64

_lock = threading.RLock()
_state = {"path": None, "entries": None, "env": None, "families": None}
_MISS = object()
_memo: dict = {}
_identities: dict = {}
_failed: set = set()
_warned: set = set()
_tuning = threading.local()


def reload() -> None:
    """Forget what was read from the cache file; the next look-up reads it again."""
    with _lock:
        _state["path"] = None
        _state["entries"] = None
        _state["env"] = None
        _state["families"] = None
        _memo.clear()


def _warn_once(tag, msg: str) -> None:
    if tag in _warned:
        return
    _warned.add(tag)
    warnings.warn(msg, CacheWarning, stacklevel=3)


def _entries(path) -> dict:
    if _state["entries"] is None or _state["path"] != path:
        with _lock:
            if _state["entries"] is None or _state["path"] != path:
                _memo.clear()
                _state["entries"] = TuneCache(path).load()
                _state["families"] = None
                _state["path"] = path
    return _state["entries"]


def _family(kkey: KernelKey, gpu_id: str, cap, triton: str, library: str) -> tuple:
    """An entry's kernel without its batch bucket: the entries one call may fall back to.

    The projection size is part of it: an LSTMP never borrows a plain LSTM's tile
    (nor another projection's), whose weight slice has another size.
    """
    return (kkey.cell, kkey.pass_, kkey.dtype, kkey.hidden, kkey.proj, kkey.arch, gpu_id,
            tuple(cap), triton, library)


def _nearest_bucket(entries: dict, name: str) -> Optional[dict]:
    """The entry of the tuned bucket nearest to ``name``'s (log scale; ties: the larger)."""
    if _state["families"] is None:
        families: dict = {}
        for n in entries:
            p = split_entry_key(n)
            fam = _family(p["kernel_key"], p["gpu"], p["capability"], p["triton"], p["library"])
            families.setdefault(fam, []).append((p["kernel_key"].batch_bucket, n))
        _state["families"] = families
    p = split_entry_key(name)
    want = p["kernel_key"].batch_bucket
    tuned = _state["families"].get(
        _family(p["kernel_key"], p["gpu"], p["capability"], p["triton"], p["library"]))
    if not tuned:
        return None
    _, best = min(tuned, key=lambda bn: (abs(bn[0].bit_length() - want.bit_length()), -bn[0]))
    return entries[best]


def _device_identity(device):
    """``(gpu name, (major, minor))`` for a CUDA device, ``None`` for anything else."""
    import torch
    if device is None:
        return None
    if isinstance(device, int):
        device = torch.device("cuda", device)
    elif not isinstance(device, torch.device):
        device = torch.device(device)
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ident = _identities.get(idx)
    if ident is None:
        ident = (torch.cuda.get_device_name(idx), tuple(torch.cuda.get_device_capability(idx)))
        _identities[idx] = ident
    return ident


def _autotune_enabled() -> bool:
    return os.environ.get("TRITON_RNN_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def lookup_config(cell, pass_, dtype, hidden, batch, device,
                  proj: int = 0) -> Optional[KernelConfig]:
    """The tuned tile for this call, or ``None`` (use the default). Never raises.

    ``proj``: an LSTM's projection size (0: none); its entries are its own.
    """
    try:
        env = os.environ
        where = env.get("TRITON_RNN_CACHE_DIR")
        tune_flag = env.get("TRITON_RNN_AUTOTUNE")
        memo_key = (cell, pass_, dtype, hidden, proj, batch, device, tune_flag)
        if _state["env"] == where and _state["entries"] is not None:
            hit = _memo.get(memo_key, _MISS)
            if hit is not _MISS:
                return hit
        return _lookup_slow(cell, pass_, dtype, hidden, batch, device, where, tune_flag, memo_key,
                            proj)
    except Exception as e:  # noqa: BLE001 - the hot path must never fail because of the cache
        _warn_once(("lookup", type(e).__name__),
                   f"triton_rnn autotune: ignoring the tuning cache ({type(e).__name__}: {e})")
        return None


def _lookup_slow(cell, pass_, dtype, hidden, batch, device, where, tune_flag, memo_key,
                 proj=0):
    tune_on = _autotune_enabled()
    path = cache_path()
    entries = _entries(path)
    _state["env"] = where
    ident = _device_identity(device)
    if ident is None:
        _memo[memo_key] = None
        return None
    gpu, cap = ident
    key = KernelKey.for_shape(cell, pass_, dtype, hidden, batch, arch=cap[0] * 10 + cap[1],
                              proj=proj)
    name = entry_key(key, gpu, cap)
    entry = entries.get(name)
    if entry is None:
        entry = _nearest_bucket(entries, name)
    if entry is None and tune_on and not getattr(_tuning, "active", False) \
            and name not in _failed:
        entry = _tune_now(key, name, gpu, cap, int(batch), device)
    cfg = None if entry is None else KernelConfig.from_dict(entry["config"])
    if entry is not None or not tune_on:
        _memo[memo_key] = cfg
    return cfg


def _tune_now(key: KernelKey, name: str, gpu: str, cap, batch: int, device) -> Optional[dict]:
    from .tuner import tune_and_store
    with _lock:
        entries = _entries(cache_path())
        entry = entries.get(name) or _nearest_bucket(entries, name)
        if entry is not None:  # another thread tuned it (or a neighbour bucket) meanwhile
            return entry
        _tuning.active = True
        try:
            fwd = None
            if key.pass_ == "backward":
                fwd = lookup_config(key.cell, "forward", key.dtype, key.hidden, batch, device,
                                    proj=key.proj)
            tune_and_store(key, gpu=gpu, capability=cap, batch=batch, seq_len=AUTOTUNE_SEQ_LEN,
                           device=device, forward_config=fwd)
        except Exception as e:  # noqa: BLE001
            _failed.add(name)
            _warn_once(("tune", name), f"triton_rnn autotune: tuning {key} failed "
                       f"({type(e).__name__}: {e}); using the default tile")
            return None
        finally:
            _tuning.active = False
        return _entries(cache_path()).get(name)
