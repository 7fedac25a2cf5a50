"""The autotuner and cuDNN inside the GPU engine (skipped without CuPy and a CUDA device)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpu_support import cupy_and_marks

cp, pytestmark = cupy_and_marks()

from ndconv.engine import cudnn  # noqa: E402
from ndconv.engine.autotune import Autotuner  # noqa: E402
from ndconv.engine.cpu import CPUEngine  # noqa: E402
from ndconv.engine import gpu as gpu_module  # noqa: E402
from ndconv.engine.gpu import ALGORITHMS, GPUEngine, cuda_timer, device_context  # noqa: E402
from ndconv.engine.registry import OPS  # noqa: E402
from ndconv.geometry import conv_geometry, conv_transpose_geometry  # noqa: E402

needs_cudnn = pytest.mark.skipif(not cudnn.available(), reason=f"cuDNN absent: {cudnn.load_error()}")


def geometry(x_shape, w_shape, **kw):
    return conv_geometry(x_shape, w_shape, None, **kw)[0]


def arrays(g, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(s).astype(dtype) for s in (g.x_shape, g.w_shape, g.y_shape))


def run(engine, op, g, x, w, y):
    if op == "forward":
        return engine.forward(x, w, g)
    if op == "backward_input":
        return engine.backward_input(y, w, g)
    return engine.backward_weight(x, y, g)


def test_cuda_timer_starts_every_sample_from_a_cold_l2(monkeypatch):
    dev = cp.cuda.runtime.getDevice()
    l2 = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrL2CacheSize, dev)
    order = []
    real = gpu_module.flush_l2
    monkeypatch.setattr(gpu_module, "flush_l2", lambda: (order.append("flush"), real()))
    a = cp.ones(1 << 20, dtype=cp.float32)
    ms = cuda_timer(lambda: order.append("call") or a.sum(), 4)
    assert ms > 0
    assert order == ["call"] + ["flush", "call"] * 4          # warm-up, then a flush before each sample
    buf = gpu_module._flush_buffers[dev]
    assert buf.nbytes == 2 * l2 and int(buf[::4096].max()) == 0     # twice L2, overwritten (zeros)
    # the memset is ordered on the current stream, not the legacy default stream, and
    # done when flush_l2 returns (the timed call starts on an idle device)
    with cp.cuda.Stream(non_blocking=True) as s:
        buf.fill(1)
        gpu_module.flush_l2()
        assert s.done
        assert int(buf.max()) == 0


def test_optimize_persists_and_a_new_process_reuses_it(tmp_path):
    path = tmp_path / "autotune.json"
    g = geometry((4, 16, 20, 20), (16, 1, 3, 3), padding=1, groups=16)   # >= 2 candidates each
    eng = GPUEngine(tuner=Autotuner(path=path, timer=cuda_timer))
    choice = eng.optimize(g, np.float32)
    assert set(choice) == set(OPS)
    assert eng.tuner.timings_run >= 2 * len(OPS)            # at least two candidates each
    data = json.loads(path.read_text())
    ctx = data["contexts"]
    assert len(ctx) == 1 and json.loads(next(iter(ctx)))["device"] == device_context(0)["device"]
    # a fresh engine and tuner on the same file: no timing, same choice, also for plain calls
    fresh = GPUEngine(tuner=Autotuner(path=path, timer=cuda_timer))
    assert fresh.optimize(g, np.float32) == choice and fresh.tuner.timings_run == 0
    plain = GPUEngine(tuner=Autotuner(path=path, timer=cuda_timer))
    x, w, y = (cp.asarray(a) for a in arrays(g, np.float32))
    for op in OPS:
        run(plain, op, g, x, w, y)
        assert plain.last_algorithm[op] == choice[op]
    assert plain.tuner.timings_run == 0


def test_corrupt_cache_does_not_stop_the_engine(tmp_path):
    path = tmp_path / "autotune.json"
    path.write_text("{{{ not json")
    g = geometry((2, 8, 12, 12), (8, 1, 3, 3), padding=1, groups=8)
    eng = GPUEngine(tuner=Autotuner(path=path, timer=cuda_timer))
    x, w, y = (cp.asarray(a) for a in arrays(g, np.float32))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        out = eng.forward(x, w, g)
    assert out.shape == g.y_shape
    eng.optimize(g, np.float32)
    assert json.loads(path.read_text())["format"] == 1


def test_autotune_flag_tunes_on_first_call(tmp_path):
    g = geometry((2, 8, 16, 16), (8, 4, 3, 3), padding=1, groups=2)
    eng = GPUEngine(autotune=True, tuner=Autotuner(path=tmp_path / "a.json", timer=cuda_timer))
    x, w, y = (cp.asarray(a) for a in arrays(g, np.float32))
    ref = CPUEngine().forward(*(a.astype(np.float64) for a in arrays(g, np.float32)[:2]), g)
    out = eng.forward(x, w, g)
    assert ("forward", g, np.dtype(np.float32).char) in eng._tuned
    np.testing.assert_allclose(cp.asnumpy(out), ref, rtol=1e-4, atol=1e-4)
    n = eng.tuner.timings_run
    eng.forward(x, w, g)
    assert eng.tuner.timings_run == n                          # tuned once


def test_cudnn_symmetric_padding_rule():
    assert cudnn.symmetric_padding(geometry((1, 1, 9, 9), (1, 1, 3, 3), padding=1)) == (1, 1)
    # 'same' with an even kernel pads (1, 2): cuDNN would give one output fewer
    assert cudnn.symmetric_padding(geometry((1, 1, 8, 8), (1, 1, 4, 4), padding="same")) is None
    # high padding never read by any window: still expressible
    assert cudnn.symmetric_padding(geometry((1, 1, 9), (1, 1, 3), stride=2, padding=[(1, 2)])) == (1,)
    g = geometry((1, 1, 8, 8), (1, 1, 4, 4), padding="same")
    assert not ALGORITHMS.get("cudnn").supports("forward", g, np.float32)


def check_forced_against_cpu(name, op, g, dtype, host_arrays, dev, got):
    """``got`` (op run with algorithm ``name`` forced) against the float64 CPU engine,
    and bit for bit against a second run."""
    assert got.dtype == np.dtype(dtype)
    tol = {"float64": 1e-12, "float32": 1e-5, "float16": 4e-3}[dtype]
    ref = run(CPUEngine(), op, g, *(a.astype(np.float64) for a in host_arrays))
    err = np.linalg.norm(cp.asnumpy(got).astype(np.float64) - ref) / np.linalg.norm(ref)
    assert err < tol, (op, err)
    again = run(GPUEngine(algorithm=name), op, g, *dev)
    assert bool(cp.all(got.view(cp.uint8) == again.view(cp.uint8))), op


@needs_cudnn
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("g", [
    geometry((3, 6, 17), (4, 3, 5), stride=2, padding=2, dilation=1, groups=2),
    geometry((2, 8, 11, 13), (8, 2, 3, 3), stride=(1, 2), padding=1, dilation=(2, 1), groups=4),
    geometry((2, 4, 6, 7, 5), (4, 1, 3, 3, 3), padding=1, groups=4),
    conv_transpose_geometry((2, 4, 5, 5), (4, 3, 4, 4), None, 2, 1, 0, 1, 1)[0],
], ids=["1d", "2d_grouped", "3d_depthwise", "2d_transposed_k4s2"])
def test_cudnn_forced_matches_cpu_and_is_deterministic(g, dtype):
    host_arrays = arrays(g, dtype, 3)
    dev = tuple(cp.asarray(a) for a in host_arrays)
    for op in OPS:
        got = run(GPUEngine(algorithm="cudnn"), op, g, *dev)
        check_forced_against_cpu("cudnn", op, g, dtype, host_arrays, dev, got)


@needs_cudnn
def test_cudnn_records_its_choice_and_respects_the_workspace_limit(tmp_path):
    g = geometry((4, 32, 24, 24), (32, 32, 3, 3), padding=1)
    tuner = Autotuner(path=tmp_path / "c.json", timer=cuda_timer)
    eng = GPUEngine(algorithm="cudnn", workspace_limit=1 << 23, tuner=tuner)
    x, w, y = (cp.asarray(a) for a in arrays(g, np.float32))
    eng.peak_temp_bytes = 0
    for op in OPS:
        run(eng, op, g, x, w, y)
    assert eng.peak_temp_bytes <= 1 << 23
    keys = tuner.entries(device_context(0))
    assert sum(k.startswith("cudnn:") for k in keys) == len(OPS)
    assert all(v.isdigit() for k, v in keys.items() if k.startswith("cudnn:"))


def test_cudnn_absent_means_not_supported(monkeypatch):
    monkeypatch.setattr(cudnn, "available", lambda: False)
    g = geometry((1, 2, 5, 5), (2, 2, 3, 3), padding=1)
    assert not ALGORITHMS.get("cudnn").supports("forward", g, np.float32)
    assert GPUEngine().choose("forward", g, np.float32).name != "cudnn"


# ------------------------------------------------------------------ cuDNN's graph API

GRAPH_GEOMETRIES = [
    geometry((3, 6, 17), (4, 3, 5), stride=2, padding=2, dilation=1, groups=2),
    geometry((2, 8, 11, 13), (8, 2, 3, 3), stride=(1, 2), padding=1, dilation=(2, 1), groups=4),
    geometry((2, 6, 10, 9), (5, 6, 4, 4), padding=[(2, 1), (1, 0)]),   # less padding after than before
    geometry((2, 4, 6, 7, 5), (4, 1, 3, 3, 3), padding=1, groups=4),
    conv_transpose_geometry((2, 4, 5, 5), (4, 3, 4, 4), None, 2, 1, 0, 1, 1)[0],
]


@needs_cudnn
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("g", GRAPH_GEOMETRIES, ids=["1d", "2d_grouped", "2d_asymmetric", "3d_depthwise",
                                                     "2d_transposed_k4s2"])
def test_cudnn_graph_forced_matches_cpu_and_is_deterministic(g, dtype):
    host_arrays = arrays(g, dtype, 3)
    dev = tuple(cp.asarray(a) for a in host_arrays)
    alg = ALGORITHMS.get("cudnn_graph")
    assert alg.supports("forward", g, np.dtype(dtype))
    for op in OPS:
        try:
            got = run(GPUEngine(algorithm="cudnn_graph"), op, g, *dev)
        except RuntimeError as e:          # no deterministic engine (some float64 gradients)
            assert dtype == "float64" and "cannot run" in str(e), e
            continue
        check_forced_against_cpu("cudnn_graph", op, g, dtype, host_arrays, dev, got)


TF32X3_GEOMETRIES = [
    geometry((3, 6, 17), (4, 6, 5), stride=2, padding=2),
    geometry((2, 8, 11, 13), (8, 8, 3, 3), stride=(1, 2), padding=1, dilation=(2, 1)),
    geometry((2, 6, 10, 9), (5, 6, 4, 4), padding=[(2, 1), (1, 0)]),
    geometry((2, 4, 6, 7, 5), (4, 4, 3, 3, 3), padding=1),
    conv_transpose_geometry((2, 4, 5, 5), (4, 3, 4, 4), None, 2, 1, 0, 1, 1)[0],
    geometry((2, 16, 9, 9), (24, 16, 1, 1)),
]


@needs_cudnn
@pytest.mark.parametrize("g", TF32X3_GEOMETRIES, ids=["1d_strided", "2d_dilated", "2d_asymmetric", "3d",
                                                      "2d_transposed_k4s2", "2d_1x1"])
def test_cudnn_tf32x3_matches_cpu_at_float32_accuracy(g):
    """TF32 engines on split, stacked operands: float32 accuracy (one TF32 convolution
    errs by ~3e-4 of the norm), same bits on a second run."""
    host_arrays = arrays(g, np.float32, 4)
    dev = tuple(cp.asarray(a) for a in host_arrays)
    alg = ALGORITHMS.get("cudnn_tf32x3")
    assert not alg.supports("backward_weight", g, np.float32)
    eng = GPUEngine(algorithm="cudnn_tf32x3")
    eng.peak_temp_bytes = 0
    for op in ("forward", "backward_input"):
        assert alg.supports(op, g, np.float32), op
        got = run(eng, op, g, *dev)
        check_forced_against_cpu("cudnn_tf32x3", op, g, "float32", host_arrays, dev, got)
    # the stacked copies of both operands count as temporaries
    assert eng.peak_temp_bytes >= 3 * (host_arrays[0].nbytes + host_arrays[1].nbytes)
    # a limit that leaves room for one sample's copies: one cuDNN call per sample, same result
    x, w, y = host_arrays
    one = GPUEngine(algorithm="cudnn_tf32x3")
    for op, a in (("forward", x), ("backward_input", y)):
        one.workspace_limit = 2 * 3 * (a.nbytes // g.batch + w.nbytes) + 64
        one.peak_temp_bytes = 0
        got = cp.asnumpy(run(one, op, g, *dev)).astype(np.float64)
        ref = run(CPUEngine(), op, g, *(v.astype(np.float64) for v in host_arrays))
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5, op
        assert one.peak_temp_bytes <= one.workspace_limit


def test_cudnn_tf32x3_takes_what_tf32x3_may_sum():
    from ndconv.engine import gpu_blas
    alg = ALGORITHMS.get("cudnn_tf32x3")
    dense = geometry((2, 8, 9, 9), (8, 8, 3, 3), padding=1)
    assert alg.supports("forward", dense, np.float32) == (cudnn.available() and gpu_blas.has_tf32())
    assert not alg.supports("forward", dense, np.float64)
    assert not alg.supports("forward", dense, np.float16)
    assert not alg.supports("backward_weight", dense, np.float32)
    assert not alg.supports("forward", geometry((2, 8, 9, 9), (8, 4, 3, 3), padding=1, groups=2), np.float32)
    # products per output: 512 channels x 9 taps = 4608 > TF32X3_MAX_K for the forward;
    # the input gradient of a k4 s2 call sums Cy x 2 x 2 products per input position
    long_sum = geometry((1, 512, 6, 6), (8, 512, 3, 3), padding=1)
    assert alg.gemm_k("forward", long_sum) == 4608
    assert not alg.supports("forward", long_sum, np.float32)
    k4s2 = geometry((1, 8, 8, 8), (1024, 8, 4, 4), stride=2, padding=1)
    assert alg.gemm_k("backward_input", k4s2) == 4096
    if alg.supports("forward", dense, np.float32):    # stacked operands past the limit: not run
        x, w, _ = (cp.asarray(a) for a in arrays(dense, np.float32))
        with pytest.raises(RuntimeError, match="cannot run forward.*workspace limit"):
            GPUEngine(algorithm="cudnn_tf32x3", workspace_limit=1024).forward(x, w, dense)


def test_stack_parts_orders_the_tf32_parts():
    from ndconv.engine import gpu_blas
    a = cp.asarray(np.random.default_rng(2).standard_normal((3, 5, 7)).astype(np.float32))
    for axis, order in ((1, "hlh"), (0, "hhl")):
        s = cp.asnumpy(gpu_blas.stack_parts(a, axis, order))
        blocks = np.split(s, 3, axis=axis)
        hi = blocks[0]
        lo = blocks[order.index("l")]
        np.testing.assert_array_equal(blocks[[i for i, c in enumerate(order) if c == "h"][1]], hi)
        # hi keeps 10 fraction bits (the low 13 bits of its float32 pattern are zero)
        assert not np.any(hi.view(np.uint32) & 0x1FFF)
        host_a = cp.asnumpy(a).astype(np.float64)
        assert np.abs(hi + lo.astype(np.float64) - host_a).max() <= 2.0 ** -20 * np.abs(host_a).max()
        assert np.abs(lo).max() > 0


@needs_cudnn
def test_cudnn_graph_takes_addresses_that_are_not_16_byte_aligned():
    g = geometry((2, 8, 12, 12), (8, 8, 3, 3), padding=1)
    x, w, y = arrays(g, np.float32, 5)
    eng = GPUEngine(algorithm="cudnn_graph")
    flat = cp.zeros(x.size + 1, np.float32)
    flat[1:] = cp.asarray(x.ravel())
    xs = flat[1:].reshape(x.shape)                    # 4 bytes past an aligned address
    assert xs.data.ptr % 16 == 4
    got = cp.asnumpy(eng.forward(xs, cp.asarray(w), g))
    ref = CPUEngine().forward(x.astype(np.float64), w.astype(np.float64), g)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


@needs_cudnn
def test_cudnn_graph_records_its_choice_and_a_new_process_reuses_it(tmp_path):
    g = geometry((4, 32, 24, 24), (32, 32, 3, 3), padding=1)
    path = tmp_path / "g.json"
    eng = GPUEngine(algorithm="cudnn_graph", workspace_limit=1 << 23,
                    tuner=Autotuner(path=path, timer=cuda_timer))
    x, w, y = (cp.asarray(a) for a in arrays(g, np.float32))
    eng.peak_temp_bytes = 0
    first = [run(eng, op, g, x, w, y) for op in OPS]
    assert eng.peak_temp_bytes <= 1 << 23
    keys = {k: v for k, v in eng.tuner.entries(device_context(0)).items() if k.startswith("cudnn_graph:")}
    assert len(keys) == len(OPS)
    assert all(v.split(",")[0].isdigit() for v in keys.values())       # "engine index,knob=value..."
    # a new algorithm object (as in a new process) takes the remembered engines: same bits
    from ndconv.engine.cudnn_graph import CudnnGraph
    fresh_alg = CudnnGraph()
    fresh = GPUEngine(workspace_limit=1 << 23, tuner=Autotuner(path=path, timer=cuda_timer))
    for op, ref in zip(OPS, first):
        a, b = {"forward": (x, w), "backward_input": (y, w), "backward_weight": (x, y)}[op]
        again = fresh_alg.run(fresh, op, a, b, g)
        assert bool(cp.all(again.view(cp.uint8) == ref.view(cp.uint8))), op
