"""The engine-agnostic autotuner: fake candidates with known timings, the cache file
(round trip, corrupt, foreign version, unwritable), concurrent writers.  No GPU needed."""
import json
import multiprocessing
import os
import threading
import warnings

import pytest

from ndconv.engine import autotune
from ndconv.engine.autotune import AutotuneCacheWarning, Autotuner, call_key, context_string
from ndconv.geometry import conv_geometry

CTX = {"device": "fake GPU", "versions": {"ndconv": "0", "lib": "1.2"}}


def fake_timer(fn, repeat):
    """Candidates return their own 'time' (ms), so the race is known in advance."""
    return fn()


def counted(ms, calls, name):
    def fn():
        calls.append(name)
        return ms
    return fn


def tuner(tmp_path, **kw):
    return Autotuner(path=tmp_path / "cache.json", timer=fake_timer, **kw)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NDCONV_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == str(tmp_path / "explicit")
    monkeypatch.delenv("NDCONV_CACHE_DIR")
    assert autotune.cache_dir() == str(tmp_path / "xdg" / "ndconv")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == str(tmp_path / "home" / ".cache" / "ndconv")
    monkeypatch.setenv("NDCONV_CACHE_DIR", str(tmp_path / "late"))
    assert Autotuner().path == str(tmp_path / "late" / "autotune.json")   # resolved at use


def test_close_calls_are_timed_again_and_keep_their_best_round(tmp_path):
    t = tuner(tmp_path)
    calls = []

    def rounds(name, times):
        it = iter(times)

        def fn():
            calls.append(name)
            return next(it)
        return fn
    # "noisy" lost its first round to a busy host; "far" is never in the running
    cands = {"steady": rounds("steady", [1.0, 1.0, 1.0]), "noisy": rounds("noisy", [1.2, 0.8, 0.9]),
             "far": rounds("far", [5.0])}
    choice = t.tune(CTX, "k", cands)
    assert choice.algorithm == "noisy" and choice.ms == {"steady": 1.0, "noisy": 0.8, "far": 5.0}
    assert calls == ["steady", "noisy", "far"] + ["steady", "noisy"] * autotune.RETIME_ROUNDS
    assert t.timings_run == 3 + 2 * autotune.RETIME_ROUNDS


def test_fastest_wins_and_is_remembered(tmp_path):
    t = tuner(tmp_path)
    calls = []
    cands = {"slow": counted(3.0, calls, "slow"), "fast": counted(1.0, calls, "fast"),
             "mid": counted(2.0, calls, "mid")}
    choice = t.tune(CTX, "k1", cands)
    assert choice.algorithm == "fast" and not choice.cached
    assert choice.ms == {"slow": 3.0, "fast": 1.0, "mid": 2.0}
    assert calls == ["slow", "fast", "mid"] and t.timings_run == 3
    again = t.tune(CTX, "k1", cands)
    assert again.algorithm == "fast" and again.cached and calls == ["slow", "fast", "mid"]
    assert t.lookup(CTX, "k1") == "fast" and t.lookup(CTX, "k2") is None
    # another context (other device or versions) does not see the choice
    assert t.lookup(dict(CTX, device="other"), "k1") is None


def test_ties_go_to_the_earlier_candidate_and_failures_are_skipped(tmp_path):
    t = tuner(tmp_path)

    def boom():
        raise MemoryError("out of device memory")
    assert t.tune(CTX, "tie", {"a": lambda: 1.0, "b": lambda: 1.0}).algorithm == "a"
    choice = t.tune(CTX, "fail", {"bad": boom, "ok": lambda: 5.0})
    assert choice.algorithm == "ok" and choice.ms == {"ok": 5.0}
    with pytest.raises(MemoryError, match="out of device memory"):
        t.tune(CTX, "allfail", {"bad": boom})
    assert t.lookup(CTX, "allfail") is None
    with pytest.raises(ValueError, match="candidates"):
        t.tune(CTX, "none", {})


def test_remembered_choice_no_longer_offered_is_retuned(tmp_path):
    t = tuner(tmp_path)
    t.tune(CTX, "k", {"gone": lambda: 1.0, "b": lambda: 2.0})
    choice = t.tune(CTX, "k", {"b": lambda: 2.0, "c": lambda: 1.5})
    assert choice.algorithm == "c" and not choice.cached


def test_file_round_trip(tmp_path):
    t = tuner(tmp_path)
    t.tune(CTX, "k1", {"a": lambda: 2.0, "b": lambda: 1.0})
    t.record(CTX, "k2", "a", {"a": 0.5})
    data = json.loads((tmp_path / "cache.json").read_text())
    assert data["format"] == autotune.FORMAT_VERSION
    assert data["contexts"][context_string(CTX)]["k1"] == {"algorithm": "b", "ms": {"a": 2.0, "b": 1.0}}
    fresh = tuner(tmp_path)                                   # a new process, in effect
    calls = []
    assert fresh.tune(CTX, "k1", {"a": counted(2.0, calls, "a"), "b": counted(1.0, calls, "b")}).cached
    assert calls == [] and fresh.timings_run == 0
    assert fresh.entries(CTX) == {"k1": "b", "k2": "a"}
    assert not list(tmp_path.glob("*.tmp"))                   # no temporary left behind


