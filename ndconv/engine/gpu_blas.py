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
from cupy.cuda import cublas

_OP_N, _OP_T = 0, 1
_INT_MAX = 2 ** 31 - 1
_ONE = {np.dtype(np.float32): np.array(1, np.float32), np.dtype(np.float64): np.array(1, np.float64)}
_ZERO = {np.dtype(np.float32): np.array(0, np.float32), np.dtype(np.float64): np.array(0, np.float64)}
_GEMM = {np.dtype(np.float32): cublas.sgemmStridedBatched, np.dtype(np.float64): cublas.dgemmStridedBatched}


def _operand(a):
    """(op, leading dim, batch stride in elements, array) of a 3-D operand, each matrix
    row-major (op N) or stored transposed (op T); anything else is made contiguous."""
    item = a.itemsize
    rows, cols = a.shape[1:]
    s0, s1, s2 = a.strides
    if s2 == item and (s1 == cols * item or rows == 1) and s1 % item == 0:
        op, ld = _OP_N, max(cols, s1 // item if rows > 1 else cols)
    elif s1 == item and (s2 == rows * item or cols == 1) and s2 % item == 0:
        op, ld = _OP_T, max(rows, s2 // item if cols > 1 else rows)
    else:
        a = cp.ascontiguousarray(a)
        return _operand(a)
    stride = 0 if a.shape[0] == 1 else s0 // item
    if s0 % item:
        a = cp.ascontiguousarray(a)
        return _operand(a)
    return op, ld, stride, a


def matmul(a, b):
    """``a @ b`` for 3-D arrays ``(B or 1, M, K) @ (B or 1, K, N)`` -> ``(B, M, N)``.

    float32/float64 go to cuBLAS in one strided-batched call (a batch of 1 is
    broadcast with stride 0); other dtypes and sizes past cuBLAS's int limits fall
    back to ``cupy.matmul``.
    """
    batch = max(a.shape[0], b.shape[0])
    m, k = a.shape[1:]
    n = b.shape[2]
    dtype = a.dtype
    if (dtype not in _GEMM or b.dtype != dtype or b.shape[1] != k or a.shape[0] not in (1, batch)
            or b.shape[0] not in (1, batch) or max(m, n, k, batch) > _INT_MAX or 0 in (m, n, k, batch)):
        return cp.matmul(a, b)
    out = cp.empty((batch, m, n), dtype=dtype)
    op_a, lda, sa, a = _operand(a)
    op_b, ldb, sb, b = _operand(b)
    if max(lda, ldb) > _INT_MAX:
        return cp.matmul(a, b)
    handle = cp.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cp.cuda.get_current_stream().ptr)
    # Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets (b, a) swapped.
    _GEMM[dtype](handle, op_b, op_a, n, m, k, _ONE[dtype].ctypes.data, b.data.ptr, ldb, sb,
                 a.data.ptr, lda, sa, _ZERO[dtype].ctypes.data, out.data.ptr, n, m * n, batch)
    return out
