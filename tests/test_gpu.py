"""The GPU engine (CuPy): parity with the CPU engine and with PyTorch on CUDA, every
algorithm forced on its own, determinism, 64-bit indexing, the module API on the GPU.

Skipped as a whole where CuPy or a CUDA device is missing (CI has neither).
"""
from __future__ import annotations

import contextlib
import itertools
import zlib

import numpy as np
import pytest

from gpu_support import TOL, cupy_and_marks

cp, pytestmark = cupy_and_marks()

import ndconv  # noqa: E402
from ndconv import functional as F  # noqa: E402
from ndconv.engine import cudnn, get_engine, gpu_blas  # noqa: E402
from ndconv.engine.cpu import CPUEngine  # noqa: E402
from ndconv.engine.gpu import ALGORITHMS, GPUEngine  # noqa: E402
from ndconv.engine.registry import OPS  # noqa: E402
from ndconv.geometry import ConvGeometry, conv_geometry, conv_transpose_geometry  # noqa: E402

# plane and depthwise_rows compile one module per geometry: random sweeps over every
# algorithm would spend minutes compiling; tests/test_gpu_plane.py and test_gpu_rows.py
# cover them.
ALGOS = tuple(name for name in ALGORITHMS.names() if name not in ("plane", "depthwise_rows"))
DTYPES = ("float64", "float32", "float16")
# what the GEMM algorithms are called in float32 where TF32 tensor cores exist
IM2COL32, FLAT32 = ("im2col_tf32x3", "flat_tf32x3") if gpu_blas.has_tf32() else ("im2col_gemm", "flat_gemm")


def relerr(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.all(np.isfinite(a)), "non-finite values in the result"
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def host(a):
    return cp.asnumpy(a) if isinstance(a, cp.ndarray) else np.asarray(a)


def rand(rng, shape, dtype="float64"):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture(autouse=True, scope="module")
def private_autotune_cache(tmp_path_factory):
    """Choices tuned here go to a private cache file, never the user's."""
    from ndconv.engine import gpu as gpu_module
    from ndconv.engine.autotune import Autotuner
    saved = gpu_module._default_tuner
    gpu_module._default_tuner = Autotuner(path=tmp_path_factory.mktemp("autotune") / "autotune.json",
                                          timer=gpu_module.cuda_timer)
    yield gpu_module._default_tuner
    gpu_module._default_tuner = saved


@pytest.fixture
def gpu():
    """The engine the functional API uses for CuPy arrays, restored after the test."""
    eng = get_engine(cp.empty(0))
    saved = (eng.workspace_limit, dict(eng._forced), dict(eng._tuned))
    yield eng
    eng.workspace_limit, eng._forced, eng._tuned = saved[0], saved[1], saved[2]
    eng._untuned.clear()


@pytest.fixture(scope="module")
def tcuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return torch


# ====================================================================== PyTorch references

def torch_reference(torch, case, x, w, b, gy, dtype=None):
    """Output and (input, weight, bias) gradients through PyTorch on CUDA.

    Works from the geometry ndconv computed (pad_lo/pad_hi/dilation), so any padding
    form is reproduced with explicit F.pad (conv) or a crop of the full transposed
    result (transposed), which is how those forms are defined.
    """
    tf = torch.nn.functional
    dt = getattr(torch, dtype) if dtype else torch.float64
    tx, tw, tb, tg = (torch.tensor(np.asarray(a, dtype=np.float64)).to("cuda", dt) for a in (x, w, b, gy))
    for t in (tx, tw, tb):
        t.requires_grad_(True)
    g = case_geometry(case, x.shape, w.shape)
    nd = g.nd
    if case["kind"] == "conv":
        pads = []
        for lo, hi in zip(reversed(g.pad_lo), reversed(g.pad_hi)):
            pads += [lo, hi]
        mode = {"zeros": "constant"}.get(g.padding_mode, g.padding_mode)
        xp = tf.pad(tx, pads, mode=mode) if any(pads) else tx
        conv = getattr(tf, f"conv{nd}d")
        out = conv(xp, tw, tb, stride=g.stride, padding=0, dilation=g.dilation, groups=g.groups)
    else:
        full = [(n - 1) * s + d * (k - 1) + 1 for n, s, d, k in zip(g.y_size, g.stride, g.dilation, g.kernel)]
        extra = [max(0, lo + xs - f) for lo, xs, f in zip(g.pad_lo, g.x_size, full)]
        convt = getattr(tf, f"conv_transpose{nd}d")
        out = convt(tx, tw, None, stride=g.stride, padding=0, output_padding=tuple(extra),
                    groups=g.groups, dilation=g.dilation)
        out = out[(slice(None), slice(None)) + tuple(slice(lo, lo + xs) for lo, xs in zip(g.pad_lo, g.x_size))]
        out = out + tb.reshape((1, -1) + (1,) * nd)
    grads = torch.autograd.grad(out, (tx, tw, tb), tg)
    return [t.detach().cpu().double().numpy() for t in (out,) + grads]


def case_geometry(case, x_shape, w_shape):
    if case["kind"] == "conv":
        return conv_geometry(x_shape, w_shape, None, case.get("stride", 1), case.get("padding", 0),
                             case.get("dilation", 1), case.get("groups", 1),
                             case.get("padding_mode", "zeros"))[0]
    return conv_transpose_geometry(x_shape, w_shape, None, case.get("stride", 1), case.get("padding", 0),
                                   case.get("output_padding", 0), case.get("groups", 1),
                                   case.get("dilation", 1), case.get("output_size"))[0]


# (name, case): x / w shapes are canonical (channels-first, batched); "layout" says how
# the arrays are handed to ndconv.
CASES = [
    ("c1d_s2_d2_g2", dict(kind="conv", x=(2, 4, 17), w=(6, 2, 3), stride=2, padding=1, dilation=2, groups=2)),
    ("c2d_asym", dict(kind="conv", x=(2, 3, 9, 11), w=(4, 3, 3, 2), stride=(2, 1), padding=[(2, 0), (1, 3)],
                      dilation=(1, 2))),
    ("c2d_same_even", dict(kind="conv", x=(2, 3, 8, 7), w=(5, 3, 4, 4), padding="same")),
    ("c2d_paddle_SAME_s2", dict(kind="conv", x=(1, 2, 9, 10), w=(3, 2, 3, 3), stride=2, padding="SAME")),
    ("c2d_depthwise", dict(kind="conv", x=(2, 4, 10, 10), w=(4, 1, 3, 3), padding=1, groups=4)),
    ("c2d_depthwise_mult3_s2", dict(kind="conv", x=(1, 3, 8, 9), w=(9, 1, 3, 3), stride=2, padding=1, groups=3)),
    ("c2d_1in_many_out", dict(kind="conv", x=(2, 1, 7, 6), w=(5, 1, 2, 3), padding=(1, 0))),
    ("c2d_1x1", dict(kind="conv", x=(3, 6, 5, 4), w=(4, 6, 1, 1))),
    ("c2d_reflect", dict(kind="conv", x=(2, 2, 6, 7), w=(3, 2, 3, 3), padding=2, padding_mode="reflect")),
    ("c2d_replicate", dict(kind="conv", x=(2, 2, 6, 7), w=(4, 1, 3, 2), padding=(1, 2), groups=2,
                           padding_mode="replicate")),
    ("c2d_circular_dw", dict(kind="conv", x=(1, 3, 5, 6), w=(3, 1, 3, 3), padding=2, groups=3,
                             padding_mode="circular")),
    ("c3d_grouped", dict(kind="conv", x=(2, 4, 5, 6, 7), w=(4, 2, 2, 3, 2), stride=(1, 2, 1),
                         padding=(1, 1, 0), groups=2)),
    ("c3d_depthwise_dil", dict(kind="conv", x=(2, 3, 6, 7, 5), w=(3, 1, 3, 3, 3), stride=(2, 1, 1), padding=1,
                               dilation=(1, 2, 1), groups=3)),
    ("c1d_depthwise_mult2_dil", dict(kind="conv", x=(3, 2, 20), w=(4, 1, 5), padding=4, dilation=2, groups=2)),
    ("c2d_channels_last", dict(kind="conv", x=(2, 3, 7, 6), w=(4, 3, 3, 3), padding=1, layout="channels_last")),
    ("c3d_channels_last_dw", dict(kind="conv", x=(1, 2, 4, 5, 6), w=(2, 1, 3, 3, 3), padding=1, groups=2,
                                  layout="channels_last")),
    ("c2d_unbatched", dict(kind="conv", x=(1, 3, 6, 6), w=(2, 3, 3, 3), stride=2, layout="unbatched")),
    ("c2d_noncontig", dict(kind="conv", x=(2, 4, 9, 8), w=(6, 2, 3, 3), padding=1, groups=2, layout="noncontig")),
    ("t2d_s2_op1", dict(kind="transposed", x=(2, 4, 5, 6), w=(4, 3, 3, 3), stride=2, padding=1,
                        output_padding=1)),
    ("t2d_depthwise_k4s2", dict(kind="transposed", x=(2, 4, 6, 6), w=(4, 1, 4, 4), stride=2, padding=1, groups=4)),
    ("t3d_torch_sample", dict(kind="transposed", x=(2, 2, 4, 4, 4), w=(2, 2, 4, 5, 6), stride=(3, 2, 1),
                              padding=(1, 2, 3), output_padding=(2, 3, 1), groups=2, dilation=4)),
    ("t1d_s3", dict(kind="transposed", x=(3, 3, 7), w=(3, 2, 5), stride=3, padding=2, output_padding=1)),
    ("t3d_depthwise_mult2", dict(kind="transposed", x=(1, 6, 3, 4, 3), w=(6, 1, 3, 3, 3), stride=2, padding=1,
                                 groups=3)),
    ("t2d_output_size", dict(kind="transposed", x=(2, 3, 5, 5), w=(3, 2, 3, 3), stride=3, padding=1,
                             output_size=(15, 14))),
    ("t2d_asym_pad", dict(kind="transposed", x=(1, 2, 4, 5), w=(2, 3, 3, 2), stride=2, padding=[1, 0, 2, 1])),
    ("t2d_channels_last", dict(kind="transposed", x=(2, 4, 3, 4), w=(4, 2, 3, 3), stride=2,
                               layout="channels_last")),
    ("t1d_unbatched_dw", dict(kind="transposed", x=(1, 3, 9), w=(3, 1, 4), stride=2, groups=3,
                              layout="unbatched")),
]


def to_layout(xp, a, layout, role):
    """Canonical (N, C, *s) -> what the case hands ndconv."""
    if layout == "channels_last" and role == "data":
        return xp.ascontiguousarray(xp.moveaxis(a, 1, -1))
    if layout == "unbatched" and role == "data":
        return a[0]
    if layout == "noncontig":
        big = xp.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=a.dtype)
        big[..., ::2] = a
        view = big[..., ::2]
        assert not view.flags.c_contiguous
        return view
    return a


