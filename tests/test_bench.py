"""The ``ndconv bench`` command: timing logic, suite validation, JSON/plot output, CLI errors.

Timing is tested with a fake clock (exact assertions) and with real sleeps
(generous tolerances); the end-to-end runs use a two-case suite of tiny shapes.
"""
from __future__ import annotations

import json
import math
import subprocess
import statistics
import sys
import time

import numpy as np
import pytest

import ndconv
from ndconv import bench, cli
from ndconv.engine.cpu import CPUEngine

REQUIRED_FIELDS = ("case", "op", "ndconv_ms", "torch_ms", "ratio", "gflops", "peak_temp_bytes")

TINY_SUITE = {
    "about": "two tiny cases for the tests",
    "cpu": [
        {"name": "tiny_conv", "kind": "conv", "N": 2, "C_in": 4, "C_out": 6, "spatial": [9, 8],
         "kernel": 3, "stride": 2, "padding": 1, "dilation": 1, "groups": 2},
        {"name": "tiny_deconv", "kind": "deconv", "N": 2, "C_in": 4, "C_out": 3, "spatial": [7],
         "kernel": 4, "stride": 2, "padding": 1, "dilation": 1, "groups": 1},
    ],
}


@pytest.fixture
def tiny_suite(tmp_path):
    path = tmp_path / "tiny-suite.json"
    path.write_text(json.dumps(TINY_SUITE))
    return path


@pytest.fixture
def fast_ceiling(monkeypatch):
    """A real but small sgemm measurement: the 2048^3 default costs seconds on CI."""
    monkeypatch.setattr(bench, "cpu_sgemm_gflops", lambda n=256, repeat=2: _REAL_SGEMM(n=256, repeat=2))


_REAL_SGEMM = bench.cpu_sgemm_gflops


def run_cli(argv):
    return cli.main(["bench"] + list(argv))


# ------------------------------------------------------------------ timing logic

