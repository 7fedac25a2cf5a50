"""Autotuner: time the candidate algorithms of one call once, remember the fastest.

Engine-agnostic: a candidate is a name and an argument-free callable, and the clock
is a callable too, so any engine (and a test without a GPU) can use it.  Choices
live in memory and in a JSON file in the user's cache directory
(``$NDCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/ndconv``, else ``~/.cache/ndconv``):

    {"format": 1,
     "contexts": {"<context>": {"<key>": {"algorithm": "name", "ms": {"name": 0.12, ...}}}}}

A *context* names everything that makes a timing valid (device name, library
versions, ...); a *key* names the call (operation, geometry, dtype, layout, ...).
A file written by another format version, or one that cannot be parsed, is
ignored with a warning and rewritten on the next save; it never stops a call.

Writers are safe against each other: a save takes an exclusive lock on a side
file (where ``fcntl`` exists), reads what is on disk, merges its own entries in,
writes a temporary file in the same directory and ``os.replace``-s it over the
old one, so a reader always sees either the old or the new complete file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import threading
import time
import warnings

try:  # POSIX only; elsewhere the atomic rename alone keeps the file whole
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT_VERSION = 1
FILE_NAME = "autotune.json"


class AutotuneCacheWarning(RuntimeWarning):
    """The autotune cache file was unreadable, foreign or unwritable (it is not fatal)."""


def cache_dir():
    """The directory of ndconv's cache files (not created here)."""
    explicit = os.environ.get("NDCONV_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.abspath(os.path.join(base, "ndconv"))


def context_string(context):
    """A stable string for a dict of facts (device, versions)."""
    if not isinstance(context, dict):
        raise TypeError(f"context must be a dict, got context={context!r}")
    return json.dumps(context, sort_keys=True, separators=(",", ":"), default=str)


def call_key(op, geometry, dtype, layout="contiguous", **extra):
    """A stable string naming one call: operation, every geometry field, dtype, layout, extras."""
    fields = dataclasses.asdict(geometry) if dataclasses.is_dataclass(geometry) else geometry
    parts = {"op": op, "dtype": str(dtype), "layout": layout, "geometry": fields}
    parts.update(extra)
    return json.dumps(parts, sort_keys=True, separators=(",", ":"), default=list)


#: candidates within this fraction of the fastest first time are timed again ...
CLOSE_CALL = 0.25
#: ... this many more rounds
RETIME_ROUNDS = 2


def perf_counter_timer(fn, repeat):
    """Median wall time of ``fn()`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(max(1, int(repeat))):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


@dataclasses.dataclass(frozen=True)
class Choice:
    algorithm: str
    ms: dict            # name -> the timer's milliseconds (failed candidates are absent)
    cached: bool        # True when no timing ran (memory or disk had the answer)


class Autotuner:
    """Choices per (context, key), in memory and (unless ``persist`` is False) on disk.

    ``path`` is the JSON file (default: :func:`cache_dir`/``autotune.json``, resolved
    at first use so that environment changes before then count).  ``timer(fn, repeat)``
    returns the time of one call in any unit (smaller is faster).
    """

    def __init__(self, path=None, timer=perf_counter_timer, repeat=3, persist=True):
        if repeat is None or not isinstance(repeat, int) or isinstance(repeat, bool) or repeat < 1:
            raise ValueError(f"repeat must be a positive int, got repeat={repeat!r}")
        if not callable(timer):
            raise TypeError(f"timer must be callable, got timer={timer!r}")
        self._path = None if path is None else os.fspath(path)
        self.timer = timer
        self.repeat = repeat
        self.persist = bool(persist)
        self._memory = {}        # context string -> {key: entry}
        self._loaded = False
        self._lock = threading.RLock()
        self._warned = set()
        self.timings_run = 0     # how many candidates were timed (tests, diagnostics)

    @property
    def path(self):
        return self._path if self._path is not None else os.path.join(cache_dir(), FILE_NAME)

    # ------------------------------------------------------------------ queries

    def lookup(self, context, key):
        """The remembered algorithm name for this call, or None."""
        ctx = context_string(context)
        with self._lock:
            self._load_once()
            entry = self._memory.get(ctx, {}).get(key)
        return None if entry is None else entry["algorithm"]

    def entries(self, context):
        """A copy of the remembered ``{key: algorithm}`` for one context."""
        ctx = context_string(context)
        with self._lock:
            self._load_once()
            return {k: e["algorithm"] for k, e in self._memory.get(ctx, {}).items()}

    # ------------------------------------------------------------------ tuning

    def tune(self, context, key, candidates, timer=None, repeat=None):
        """Time each candidate (unless remembered) and return the fastest as a Choice.

        Every candidate is timed once; those within ``CLOSE_CALL`` of the fastest
        get ``RETIME_ROUNDS`` more rounds and keep their best.
        ``candidates`` maps names to argument-free callables.  A remembered choice
        is returned without timing when it is still among the candidates.  A
        candidate that raises is skipped; if every one raises, the last error is
        raised again.
        """
        if not candidates:
            raise ValueError("candidates must name at least one algorithm, got candidates={}")
        names = list(candidates)
        known = self.lookup(context, key)
        if known in candidates:
            return Choice(known, {}, True)
        timer = self.timer if timer is None else timer
        repeat = self.repeat if repeat is None else repeat
        ms, error = {}, None
        for name in names:
            try:
                t = float(timer(candidates[name], repeat))
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: not a candidate here
                error = e
                continue
            self.timings_run += 1
            if math.isfinite(t):
                ms[name] = t
        if not ms:
            if error is not None:
                raise error
            raise RuntimeError(f"no candidate of {names} gave a finite time")
        # Close calls are timed again, in turn, each keeping its fastest round: a busy
        # host only ever adds time, so one unlucky round must not decide the choice.
        fastest = min(ms.values())
        close = [n for n in names if n in ms and ms[n] <= fastest * (1 + CLOSE_CALL)]
        for _ in range(RETIME_ROUNDS if len(close) > 1 else 0):
            for name in close:
                t = float(timer(candidates[name], repeat))
                self.timings_run += 1
                if math.isfinite(t):
                    ms[name] = min(ms[name], t)
        best = min(names, key=lambda n: (ms.get(n, math.inf), names.index(n)))
        self.record(context, key, best, ms)
        return Choice(best, ms, False)

    def tune_interleaved(self, context, key, candidates, rounds=5, calls=2, settle=0.0,
                         prune=1.6, budget=None, min_rounds=2, tie=0.0, clock=time.perf_counter,
                         sleep=time.sleep):
        """Time the candidates round-robin over up to ``rounds`` rounds; return the fastest.

        For hosts whose speed drifts over seconds and whose libraries leave worker
        threads spinning after a call (the CPU).  In every round each candidate, in
        turn, gets ``sleep(settle)`` (the previous candidate's threads go idle), one
        untimed call (its own threads wake, first-call costs are paid), then ``calls``
        calls timed one by one with ``clock`` (seconds).  A candidate's time is the
        minimum over all its timed calls, in milliseconds: a busy host only adds time,
        and spreading each candidate's calls over the rounds gives each a chance at
        the host's fast spells, so a drift of the host's speed does not decide.  Round
        r starts at candidate r (mod their number), so none is always first.  After
        the first round, candidates slower than ``prune`` times the fastest drop out;
        no round starts once ``budget`` seconds (of ``clock``) have passed since the
        start and ``min_rounds`` rounds ran, nor once one candidate is left.  The
        choice is the first candidate (in the order given: the caller's preference)
        within ``tie`` (a fraction) of the fastest time: on a noisy host, times that
        close do not say which is faster, and a fixed preference keeps the choice
        the same from run to run.  A
        candidate that raises is dropped; if every one raises, the last error is
        raised again.  A remembered choice still among the candidates is returned
        without timing, as :meth:`tune` does.
        """
        if not candidates:
            raise ValueError("candidates must name at least one algorithm, got candidates={}")
        if not isinstance(rounds, int) or rounds < 1 or not isinstance(calls, int) or calls < 1:
            raise ValueError(f"rounds and calls must be positive ints, got rounds={rounds!r}, calls={calls!r}")
        names = list(candidates)
        known = self.lookup(context, key)
        if known in candidates:
            return Choice(known, {}, True)
        ms, error, alive = {}, None, list(names)
        start = clock()
        for r in range(rounds):
            if r >= max(1, min_rounds) and budget is not None and clock() - start >= budget:
                break
            order = alive[r % len(alive):] + alive[:r % len(alive)]
            for name in order:
                fn = candidates[name]
                try:
                    if settle > 0:
                        sleep(settle)
                    fn()
                    for _ in range(calls):
                        t0 = clock()
                        fn()
                        t = (clock() - t0) * 1e3
                        if math.isfinite(t):
                            ms[name] = min(ms.get(name, math.inf), t)
                except Exception as e:  # noqa: BLE001 - e.g. out of memory: not a candidate here
                    error = e
                    alive.remove(name)
                    ms.pop(name, None)
                    continue
                self.timings_run += 1
            if r == 0 and ms:
                fastest = min(ms.values())
                alive = [n for n in alive if n in ms and ms[n] <= fastest * prune]
            if len(alive) <= 1:
                break
        if not ms:
            if error is not None:
                raise error
            raise RuntimeError(f"no candidate of {names} gave a finite time")
        fastest = min(ms.values())
        best = next(n for n in names if ms.get(n, math.inf) <= fastest * (1 + tie))
        self.record(context, key, best, ms)
        return Choice(best, ms, False)

    def record(self, context, key, algorithm, ms=None):
        """Remember ``algorithm`` for this call (memory, then disk)."""
        if not isinstance(algorithm, str) or not algorithm:
            raise ValueError(f"algorithm must be a non-empty str, got algorithm={algorithm!r}")
        ctx = context_string(context)
        entry = {"algorithm": algorithm, "ms": {k: float(v) for k, v in (ms or {}).items()}}
        with self._lock:
            self._load_once()
            self._memory.setdefault(ctx, {})[key] = entry
            if self.persist:
                self._save()

    def forget(self):
        """Drop the in-memory choices (the file stays; it is read again at next use)."""
        with self._lock:
            self._memory = {}
            self._loaded = False

    # ------------------------------------------------------------------ the file

    def _warn(self, message):
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, AutotuneCacheWarning, stacklevel=4)

    def _read_file(self):
        """``contexts`` dict of the file, {} when missing; warns when unusable."""
        path = self.path
        try:
            with open(path, "r", encoding="utf-8") as f:
                text = f.read()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as e:
            self._warn(f"ndconv autotune cache {path!r} cannot be read ({e}); ignoring it")
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            self._warn(f"ndconv autotune cache {path!r} is corrupt; ignoring it (it will be rewritten)")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
            found = data.get("format") if isinstance(data, dict) else None
            self._warn(f"ndconv autotune cache {path!r} has format {found!r}, this ndconv writes "
                       f"{FORMAT_VERSION}; ignoring it (it will be rewritten)")
            return {}
        contexts = data.get("contexts")
        if not isinstance(contexts, dict):
            self._warn(f"ndconv autotune cache {path!r} is corrupt; ignoring it (it will be rewritten)")
            return {}
        clean = {}
        for ctx, entries in contexts.items():
            if not isinstance(entries, dict):
                continue
            good = {k: e for k, e in entries.items()
                    if isinstance(e, dict) and isinstance(e.get("algorithm"), str)}
            if good:
                clean[ctx] = {k: {"algorithm": e["algorithm"],
                                  "ms": e["ms"] if isinstance(e.get("ms"), dict) else {}}
                              for k, e in good.items()}
        return clean

    def _load_once(self):
        if self._loaded:
            return
        self._loaded = True
        if not self.persist:
            return
        disk = self._read_file()
        for ctx, entries in disk.items():
            mine = self._memory.setdefault(ctx, {})
            for k, e in entries.items():
                mine.setdefault(k, e)

    @contextlib.contextmanager
    def _file_lock(self, directory):
        if fcntl is None:
            yield
            return
        fd = os.open(os.path.join(directory, FILE_NAME + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _save(self):
        path = self.path
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, exist_ok=True)
            with self._file_lock(directory):
                merged = self._read_file()
                for ctx, entries in self._memory.items():
                    merged.setdefault(ctx, {}).update(entries)
                fd, tmp = tempfile.mkstemp(prefix=FILE_NAME + ".", suffix=".tmp", dir=directory)
                try:
                    with os.fdopen(fd, "w", encoding="utf-8") as f:
                        json.dump({"format": FORMAT_VERSION, "contexts": merged}, f,
                                  sort_keys=True, separators=(",", ":"))
                        f.flush()
                        os.fsync(f.fileno())
                    os.replace(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                # What other writers saved is now ours to answer lookups with, too.
                for ctx, entries in merged.items():
                    mine = self._memory.setdefault(ctx, {})
                    for k, e in entries.items():
                        mine.setdefault(k, e)
        except OSError as e:
            self._warn(f"ndconv autotune cache {path!r} cannot be written ({e}); "
                       f"choices stay in memory only")