def from_layout(xp, a, layout):
    if layout == "channels_last":
        return xp.moveaxis(a, -1, 1)
    if layout == "unbatched":
        return a[None]
    return a


def run_ndconv(case, x, w, b, gy):
    """Forward and gradients through the functional API, arrays on whatever device they are."""
    xp = cp if isinstance(x, cp.ndarray) else np
    layout = case.get("layout", "plain")
    nd = w.ndim - 2
    fmt = {1: "NLC", 2: "NHWC", 3: "NDHWC"}[nd] if layout == "channels_last" else None
    xi, gi = to_layout(xp, x, layout, "data"), to_layout(xp, gy, layout, "data")
    wi = to_layout(xp, w, layout, "weight")
    if case["kind"] == "conv":
        kw = dict(stride=case.get("stride", 1), padding=case.get("padding", 0),
                  dilation=case.get("dilation", 1), groups=case.get("groups", 1))
        out = F.conv_nd(xi, wi, b, **kw, padding_mode=case.get("padding_mode", "zeros"), data_format=fmt)
        grads = F.conv_backward(gi, xi, wi, **kw, padding_mode=case.get("padding_mode", "zeros"),
                                data_format=fmt)
    else:
        kw = dict(stride=case.get("stride", 1), padding=case.get("padding", 0),
                  output_padding=case.get("output_padding", 0), groups=case.get("groups", 1),
                  dilation=case.get("dilation", 1))
        out = F.conv_transpose_nd(xi, wi, b, **kw, output_size=case.get("output_size"), data_format=fmt)
        grads = F.conv_backward(gi, xi, wi, kw["stride"], kw["padding"], kw["dilation"], kw["groups"],
                                transposed=True, output_padding=kw["output_padding"],
                                output_size=case.get("output_size"), data_format=fmt)
    gx, gw, gb = grads
    return [host(from_layout(xp, out, layout)), host(from_layout(xp, gx, layout)), host(gw), host(gb)]


def case_arrays(case, seed, dtype):
    rng = np.random.default_rng(seed)
    x = rand(rng, case["x"], dtype)
    w = rand(rng, case["w"], dtype)
    g = case_geometry(case, case["x"], case["w"])
    out_shape = g.y_shape if case["kind"] == "conv" else g.x_shape
    b = rand(rng, (out_shape[1],), dtype)
    gy = rand(rng, out_shape, dtype)
    return g, x, w, b, gy


def algorithms_for(g):
    return [name for name in ALGOS if all(ALGORITHMS.get(name).supports(op, g, np.float32) for op in OPS)]


def engine_geometry(case):
    """The geometry the engine sees: explicit padding is done first for non-zero modes."""
    g = case_geometry(case, case["x"], case["w"])
    return g if g.padding_mode == "zeros" else g.with_zero_padding()


PARAMS = [(name, alg) for name, case in CASES for alg in algorithms_for(engine_geometry(case))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,alg", PARAMS, ids=[f"{n}-{a}" for n, a in PARAMS])
def test_functional_vs_torch_and_cpu(tcuda, gpu, name, alg, dtype):
    case = dict(CASES)[name]
    if not all(ALGORITHMS.get(alg).supports(op, engine_geometry(case), dtype) for op in OPS):
        pytest.skip(f"{alg} does not take {dtype}")
    g, x, w, b, gy = case_arrays(case, zlib.crc32(name.encode()) % 1000, dtype)
    with gpu.force(None, alg):
        got = run_ndconv(case, *(cp.asarray(a) for a in (x, w, b, gy)))
    ref = torch_reference(tcuda, case, x, w, b, gy)
    for what, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert a.dtype == np.dtype(dtype), what
        assert relerr(a, r) < TOL[dtype], (what, relerr(a, r))
    if dtype == "float64":
        cpu = run_ndconv(case, x, w, b, gy)
        for what, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, cpu):
            assert relerr(a, r) < 1e-12, what


@pytest.mark.parametrize("alg", ALGOS)
def test_float32_against_torch_float32(tcuda, gpu, alg):
    """Same dtype on both sides (TF32 off in PyTorch)."""
    if alg.startswith("cudnn") and not cudnn.available():
        pytest.skip(f"cuDNN is not installed: {cudnn.load_error()}")
    case = dict(kind="conv", x=(4, 8, 12, 12), w=(8, 1, 3, 3), padding=1, groups=8)
    if alg in ("im2col_gemm", "im2col_tf32x3", "cudnn", "cudnn_graph", "phases"):
        case = dict(kind="conv", x=(4, 8, 12, 12), w=(6, 4, 3, 3), stride=2, padding=1, groups=2)
    if alg in ("flat_gemm", "flat_tf32x3"):
        case = dict(kind="conv", x=(4, 8, 12, 12), w=(6, 4, 3, 2), dilation=(1, 2), padding=(2, 1), groups=2)
    if alg == "space_to_batch":
        case = dict(kind="conv", x=(4, 8, 12, 12), w=(6, 4, 3, 3), dilation=(2, 3), padding=2, groups=2)
    if alg in ("implicit_gemm", "implicit_tf32x3", "cudnn_tf32x3"):
        case = dict(kind="conv", x=(4, 8, 12, 11), w=(6, 8, 3, 3), stride=2, padding=1)
    g, x, w, b, gy = case_arrays(case, 7, "float32")
    with forced_where_supported(gpu, alg, g):
        got = run_ndconv(case, *(cp.asarray(a) for a in (x, w, b, gy)))
    ref = torch_reference(tcuda, case, x, w, b, gy, dtype="float32")
    for a, r in zip(got, ref):
        assert relerr(a, r) < 1e-5


@contextlib.contextmanager
def forced_where_supported(gpu, alg, g):
    """Force ``alg`` on the ops it supports for ``g`` (the others keep the engine's choice)."""
    ops = [op for op in OPS if ALGORITHMS.get(alg).supports(op, g, np.float32)]
    assert ops, f"{alg} supports no op of {g}"
    with contextlib.ExitStack() as stack:
        for op in ops:
            stack.enter_context(gpu.force(op, alg))
        yield ops


IMPLICIT_CASES = [
    dict(kind="transposed", x=(3, 8, 5, 7), w=(8, 6, 2, 2), stride=2),               # k = s: one GEMM
    dict(kind="transposed", x=(2, 130, 4, 3, 5), w=(130, 9, 2, 2, 2), stride=2),    # M, K, N off the tiles
    dict(kind="transposed", x=(2, 5, 37), w=(5, 3, 4), stride=4),
    dict(kind="transposed", x=(1, 16, 40, 41), w=(16, 140, 2, 2), stride=2),         # several block tiles
    dict(kind="transposed", x=(2, 12, 6, 7), w=(12, 10, 4, 4), stride=2, padding=1),  # 4 phases of 2x2 taps
    dict(kind="transposed", x=(2, 9, 11), w=(9, 5, 16), stride=8, padding=4),        # vocoder-like
    dict(kind="transposed", x=(1, 6, 3, 4, 3), w=(6, 4, 3, 3, 3), stride=2, padding=1, output_padding=1),
    dict(kind="transposed", x=(2, 4, 5, 5), w=(4, 3, 1, 1), stride=3),              # phases without taps
    dict(kind="conv", x=(2, 6, 10, 14), w=(9, 6, 2, 2), stride=2),
    dict(kind="conv", x=(2, 20, 15, 13), w=(33, 20, 3, 3), stride=2, padding=1),    # ResNet's down-sampling
    dict(kind="conv", x=(2, 7, 9, 8, 10), w=(5, 7, 3, 3, 3), padding=(1, 0, 2), dilation=(2, 1, 1)),
    dict(kind="conv", x=(3, 4, 50), w=(6, 4, 7), stride=3, padding=[(4, 1)], dilation=2),
]


@pytest.mark.parametrize("alg", ["implicit_gemm", "implicit_tf32x3"])
@pytest.mark.parametrize("case", IMPLICIT_CASES, ids=lambda c: f"{c['kind']}-{c['x']}-{c['w']}")
def test_implicit_gemm_vs_torch(tcuda, gpu, case, alg):
    """Both kernels (CUDA cores; 3xTF32 on tensor cores) at float32 accuracy."""
    g, x, w, b, gy = case_arrays(case, 5, "float32")
    with forced_where_supported(gpu, alg, g) as ops:
        assert set(ops) == {"forward", "backward_input"}
        got = run_ndconv(case, *(cp.asarray(a) for a in (x, w, b, gy)))
        ran = {op for op, name in gpu.last_algorithm.items() if name == alg}
        assert ran == {"forward", "backward_input"}
        algorithms = dict(gpu.last_algorithm)
    ref = torch_reference(tcuda, case, x, w, b, gy, dtype="float32")
    for what, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert relerr(a, r) < 1e-5, (what, relerr(a, r), algorithms)


