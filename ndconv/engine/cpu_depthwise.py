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
    # Stride 1: each (sample, channel) plane is padded into a small local buffer and
    # read flat.  Output p (at the padded row pitch) of tap t reads plane[p + offset[t]],
    # so a tap is one long contiguous loop; the wrap-around positions between rows are
    # computed and dropped.  The loops live in helpers: inside a prange body numba
    # lowers them without vectorising.

    @njit(fastmath=True, cache=True)
    def _load_plane(src, plane, lo0, lo1, lo2, p0_, p1_, p2_):
        # src (X0, X1, X2) -> plane (P0*P1*P2), zero elsewhere; parts beyond P are unread
        plane[:] = 0
        n2 = min(src.shape[2], p2_ - lo2)
        for i0 in range(min(src.shape[0], p0_ - lo0)):
            for i1 in range(min(src.shape[1], p1_ - lo1)):
                base = ((i0 + lo0) * p1_ + i1 + lo1) * p2_ + lo2
                row = src[i0, i1]
                seg = plane[base:base + n2]     # a slice: plane[base + j] would not vectorise
                for j in range(n2):
                    seg[j] = row[j]

    @njit(fastmath=True, cache=True)
    def _three(plane, offsets, t, length):
        """The plane seen from taps t, t+1, t+2: three shifted views of ``length``."""
        return (plane[offsets[t]:offsets[t] + length], plane[offsets[t + 1]:offsets[t + 1] + length],
                plane[offsets[t + 2]:offsets[t + 2] + length])

    @njit(fastmath=True, cache=True)
    def _taps(plane, wk, offsets, acc, length):
        # acc[p] += sum_t wk[t] * plane[p + offsets[t]], nine (then six, three) taps per pass
        # over acc (the loop is bound by loads and stores, not by multiply-adds)
        k = offsets.shape[0]
        t = 0
        while t + 9 <= k:
            w0, w1, w2, w3, w4, w5 = wk[t], wk[t + 1], wk[t + 2], wk[t + 3], wk[t + 4], wk[t + 5]
            w6, w7, w8 = wk[t + 6], wk[t + 7], wk[t + 8]
            s0, s1, s2 = _three(plane, offsets, t, length)
            s3, s4, s5 = _three(plane, offsets, t + 3, length)
            s6, s7, s8 = _three(plane, offsets, t + 6, length)
            for p in range(length):
                acc[p] += (((w0 * s0[p] + w1 * s1[p] + w2 * s2[p]) + (w3 * s3[p] + w4 * s4[p] + w5 * s5[p]))
                           + (w6 * s6[p] + w7 * s7[p] + w8 * s8[p]))
            t += 9
        while t + 6 <= k:
            w0, w1, w2, w3, w4, w5 = wk[t], wk[t + 1], wk[t + 2], wk[t + 3], wk[t + 4], wk[t + 5]
            s0, s1, s2 = _three(plane, offsets, t, length)
            s3, s4, s5 = _three(plane, offsets, t + 3, length)
            for p in range(length):
                acc[p] += (w0 * s0[p] + w1 * s1[p] + w2 * s2[p]) + (w3 * s3[p] + w4 * s4[p] + w5 * s5[p])
            t += 6
        while t + 3 <= k:
            w0, w1, w2 = wk[t], wk[t + 1], wk[t + 2]
            s0, s1, s2 = _three(plane, offsets, t, length)
            for p in range(length):
                acc[p] += w0 * s0[p] + w1 * s1[p] + w2 * s2[p]
            t += 3
        while t < k:
            wv = wk[t]
            seg = plane[offsets[t]:offsets[t] + length]
            for p in range(length):
                acc[p] += wv * seg[p]
            t += 1

    @njit(fastmath=True, cache=True)
    def _store_plane(acc, out, pitch0, pitch1):
        # Kept apart from its inverse _scatter_plane: one function with a direction flag
        # made the depthwise forward 1.4x slower (the stores stopped vectorising).
        for o0 in range(out.shape[0]):
            for o1 in range(out.shape[1]):
                base = o0 * pitch0 + o1 * pitch1
                row = out[o0, o1]
                seg = acc[base:base + out.shape[2]]
                for o2 in range(out.shape[2]):
                    row[o2] = seg[o2]

    @njit(fastmath=True, cache=True)
    def _scatter_plane(src, flat, pitch0, pitch1):
        for o0 in range(src.shape[0]):
            for o1 in range(src.shape[1]):
                base = o0 * pitch0 + o1 * pitch1
                row = src[o0, o1]
                seg = flat[base:base + src.shape[2]]
                for o2 in range(src.shape[2]):
                    seg[o2] = row[o2]

    @njit(fastmath=True, cache=True)
    def _dots(plane, g, offsets, out, length):
        # out[t] += sum_p g[p] * plane[p + offsets[t]], six (then three) taps per pass over g
        k = offsets.shape[0]
        t = 0
        while t + 6 <= k:
            s0, s1, s2 = _three(plane, offsets, t, length)
            s3, s4, s5 = _three(plane, offsets, t + 3, length)
            a0 = a1 = a2 = a3 = a4 = a5 = g.dtype.type(0)
            for p in range(length):
                gv = g[p]
                a0 += gv * s0[p]
                a1 += gv * s1[p]
                a2 += gv * s2[p]
                a3 += gv * s3[p]
                a4 += gv * s4[p]
                a5 += gv * s5[p]
            out[t] += a0
            out[t + 1] += a1
            out[t + 2] += a2
            out[t + 3] += a3
            out[t + 4] += a4
            out[t + 5] += a5
            t += 6
        while t + 3 <= k:
            s0, s1, s2 = _three(plane, offsets, t, length)
            a0 = a1 = a2 = g.dtype.type(0)
            for p in range(length):
                gv = g[p]
                a0 += gv * s0[p]
                a1 += gv * s1[p]
                a2 += gv * s2[p]
            out[t] += a0
            out[t + 1] += a1
            out[t + 2] += a2
            t += 3
        while t < k:
            seg = plane[offsets[t]:offsets[t] + length]
            part = g.dtype.type(0)
            for p in range(length):
                part += g[p] * seg[p]
            out[t] += part
            t += 1

    @njit(parallel=True, fastmath=True, cache=True)
    def flat_taps(src, w, offsets, out, lo0, lo1, lo2, p0_, p1_, p2_, mult, gather):
        # out (N, C_out, O0, O1, O2) from padded planes of src (N, C_src, ...) and w (Cy, K).
        # Forward (gather False): out channel j reads src channel j // mult with w[j].
        # Input gradient (gather True, w flipped, src = gy with the complementary padding):
        # out channel c sums src channels c*mult + m with w[c*mult + m].
        n_, cout = out.shape[0], out.shape[1]
        length = ((out.shape[2] - 1) * p1_ + out.shape[3] - 1) * p2_ + out.shape[4]
        for job in prange(n_ * cout):
            n = job // cout
            j = job % cout
            plane = np.empty(p0_ * p1_ * p2_, dtype=out.dtype)
            acc = np.zeros(length, dtype=out.dtype)
            for m in range(mult if gather else 1):
                row = j * mult + m if gather else j
                _load_plane(src[n, row if gather else j // mult], plane, lo0, lo1, lo2, p0_, p1_, p2_)
                _taps(plane, w[row], offsets, acc, length)
            _store_plane(acc, out[n, j], p1_ * p2_, p2_)

    @njit(parallel=True, fastmath=True, cache=True)
    def flat_backward_weight(x, gy, offsets, gw, lo0, lo1, lo2, p0_, p1_, p2_, mult):
        # gw (Cy, K) = sum over samples and positions of gy * shifted padded x
        n_, cy = gy.shape[0], gy.shape[1]
        length = ((gy.shape[2] - 1) * p1_ + gy.shape[3] - 1) * p2_ + gy.shape[4]
        for co in prange(cy):
            plane = np.empty(p0_ * p1_ * p2_, dtype=gw.dtype)
            g = np.zeros(length, dtype=gw.dtype)     # gy at the padded pitch, zero between rows
            acc = np.zeros(offsets.shape[0], dtype=np.float64)
            part = np.zeros(offsets.shape[0], dtype=gw.dtype)
            for n in range(n_):
                _load_plane(x[n, co // mult], plane, lo0, lo1, lo2, p0_, p1_, p2_)
                _scatter_plane(gy[n, co], g, p1_ * p2_, p2_)
                part[:] = 0
                _dots(plane, g, offsets, part, length)
                for t in range(offsets.shape[0]):
                    acc[t] += part[t]
            for t in range(offsets.shape[0]):
                gw[co, t] = acc[t]

def as5d(a, nd):
    """(N, C, *s) -> (N, C, 1.., *s) with 5 dims, a view."""
    return a.reshape(a.shape[:2] + (1,) * (3 - nd) + a.shape[2:])


def pad3(t, nd, fill):
    return (fill,) * (3 - nd) + tuple(t)