def test_persist_false_never_touches_disk(tmp_path):
    t = tuner(tmp_path, persist=False)
    t.tune(CTX, "k", {"a": lambda: 1.0})
    assert not (tmp_path / "cache.json").exists()
    assert t.lookup(CTX, "k") == "a"


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"format": 1, "contexts": 7}',
                                     '\x00\x01binary'])
def test_corrupt_file_is_ignored_with_a_warning_and_rewritten(tmp_path, content):
    (tmp_path / "cache.json").write_text(content)
    t = tuner(tmp_path)
    with pytest.warns(AutotuneCacheWarning, match="ignoring it"):
        assert t.lookup(CTX, "k") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # one warning per problem, not per call
        assert t.tune(CTX, "k", {"a": lambda: 1.0}).algorithm == "a"
    data = json.loads((tmp_path / "cache.json").read_text())
    assert data["format"] == autotune.FORMAT_VERSION
    assert data["contexts"][context_string(CTX)]["k"]["algorithm"] == "a"


def test_foreign_format_version_is_ignored_and_rewritten(tmp_path):
    foreign = {"format": autotune.FORMAT_VERSION + 1,
               "contexts": {context_string(CTX): {"k": {"algorithm": "from_the_future", "ms": {}}}}}
    (tmp_path / "cache.json").write_text(json.dumps(foreign))
    t = tuner(tmp_path)
    with pytest.warns(AutotuneCacheWarning, match="format 2"):
        assert t.lookup(CTX, "k") is None
    t.record(CTX, "k", "now")
    assert json.loads((tmp_path / "cache.json").read_text())["format"] == autotune.FORMAT_VERSION
    assert tuner(tmp_path).lookup(CTX, "k") == "now"


def test_bad_entries_are_dropped_good_ones_kept(tmp_path):
    ctx = context_string(CTX)
    data = {"format": autotune.FORMAT_VERSION,
            "contexts": {ctx: {"good": {"algorithm": "a", "ms": {"a": 1}}, "bad": {"ms": {}}, "worse": 3},
                         "junk": []}}
    (tmp_path / "cache.json").write_text(json.dumps(data))
    assert tuner(tmp_path).entries(CTX) == {"good": "a"}


def test_unwritable_directory_warns_and_keeps_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")                                   # a file where the directory should be
    t = Autotuner(path=blocker / "sub" / "cache.json", timer=fake_timer)
    with pytest.warns(AutotuneCacheWarning, match="cannot be written"):
        assert t.tune(CTX, "k", {"a": lambda: 1.0}).algorithm == "a"
    assert t.lookup(CTX, "k") == "a"


def test_call_key_names_every_field():
    g1 = conv_geometry((2, 4, 8, 8), (4, 1, 3, 3), groups=4)[0]
    g2 = conv_geometry((2, 4, 8, 8), (4, 1, 3, 3), groups=4, padding=1)[0]
    keys = {call_key("forward", g1, "float32"), call_key("forward", g2, "float32"),
            call_key("backward_input", g1, "float32"), call_key("forward", g1, "float16"),
            call_key("forward", g1, "float32", layout="channels_last"),
            call_key("forward", g1, "float32", deterministic=False)}
    assert len(keys) == 6
    assert call_key("forward", g1, "float32") == call_key("forward", g1, "float32")
    json.loads(call_key("forward", g1, "float32"))


def test_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        Autotuner(repeat=0)
    with pytest.raises(TypeError, match="timer"):
        Autotuner(timer=3)
    with pytest.raises(TypeError, match="context"):
        tuner(tmp_path).lookup("device", "k")
    with pytest.raises(ValueError, match="algorithm"):
        tuner(tmp_path).record(CTX, "k", "")


def test_perf_counter_timer_counts_calls():
    calls = []
    t = autotune.perf_counter_timer(lambda: calls.append(1), 4)
    assert len(calls) == 5 and t >= 0.0


def test_concurrent_thread_writers_lose_nothing(tmp_path):
    errors = []

    def worker(i):
        try:
            t = tuner(tmp_path)                               # each thread its own tuner
            for j in range(10):
                t.tune(CTX, f"t{i}-{j}", {"a": lambda: 2.0, "b": lambda: 1.0})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    entries = tuner(tmp_path).entries(CTX)
    assert len(entries) == 80 and set(entries.values()) == {"b"}


def _process_writer(path, i):
    t = Autotuner(path=path, timer=fake_timer)
    for j in range(10):
        t.record(CTX, f"p{i}-{j}", f"alg{i}")