def test_implicit_gemm_is_the_untuned_choice_for_k_equal_s_transposed():
    k2s2 = conv_transpose_geometry((2, 8, 6, 6), (8, 4, 2, 2), None, 2)[0]
    a = cp.asarray(np.random.default_rng(1).standard_normal(k2s2.y_shape), dtype=cp.float32)
    w = cp.asarray(np.random.default_rng(2).standard_normal(k2s2.w_shape), dtype=cp.float32)
    tensor_cores = "implicit_tf32x3" if gpu_blas.has_tf32() else "implicit_gemm"
    for eng, name in ((GPUEngine(), tensor_cores), (GPUEngine(fp32_math="ieee"), "implicit_gemm")):
        assert eng.choose("backward_input", k2s2, np.float32).name == name
        assert not eng.choose("backward_input", k2s2, np.float16).name.startswith("implicit")  # float32 only
        first = eng.backward_input(a, w, k2s2)
        assert eng.last_algorithm["backward_input"] == name
        assert bool((eng.backward_input(a, w, k2s2) == first).all())                    # deterministic


# ====================================================================== primitives vs the CPU engine

def geometry(x_shape, w_shape, **kw):
    return conv_geometry(x_shape, w_shape, None, **kw)[0]


PRIMITIVE_GEOMETRIES = [
    geometry((2, 3, 11), (4, 3, 3), stride=2, padding=1),
    geometry((1, 4, 9, 8), (6, 2, 3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1), groups=2),
    geometry((2, 2, 5, 6, 4), (4, 1, 2, 3, 2), stride=(1, 2, 2), padding=1, groups=2),
    geometry((3, 5, 7, 7), (10, 1, 3, 3), stride=2, padding=1, groups=5),
    geometry((2, 3, 6, 5, 7), (3, 1, 3, 2, 3), padding=(1, 0, 2), dilation=(1, 2, 1), groups=3),
    geometry((4, 1, 30), (3, 1, 7), stride=3, padding=5),
    # transposed geometry with output_padding >= stride (x longer than any window reaches)
    conv_transpose_geometry((2, 2, 4, 4, 4), (2, 2, 4, 5, 6), None, (3, 2, 1), (1, 2, 3), (2, 3, 1), 2, 4)[0],
]


def run_primitive(engine, op, g, arrays):
    x, w, y = arrays
    if op == "forward":
        return engine.forward(x, w, g)
    if op == "backward_input":
        return engine.backward_input(y, w, g)
    return engine.backward_weight(x, y, g)