class FakeClock:
    """A clock that only moves when the timed functions say so."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_time_pair_interleaves_and_takes_medians():
    clock = FakeClock()
    calls = []
    a_costs = iter([100.0, 100.0, 3.0, 5.0, 4.0, 50.0, 4.0])   # 2 warm-ups, then 5 timed
    b_costs = iter([100.0, 100.0, 1.0, 2.0, 9.0, 2.0, 2.0])

    def fn_a():
        calls.append("A")
        clock.now += next(a_costs)

    def fn_b():
        calls.append("B")
        clock.now += next(b_costs)

    def sync():
        calls.append("s")

    t = bench.time_pair(fn_a, fn_b, repeat=5, warmup=2, sync=sync, clock=clock)
    # warm-up rounds untimed (each ends with a sync), then A and B strictly alternate,
    # each wrapped in two syncs
    assert calls[:6] == ["A", "B", "s", "A", "B", "s"]
    assert calls[6:] == ["s", "A", "s", "s", "B", "s"] * 5
    assert t.times_a == [3.0, 5.0, 4.0, 50.0, 4.0]
    assert t.times_b == [1.0, 2.0, 9.0, 2.0, 2.0]
    assert t.median_a == 4.0          # the 50.0 outlier does not move the median
    assert t.median_b == 2.0



def test_time_pair_host_share_stops_before_the_sync():
    # on a GPU a call returns once launched; the sync waits for the device: the host share
    # is the time until the call returned, the figure the time until the sync returned
    clock = FakeClock()
    tail = {"A": 5.0, "B": 0.5}
    pending = []

    def call(name, cost):
        def fn():
            clock.now += cost
            pending.append(name)
        return fn

    def sync():
        while pending:
            clock.now += tail[pending.pop()]

    t = bench.time_pair(call("A", 1.0), call("B", 2.0), repeat=3, warmup=1, sync=sync, clock=clock)
    assert t.times_a == [6.0] * 3 and t.host_a == [1.0] * 3
    assert t.times_b == [2.5] * 3 and t.host_b == [2.0] * 3


def _recorded(calls, clock):
    """fn(name, cost): a call that appends its name to ``calls`` and costs ``cost`` on ``clock``."""
    def fn(name, cost):
        def call():
            calls.append(name)
            clock.now += cost
        return call
    return fn

def test_time_pair_warms_up_for_at_least_warmup_s():
    # rounds of A + B cost 5 s of the fake clock: 12 s of warm-up takes 3 rounds (the
    # count asked for is only 1), and the timed calls come after them
    clock = FakeClock()
    calls = []
    fn = _recorded(calls, clock)
    t = bench.time_pair(fn("A", 3.0), fn("B", 2.0), repeat=2, warmup=1, clock=clock, warmup_s=12.0)
    assert calls == ["A", "B"] * 3 + ["A", "B"] * 2
    assert t.times_a == [3.0, 3.0] and t.times_b == [2.0, 2.0]
    with pytest.raises(ValueError, match="warmup_s"):
        bench.time_pair(fn("A", 1.0), fn("B", 1.0), repeat=1, warmup_s=-1.0)


def test_time_pair_settles_and_primes_before_each_timed_call():
    # On a CPU each library's threads spin after its call: every timed call of one
    # library must follow a pause and an untimed call of that same library.
    clock = FakeClock()
    calls = []
    fn = _recorded(calls, clock)

    def sleep(seconds):
        calls.append(f"z{seconds}")
        clock.now += 1000.0     # the pause is never charged to a call

    t = bench.time_pair(fn("A", 3.0), fn("B", 2.0), repeat=2, warmup=0, clock=clock, settle=0.5,
                        sleep=sleep)
    assert calls == ["z0.5", "A", "A", "z0.5", "B", "B"] * 2
    assert t.times_a == [3.0, 3.0] and t.times_b == [2.0, 2.0]


def test_time_pair_with_real_sleeps():
    t = bench.time_pair(lambda: time.sleep(0.02), lambda: time.sleep(0.005), repeat=3, warmup=0)
    assert len(t.times_a) == len(t.times_b) == 3
    assert t.median_a >= 0.019
    assert t.median_b >= 0.0045
    assert t.median_a > 2 * t.median_b       # sleep overshoot is far below 10 ms
    assert t.median_a < 1.0


@pytest.mark.parametrize("kwargs, word", [({"repeat": 0}, "repeat"), ({"repeat": 2.5}, "repeat"),
                                          ({"repeat": 1, "warmup": -1}, "warmup"),
                                          ({"repeat": 1, "settle": -0.1}, "settle"),
                                          ({"repeat": 1, "settle": True}, "settle")])
def test_time_pair_rejects_bad_counts(kwargs, word):
    called = []
    with pytest.raises(ValueError, match=word):
        bench.time_pair(lambda: called.append(1), lambda: called.append(2), **kwargs)
    assert not called


def test_geomean():
    assert bench.geomean([1.0, 4.0]) == pytest.approx(2.0)
    assert bench.geomean([0.5, 2.0, None, 8.0]) == pytest.approx(2.0)
    assert bench.geomean([3.0]) == pytest.approx(3.0)
    assert bench.geomean([]) is None
    assert bench.geomean([None, math.nan]) is None
    with pytest.raises(ValueError):
        bench.geomean([1.0, -2.0])


def test_rel_error():
    b = np.array([[1.0, -4.0], [2.0, 0.5]])
    assert bench.rel_error(b, b) == 0.0
    a = b.copy()
    a[1, 0] += 0.04
    assert bench.rel_error(a, b) == pytest.approx(0.01)
    assert bench.rel_error(np.array([np.nan]), np.array([1.0])) == math.inf
    with pytest.raises(ValueError, match="shapes differ"):
        bench.rel_error(np.zeros((2, 3)), np.zeros((3, 2)))


def test_ceilings_are_medians_of_samples_applied_after_the_run():
    ceilings = {"compute": bench.Ceiling("sgemm", "GFLOP/s", [100.0, 300.0, 200.0]), "memory": None}
    assert ceilings["compute"].rate == 200.0
    assert str(ceilings["compute"]) == "sgemm 200.0 GFLOP/s"
    ok = {"status": "ok", "ndconv_ms": 10.0, "_ceiling": "compute", "_work": 0.5}   # 0.5 GFLOP in 10 ms
    bad = {"status": "mismatch", "ceiling_pct": None}
    bench.apply_ceilings([ok, bad], ceilings)
    assert ok["ceiling"] == "sgemm" and ok["ceiling_rate"] == 200.0
    assert ok["ceiling_pct"] == pytest.approx(25.0)      # 50 GFLOP/s of 200
    assert "_ceiling" not in ok and "_work" not in ok
    assert bad == {"status": "mismatch", "ceiling_pct": None}


def test_cpu_sgemm_ceiling_is_a_rate():
    rate = bench.cpu_sgemm_gflops(n=128, repeat=2)
    assert math.isfinite(rate) and 0 < rate < 1e5   # GFLOP/s; loaded CI machines can be very slow


# ------------------------------------------------------------------ the suite

def test_packaged_suite_matches_the_shared_format():
    suite = bench.load_suite(bench.DEFAULT_SUITE)
    assert set(suite) == {"cpu", "gpu"}
    for device in ("cpu", "gpu"):
        names = [c.name for c in suite[device]]
        assert len(names) == 16 and len(set(names)) == 16
        assert {"c2d_depthwise", "c3d_depthwise", "c1d_depthwise31", "t1d_vocoder"} <= set(names)
        assert {c.kind for c in suite[device]} == {"conv", "deconv"}
    dw = {c.name: c for c in suite["cpu"]}["c1d_depthwise31"]
    assert dw.kernel == (31,) and dw.padding == (15,) and dw.groups == 512


def test_case_shapes_follow_pytorch_layouts():
    suite = bench.load_suite(bench.DEFAULT_SUITE)
    cases = {c.name: c for c in suite["cpu"]}
    t = cases["t2d_dcgan_k4s2"]      # 16 -> (16-1)*2 - 2 + 4 = 32
    assert t.w_shape == (256, 128, 4, 4)
    assert t.out_shape == (8, 128, 32, 32)
    c = cases["c2d_resnet_s2"]
    assert c.w_shape == (256, 128, 3, 3)
    assert c.out_shape == (8, 256, 14, 14)
    g = cases["c2d_grouped32"]
    assert g.w_shape == (256, 8, 3, 3)


def _bad(**changes):
    case = dict(TINY_SUITE["cpu"][0])
    for k, v in changes.items():
        if v is None:
            del case[k]
        else:
            case[k] = v
    return {"cpu": [case]}


@pytest.mark.parametrize("content, words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    ({"about": "x"}, ["neither a 'cpu' nor a 'gpu'"]),
    ({"cpu": {"name": "x"}}, ["'cpu'", "list"]),
    ({"cpu": [5]}, ["cpu[0]", "JSON object"]),
    (_bad(kernel=None), ["cpu[0]", "tiny_conv", "missing field 'kernel'"]),
    (_bad(kind="conv3"), ["'kind'", "conv3"]),
    (_bad(N=0), ["'N'", "positive"]),
    (_bad(C_out=True), ["'C_out'"]),
    (_bad(spatial=[4, 4, 4, 4]), ["'spatial'"]),
    (_bad(spatial=[]), ["'spatial'"]),
    (_bad(kernel=[3, 3, 3]), ["'kernel'", "2"]),
    (_bad(stride=0), ["'stride'", "positive"]),
    (_bad(padding=[-1, 0]), ["'padding'", "non-negative"]),
    (_bad(groups=3), ["'C_in'", "groups=3"]),
    (_bad(strides=2), ["unknown field 'strides'"]),
    (_bad(output_padding=1), ["'output_padding'", "deconv"]),
    (_bad(kernel=11), ["not a valid conv", "Kernel size"]),
    (_bad(name="a,b"), ["'name'"]),
    ({"cpu": [TINY_SUITE["cpu"][0], TINY_SUITE["cpu"][0]]}, ["'tiny_conv'", "more than once"]),
])
def test_bad_suite_files_name_the_problem(tmp_path, content, words):
    path = tmp_path / "suite.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(bench.BenchError) as info:
        bench.load_suite(path)
    for w in words:
        assert w in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_suite_file(tmp_path):
    with pytest.raises(bench.BenchError, match="cannot read suite file"):
        bench.load_suite(tmp_path / "nope.json")


def test_select_cases(tiny_suite):
    cases = bench.load_suite(tiny_suite)["cpu"]
    assert [c.name for c in bench.select_cases(cases, None)] == ["tiny_conv", "tiny_deconv"]
    # suite order, whatever order they were asked in
    assert [c.name for c in bench.select_cases(cases, "tiny_deconv, tiny_conv")] == ["tiny_conv", "tiny_deconv"]
    assert [c.name for c in bench.select_cases(cases, ["tiny_deconv"])] == ["tiny_deconv"]
    with pytest.raises(bench.BenchError, match="unknown case 'tiny_conf'.*tiny_conv, tiny_deconv"):
        bench.select_cases(cases, "tiny_conf")
    with pytest.raises(bench.BenchError, match="at least one"):
        bench.select_cases(cases, " , ")


# ------------------------------------------------------------------ end to end

@pytest.mark.requires_torch
def test_end_to_end_json_plot_and_table(tiny_suite, tmp_path, capsys, fast_ceiling, torch):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    threads_before = torch.get_num_threads()
    rc = run_cli(["--suite", str(tiny_suite), "--repeat", "2", "--threads", "1",
                  "--json", str(out_json), "--plot", str(out_png)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert torch.get_num_threads() == threads_before      # thread settings restored

    records = json.loads(out_json.read_text())
    assert isinstance(records, list) and len(records) == 6
    assert [(r["case"], r["op"]) for r in records] == [
        (c, op) for c in ("tiny_conv", "tiny_deconv") for op in ("fwd", "bwd_data", "bwd_weight")]
    for r in records:
        for f in REQUIRED_FIELDS:
            assert f in r
        assert r["status"] == "ok" and r["error"] is None
        assert r["ndconv_ms"] > 0 and r["torch_ms"] > 0
        assert r["ratio"] == pytest.approx(r["ndconv_ms"] / r["torch_ms"])
        for lib in ("ndconv", "torch"):            # every timed call; the median is the figure
            samples = r[f"{lib}_samples_ms"]
            assert len(samples) == r["repeat"] and min(samples) > 0
            assert statistics.median(samples) == pytest.approx(r[f"{lib}_ms"], rel=1e-3, abs=1e-3)
            assert 0 < r[f"{lib}_host_ms"] <= max(samples)
        assert r["gflops"] == pytest.approx(r["flops"] / (r["ndconv_ms"] * 1e-3) / 1e9)
        assert isinstance(r["peak_temp_bytes"], int) and r["peak_temp_bytes"] >= 0
        assert r["rel_err"] <= bench.TOLERANCE["float32"]
        assert r["device"] == "cpu" and r["dtype"] == "float32" and r["threads"] == 1
        assert r["ceiling"] == "sgemm" and r["ceiling_pct"] > 0
        assert r["algorithm"] in CPUEngine.algorithms                  # the one that ran the timed call
    # flops: 2 * N * Cy * prod(y) * Cx/G * K, the same for all three operations
    conv = [r for r in records if r["case"] == "tiny_conv"]
    assert {r["flops"] for r in conv} == {2 * 2 * 6 * (5 * 4) * 2 * 9}
    deconv = [r for r in records if r["case"] == "tiny_deconv"]   # conv view: x 14 long, y 7, Cy=4
    assert {r["flops"] for r in deconv} == {2 * 2 * 4 * 7 * 3 * 4}

    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = captured.out
    header = next(line for line in out.splitlines() if line.startswith("case"))
    for col in ("op", "ndconv ms", "PyTorch ms", "ratio", "GFLOP/s", "% ceiling", "peak temp"):
        assert col in header
    assert "sgemm" in out and "geometric mean ratio" in out
    gm = bench.geomean(r["ratio"] for r in records)
    assert f"{gm:.3f}" in out.splitlines()[-1]


@pytest.mark.requires_torch
def test_cases_option_and_module_entry_point(tiny_suite, tmp_path, capsys, fast_ceiling):
    out_json = tmp_path / "one.json"
    rc = bench.main(["--suite", str(tiny_suite), "--cases", "tiny_deconv", "--repeat", "1",
                     "--warmup", "0", "--json", str(out_json)])
    assert rc == 0, capsys.readouterr().err
    records = json.loads(out_json.read_text())
    assert [r["op"] for r in records] == ["fwd", "bwd_data", "bwd_weight"]
    assert {r["case"] for r in records} == {"tiny_deconv"}


def test_python_dash_m_help():
    proc = subprocess.run([sys.executable, "-m", "ndconv.bench", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    for opt in ("--device", "--suite", "--cases", "--repeat", "--dtype", "--json", "--plot", "--threads"):
        assert opt in proc.stdout


@pytest.mark.requires_torch
def test_disagreement_fails_the_row_and_the_exit_status(tiny_suite, tmp_path, capsys, monkeypatch,
                                                        fast_ceiling):
    real = ndconv.conv_nd

    def wrong(*args, **kwargs):
        return real(*args, **kwargs) * 1.01

    monkeypatch.setattr(ndconv, "conv_nd", wrong)
    out_json = tmp_path / "bad.json"
    rc = run_cli(["--suite", str(tiny_suite), "--cases", "tiny_conv", "--repeat", "1",
                  "--json", str(out_json)])
    captured = capsys.readouterr()
    assert rc == 1
    records = {r["op"]: r for r in json.loads(out_json.read_text())}
    assert records["fwd"]["status"] == "mismatch"
    assert records["fwd"]["ndconv_ms"] is None and records["fwd"]["ratio"] is None
    assert records["fwd"]["rel_err"] == pytest.approx(0.01, rel=0.05)
    assert records["bwd_data"]["status"] == records["bwd_weight"]["status"] == "ok"
    assert "MISMATCH" in captured.out
    assert "FAILED tiny_conv fwd" in captured.out and "FAILED tiny_conv fwd" in captured.err
    assert "over 2 rows" in captured.out    # the geometric mean skips the failed row


@pytest.mark.requires_torch
def test_exception_in_a_row_is_reported_not_raised(tiny_suite, capsys, monkeypatch, fast_ceiling):
    def broken(*args, **kwargs):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(ndconv, "conv_backward", broken)
    rc = run_cli(["--suite", str(tiny_suite), "--cases", "tiny_conv", "--repeat", "1"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "engine exploded" in out and out.count("ERROR") == 2


# ------------------------------------------------------------------ command-line errors

def test_unknown_case_is_a_clear_error(capsys):
    rc = run_cli(["--cases", "c2d_resnet3x3,c2d_nope"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown case 'c2d_nope'" in err and "c2d_depthwise" in err


def test_bad_suite_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_bad(dilation=[1, 0])))
    rc = run_cli(["--suite", str(path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("ndconv bench: error:") and "'dilation'" in err and "tiny_conv" in err


@pytest.mark.parametrize("opt", ["--json", "--plot"])
def test_unwritable_output_fails_before_timing(tmp_path, capsys, opt, monkeypatch):
    monkeypatch.setattr(bench, "run_case", lambda *a, **k: pytest.fail("timed despite a bad output path"))
    rc = run_cli([opt, str(tmp_path / "missing-dir" / "out.x")])
    err = capsys.readouterr().err
    assert rc == 2 and opt in err and "does not exist" in err
    rc = run_cli([opt, str(tmp_path)])
    assert rc == 2 and "is a directory" in capsys.readouterr().err


def test_suite_without_the_device_list(tiny_suite, capsys):
    rc = run_cli(["--suite", str(tiny_suite), "--device", "gpu"])
    assert rc == 2
    assert "no 'gpu' cases" in capsys.readouterr().err


@pytest.mark.skipif(bench.gpu_available() is None, reason="a GPU is present")
def test_gpu_without_a_gpu_is_a_clear_error(capsys):
    rc = run_cli(["--device", "gpu", "--cases", "c2d_resnet3x3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--device gpu needs CuPy and a CUDA GPU" in err


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--threads", "-2"], ["--dtype", "float64"],
                                  ["--device", "tpu"]])
def test_bad_options_are_rejected_by_argparse(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(argv)
    assert info.value.code == 2
    assert argv[0] in capsys.readouterr().err


def test_format_table_marks_failures():
    ok = {"case": "a", "op": "fwd", "status": "ok", "ndconv_ms": 1.5, "torch_ms": 3.0, "ratio": 0.5,
          "gflops": 12.0, "ceiling_pct": 40.0, "ceiling": "sgemm", "peak_temp_bytes": 3 << 20}
    bad = {"case": "a_long_case_name", "op": "bwd_weight", "status": "mismatch", "error": "disagree",
           "peak_temp_bytes": None}
    lines = bench.format_table([ok, bad]).splitlines()
    assert lines[0].split()[:2] == ["case", "op"]
    assert len(lines[0]) == len(lines[1])         # dashes under every column
    assert "3.0 MiB" in lines[2] and "40% sgemm" in lines[2] and "0.50" in lines[2]
    assert "MISMATCH" in lines[3]
    assert "over 1 rows: 0.500" in lines[5]
    assert lines[-1] == "FAILED a_long_case_name bwd_weight: disagree"
