"""The CPU engine's own mechanics: algorithm choice, forcing, tuning, workspace bounds."""
import numpy as np
import pytest

import ndconv
from ndconv.engine import autotune, cpu_depthwise, cpu_direct, cpu_grouped, cpu_ir
from ndconv.engine.cpu import CPUEngine
from ndconv.engine.phases import waste as _phase_waste

rng = np.random.default_rng(7)


def geometry(x_shape, w_shape, **kw):
    return ndconv.conv_geometry(x_shape, w_shape, None, **kw)[0]


def test_phase_waste_counts_missing_taps():
    # k4 s2 and k2 s2 split evenly into phases; k3 s2 fills only 9 of its 4 x 4 phase slots
    assert _phase_waste(geometry((1, 1, 9, 9), (1, 1, 4, 4), stride=2)) == 1.0
    assert _phase_waste(geometry((1, 1, 9, 9), (1, 1, 2, 2), stride=2)) == 1.0
    assert _phase_waste(geometry((1, 1, 9, 9), (1, 1, 3, 3), stride=2)) == pytest.approx(16 / 9)
    assert _phase_waste(geometry((1, 1, 9, 9), (1, 1, 3, 3))) == 1.0


def test_default_choice_per_geometry():
    e = CPUEngine()
    dense = geometry((2, 4, 9, 9), (6, 4, 3, 3), padding=1)
    depthwise = geometry((2, 4, 9, 9), (8, 1, 3, 3), padding=1, groups=4)
    strided = geometry((2, 4, 9, 9), (6, 4, 3, 3), stride=2)
    assert e.choose("forward", dense, np.float32) == "flat_cf"
    assert e.choose("forward", depthwise, np.float32) == "depthwise"
    assert e.choose("forward", strided, np.float32) == "im2col"      # 16/9 of the work as phases
    big_pad = geometry((2, 4, 9, 9), (6, 4, 3, 3), padding=4)        # pad > d(k-1): no flipped kernel
    assert e.choose("backward_input", big_pad, np.float32) == "im2col"


def test_force_rejects_unknown_and_unsupported():
    e = CPUEngine()
    with pytest.raises(ValueError, match="algorithm must be one of"):
        with e.force("winograd"):
            pass
    g = geometry((1, 2, 5, 5), (2, 2, 3, 3))
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.w_shape)
    with e.force("depthwise"), pytest.raises(ValueError, match="does not support"):
        e.forward(x, w, g)


def test_small_workspace_leaves_only_im2col_and_bounds_temporaries():
    e = CPUEngine(workspace_limit=64 << 10)
    g = geometry((3, 8, 20, 20), (8, 8, 3, 3), padding=1)
    assert e.choose("forward", g, np.float64) == "im2col"
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    results = [e.forward(x, w, g), e.backward_input(gy, w, g), e.backward_weight(x, gy, g)]
    assert e.peak_temp_bytes <= 64 << 10
    roomy = CPUEngine()
    expected = [roomy.forward(x, w, g), roomy.backward_input(gy, w, g), roomy.backward_weight(x, gy, g)]
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_optimize_caches_a_supported_choice_and_keeps_results(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_module, "TUNE_SETTLE", 0.0)      # tiny shapes: no pauses in a test
    e = CPUEngine()
    e.tuner = autotune.Autotuner(path=tmp_path / "a.json")
    g = geometry((2, 4, 8, 8), (4, 4, 3, 3), padding=1)
    chosen = e.optimize(g, np.float64, repeat=1)
    assert set(chosen) == {"forward", "backward_input", "backward_weight"}
    for op, algorithm in chosen.items():
        assert e.supports(algorithm, op, g, 8)
        assert e.choose(op, g, np.float64) == algorithm
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.w_shape)
    with e.force("im2col"):
        want = e.forward(x, w, g)
    np.testing.assert_allclose(e.forward(x, w, g), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["flat", "flat_cf", "im2col", "depthwise"])
def test_results_independent_of_batch_split(algorithm):
    # The same call with a limit that splits the batch one sample at a time.
    g = geometry((4, 6, 11, 10), (12, 1, 3, 3), padding=1, groups=6)
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    whole, split = CPUEngine(), CPUEngine()
    split.workspace_limit = split._sample_bytes(g, 8) + 1
    results = []
    for e in (whole, split):
        with e.force(algorithm):
            results.append([e.forward(x, w, g), e.backward_input(gy, w, g), e.backward_weight(x, gy, g)])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_last_algorithm_names_the_one_that_ran():
    e = CPUEngine()
    g = geometry((1, 2, 6, 6), (2, 2, 3, 3), padding=1)
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    with e.force("im2col"):
        e.forward(x, w, g)
    with e.force("flat"):
        e.backward_weight(x, gy, g)
    assert e.last_algorithm == {"forward": "im2col", "backward_weight": "flat"}