def primitive_arrays(g, seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    return rand(rng, g.x_shape, dtype), rand(rng, g.w_shape, dtype), rand(rng, g.y_shape, dtype)


def check_primitives(g, seed, workspace_limit=None, dtype="float64"):
    cpu = CPUEngine()
    arrays = primitive_arrays(g, seed, dtype)
    dev = tuple(cp.asarray(a) for a in arrays)
    f64 = tuple(a.astype(np.float64) for a in arrays)
    for alg in ALGOS:
        eng = GPUEngine(algorithm=alg) if workspace_limit is None else \
            GPUEngine(algorithm=alg, workspace_limit=workspace_limit)
        for op in OPS:
            if not ALGORITHMS.get(alg).supports(op, g, np.dtype(dtype)):
                with pytest.raises(ValueError, match="does not support"):
                    run_primitive(eng, op, g, dev)
                continue
            try:
                got = run_primitive(eng, op, g, dev)
            except RuntimeError as e:
                # stacked copies of one sample's operands past a small workspace limit
                assert workspace_limit is not None and alg == "cudnn_tf32x3" and "workspace limit" in str(e), e
                continue
            assert isinstance(got, cp.ndarray) and got.dtype == np.dtype(dtype)
            assert eng.last_algorithm[op] == alg
            ref = run_primitive(cpu, op, g, f64)
            err = relerr(host(got), ref)
            assert err < TOL[dtype], (alg, op, err, g)
            if dtype == "float64":
                np.testing.assert_allclose(host(got), ref, rtol=1e-9, atol=1e-11, err_msg=f"{alg} {op} {g}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", PRIMITIVE_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
def test_primitives_vs_cpu(g, dtype):
    check_primitives(g, 3, dtype=dtype)


@pytest.mark.parametrize("g", PRIMITIVE_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
def test_workspace_limit_splits_rows(g):
    """A limit smaller than one sample forces chunks of output rows (col2im adds across them)."""
    per_row_floor = 8 * (g.x_channels * g.taps + 2 * g.y_channels) * int(np.prod(g.y_size[1:]))
    check_primitives(g, 5, workspace_limit=per_row_floor * 2)
    eng = GPUEngine(algorithm="im2col_gemm", workspace_limit=per_row_floor * 2)
    x, w, y = (cp.asarray(a) for a in primitive_arrays(g, 1))
    eng.forward(x, w, g)
    eng.backward_weight(x, y, g)
    assert 0 < eng.peak_temp_bytes <= eng.workspace_limit


def test_workspace_limit_splits_batch():
    g = geometry((16, 4, 12, 12), (8, 4, 3, 3), padding=1)
    per_sample = 8 * (4 * 9 + 2 * 8) * 144
    check_primitives(g, 9, workspace_limit=per_sample * 3)
    eng = GPUEngine(algorithm="im2col_gemm", workspace_limit=per_sample * 3)
    x, w, y = (cp.asarray(a) for a in primitive_arrays(g, 1))
    for op in OPS:
        run_primitive(eng, op, g, (x, w, y))
    assert 0 < eng.peak_temp_bytes <= per_sample * 3


def test_workspace_limit_argument():
    for bad in (0, -1, 1.5, "1G", True):
        with pytest.raises(ValueError, match="workspace_limit"):
            GPUEngine(workspace_limit=bad)
    assert GPUEngine().workspace_limit == 1 << 30


# ====================================================================== hypothesis: random geometries

try:
    import hypothesis as hyp
    from hypothesis import strategies as st
except ImportError:  # the hypothesis tests below are then skipped, the rest still runs
    hyp = None

if hyp is not None:
    @st.composite
    def geometries(draw):
        nd = draw(st.integers(1, 3))
        depthwise = draw(st.booleans())
        groups = draw(st.integers(1, 3))
        cg = 1 if depthwise else draw(st.integers(1, 3))
        cyg = draw(st.integers(1, 3))
        batch = draw(st.integers(1, 3))
        kernel, stride, dil, lo, hi, xs, ys = [], [], [], [], [], [], []
        for _ in range(nd):
            k = draw(st.integers(1, 4))
            s = draw(st.integers(1, 3))
            d = draw(st.integers(1, 3))
            a, b = draw(st.integers(0, 3)), draw(st.integers(0, 3))
            span = d * (k - 1) + 1
            x = max(1, span - a - b + draw(st.integers(0, 6 if nd < 3 else 3)))
            y_max = (x + a + b - span) // s + 1
            y = draw(st.integers(max(1, y_max - 1), y_max))    # y_max - 1: x longer than windows reach
            for seq, v in zip((kernel, stride, dil, lo, hi, xs, ys), (k, s, d, a, b, x, y)):
                seq.append(v)
        return ConvGeometry(batch, groups * cg, groups * cyg, groups, tuple(xs), tuple(ys), tuple(kernel),
                            tuple(stride), tuple(dil), tuple(lo), tuple(hi))

    @hyp.settings(max_examples=300, deadline=None)
    @hyp.given(g=geometries(), seed=st.integers(0, 2 ** 16))
    def test_random_geometries_vs_cpu(g, seed):
        check_primitives(g, seed)

    @hyp.settings(max_examples=40, deadline=None)
    @hyp.given(g=geometries(), seed=st.integers(0, 2 ** 16))
    def test_random_geometries_row_chunks_float32(g, seed):
        limit = 4 * (g.x_channels * g.taps + 2 * g.y_channels) * int(np.prod(g.y_size[1:]))
        check_primitives(g, seed, workspace_limit=limit, dtype="float32")
else:
    @pytest.mark.skip(reason="needs hypothesis")
    def test_random_geometries_vs_cpu():
        pass


# ====================================================================== determinism

DETERMINISM_GEOMETRIES = [
    geometry((8, 16, 24, 24), (32, 8, 3, 3), stride=1, padding=1, groups=2),
    geometry((4, 8, 10, 12, 9), (24, 1, 3, 3, 3), stride=(2, 1, 1), padding=1, groups=8),
    conv_transpose_geometry((4, 32, 9, 9), (32, 1, 4, 4), None, 2, 1, 0, 32)[0],
    geometry((8, 64, 4096), (64, 1, 31), padding=15, groups=64),
]


def bits(a):
    a = cp.ascontiguousarray(a)
    return a.view({2: cp.uint16, 4: cp.uint32, 8: cp.uint64}[a.dtype.itemsize])


@pytest.mark.parametrize("dtype", ("float32", "float16"))
@pytest.mark.parametrize("g", DETERMINISM_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
def test_deterministic(g, dtype):
    arrays = tuple(cp.asarray(a) for a in primitive_arrays(g, 11, dtype))
    for alg in ALGOS:
        for limit in (1 << 30, 1 << 20):
            for op in OPS:
                if not ALGORITHMS.get(alg).supports(op, g, np.dtype(dtype)):
                    continue
                try:
                    first = run_primitive(GPUEngine(algorithm=alg, workspace_limit=limit), op, g, arrays)
                except RuntimeError as e:   # cuDNN: no deterministic kernel within this limit
                    assert alg.startswith("cudnn") and "cannot run" in str(e), e
                    continue
                for _ in range(2):
                    again = run_primitive(GPUEngine(algorithm=alg, workspace_limit=limit), op, g, arrays)
                    assert bool(cp.all(bits(first) == bits(again))), (alg, op, limit)


def test_default_engine_is_deterministic():
    assert GPUEngine().deterministic
    assert all(a.deterministic for a in ALGORITHMS)


# ====================================================================== depthwise_tiled

TILED_GEOMETRIES = [
    geometry((2, 3, 37), (6, 1, 5), padding=[(3, 1)], dilation=2, groups=3),
    geometry((2, 2, 1100), (2, 1, 31), padding=15, groups=2),
    geometry((1, 2, 41), (4, 1, 4), stride=2, padding=[(2, 1)], groups=2),
    geometry((2, 2, 57, 70), (4, 1, 3, 3), padding=1, groups=2),
    geometry((1, 3, 19, 70), (3, 1, 3, 2), stride=2, padding=[(0, 2), (1, 0)], dilation=(1, 2), groups=3),
    geometry((1, 2, 7, 150), (2, 1, 2, 5), padding=[(1, 1), (20, 3)], dilation=(1, 13), groups=2),
    geometry((2, 2, 5, 33, 37), (4, 1, 3, 3, 3), padding=[(1, 0), (1, 2), (0, 1)], groups=2),
    geometry((1, 2, 5, 9, 6), (2, 1, 2, 3, 3), stride=(1, 2, 2), padding=[(1, 0), (2, 1), (0, 1)],
             dilation=(2, 1, 1), groups=2),
    conv_transpose_geometry((1, 2, 9), (2, 1, 3), None, 1, 1, 0, 2)[0],
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", TILED_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}-s{g.stride}")
def test_depthwise_tiled_vs_cpu(g, dtype):
    """Forced depthwise_tiled, every op it supports, against the CPU engine in float64."""
    tiled = ALGORITHMS.get("depthwise_tiled")
    assert tiled.supports("forward", g, dtype) and tiled.supports("backward_weight", g, dtype)
    assert tiled.supports("backward_input", g, dtype) == all(s == 1 for s in g.stride)
    cpu = CPUEngine()
    arrays = primitive_arrays(g, 17, dtype)
    dev = tuple(cp.asarray(a) for a in arrays)
    f64 = tuple(a.astype(np.float64) for a in arrays)
    eng = GPUEngine(algorithm="depthwise_tiled")
    for op in OPS:
        if not tiled.supports(op, g, dtype):
            with pytest.raises(ValueError, match="does not support"):
                run_primitive(eng, op, g, dev)
            continue
        got = run_primitive(eng, op, g, dev)
        assert got.dtype == np.dtype(dtype) and eng.last_algorithm[op] == "depthwise_tiled"
        err = relerr(host(got), run_primitive(cpu, op, g, f64))
        assert err < TOL[dtype], (op, err)


TILED_TORCH_CASES = [
    dict(kind="conv", x=(2, 4, 300), w=(8, 1, 31), padding=[(15, 14)], groups=4),
    dict(kind="conv", x=(2, 3, 45, 38), w=(6, 1, 3, 3), stride=2, padding=[(1, 0), (2, 1)], groups=3),
    dict(kind="conv", x=(1, 2, 9, 21, 35), w=(2, 1, 3, 3, 3), padding=2, dilation=2, groups=2),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TILED_TORCH_CASES, ids=lambda c: f"{len(c['x']) - 2}d")
def test_depthwise_tiled_vs_torch(tcuda, gpu, case, dtype):
    """Through the functional API with depthwise_tiled forced where it applies."""
    g, x, w, b, gy = case_arrays(case, 5, dtype)
    tiled = ALGORITHMS.get("depthwise_tiled")
    ops = [op for op in OPS if tiled.supports(op, g, dtype)]
    assert "forward" in ops and "backward_weight" in ops
    with contextlib.ExitStack() as stack:
        for op in ops:
            stack.enter_context(gpu.force(op, "depthwise_tiled"))
        got = run_ndconv(case, *(cp.asarray(a) for a in (x, w, b, gy)))
        assert all(gpu.last_algorithm[op] == "depthwise_tiled" for op in ops)
    ref = torch_reference(tcuda, case, x, w, b, gy)
    for what, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert a.dtype == np.dtype(dtype), what
        assert relerr(a, r) < TOL[dtype], (what, relerr(a, r))


@pytest.mark.parametrize("dtype", ("float32", "float16", "float64"))
def test_depthwise_tiled_deterministic(dtype):
    """Bitwise repeats, including a weight gradient reduced over many chunks."""
    for g in (geometry((8, 6, 61, 67), (12, 1, 3, 3), padding=1, groups=6),
              geometry((4, 8, 3000), (8, 1, 31), padding=15, groups=8)):
        arrays = tuple(cp.asarray(a) for a in primitive_arrays(g, 23, dtype))
        for op in OPS:
            first = run_primitive(GPUEngine(algorithm="depthwise_tiled"), op, g, arrays)
            for _ in range(2):
                again = run_primitive(GPUEngine(algorithm="depthwise_tiled"), op, g, arrays)
                assert bool(cp.all(bits(first) == bits(again))), (op, g)


def test_depthwise_tiled_supports_is_precise():
    tiled = ALGORITHMS.get("depthwise_tiled")
    dw = geometry((2, 4, 8, 8), (8, 1, 3, 3), padding=1, groups=4)
    assert all(tiled.supports(op, dw, dt) for op in OPS for dt in DTYPES)
    assert not tiled.supports("forward", dw, np.int32)
    dense = geometry((2, 4, 8, 8), (8, 2, 3, 3), padding=1, groups=2)
    assert not any(tiled.supports(op, dense, np.float32) for op in OPS)
    strided = geometry((2, 4, 8, 8), (4, 1, 3, 3), stride=2, padding=1, groups=4)
    assert tiled.supports("forward", strided, np.float32)
    assert not tiled.supports("backward_input", strided, np.float32)
    big = geometry((1, 2, 12, 12, 12), (2, 1, 5, 5, 5), padding=2, groups=2)     # 125 taps
    assert tiled.supports("forward", big, np.float32)
    assert not tiled.supports("backward_weight", big, np.float32)
    # the default registry order puts it before the simple reference kernels
    names = ALGORITHMS.names()
    assert names.index("depthwise_tiled") < names.index("depthwise_direct")


# ====================================================================== algorithm choice

def test_heuristic_and_forcing(gpu):
    dw = geometry((2, 4, 8, 8), (8, 1, 3, 3), padding=1, groups=4)
    dense = geometry((2, 4, 8, 8), (8, 4, 3, 3), padding=1)
    grouped = geometry((2, 8, 8, 8), (8, 4, 3, 3), padding=1, groups=2)
    eng = GPUEngine()
    first = "cudnn" if cudnn.available() else None
    for op in OPS:
        # preferred untuned: register windows for stride-1 depthwise where they apply
        assert eng.choose(op, dw, np.float32).name == "depthwise_rows"
        assert eng.choose(op, grouped, np.float32).name == "plane"
        assert eng.choose(op, dense, np.float32).name == (first or IM2COL32)
    with eng.force("forward", "im2col_gemm"):
        assert eng.choose("forward", dw, np.float32).name == "im2col_gemm"
        assert eng.choose("backward_input", dw, np.float32).name == "depthwise_rows"
    assert eng.choose("forward", dw, np.float32).name == "depthwise_rows"
    with eng.force(None, "depthwise_direct"):
        with pytest.raises(ValueError, match="does not support"):
            eng.choose("forward", dense, np.float32)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        with eng.force(None, "winograd"):
            pass
    with pytest.raises(ValueError, match="op must be one of"):
        with eng.force("sideways", "im2col_gemm"):
            pass
    with pytest.raises(ValueError, match="algorithm must be one of"):
        GPUEngine(algorithm="fft")
    # the functional API goes through the same engine
    x = cp.asarray(np.random.default_rng(0).standard_normal(dw.x_shape).astype(np.float32))
    w = cp.asarray(np.random.default_rng(1).standard_normal(dw.w_shape).astype(np.float32))
    F.conv2d(x, w, padding=1, groups=4)
    assert gpu.last_algorithm["forward"] == "depthwise_rows"
    with gpu.force(None, "im2col_gemm"):
        F.conv2d(x, w, padding=1, groups=4)
    assert gpu.last_algorithm["forward"] == "im2col_gemm"


PHASE_CASES = [
    dict(kind="deconv", x=(2, 16, 8, 8), w=(16, 8, 2, 2), stride=2),                    # k = s: a GEMM
    dict(kind="deconv", x=(2, 8, 5, 6, 4), w=(8, 4, 4, 4, 4), stride=2, padding=1),     # k4 s2 p1, 3-D
    dict(kind="deconv", x=(2, 8, 9), w=(8, 3, 8), stride=4, padding=2, output_padding=3, groups=2),
    dict(kind="conv", x=(2, 6, 13, 11), w=(4, 6, 4, 2), stride=2, padding=(1, 0)),
]


@pytest.mark.parametrize("dtype", ("float32", "float16"))
@pytest.mark.parametrize("case", PHASE_CASES, ids=lambda c: f"{c['kind']}-{len(c['x']) - 2}d")
def test_phases_vs_torch(tcuda, gpu, case, dtype):
    """The phase form forced on the outer call; its stride-1 call is the engine's own choice."""
    g, x, w, b, gy = case_arrays(case, 11, dtype)
    with gpu.force(None, "phases"):
        got = run_ndconv(case, *(cp.asarray(a) for a in (x, w, b, gy)))
        assert set(gpu.last_algorithm.values()) == {"phases"}
    ref = torch_reference(tcuda, case, x, w, b, gy)
    for what, a, r in zip(("output", "grad_input", "grad_weight", "grad_bias"), got, ref):
        assert a.dtype == np.dtype(dtype), what
        assert relerr(a, r) < TOL[dtype], (what, relerr(a, r))


def test_phases_is_the_untuned_choice_for_k_multiple_of_s_transposed():
    eng = GPUEngine()
    k4s2 = conv_transpose_geometry((2, 8, 6, 6), (8, 4, 4, 4), None, 2, 1)[0]
    k3s2 = conv_transpose_geometry((2, 8, 6, 6), (8, 4, 3, 3), None, 2, 1)[0]
    assert eng.choose("backward_input", k4s2, np.float32).name == "phases"
    assert eng.choose("backward_input", k3s2, np.float32).name != "phases"     # 16/9 waste: cuDNN's
    assert eng.choose("forward", k4s2, np.float32).name != "phases"


def test_space_to_batch_is_the_untuned_choice_for_dilated_dense_calls():
    eng = GPUEngine()
    dilated = geometry((2, 8, 12, 12), (8, 8, 3, 3), padding=2, dilation=2)
    for op in OPS:
        assert eng.choose(op, dilated, np.float32).name == "space_to_batch"
    depthwise = geometry((2, 8, 12, 12), (8, 1, 3, 3), padding=2, dilation=2, groups=8)
    assert eng.choose("forward", depthwise, np.float32).name != "space_to_batch"


def test_flat_gemm_is_the_untuned_weight_gradient_outside_2d():
    eng = GPUEngine()
    for g in (geometry((2, 8, 6, 6, 6), (8, 8, 3, 3, 3), padding=1), geometry((2, 8, 40), (8, 8, 3), padding=1)):
        assert eng.choose("backward_weight", g, np.float32).name == FLAT32
        assert eng.choose("backward_weight", g, np.float64).name == "flat_gemm"
        assert eng.choose("forward", g, np.float32).name != FLAT32
    assert eng.choose("backward_weight", geometry((2, 8, 6, 6), (8, 8, 3, 3)), np.float32).name != FLAT32
    ieee = GPUEngine(fp32_math="ieee")
    assert ieee.choose("backward_weight", g, np.float32).name == "flat_gemm"


def test_optimize_caches_a_choice():
    g = geometry((4, 8, 16, 16), (8, 1, 3, 3), padding=1, groups=8)
    eng = GPUEngine()
    choice = eng.optimize(g, np.float32)
    assert set(choice) == set(OPS)
    assert all(name in ALGORITHMS.names() for name in choice.values())
    for op in OPS:
        assert eng.choose(op, g, np.float32).name == choice[op]
    assert eng.optimize(g, "float32") == choice                      # cached
    dense = geometry((2, 4, 8, 8), (8, 4, 3, 3))
    dense_choice = eng.optimize(dense, np.float64)
    assert set(dense_choice) == set(OPS)
    assert set(dense_choice.values()) <= {"im2col_gemm", "cudnn", "cudnn_graph", "flat_gemm"}
    other = "im2col_gemm" if choice["forward"] != "im2col_gemm" else "depthwise_direct"
    with eng.force("forward", other):                               # forcing beats tuning
        assert eng.choose("forward", g, np.float32).name == other
    with pytest.raises(TypeError, match="dtype"):
        eng.optimize(g, np.int32)


# ====================================================================== edge cases and errors

@pytest.mark.parametrize("alg", ALGOS)
def test_empty_sizes(alg):
    cpu = CPUEngine()
    shapes = [((0, 4, 5, 5), (4, 1, 3, 3), 4), ((2, 4, 5, 5), (0, 4, 3, 3), 1),
              ((2, 0, 5, 5), (3, 0, 3, 3), 1), ((0, 3, 6), (6, 1, 2), 3)]
    for xs, ws, groups in shapes:
        g = geometry(xs, ws, groups=groups)
        arrays = primitive_arrays(g, 0)
        eng = GPUEngine(algorithm=alg)
        for op in OPS:
            try:
                got = run_primitive(eng, op, g, tuple(cp.asarray(a) for a in arrays))
            except ValueError as e:          # the forced algorithm cannot do this geometry
                assert "does not support" in str(e)
                continue
            ref = run_primitive(cpu, op, g, arrays)
            assert got.shape == ref.shape
            np.testing.assert_array_equal(host(got), ref)


def test_mixed_numpy_and_cupy_raise_type_error():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    with pytest.raises(TypeError, match="one device"):
        F.conv2d(cp.asarray(x), w)
    with pytest.raises(TypeError, match="one device"):
        F.conv2d(x, cp.asarray(w))
    with pytest.raises(TypeError, match="one device"):
        F.conv2d(cp.asarray(x), cp.asarray(w), b)
    with pytest.raises(TypeError, match="one device"):
        F.conv_transpose2d(cp.asarray(x[:, :, :4, :4]).reshape(1, 2, 4, 4), w.transpose(1, 0, 2, 3).copy())
    with pytest.raises(TypeError):
        F.conv_backward(np.zeros((1, 3, 4, 4), np.float32), cp.asarray(x), cp.asarray(w))
    g = geometry(x.shape, w.shape)
    with pytest.raises(TypeError, match="CuPy array"):
        GPUEngine().forward(x, cp.asarray(w), g)
    with pytest.raises(ValueError, match="shape"):
        GPUEngine().forward(cp.asarray(x[:, :, :5]), cp.asarray(w), g)


def test_broadcast_and_strided_inputs():
    rng = np.random.default_rng(4)
    base = rng.standard_normal((3, 1, 1, 1)).astype(np.float64)
    w_host = np.broadcast_to(base, (3, 2, 3, 3))
    x_host = rng.standard_normal((2, 2, 9, 9))
    w = cp.broadcast_to(cp.asarray(base), (3, 2, 3, 3))          # stride-0 weight
    x = cp.asarray(np.ascontiguousarray(x_host.transpose(0, 1, 3, 2))).transpose(0, 1, 3, 2)  # F-ish strides
    got = F.conv2d(x, w, stride=2, padding=1)
    ref = F.conv2d(x_host, np.ascontiguousarray(w_host), stride=2, padding=1)
    np.testing.assert_allclose(host(got), ref, rtol=1e-12, atol=1e-12)


def test_non_finite_values_propagate():
    x = np.ones((1, 1, 5, 5), np.float32)
    x[0, 0, 2, 2] = np.nan
    x[0, 0, 0, 4] = np.inf
    w = np.ones((1, 1, 3, 3), np.float32)
    for alg in ALGOS:
        g = geometry(x.shape, w.shape, padding=1)
        if not all(ALGORITHMS.get(alg).supports(op, g, np.float32) for op in OPS):
            continue
        with get_engine(cp.empty(0)).force(None, alg):
            got = host(F.conv2d(cp.asarray(x), cp.asarray(w), padding=1))
        ref = F.conv2d(x, w, padding=1)
        if alg.startswith("cudnn"):
            # cuDNN's transform algorithms (FFT, Winograd) may spread a non-finite input
            # over a whole tile, as they do under PyTorch; every non-finite output of the
            # direct sum must still be non-finite.
            assert np.all(~np.isfinite(got[~np.isfinite(ref)]))
            continue
        if ALGORITHMS.get(alg).fp32_math == "tf32x3":
            # tf32x3: inf times a zero lo part of the other operand is NaN, so an output
            # that is +-inf in float32 may be NaN; no other output becomes non-finite.
            np.testing.assert_array_equal(np.isfinite(got), np.isfinite(ref))
            assert np.all(np.isnan(got[np.isnan(ref)]))
            continue
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(ref))


# ====================================================================== over 2^31 elements

def _window(a, n, c, i, j, kh, kw, lo_h, lo_w):
    """a[n, c, i-lo_h : i-lo_h+kh, j-lo_w : j-lo_w+kw] as float64, zero outside."""
    h, w = a.shape[2:]
    out = np.zeros((kh, kw))
    r0, c0 = i - lo_h, j - lo_w
    rs, cs = max(r0, 0), max(c0, 0)
    re, ce = min(r0 + kh, h), min(c0 + kw, w)
    if re > rs and ce > cs:
        out[rs - r0:re - r0, cs - c0:ce - c0] = cp.asnumpy(a[n, c, rs:re, cs:ce]).astype(np.float64)
    return out


def test_over_2_to_31_elements():
    """float16 depthwise 3x3 on a (1, 2, 32768, 32832) input: 2_151_677_952 elements."""
    shape = (1, 2, 32768, 32832)
    assert np.prod(shape) > 2 ** 31
    free = cp.cuda.runtime.memGetInfo()[0]
    if free < 48 * 2 ** 30:
        pytest.skip(f"needs about 48 GiB of free device memory, {free / 2 ** 30:.0f} GiB free")
    pool = cp.get_default_memory_pool()
    g = geometry(shape, (2, 1, 3, 3), padding=1, groups=2)
    rng = np.random.default_rng(0)
    w = cp.asarray(rng.standard_normal((2, 1, 3, 3)).astype(np.float16))
    w64 = cp.asnumpy(w).astype(np.float64)
    cp.random.seed(1)
    x = cp.empty(shape, dtype=cp.float16)
    gy = cp.empty(shape, dtype=cp.float16)
    for c in range(2):
        x[0, c] = cp.random.standard_normal(shape[2:], dtype=cp.float32)
        gy[0, c] = cp.random.standard_normal(shape[2:], dtype=cp.float32) * 1e-3
    h, wd = shape[2:]
    samples = [(0, 0, 0, 0), (0, 1, h - 1, wd - 1), (0, 1, 20000, 100), (0, 1, h - 1, 0), (0, 0, h - 1, wd - 1)]
    samples += [(0, int(rng.integers(2)), int(rng.integers(h)), int(rng.integers(wd))) for _ in range(10)]

    # weight-gradient reference: per tap, sum over the overlapping ranges (float64 sums on device)
    gw_ref = np.zeros((2, 1, 3, 3))
    for c, ky, kx in itertools.product(range(2), range(3), range(3)):
        oy0, oy1 = max(0, 1 - ky), min(h, h + 1 - ky)
        ox0, ox1 = max(0, 1 - kx), min(wd, wd + 1 - kx)
        xs = x[0, c, oy0 - 1 + ky:oy1 - 1 + ky, ox0 - 1 + kx:ox1 - 1 + kx].astype(cp.float32)
        prod = gy[0, c, oy0:oy1, ox0:ox1].astype(cp.float32)
        prod *= xs
        del xs
        gw_ref[c, 0, ky, kx] = float(prod.sum(dtype=cp.float64))
        del prod
    pool.free_all_blocks()

    results = {}
    for alg in ALGOS:
        if not all(ALGORITHMS.get(alg).supports(op, g, np.float16) for op in OPS):
            continue                      # cuDNN's legacy API: int32 sizes only
        eng = GPUEngine(algorithm=alg)
        y = eng.forward(x, w, g)
        assert y.shape == shape and y.dtype == cp.float16
        for n, c, i, j in samples:
            ref = float((_window(x, n, c, i, j, 3, 3, 1, 1) * w64[c, 0]).sum())
            assert abs(float(y[n, c, i, j]) - ref) <= 2e-3 * abs(ref) + 1e-2, (alg, "forward", (n, c, i, j))
        results[(alg, "forward")] = y[0, 1, -2:, -8:].get()
        del y
        gx = eng.backward_input(gy, w, g)
        for n, c, i, j in samples:
            ref = float((_window(gy, n, c, i, j, 3, 3, 1, 1) * w64[c, 0][::-1, ::-1]).sum())
            assert abs(float(gx[n, c, i, j]) - ref) <= 2e-3 * abs(ref) + 1e-5, (alg, "backward_input")
        del gx
        pool.free_all_blocks()
        gw = cp.asnumpy(eng.backward_weight(x, gy, g)).astype(np.float64)
        assert relerr(gw, gw_ref) < 1e-2, (alg, gw, gw_ref)
        pool.free_all_blocks()
    np.testing.assert_allclose(results[("im2col_gemm", "forward")].astype(np.float32),
                               results[("depthwise_direct", "forward")].astype(np.float32), rtol=2e-3, atol=1e-2)


# ====================================================================== module API on the GPU

def _seed_weights(size):
    w1 = np.diag(np.full(size, 1)).reshape((1, 1, size, size))
    w2 = np.flip(np.diag(np.arange(1, size + 1) * (-1)), 1).reshape((1, 1, size, size))
    return np.vstack([w1, w2]).astype(np.float32)


SEED_001 = [
    (dict(size=2), [[[6, 8, 10, 12], [16, 18, 20, 22], [26, 28, 30, 32], [36, 38, 40, 42]],
                    [[-11, -14, -17, -20], [-26, -29, -32, -35], [-41, -44, -47, -50], [-56, -59, -62, -65]]]),
    (dict(size=3), [[[18, 21, 24], [33, 36, 39], [48, 51, 54]],
                    [[-44, -50, -56], [-74, -80, -86], [-104, -110, -116]]]),
    (dict(size=3, pad=1), [[[6, 8, 10, 12, 4], [16, 18, 21, 24, 12], [26, 33, 36, 39, 22],
                            [36, 48, 51, 54, 32], [20, 36, 38, 40, 42]],
                           [[0, -17, -22, -27, -32], [-11, -44, -50, -56, -57], [-26, -74, -80, -86, -82],
                            [-41, -104, -110, -116, -107], [-56, -59, -62, -65, -48]]]),
    (dict(size=3, pad=(1, 0)), [[[8, 10, 12], [18, 21, 24], [33, 36, 39], [48, 51, 54], [36, 38, 40]],
                                [[-17, -22, -27], [-44, -50, -56], [-74, -80, -86], [-104, -110, -116],
                                 [-59, -62, -65]]]),
    (dict(size=2, stride=2), [[[6, 10], [26, 30]], [[-11, -17], [-41, -47]]]),
    (dict(size=2, stride=2, pad=3), [[[0, 0, 0, 0, 0], [0, 0, 2, 4, 0], [0, 10, 18, 22, 0], [0, 20, 38, 42, 0],
                                      [0, 0, 0, 0, 0]],
                                     [[0, 0, 0, 0, 0], [0, 0, -2, -6, 0], [0, -5, -29, -35, 0],
                                      [0, -15, -59, -65, 0], [0, 0, 0, 0, 0]]]),
    (dict(size=2, stride=(2, 4), pad=3), [[[0, 0, 0], [0, 2, 0], [0, 18, 0], [0, 38, 0], [0, 0, 0]],
                                          [[0, 0, 0], [0, -2, 0], [0, -29, 0], [0, -59, 0], [0, 0, 0]]]),
    (dict(size=2, dilation=2), [[[12, 14, 16], [22, 24, 26], [32, 34, 36]],
                                [[-22, -25, -28], [-37, -40, -43], [-52, -55, -58]]]),
    (dict(size=2, dilation=(3, 1)), [[[16, 18, 20, 22], [26, 28, 30, 32]],
                                     [[-31, -34, -37, -40], [-46, -49, -52, -55]]]),
]


def _seed_data():
    return np.arange(25).reshape((1, 1, 5, 5)).astype(np.float32)


@pytest.mark.parametrize("kw,expected", SEED_001, ids=[str(k) for k, _ in SEED_001])
def test_seed_001_functional_on_gpu(kw, expected):
    """The seed's printed outputs through the functional API, on the GPU, every algorithm."""
    w = cp.asarray(_seed_weights(kw["size"]))
    pad = kw.get("pad", 0)
    args = dict(stride=kw.get("stride", 1), padding=pad, dilation=kw.get("dilation", 1))
    g = conv_geometry((1, 1, 5, 5), tuple(w.shape), None, **args)[0]
    ran = []
    for alg in ALGOS:
        # the rewriting algorithms take only strided (phases) or dilated (space_to_batch)
        # calls, flat_gemm only unit strides: every other one must take every seed call
        if not ALGORITHMS.get(alg).supports("forward", g, np.float32):
            assert alg in ("phases", "space_to_batch", "flat_gemm", "flat_tf32x3", "cudnn", "cudnn_graph",
                           "cudnn_tf32x3"), alg
            continue
        with get_engine(w).force(None, alg):
            y = F.conv2d(cp.asarray(_seed_data()), w, **args)
        ran.append(alg)
        assert isinstance(y, cp.ndarray)
        np.testing.assert_array_equal(host(y)[0], np.array(expected, np.float32), err_msg=alg)
    assert {"im2col_gemm", "depthwise_direct"} <= set(ran)


@pytest.fixture
def modules():
    mods = pytest.importorskip("ndconv.modules")
    variable = pytest.importorskip("ndconv.variable")
    backend = pytest.importorskip("ndconv.backend")
    if not backend.gpuarray.gpu_available():
        pytest.skip("gpuarray does not place arrays on the GPU here")
    return mods, variable.Variable, backend.gpuarray


@pytest.mark.parametrize("kw,expected", SEED_001, ids=[str(k) for k, _ in SEED_001])
def test_seed_001_modules_on_gpu(modules, kw, expected):
    mods, Variable, gpuarray = modules
    data = gpuarray.to_gpu(_seed_data())
    assert isinstance(data, cp.ndarray)
    conv = mods.Conv2D(inmaps=1, outmaps=2, useBias=False, **kw)
    conv.setVar("W", Variable(gpuarray.to_gpu(_seed_weights(kw["size"]))))
    conv(data)
    assert isinstance(conv.data, cp.ndarray)
    np.testing.assert_array_equal(host(conv.data)[0], np.array(expected, np.float32))


def test_modules_gpu_matches_cpu_forward_and_backward(modules):
    mods, Variable, gpuarray = modules
    containers = pytest.importorskip("ndconv.containers")
    rng = np.random.default_rng(3)
    data = rng.standard_normal((2, 3, 7, 7)).astype(np.float32)

    def build(to):
        seq = containers.Sequential()
        # no bias: the constructor puts it where gpuarray puts arrays (the GPU here)
        seq.append(mods.Conv2D(3, 3, size=4, groups=3, useBias=False, name="depthwise"))
        seq.append(mods.Conv2D(3, 8, size=1, useBias=False, name="pointwise"))
        seq["depthwise"].setVar("W", Variable(to(w_dw)))
        seq["pointwise"].setVar("W", Variable(to(w_pw)))
        return seq

    w_dw = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    w_pw = rng.standard_normal((8, 3, 1, 1)).astype(np.float32)
    gpu_seq, cpu_seq = build(gpuarray.to_gpu), build(np.asarray)
    out_g, out_c = gpu_seq(gpuarray.to_gpu(data)), cpu_seq(data)
    assert isinstance(out_g, cp.ndarray)
    np.testing.assert_allclose(host(out_g), out_c, rtol=1e-5, atol=1e-4)
    grad = rng.standard_normal(out_c.shape).astype(np.float32)
    gg, gc = gpu_seq.backward(gpuarray.to_gpu(grad)), cpu_seq.backward(grad)
    np.testing.assert_allclose(host(gg), gc, rtol=1e-5, atol=1e-4)
    for name in ("depthwise", "pointwise"):
        np.testing.assert_allclose(host(gpu_seq[name].vars["W"].grad), cpu_seq[name].vars["W"].grad,
                                   rtol=1e-4, atol=1e-3)


def test_module_optimize_for_shape_on_gpu(modules):
    mods, Variable, gpuarray = modules
    conv = mods.Conv2D(4, 4, size=3, pad=1, groups=4)
    assert isinstance(conv.vars["W"].data, cp.ndarray)
    conv.optimizeForShape((2, 4, 16, 16))
    eng = get_engine(conv.vars["W"].data)
    tuned = [k for k in eng._tuned if k[1].x_shape == (2, 4, 16, 16) and k[1].groups == 4]
    assert {k[0] for k in tuned} == set(OPS)
    y = conv(gpuarray.to_gpu(np.ones((2, 4, 16, 16), np.float32)))
    assert y.shape == (2, 4, 16, 16)
    eng._tuned.clear()


def test_deconv_module_on_gpu_matches_cpu(modules):
    mods, Variable, gpuarray = modules
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 2, 3, 3, 3)).astype(np.float32)
    data = rng.standard_normal((2, 4, 3, 4, 3)).astype(np.float32)
    outs = []
    for to in (gpuarray.to_gpu, np.asarray):
        m = mods.Deconv3D(4, 2, size=3, stride=2, pad=1, useBias=False)
        m.setVar("W", Variable(to(w)))
        outs.append(host(m(to(data))))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-4)