def test_concurrent_process_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "cache.json")
    ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
    procs = [ctx.Process(target=_process_writer, args=(path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    entries = Autotuner(path=path).entries(CTX)
    assert entries == {f"p{i}-{j}": f"alg{i}" for i in range(4) for j in range(10)}


class FakeClock:
    """A clock that only moves when a candidate runs (by its scripted time) or sleeps."""

    def __init__(self):
        self.now = 0.0
        self.log = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.log.append(("sleep", s))
        self.now += s

    def candidate(self, name, times_ms):
        it = iter(times_ms)

        def fn():
            self.log.append(name)
            self.now += next(it) / 1e3
        return fn


def test_interleaved_rounds_order_settle_prune_and_fastest_call(tmp_path):
    t = tuner(tmp_path)
    clock = FakeClock()
    # each round: one untimed call (99 ms: first-call costs), then calls=2 timed ones
    cands = {
        "a": clock.candidate("a", [99, 5, 9] + [99, 3, 8] + [99, 6, 6]),     # fastest call 3
        "b": clock.candidate("b", [99, 4, 4] + [99, 7, 7] + [99, 3.5, 9]),   # fastest call 3.5
        "far": clock.candidate("far", [99, 20, 7]),                         # 7 > 1.6 * 4: out
    }
    choice = t.tune_interleaved(CTX, "k", cands, rounds=3, calls=2, settle=0.2, prune=1.6,
                                clock=clock, sleep=clock.sleep)
    assert choice.algorithm == "a" and not choice.cached
    assert choice.ms == pytest.approx({"a": 3.0, "b": 3.5, "far": 7.0})
    s = ("sleep", 0.2)
    # round 1 in order; round 2 starts at the survivors' 2nd, round 3 at their 1st (3 mod 2)
    assert clock.log == ([s] + ["a"] * 3 + [s] + ["b"] * 3 + [s] + ["far"] * 3
                         + [s] + ["b"] * 3 + [s] + ["a"] * 3
                         + [s] + ["a"] * 3 + [s] + ["b"] * 3)
    assert t.timings_run == 7 and t.lookup(CTX, "k") == "a"
    assert t.tune_interleaved(CTX, "k", cands, clock=clock, sleep=clock.sleep).cached


def test_interleaved_budget_stops_new_rounds_after_min_rounds(tmp_path):
    t = tuner(tmp_path)
    clock = FakeClock()
    cands = {"a": clock.candidate("a", [400, 300, 300] * 5), "b": clock.candidate("b", [400, 310, 310] * 5)}
    # a round takes 2 * 1.0 s: the budget of 1 s is spent after round 1, min_rounds runs 2
    choice = t.tune_interleaved(CTX, "k", cands, rounds=5, calls=2, budget=1.0, min_rounds=2,
                                clock=clock, sleep=clock.sleep)
    assert choice.algorithm == "a" and clock.log == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
    clock.log.clear()
    t.tune_interleaved(CTX, "k2", cands, rounds=5, calls=2, budget=5.0, clock=clock, sleep=clock.sleep)
    assert len(clock.log) == 3 * 2 * 3                  # rounds of 2 s: the 4th would start at 6 s


def test_interleaved_drops_failures_stops_alone_and_raises_when_all_fail(tmp_path):
    t = tuner(tmp_path)
    clock = FakeClock()

    def boom():
        raise MemoryError("no room")
    choice = t.tune_interleaved(CTX, "k", {"bad": boom, "ok": clock.candidate("ok", [1, 2, 2.5])},
                                rounds=5, calls=2, clock=clock, sleep=clock.sleep)
    # "ok" alone after round 1: no more rounds; no settle pause when settle is 0
    assert choice.algorithm == "ok" and choice.ms == pytest.approx({"ok": 2.0})
    assert clock.log == ["ok"] * 3
    with pytest.raises(MemoryError):
        t.tune_interleaved(CTX, "k2", {"bad": boom}, clock=clock, sleep=clock.sleep)
    with pytest.raises(ValueError):
        t.tune_interleaved(CTX, "k3", {"ok": lambda: None}, rounds=0)


def test_interleaved_tie_prefers_the_first_candidate_in_order(tmp_path):
    t = tuner(tmp_path)
    clock = FakeClock()
    cands = {"pref": clock.candidate("pref", [9, 10.5, 10.5] * 2), "other": clock.candidate("other", [9, 10, 10] * 2),
             "third": clock.candidate("third", [9, 9.8, 9.8] * 2)}
    assert t.tune_interleaved(CTX, "k", cands, rounds=2, tie=0.1, clock=clock, sleep=clock.sleep).algorithm == "pref"
    clock2 = FakeClock()
    cands = {"pref": clock2.candidate("pref", [9, 11, 11] * 2), "other": clock2.candidate("other", [9, 9.9, 9.9] * 2)}
    assert t.tune_interleaved(CTX, "k2", cands, rounds=2, tie=0.1, clock=clock2, sleep=clock2.sleep).algorithm == "other"
    cands = {"pref": clock2.candidate("pref", [9, 10.5, 10.5] * 2), "other": clock2.candidate("other", [9, 10, 10] * 2)}
    assert t.tune_interleaved(CTX, "k3", cands, rounds=2, clock=clock2, sleep=clock2.sleep).algorithm == "other"
