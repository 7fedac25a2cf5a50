"""Compiled (numba) loops for depthwise convolution on the CPU.

Depthwise convolutions (each group reads one input channel, with channel
multiplier M = Cy / Cx) do too little arithmetic per byte for BLAS; these loops
read each padded plane once per tap from L1 and vectorise along the last axis.
Every array is 5-D (N, C, D, H, W): 1-D and 2-D calls add unit axes.  Each
parallel iteration owns its output plane, so results do not depend on threading.
"""
import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError:  # the engine falls back to im2col + BLAS
    numba = None

AVAILABLE = numba is not None

if AVAILABLE:
    @njit(fastmath=True, cache=True, inline="always")
    def _axpy(out, wv, row, base, step):
        # out[o] += wv * row[base + o*step]; the unit-step case is a contiguous, vectorised loop.
        if step == 1:
            seg = row[base:base + out.shape[0]]
            for o in range(out.shape[0]):
                out[o] += wv * seg[o]
        else:
            for o in range(out.shape[0]):
                out[o] += wv * row[base + o * step]

    @njit(parallel=True, fastmath=True, cache=True)
    def forward(xp, w, y, s0, s1, s2, d0, d1, d2, mult):
        n_, cy = y.shape[0], y.shape[1]
        k0_, k1_, k2_ = w.shape[1], w.shape[2], w.shape[3]
        for job in prange(n_ * cy):
            n = job // cy
            co = job % cy
            xplane = xp[n, co // mult]
            yplane = y[n, co]
            for o0 in range(yplane.shape[0]):
                for o1 in range(yplane.shape[1]):
                    out = yplane[o0, o1]
                    out[:] = 0
                    for k0 in range(k0_):
                        for k1 in range(k1_):
                            row = xplane[o0 * s0 + k0 * d0, o1 * s1 + k1 * d1]
                            for k2 in range(k2_):
                                _axpy(out, w[co, k0, k1, k2], row, k2 * d2, s2)

    @njit(parallel=True, fastmath=True, cache=True)
    def backward_input(gy, w, gxp, s0, s1, s2, d0, d1, d2, mult):
        # gxp (N, Cx, padded...) is zero on entry; each output scatters its kernel copy.
        n_, cx = gxp.shape[0], gxp.shape[1]
        o0_, o1_, o2_ = gy.shape[2], gy.shape[3], gy.shape[4]
        k0_, k1_, k2_ = w.shape[1], w.shape[2], w.shape[3]
        for job in prange(n_ * cx):
            n = job // cx
            c = job % cx
            gplane = gxp[n, c]
            for m in range(mult):
                co = c * mult + m
                for o0 in range(o0_):
                    for o1 in range(o1_):
                        src = gy[n, co, o0, o1]
                        for k0 in range(k0_):
                            for k1 in range(k1_):
                                row = gplane[o0 * s0 + k0 * d0, o1 * s1 + k1 * d1]
                                for k2 in range(k2_):
                                    wv = w[co, k0, k1, k2]
                                    base = k2 * d2
                                    if s2 == 1:
                                        seg = row[base:base + o2_]
                                        for o2 in range(o2_):
                                            seg[o2] += wv * src[o2]
                                    else:
                                        for o2 in range(o2_):
                                            row[base + o2 * s2] += wv * src[o2]

    @njit(parallel=True, fastmath=True, cache=True)
    def backward_weight(xp, gy, gw, s0, s1, s2, d0, d1, d2, mult):
        n_, cy = gy.shape[0], gy.shape[1]
        o0_, o1_, o2_ = gy.shape[2], gy.shape[3], gy.shape[4]
        k0_, k1_, k2_ = gw.shape[1], gw.shape[2], gw.shape[3]
        for co in prange(cy):
            c = co // mult
            acc = np.zeros((k0_, k1_, k2_), dtype=np.float64)
            for n in range(n_):
                xplane = xp[n, c]
                for o0 in range(o0_):
                    for o1 in range(o1_):
                        g = gy[n, co, o0, o1]
                        for k0 in range(k0_):
                            for k1 in range(k1_):
                                row = xplane[o0 * s0 + k0 * d0, o1 * s1 + k1 * d1]
                                for k2 in range(k2_):
                                    base = k2 * d2
                                    part = row.dtype.type(0)
                                    if s2 == 1:
                                        seg = row[base:base + o2_]
                                        for o2 in range(o2_):
                                            part += g[o2] * seg[o2]
                                    else:
                                        for o2 in range(o2_):
                                            part += g[o2] * row[base + o2 * s2]
                                    acc[k0, k1, k2] += part
            for k0 in range(k0_):
                for k1 in range(k1_):
                    for k2 in range(k2_):
                        gw[co, k0, k1, k2] = acc[k0, k1, k2]


if AVAILABLE:
    # Stride 1: a padded plane is read flat.  Output p (at the padded row pitch) of
    # tap t reads xf[p + offset[t]], so each tap is one long contiguous loop; the
    # wrap-around positions between rows are computed and dropped.

    @njit(fastmath=True, cache=True, inline="always")
    def _store(acc, out, pitch0, pitch1):
        for o0 in range(out.shape[0]):
            for o1 in range(out.shape[1]):
                base = o0 * pitch0 + o1 * pitch1
                row = out[o0, o1]
                for o2 in range(out.shape[2]):
                    row[o2] = acc[base + o2]

    @njit(parallel=True, fastmath=True, cache=True)
    def flat_forward(xf, w, offsets, y, pitch0, pitch1, mult, length):
        # xf (N, Cx, P) padded planes; w (Cy, K); y (N, Cy, O0, O1, O2)
        n_, cy = y.shape[0], y.shape[1]
        for job in prange(n_ * cy):
            n = job // cy
            co = job % cy
            src = xf[n, co // mult]
            acc = np.zeros(length, dtype=y.dtype)
            for t in range(offsets.shape[0]):
                wv = w[co, t]
                seg = src[offsets[t]:offsets[t] + length]
                for p in range(length):
                    acc[p] += wv * seg[p]
            _store(acc, y[n, co], pitch0, pitch1)

    @njit(parallel=True, fastmath=True, cache=True)
    def flat_backward_input(gf, w, offsets, gx, pitch0, pitch1, mult, length):
        # gf (N, Cy, P) gy padded by the complementary padding; w (Cy, K) already flipped;
        # gx (N, Cx, X0, X1, X2): gx[c] sums its mult output channels.
        n_, cx = gx.shape[0], gx.shape[1]
        for job in prange(n_ * cx):
            n = job // cx
            c = job % cx
            acc = np.zeros(length, dtype=gx.dtype)
            for m in range(mult):
                co = c * mult + m
                src = gf[n, co]
                for t in range(offsets.shape[0]):
                    wv = w[co, t]
                    seg = src[offsets[t]:offsets[t] + length]
                    for p in range(length):
                        acc[p] += wv * seg[p]
            _store(acc, gx[n, c], pitch0, pitch1)

    @njit(parallel=True, fastmath=True, cache=True)
    def flat_backward_weight(xf, gyf, offsets, gw, mult, length):
        # xf (N, Cx, P) padded planes; gyf (N, Cy, L) gy at the padded pitch, zeros between rows.
        n_, cy = gyf.shape[0], gyf.shape[1]
        for co in prange(cy):
            for t in range(offsets.shape[0]):
                total = 0.0
                for n in range(n_):
                    g = gyf[n, co]
                    seg = xf[n, co // mult, offsets[t]:offsets[t] + length]
                    part = g.dtype.type(0)
                    for p in range(length):
                        part += g[p] * seg[p]
                    total += part
                gw[co, t] = total


def as5d(a, nd):
    """(N, C, *s) -> (N, C, 1.., *s) with 5 dims, a view."""
    return a.reshape(a.shape[:2] + (1,) * (3 - nd) + a.shape[2:])


def pad3(t, nd, fill):
    return (fill,) * (3 - nd) + tuple(t)