# ====================================================================== cuBLAS strided-batched GEMM

@pytest.mark.parametrize("dtype,fp32_math", [("float32", "ieee"), ("float32", "tf32x3"),
                                              ("float64", "tf32x3"), ("float16", "tf32x3")])
def test_gpu_blas_matmul_layouts(dtype, fp32_math):
    from ndconv.engine import gpu_blas
    rng = np.random.default_rng(4)
    tol = {"float32": 1e-5, "float64": 1e-12, "float16": 4e-3}[dtype]

    def arr(*shape):
        return cp.asarray(rng.standard_normal(shape).astype(dtype))

    cases = [
        (arr(3, 5, 7), arr(3, 7, 4)),                              # plain
        (arr(1, 5, 7), arr(6, 7, 4)),                              # a broadcast over the batch
        (arr(6, 5, 7), arr(1, 7, 4)),                              # b broadcast
        (arr(3, 7, 5).transpose(0, 2, 1), arr(3, 4, 7).transpose(0, 2, 1)),   # both stored transposed
        (arr(2, 5, 9)[:, :, 1:8], arr(2, 7, 4)),                   # rows with a gap: copied first
        (arr(4, 1, 7), arr(4, 7, 1)),                              # vectors
        (arr(2, 40, 3), arr(1, 3, 50)),                            # small K: one GEMM of 3K under tf32x3
    ]
    for a, b in cases:
        want = np.matmul(host(a).astype(np.float64), host(b).astype(np.float64))
        got = gpu_blas.matmul(a, b, fp32_math=fp32_math)
        assert got.shape == want.shape and got.dtype == np.dtype(dtype)
        assert relerr(host(got), want) < tol, (a.shape, a.strides, b.shape, b.strides)
        if gpu_blas.uses_tf32x3(dtype, fp32_math):    # operands split beforehand, added into out
            for sa, sb in ((gpu_blas.split(a), gpu_blas.split(b)), (gpu_blas.split(a), b),
                           (gpu_blas.stack_a(a, 2), gpu_blas.stack_b(b, 2)),
                           (gpu_blas.stack_a(a, 3), gpu_blas.stack_b(b, 3)),
                           (gpu_blas.stack_a(a, 3), gpu_blas.stack_b(b, 2)), (a, gpu_blas.stack_b(b, 3))):
                out = cp.ones(want.shape, dtype)
                gpu_blas.matmul(sa, sb, out=out, accumulate=True)
                assert relerr(host(out), want + 1) < tol, (type(sa).__name__, type(sb).__name__)



