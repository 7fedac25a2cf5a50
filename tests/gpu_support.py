"""What every GPU test module starts with: CuPy (the module is skipped without it) and
the marks that skip its tests where no CUDA device answers (CI has neither)."""
from __future__ import annotations

import pytest


def cupy_and_marks():
    """``(cupy, pytestmark)`` for a GPU test module."""
    cp = pytest.importorskip("cupy")
    try:
        have_device = cp.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no driver / no device
        have_device = False
    return cp, [pytest.mark.gpu, pytest.mark.skipif(not have_device, reason="needs a CUDA device")]


#: relative L2 error allowed against a float64 reference, per dtype
TOL = {"float64": 1e-11, "float32": 1e-5, "float16": 4e-3}


def assert_close_to_reference(got, ref, dtype, context=None):
    """A GPU (or host) result against a float64 reference: finite, relative L2 error under TOL."""
    import numpy as np
    if not isinstance(got, np.ndarray):
        got = got.get()
    got = got.astype(np.float64)
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
    assert np.all(np.isfinite(got)) and err < TOL[str(np.dtype(dtype))], (err, context)