def test_float16_accumulates_in_float32():
    # 4096 products of 1.0: a float16 accumulator would stop at 2048.
    x = np.ones((1, 1, 4096), dtype=np.float16)
    w = np.ones((1, 1, 4096), dtype=np.float16)
    y = ndconv.conv1d(x.reshape(1, 1, 4096), w)
    assert y.dtype == np.float16 and float(y[0, 0, 0]) == 4096.0


def test_autotune_times_on_first_call_and_the_cache_file_serves_a_fresh_engine(tmp_path, monkeypatch):
    from ndconv.engine.autotune import Autotuner
    monkeypatch.setattr(cpu_module, "TUNE_SETTLE", 0.0)      # tiny shapes: no pauses in a test
    g = geometry((2, 4, 9, 9), (4, 4, 3, 3), padding=1)
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.w_shape)
    tuner = Autotuner(path=tmp_path / "autotune.json", repeat=1)
    e = CPUEngine()
    e.tuner, e.autotune = tuner, True
    y = e.forward(x, w, g)
    n = tuner.timings_run                    # each candidate in round 1, close ones in later rounds
    candidates = [a for a in e.algorithms if e.supports(a, "forward", g, 8)]
    assert len(candidates) <= n <= len(candidates) * cpu_module.TUNE_ROUNDS
    chosen = e.choose("forward", g, np.float64)
    e.forward(x, w, g)
    assert tuner.timings_run == n            # and never again
    fresh = CPUEngine()                      # autotune off: the file's choice still wins
    fresh.tuner = Autotuner(path=tmp_path / "autotune.json", repeat=1)
    assert fresh.choose("forward", g, np.float64) == chosen
    np.testing.assert_allclose(fresh.forward(x, w, g), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_shape, w_shape, kw", [
    ((2, 6, 17), (4, 3, 5), dict(stride=2, padding=2, groups=2)),
    ((2, 4, 9, 11), (6, 2, 3, 2), dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)),
    ((1, 3, 5, 6, 7), (2, 3, 3, 2, 3), dict(stride=(1, 2, 2), padding=(1, 0, 1), dilation=(2, 1, 1))),
])
def test_im2col_input_gradient_compiled_scatter_matches_numpy_loop(monkeypatch, x_shape, w_shape, kw):
    """The numba col2im and the NumPy per-tap loop add the taps in the same order: same bits."""
    from ndconv.engine import cpu_col2im
    if not cpu_col2im.AVAILABLE:
        pytest.skip("numba is not installed")
    from reference import conv_grad_input
    g = geometry(x_shape, w_shape, **kw)
    gy, w = rng.standard_normal(g.y_shape), rng.standard_normal(g.w_shape)
    e = CPUEngine()
    with e.force("im2col"):
        compiled = e.backward_input(gy, w, g)
    monkeypatch.setattr(cpu_col2im, "AVAILABLE", False)
    with e.force("im2col"):
        loop = e.backward_input(gy, w, g)
    np.testing.assert_array_equal(compiled, loop)
    padding = [(lo, hi) for lo, hi in zip(g.pad_lo, g.pad_hi)]
    ref = conv_grad_input(gy, w, g.x_size, g.stride, padding, g.dilation, g.groups)
    np.testing.assert_allclose(compiled, ref, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ taps: strided BLAS per kernel tap

from hypothesis import given, settings, strategies as st  # noqa: E402
from strategies import conv_cases  # noqa: E402

from ndconv.engine import cpu as cpu_module  # noqa: E402
from ndconv.engine import cpu_blas  # noqa: E402

needs_blas = pytest.mark.skipif(not cpu_blas.AVAILABLE, reason="NumPy's OpenBLAS CBLAS not found")


@needs_blas
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_b", [False, True])
def test_blas_gemm_on_strided_blocks_adds_into_c(dtype, trans_b):
    a = rng.standard_normal((7, 20)).astype(dtype)
    b = rng.standard_normal((9, 30)).astype(dtype)
    c = rng.standard_normal((6, 25)).astype(dtype)
    want = c.copy()
    ab = a[1:6, 2:6]                                   # (5, 4) at offset 22, pitch 20
    bb = b[3:8, 7:11] if trans_b else b[2:6, 4:9]      # (5, 4) -> B^T (4, 5), or (4, 5)
    want[1:6, 3:8] += ab @ (bb.T if trans_b else bb)
    cpu_blas.gemm(a, 22, (5, 4), 20, b, 3 * 30 + 7 if trans_b else 2 * 30 + 4, bb.shape, 30,
                  c, 25 + 3, 25, 1.0, trans_b=trans_b)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5)