@pytest.mark.parametrize("dtype,fp32_math", [("float32", "ieee"), ("float32", "tf32x3"), ("float64", "ieee")])
def test_gpu_blas_matmul_samples(dtype, fp32_math):
    """out[n] = a @ (sample n's block of P columns): one batched GEMM writing (nb, M, P),
    from plain columns and from columns already stacked in 2 or 3 TF32 blocks."""
    from ndconv.engine import gpu_blas
    rng = np.random.default_rng(6)
    tol = {"float32": 1e-5, "float64": 1e-12}[dtype]
    nb, m, k, p = 3, 5, 7, 11
    a = cp.asarray(rng.standard_normal((1, m, k)).astype(dtype))
    cols = cp.asarray(rng.standard_normal((1, k, nb * p)).astype(dtype))
    want = np.einsum("mk,knp->nmp", host(a)[0].astype(np.float64),
                     host(cols)[0].astype(np.float64).reshape(k, nb, p))
    operands = [cols]
    if gpu_blas.uses_tf32x3(dtype, fp32_math):
        operands += [gpu_blas.stack_b(cols, 2), gpu_blas.stack_b(cols, 3)]
    for c in operands:
        out = cp.full((nb, m, p), np.nan, dtype)
        assert gpu_blas.matmul_samples(a, c, out, fp32_math) is out
        assert relerr(host(out), want) < tol, type(c).__name__

