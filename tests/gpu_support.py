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