@needs_blas
def test_blas_gemm_refuses_a_block_outside_its_array_before_writing():
    a, b, c = (np.ones((4, 4), np.float32) for _ in range(3))
    before = c.copy()
    with pytest.raises(ValueError, match="leaves an array of 16"):
        cpu_blas.gemm(a, 0, (4, 4), 4, b, 1, (4, 4), 4, c, 0, 4, 0.0)      # B runs one past the end
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_blas.gemm(a, 0, (4, 4), 4, b.astype(np.float64), 0, (4, 4), 4, c, 0, 4, 0.0)
    np.testing.assert_array_equal(c, before)


@st.composite
def taps_cases(draw):
    return dict(draw(conv_cases()), block=draw(st.sampled_from([1, 64, 1 << 20])))


@needs_blas
@settings(max_examples=60, deadline=None)
@given(c=taps_cases())
def test_taps_matches_reference_on_drawn_geometries(c):
    """Forced ``taps`` (any channel count, tiny and huge column blocks) against the float64 loops."""
    import reference as ref
    g = geometry((c["batch"], c["c_in"]) + c["size"], (c["c_out"], c["c_in"] // c["groups"]) + c["kernel"],
                 stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    x, w, gy = (rng.standard_normal(s) for s in (g.x_shape, g.w_shape, g.y_shape))
    args = dict(stride=c["stride"], padding=c["padding"], dilation=c["dilation"], groups=c["groups"])
    expected = {"forward": ref.conv(x, w, None, **args),
                "backward_input": ref.conv_grad_input(gy, w, c["size"], **args),
                "backward_weight": ref.conv_grad_weight(x, gy, w.shape, **args)}
    operands = {"forward": (x, w), "backward_input": (gy, w), "backward_weight": (x, gy)}
    e = CPUEngine()
    e.taps_block_bytes = c["block"]
    saved = cpu_module.TAPS_MIN_CHANNELS
    cpu_module.TAPS_MIN_CHANNELS = 1
    try:
        for op, want in expected.items():
            if not e.supports("taps", op, g, 8):
                continue
            for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
                with e.force("taps"):
                    got = getattr(e, op)(*(v.astype(dtype) for v in operands[op]), g)
                assert got.dtype == dtype
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, np.abs(want).max()),
                                           err_msg=f"{op} {dtype.__name__} {c}")
    finally:
        cpu_module.TAPS_MIN_CHANNELS = saved


@needs_blas
def test_taps_is_a_candidate_only_for_wide_groups():
    e = CPUEngine()
    wide = geometry((2, 32, 9, 9), (32, 16, 3, 3), padding=1, groups=2)
    narrow = geometry((2, 32, 9, 9), (32, 4, 3, 3), padding=1, groups=8)
    assert e.supports("taps", "forward", wide)
    assert not e.supports("taps", "forward", narrow)


@pytest.mark.skipif(not cpu_direct.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("algorithm, groups, stride", [("direct", 1, 1), ("direct", 1, 2), ("depthwise", 4, 1),
                                                       ("grouped", 2, 1)])
def test_read_only_inputs_compile_no_second_variant(algorithm, groups, stride):
    # numba types an array with its writeable flag: without read-only views at every kernel,
    # a caller's read-only array (np.broadcast_to, a memory map) compiled each kernel again
    e = CPUEngine()
    cx = 16 * groups if algorithm != "depthwise" else groups
    g = geometry((2, cx, 9, 9), (16 * groups if algorithm == "grouped" else 4 * cx, cx // groups, 3, 3),
                 padding=1, stride=stride, groups=groups)
    x, w, gy = (rng.standard_normal(s).astype(np.float32) for s in (g.x_shape, g.w_shape, g.y_shape))

    def run(x, w, gy):
        with e.force(algorithm):
            return [e.forward(x, w, g), e.backward_input(gy, w, g), e.backward_weight(x, gy, g)]

    want = run(x, w, gy)
    frozen = []
    for a in (x, w, gy):
        a = a.copy()
        a.flags.writeable = False
        frozen.append(a)
    for got, expected in zip(run(*frozen), want):
        np.testing.assert_array_equal(got, expected)
    wrapped = [k for m in (cpu_direct, cpu_depthwise, cpu_grouped) for k in vars(m).values() if hasattr(k, "kernel")]
    used = [k for k in wrapped if k.kernel.signatures]
    assert used
    for k in used:
        for sig in k.kernel.signatures:
            assert all(not sig[i].mutable for i in k.reads), (k.__name__, sig)
        # one variant per dtype: signatures differ in nothing but their arrays' dtype
        kinds = {tuple(str(getattr(t, "dtype", t)) for t in sig) for sig in k.kernel.signatures}
        assert len(kinds) == len(k.kernel.signatures), k.__name__