def test_tf32_stack_strided_views():
    """stack_a / stack_b / split write the parts the reference split gives, from views of
    any strides (the raw kernel: size-1 and mergeable dims collapsed; more than 4 dims
    left, or float16, take the elementwise kernel)."""
    from ndconv.engine import gpu_blas
    rng = np.random.default_rng(9)
    base = cp.asarray(rng.standard_normal((4, 6, 10, 8)).astype(np.float32))
    flat = base.reshape(4, 6, 80)
    as_a = [flat, flat[:, ::2, 3:40], flat.transpose(0, 2, 1), flat[:, ::-1, ::3], flat[:1],
            cp.broadcast_to(flat[:1, :1], (3, 5, 80)), base[0, :, :, ::2].transpose(2, 0, 1),
            flat[:, :, :0], flat[:, :, 4:76], flat[:, :, 2:78]]     # float4 rows; rows off 16-byte alignment
    assert gpu_blas._stack_plan(flat.shape, flat.strides, (480, 80, 1), -1)[-1]      # float4 rows
    as_b = [base, base[:, 1:5, ::2, 1:7], base.transpose(1, 0, 3, 2), base[:, :, ::-1],
            base.reshape(4, 6, 2, 5, 8)[:, :, :, ::2], base.reshape(2, 2, 6, 10, 8).transpose(0, 2, 1, 3, 4)[:, :, :, ::2, ::3],
            base[:, :, None, :, 2:4]]

    def parts(v):
        return tf32_split_reference(host(v))

    for v in as_a:
        hi, lo = parts(v)
        for blocks in (2, 3):
            got = host(gpu_blas.stack_a(v, blocks).data)
            want = np.concatenate([lo, hi, hi][:blocks], axis=2)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str(v.strides))
        sp = gpu_blas.split(v)
        np.testing.assert_array_equal(host(sp.hi).view(np.uint32), hi.view(np.uint32))
        np.testing.assert_array_equal(host(sp.lo).view(np.uint32), lo.view(np.uint32))
    for v in as_b:
        hi, lo = (p.reshape(p.shape[0], p.shape[1], -1) for p in parts(v))
        for blocks in (2, 3):
            got = host(gpu_blas.stack_b(v, blocks).data)
            want = np.concatenate([hi, lo, hi][:blocks], axis=1)
            np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=str(v.strides))
    # into views of a larger array (split's out=), and from float16 (elementwise kernel)
    out = gpu_blas.Split(cp.zeros((4, 6, 90), np.float32)[:, :, 5:85], cp.zeros((4, 6, 90), np.float32)[:, :, 5:85])
    gpu_blas.split(flat, out=out)
    hi, lo = parts(flat)
    np.testing.assert_array_equal(host(out.hi), hi)
    np.testing.assert_array_equal(host(out.lo), lo)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sum_batch_in_order(dtype):
    from ndconv.engine.gpu import sum_batch
    rng = np.random.default_rng(10)
    a = (rng.standard_normal((7, 3, 50)) * 10.0 ** rng.integers(-6, 6, (7, 3, 50))).astype(dtype)

    def in_order(v):
        out = v[0].copy()
        for i in range(1, v.shape[0]):
            out += v[i]
        return out

    np.testing.assert_array_equal(host(sum_batch(cp.asarray(a))), in_order(a))
    np.testing.assert_array_equal(host(sum_batch(cp.asarray(a)[:, :, ::2])), in_order(a[:, :, ::2]))
    assert sum_batch(cp.zeros((0, 4), dtype)).shape == (4,)


