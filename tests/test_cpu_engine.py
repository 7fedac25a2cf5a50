"""The CPU engine's own mechanics: algorithm choice, forcing, tuning, workspace bounds."""
import numpy as np
import pytest

import ndconv
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


def test_optimize_caches_a_supported_choice_and_keeps_results():
    e = CPUEngine()
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


def test_float16_accumulates_in_float32():
    # 4096 products of 1.0: a float16 accumulator would stop at 2048.
    x = np.ones((1, 1, 4096), dtype=np.float16)
    w = np.ones((1, 1, 4096), dtype=np.float16)
    y = ndconv.conv1d(x.reshape(1, 1, 4096), w)
    assert y.dtype == np.float16 and float(y[0, 0, 0]) == 4096.0


def test_autotune_times_on_first_call_and_the_cache_file_serves_a_fresh_engine(tmp_path):
    from ndconv.engine.autotune import Autotuner
    g = geometry((2, 4, 9, 9), (4, 4, 3, 3), padding=1)
    x, w = rng.standard_normal(g.x_shape), rng.standard_normal(g.w_shape)
    tuner = Autotuner(path=tmp_path / "autotune.json", repeat=1)
    e = CPUEngine()
    e.tuner, e.autotune = tuner, True
    y = e.forward(x, w, g)
    n = tuner.timings_run                    # flat_cf, flat and im2col, and close calls again
    assert 3 <= n <= 3 + 2 * 3
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
