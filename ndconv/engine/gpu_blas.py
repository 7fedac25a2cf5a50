"""Batched GEMM straight through cuBLAS (strided-batched), for the GPU engine's GEMM paths.

``cupy.matmul`` spends about 50 us of host time per call on an H200 machine (shape
checks, broadcasting, contiguity copies); one ``cublas<t>gemmStridedBatched`` call
through CuPy's binding spends about 13 us and runs the same GEMM a little faster,
because a broadcast operand is passed with batch stride 0 instead of being copied.
Convolutions call GEMMs on every step, so that host time is part of every layer.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

_OP_N, _OP_T = 0, 1
_INT_MAX = 2 ** 31 - 1
_ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
_GEMM_NAMES = {np.dtype(np.float32): "sgemmStridedBatched", np.dtype(np.float64): "dgemmStridedBatched"}
_cublas = None


def _lib():
    """CuPy's cuBLAS binding, imported at first use: importing it loads libcublas, which
    a machine with CuPy but no CUDA libraries (CI) does not have."""
    global _cublas
    if _cublas is None:
        from cupy.cuda import cublas
        _cublas = cublas
    return _cublas


def _operand(a):
    """(op, leading dim, batch stride in elements, array) of a 3-D operand whose matrices
    are row-major (op N) or stored transposed (op T), with any leading dimension and
    batch stride (0: one matrix for the whole batch); other layouts are copied first."""
    item = a.itemsize
    rows, cols = a.shape[1:]
    s0, s1, s2 = a.strides
    if s0 % item == 0 and s1 % item == 0 and s2 % item == 0 and min(s0, s1, s2) >= 0:
        if s2 == item and (rows == 1 or s1 >= cols * item):
            return _OP_N, max(cols, s1 // item), (0 if a.shape[0] == 1 else s0 // item), a
        if s1 == item and (cols == 1 or s2 >= rows * item):
            return _OP_T, max(rows, s2 // item), (0 if a.shape[0] == 1 else s0 // item), a
    # Copy into a fresh C-ordered buffer.  (Not ascontiguousarray: it returns arrays whose
    # size-1 axes have odd strides unchanged, and those strides are what failed above.)
    fresh = cp.empty(a.shape, dtype=a.dtype)
    fresh[...] = a
    return _OP_N, max(1, cols), (0 if a.shape[0] == 1 else rows * cols), fresh


def matmul(a, b, out=None, accumulate=False):
    """``a @ b`` for 3-D arrays ``(B or 1, M, K) @ (B or 1, K, N)`` -> ``(B, M, N)``.

    float32/float64 go to cuBLAS in one strided-batched call (a batch of 1 is
    broadcast with stride 0); other dtypes and sizes past cuBLAS's int limits fall
    back to ``cupy.matmul``.  ``out`` (optional) is a (B, M, N) view with unit
    column stride; ``accumulate`` adds the product to it (beta = 1).  cuBLAS
    results are bitwise reproducible run to run, so both stay deterministic.
    """
    batch = max(a.shape[0], b.shape[0])
    m, k = a.shape[1:]
    n = b.shape[2]
    dtype = a.dtype
    item = a.itemsize
    direct = (dtype in _GEMM_NAMES and b.dtype == dtype and b.shape[1] == k and a.shape[0] in (1, batch)
              and b.shape[0] in (1, batch) and max(m, n, k, batch) <= _INT_MAX and 0 not in (m, n, k, batch))
    if out is not None:
        direct = (direct and out.dtype == dtype and out.shape == (batch, m, n) and out.strides[2] == item
                  and out.strides[1] % item == 0 and out.strides[0] % item == 0
                  and (m == 1 or out.strides[1] >= n * item))
    if not direct:
        res = cp.matmul(a, b)
        if out is None:
            return res
        if accumulate:
            out += res
        else:
            out[...] = res
        return out
    if out is None:
        out = cp.empty((batch, m, n), dtype=dtype)
    op_a, lda, sa, a = _operand(a)
    op_b, ldb, sb, b = _operand(b)
    ldc = max(n, out.strides[1] // item)
    sc = out.strides[0] // item
    cublas = _lib()
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    # Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets (b, a) swapped.
    gemm = getattr(cublas, _GEMM_NAMES[dtype])
    gemm(handle, op_b, op_a, n, m, k, _ONE[dtype].ctypes.data, b.data.ptr, ldb, sb, a.data.ptr, lda, sa,
         (_ONE if accumulate else _ZERO)[dtype].ctypes.data, out.data.ptr, ldc, sc, batch)
    return out
