"""Compiled (numba) col2im for the CPU engine's im2col path.

The input gradient of im2col is a scatter-add of every tap's columns onto the padded
input.  With NumPy that is one strided add over the whole batch per tap (half of a
strided 1-D transposed call's time went there); this loop does all taps of one
(sample, channel) plane in one pass.  Each parallel iteration owns its plane and adds
the taps in order, so the result does not depend on the thread count.
"""
from .cpu_ir import reading

try:
    from numba import njit, prange
except ImportError:  # the engine keeps its NumPy loop
    njit = None

AVAILABLE = njit is not None

if AVAILABLE:
    @reading("cols")
    @njit(parallel=True, cache=True)
    def scatter_add(cols, buf, k0_, k1_, k2_, s0, s1, s2, d0, d1, d2):
        """buf[j, o*s + k*d] += cols[j, tap(k), o] for every tap k (in order) and output o.

        cols (J, K, O0, O1, O2), buf (J, R0, R1, R2): 3 spatial dims (1-D and 2-D calls
        have unit leading ones)."""
        o0_, o1_, o2_ = cols.shape[2], cols.shape[3], cols.shape[4]
        for j in prange(cols.shape[0]):
            plane = buf[j]
            tap = 0
            for k0 in range(k0_):
                for k1 in range(k1_):
                    for k2 in range(k2_):
                        src = cols[j, tap]
                        base = k2 * d2
                        for o0 in range(o0_):
                            for o1 in range(o1_):
                                row = plane[o0 * s0 + k0 * d0, o1 * s1 + k1 * d1]
                                srow = src[o0, o1]
                                for o2 in range(o2_):
                                    row[base + o2 * s2] += srow[o2]
                        tap += 1