def tf32_split_reference(a):
    """NumPy's version of gpu_blas.split: round to nearest (ties away) at fraction bit 13."""
    a = np.asarray(a, np.float32)
    u = a.view(np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):
        hi = ((u + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
        hi = np.where(np.isfinite(hi), hi, (u & np.uint32(0xFFFFE000)).view(np.float32))
        r = (a - hi).astype(np.float32)
        lo = ((r.view(np.uint32) + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    finite = np.isfinite(a)
    return np.where(finite, hi, a), np.where(finite, lo, np.float32(0))


def test_tf32_split_bits():
    from ndconv.engine import gpu_blas
    rng = np.random.default_rng(7)
    fmax = np.finfo(np.float32).max
    special = np.array([0.0, -0.0, 1.0, -1.0, 1 + 2.0 ** -11, 1 + 2.0 ** -10, 1 + 3 * 2.0 ** -11, fmax, -fmax,
                        np.inf, -np.inf, np.nan, 1e-40, -1e-45, 2.0 ** -126], np.float32)
    a = np.concatenate([special, rng.standard_normal(4096).astype(np.float32),
                        (rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)).astype(np.float32)])
    hi, lo = (host(p) for p in gpu_blas.split(cp.asarray(a)))
    want_hi, want_lo = tf32_split_reference(a)
    # bit for bit, but for the sign of a zero lo of a subnormal (the GPU flushes those)
    normal = ~(np.abs(a) < np.finfo(np.float32).tiny) | (a == 0)
    np.testing.assert_array_equal(hi.view(np.uint32), want_hi.view(np.uint32))
    np.testing.assert_array_equal(lo[normal].view(np.uint32), want_lo[normal].view(np.uint32))
    np.testing.assert_array_equal(lo, want_lo)
    finite = np.isfinite(a) & (np.abs(a) > 1e-30)
    # both parts carry at most 11 significant bits; together they hold a to 2^-21
    assert not np.any(hi.view(np.uint32) & 0x1FFF) and not np.any(lo.view(np.uint32) & 0x1FFF)
    err = np.abs(hi[finite].astype(np.float64) + lo[finite] - a[finite]) / np.abs(a[finite])
    assert err.max() <= 2.0 ** -21
    # the im2col kernel's split is the same function
    g = geometry((1, 1, a.size), (1, 1, 1))
    cols = ALGORITHMS.get("im2col_tf32x3")._columns(cp.asarray(a[None, None]), g, 0, 1, 0, a.size, np.dtype("float32"))
    np.testing.assert_array_equal(host(cols.hi).ravel().view(np.uint32), want_hi.view(np.uint32))
    np.testing.assert_array_equal(host(cols.lo).ravel()[normal].view(np.uint32), want_lo[normal].view(np.uint32))


@pytest.mark.parametrize("k", [64, 1024, gpu_blas.TF32X3_MAX_K])
def test_tf32x3_accuracy(k):
    """Up to TF32X3_MAX_K products, three TF32 GEMMs on split operands stay within 10x of
    SGEMM's error (measured: 8x at K = 4096) and at least 25x below one TF32 GEMM's,
    which a wrong split or operand order would not."""
    rng = np.random.default_rng(8)
    a = rng.standard_normal((2, 96, k)).astype(np.float32)
    b = rng.standard_normal((2, k, 80)).astype(np.float32)
    want = np.matmul(a.astype(np.float64), b.astype(np.float64))
    da, db = cp.asarray(a), cp.asarray(b)
    ieee = relerr(host(gpu_blas.matmul(da, db, fp32_math="ieee")), want)
    x3 = relerr(host(gpu_blas.matmul(da, db, fp32_math="tf32x3")), want)
    one = cp.empty(want.shape, np.float32)
    gpu_blas._gemm(da, db, one, False, True)                  # a single TF32 GEMM
    single = relerr(host(one), want)
    print(f"K={k}: ieee {ieee:.2e}, tf32x3 {x3:.2e}, tf32 {single:.2e}")
    assert x3 <= 10 * ieee, (x3, ieee)
    assert single > 25 * x3, (single, x3)


def test_tf32x3_takes_short_gemms_only():
    dense = geometry((2, 64, 9, 9), (32, 64, 3, 3), padding=1)
    wide = geometry((1, 1024, 9, 9), (8, 1024, 3, 3), padding=1)
    batch = geometry((64, 8, 9, 9), (8, 8, 3, 3), padding=1)         # 5184 products per weight
    for name in ("im2col_tf32x3", "flat_tf32x3"):
        alg = ALGORITHMS.get(name)
        assert all(alg.supports(op, dense, np.float32) for op in OPS)
        assert not alg.supports("forward", dense, np.float64) and not alg.supports("forward", dense, np.float16)
        assert alg.supports("backward_input", wide, np.float32)
        assert alg.supports("forward", batch, np.float32)
    # im2col cuts a weight gradient's sums into GEMMs of 4096; flat does not
    assert ALGORITHMS.get("im2col_tf32x3").supports("backward_weight", batch, np.float32)
    assert not ALGORITHMS.get("flat_tf32x3").supports("backward_weight", batch, np.float32)
    # im2col's forward GEMM sums over (channel, tap): 9216 products; flat's per tap: 1024
    assert not ALGORITHMS.get("im2col_tf32x3").supports("forward", wide, np.float32)
    assert ALGORITHMS.get("flat_tf32x3").supports("forward", wide, np.float32)


def test_fp32_math_argument(monkeypatch):
    with pytest.raises(ValueError, match=r"fp32_math=.tf32\'"):
        GPUEngine(fp32_math="tf32")
    eng = GPUEngine(fp32_math="ieee")
    assert eng.fp32_math == "ieee"
    with pytest.raises(ValueError, match="fp32_math"):
        eng.fp32_math = None
    assert eng.fp32_math == "ieee"
    monkeypatch.setenv("NDCONV_GPU_FP32", "ieee")
    assert GPUEngine().fp32_math == "ieee"
    monkeypatch.delenv("NDCONV_GPU_FP32")
    assert GPUEngine().fp32_math == "tf32x3"
    monkeypatch.setenv("NDCONV_GPU_FP32", "fast")
    with pytest.raises(ValueError, match="fast"):
        GPUEngine()


def test_im2col_tf32x3_weight_gradient_in_pieces():
    """Sums over 2*70*70 = 9800 positions: three pieces of at most 4096 (two of 3268 and a
    rest), per group."""
    rng = np.random.default_rng(10)
    g = geometry((2, 6, 70, 70), (4, 3, 3, 3), padding=1, groups=2)
    x, gy = rand(rng, g.x_shape, "float32"), rand(rng, g.y_shape, "float32")
    got = host(GPUEngine(algorithm="im2col_tf32x3").backward_weight(cp.asarray(x), cp.asarray(gy), g))
    want = CPUEngine().backward_weight(x.astype(np.float64), gy.astype(np.float64), g)
    assert relerr(got, want) < TOL["float32"]


@pytest.mark.parametrize("alg", ["im2col_gemm", "im2col_tf32x3", "flat_gemm", "flat_tf32x3"])
@pytest.mark.parametrize("fp32_math", ["ieee", "tf32x3"])
def test_gemm_algorithms_under_both_fp32_maths(alg, fp32_math):
    """A forced algorithm runs whatever the engine's fp32_math; unforced, an "ieee" engine
    never picks a tensor-core one."""
    rng = np.random.default_rng(9)
    cpu = CPUEngine()
    for g in (geometry((3, 8, 13, 11), (12, 4, 3, 2), padding=(1, 0), dilation=(1, 2), groups=2),
              geometry((2, 16, 9, 7, 6), (8, 16, 2, 3, 3), padding=1)):
        x, w, gy = (rand(rng, s, "float32") for s in (g.x_shape, g.w_shape, g.y_shape))
        eng = GPUEngine(algorithm=alg, fp32_math=fp32_math)
        for op, args in (("forward", (x, w)), ("backward_input", (gy, w)), ("backward_weight", (x, gy))):
            got = host(getattr(eng, op)(*(cp.asarray(a) for a in args), g))
            want = getattr(cpu, op)(*(a.astype(np.float64) for a in args), g)
            assert relerr(got, want) < TOL["float32"], (alg, fp32_math, op)
            free = GPUEngine(fp32_math=fp32_math, autotune=True)
            getattr(free, op)(*(cp.asarray(a) for a in args), g)
            used = ALGORITHMS.get(free.last_algorithm[op])
            assert fp32_math == "tf32x3" or used.fp32_math == "ieee", used


@pytest.mark.parametrize("g", PRIMITIVE_GEOMETRIES, ids=lambda g: f"{g.nd}d-{g.x_shape}-{g.w_shape}")
def test_im2col_modules_compiled_for_the_geometry(g, monkeypatch):
    """Calls past SPECIALIZE_ELEMENTS run im2col/col2im compiled with the geometry's sizes
    as constants: the same results as the shared module, in float64 and under tf32x3."""
    from ndconv.engine import gpu as gpu_mod
    monkeypatch.setattr(gpu_mod, "SPECIALIZE_ELEMENTS", 1)
    # launches planned by earlier tests hold the shared module's kernels
    monkeypatch.setattr(gpu_mod, "_column_plans", {})
    monkeypatch.setattr(gpu_mod, "_col2im_plans", {})
    cpu = CPUEngine()
    arrays = primitive_arrays(g, 7, "float64")
    dev = tuple(cp.asarray(a) for a in arrays)
    for alg, dtype, tol in (("im2col_gemm", "float64", 1e-11), ("im2col_tf32x3", "float32", 1e-5)):
        eng = GPUEngine(algorithm=alg)
        for op in OPS:
            if not ALGORITHMS.get(alg).supports(op, g, np.dtype(dtype)):
                continue
            got = run_primitive(eng, op, g, tuple(a.astype(dtype) for a in dev))
            ref = run_primitive(cpu, op, g, arrays)
            assert relerr(host(got), ref) < tol, (alg, op, g)
    assert any(key[-1] == g for key in gpu_mod._modules if len(key) == 5)


def test_weight_piece_fills_the_device_and_bounds_tf32x3_sums():
    from ndconv.engine.gpu import weight_piece
    from ndconv.engine.gpu_blas import TF32X3_MAX_K
    # a strided ResNet layer's weight gradient: 18 output tiles -> 12 pieces of >= 1024
    # wanted, 14 of 896 taken (no shorter last piece)
    step = weight_piece(12544, 256, 1152, 1, None, 132, 4, 1 << 30)
    assert step == 896
    step = weight_piece(12538, 256, 1152, 1, None, 132, 4, 1 << 30)   # no even split: 12
    assert step % 4 == 0 and -(-12538 // step) == 12
    # enough tiles already, or a short sum: one piece
    assert weight_piece(4096, 4096, 2048, 1, None, 132, 4, 1 << 30) == 4096
    assert weight_piece(1500, 64, 64, 1, None, 132, 4, 1 << 30) == 1500
    # tf32x3: the fewest pieces no longer than TF32X3_MAX_K (12544 -> 4 of 3136)
    step = weight_piece(50000, 4096, 4096, 1, TF32X3_MAX_K, 132, 4, 1 << 30)
    assert step <= TF32X3_MAX_K and -(-50000 // step) == -(-50000 // TF32X3_MAX_K)
    assert weight_piece(12544, 256, 1152, 1, TF32X3_MAX_K, 132, 4, 1 << 30) == 3136
    # the pieces' results stay within a quarter of the workspace limit
    step = weight_piece(1 << 20, 64, 64, 1, None, 132, 4, 64 * 64 * 4 * 8 * 4)
    assert -(-(1 << 20) // step) <= 8
