"""What the GPU test modules share: CuPy and the marks that skip tests where no CUDA
device answers (CI has neither), and checks of a forced algorithm against the CPU engine."""
from __future__ import annotations

import numpy as np
import pytest

#: relative L2 error allowed against a float64 reference, per dtype
TOL = {"float64": 1e-11, "float32": 1e-5, "float16": 4e-3}


def device_count():
    """CUDA devices CuPy sees; 0 without CuPy, a driver or a device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device
        return 0


#: for modules that also hold tests run anywhere (plans): skips one test without a device
on_gpu = pytest.mark.skipif(device_count() == 0, reason="needs CuPy and a CUDA device")


def cupy_and_marks():
    """``(cupy, pytestmark)`` for a GPU test module (skipped as a whole without CuPy)."""
    cp = pytest.importorskip("cupy")
    return cp, [pytest.mark.gpu, pytest.mark.skipif(device_count() == 0, reason="needs a CUDA device")]


def assert_close_to_reference(got, ref, dtype, context=None):
    """A GPU (or host) result against a float64 reference: finite, relative L2 error under TOL."""
    if not isinstance(got, np.ndarray):
        got = got.get()
    got = got.astype(np.float64)
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert np.all(np.isfinite(got)) and err < TOL[str(np.dtype(dtype))], (err, context)


def check_forced(name, g, dtype, ops, seed=0, offset=0, repeat=False):
    """GPU algorithm ``name``, forced, against the CPU engine in float64 for each of ``ops``.

    ``offset`` elements shift the first operand off its buffer's alignment; ``repeat``
    runs each op twice and asks for the same bits.
    """
    import cupy as cp
    from ndconv.engine.cpu import CPUEngine
    from ndconv.engine.gpu import GPUEngine
    cpu, eng = CPUEngine(), GPUEngine(algorithm=name)
    rng = np.random.default_rng(seed)
    x, w, y = (rng.standard_normal(s).astype(dtype) for s in (g.x_shape, g.w_shape, g.y_shape))
    operands = {"forward": (x, w), "backward_input": (y, w), "backward_weight": (x, y)}
    for op in ops:
        a, b = operands[op]
        buf = cp.empty(a.size + offset, dtype=dtype)
        dev = buf[offset:].reshape(a.shape)
        dev[...] = cp.asarray(a)
        got = getattr(eng, op)(dev, cp.asarray(b), g)
        assert eng.last_algorithm[op] == name and got.dtype == np.dtype(dtype)
        if repeat:
            assert bool(cp.all(got == getattr(eng, op)(dev, cp.asarray(b), g))), "not bitwise reproducible"
        ref = getattr(cpu, op)(a.astype(np.float64), b.astype(np.float64), g)
        assert_close_to_reference(got, ref, dtype, (op, g))
