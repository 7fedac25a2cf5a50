"""Compiled (numba) direct loops for grouped convolution with few channels per group.

With 4-32 channels per group, a grouped convolution is G tiny GEMMs per sample
(M = C_out/G rows), which BLAS runs far below its peak.  These loops compute one
group of one sample at a time, entirely in cache:

* The group's input channels are copied into a zero-padded *flat* buffer, one
  plane per channel.  For a stride s > 1 the buffer holds the s^nd phases of each
  padded channel instead (plane (r, c) at grid position m holds x[m*s + r]), so
  that every kernel tap k, with k*d = q*s + r, reads phase r at o + q: a fixed
  offset again.  Every (channel, tap) pair is therefore a "source": one offset into
  the flat buffer, and output p (at the buffer's row pitch; the wrap-around
  positions between rows are computed and dropped) reads ``flat[p + offset]``.
* The output channels of the group accumulate ``acc[co, p] += w[co, j] * src_j[p]``
  in blocks of 8 output channels x 3 sources per pass over a chunk of p: each
  source vector loaded feeds 8 outputs, and each accumulator load/store carries 3
  multiply-adds (measured on c2d_grouped32: 8x3 beat 4x3, 8x2, 4x6, 2x9 and 8x6,
  whose weights no longer fit the vector registers).  The inner loops are
  contiguous, so LLVM vectorises them.
* The input gradient (a transposed convolution) is the same loop over gy's planes:
  each phase r of the padded input gradient is a stride-1 correlation of gy with
  the taps that fall on r (flipped), written back with step s.  Each input element
  belongs to exactly one phase and grid position, so every one is written once.
* The weight gradient is the same sources dotted with gy (placed at the buffer's
  pitch): blocks of 4 output channels x 3 sources, 12 running sums per pass.

Every array is 5-D (N, C, D, H, W); 1-D and 2-D calls add unit axes.  Each
parallel job owns its output (a (sample, group) block of y or gx, or a group of
gw, summed over the batch in order), so results do not depend on threading.
"""
import functools

import numpy as np

from .cpu_ir import reading

try:
    import numba
    from numba import njit, prange
except ImportError:  # the engine falls back to its BLAS paths
    numba = None

AVAILABLE = numba is not None
if AVAILABLE:
    from .cpu_depthwise import _scatter_plane, _store_plane

CHUNK = 512     # outputs per pass at most: 8 accumulator rows (16 KiB in float32) stay in L1

if AVAILABLE:
    # The loops live in helpers (not in the prange bodies): numba lowers loops inside a
    # prange body without vectorising them.

    @njit(fastmath=True, cache=True)
    def _load(src, flat, lo0, lo1, lo2, s0, s1, s2, m0_, m1_, m2_):
        # src (C, X0, X1, X2) -> flat planes (r, c) of m0_*m1_*m2_ each, zero where the
        # grid position m*s + r - lo falls outside src (padding).  lo may be negative.
        # (A memset first and then the rows is faster than writing each element once:
        # the memset vectorises, per-row border loops do not.)
        flat[:] = 0
        cs = src.shape[0]
        x0_, x1_, x2_ = src.shape[1], src.shape[2], src.shape[3]
        mtot = m0_ * m1_ * m2_
        for r0 in range(s0):
            for r1 in range(s1):
                for r2 in range(s2):
                    rf = (r0 * s1 + r1) * s2 + r2
                    # grid positions of the last axis that land inside src
                    a = max(0, -((r2 - lo2) // s2))
                    b = min(m2_, (x2_ - 1 - r2 + lo2) // s2 + 1)
                    for c in range(cs):
                        base = (rf * cs + c) * mtot
                        for m0 in range(m0_):
                            i0 = m0 * s0 + r0 - lo0
                            if i0 < 0 or i0 >= x0_:
                                continue
                            for m1 in range(m1_):
                                i1 = m1 * s1 + r1 - lo1
                                if i1 < 0 or i1 >= x1_:
                                    continue
                                row = src[c, i0, i1]
                                at = base + (m0 * m1_ + m1) * m2_
                                if s2 == 1:
                                    seg = flat[at + a:at + b]
                                    part = row[a - lo2:b - lo2]
                                    for t in range(b - a):
                                        seg[t] = part[t]
                                else:
                                    for m2 in range(a, b):
                                        flat[at + m2] = row[m2 * s2 + r2 - lo2]

    @njit(fastmath=True, cache=True)
    def _padded(length):
        # accumulator rows padded to 16 elements: vector loads and stores of every row
        # then start aligned (a few % faster than rows that split cache lines)
        return (length + 15) // 16 * 16

    @njit(fastmath=True, cache=True)
    def _chunk(length):
        # equal chunks of at most CHUNK, multiples of 16 (whole vectors)
        parts = (length + CHUNK - 1) // CHUNK
        return ((length + parts - 1) // parts + 15) // 16 * 16

    @njit(fastmath=True, cache=True)
    def _accumulate(acc, flat, w, wrow, off, j0, j1, c0, n):
        # acc[b, c0:c0+n] = sum_j w[wrow + b, j] * flat[off[j] + c0 : ... + n] for j in j0:j1.
        # Blocks of 8 outputs x 3 sources, then 4 x 3, then single outputs / sources.
        nb = acc.shape[0]
        for b in range(nb):       # here rather than per call: the chunk is then in L1
            row = acc[b, c0:c0 + n]
            for p in range(n):
                row[p] = 0
        b = 0
        while b + 8 <= nb:
            a0, a1, a2, a3 = acc[b, c0:c0 + n], acc[b + 1, c0:c0 + n], acc[b + 2, c0:c0 + n], acc[b + 3, c0:c0 + n]
            a4, a5, a6, a7 = acc[b + 4, c0:c0 + n], acc[b + 5, c0:c0 + n], acc[b + 6, c0:c0 + n], acc[b + 7, c0:c0 + n]
            wr = wrow + b
            j = j0
            while j + 3 <= j1:
                x0 = flat[off[j] + c0:off[j] + c0 + n]
                x1 = flat[off[j + 1] + c0:off[j + 1] + c0 + n]
                x2 = flat[off[j + 2] + c0:off[j + 2] + c0 + n]
                w00, w01, w02 = w[wr, j], w[wr, j + 1], w[wr, j + 2]
                w10, w11, w12 = w[wr + 1, j], w[wr + 1, j + 1], w[wr + 1, j + 2]
                w20, w21, w22 = w[wr + 2, j], w[wr + 2, j + 1], w[wr + 2, j + 2]
                w30, w31, w32 = w[wr + 3, j], w[wr + 3, j + 1], w[wr + 3, j + 2]
                w40, w41, w42 = w[wr + 4, j], w[wr + 4, j + 1], w[wr + 4, j + 2]
                w50, w51, w52 = w[wr + 5, j], w[wr + 5, j + 1], w[wr + 5, j + 2]
                w60, w61, w62 = w[wr + 6, j], w[wr + 6, j + 1], w[wr + 6, j + 2]
                w70, w71, w72 = w[wr + 7, j], w[wr + 7, j + 1], w[wr + 7, j + 2]
                for p in range(n):
                    v0, v1, v2 = x0[p], x1[p], x2[p]
                    a0[p] += w00 * v0 + w01 * v1 + w02 * v2
                    a1[p] += w10 * v0 + w11 * v1 + w12 * v2
                    a2[p] += w20 * v0 + w21 * v1 + w22 * v2
                    a3[p] += w30 * v0 + w31 * v1 + w32 * v2
                    a4[p] += w40 * v0 + w41 * v1 + w42 * v2
                    a5[p] += w50 * v0 + w51 * v1 + w52 * v2
                    a6[p] += w60 * v0 + w61 * v1 + w62 * v2
                    a7[p] += w70 * v0 + w71 * v1 + w72 * v2
                j += 3
            b += 8
        while b + 4 <= nb:
            a0, a1, a2, a3 = acc[b, c0:c0 + n], acc[b + 1, c0:c0 + n], acc[b + 2, c0:c0 + n], acc[b + 3, c0:c0 + n]
            wr = wrow + b
            j = j0
            while j + 3 <= j1:
                x0 = flat[off[j] + c0:off[j] + c0 + n]
                x1 = flat[off[j + 1] + c0:off[j + 1] + c0 + n]
                x2 = flat[off[j + 2] + c0:off[j + 2] + c0 + n]
                w00, w01, w02 = w[wr, j], w[wr, j + 1], w[wr, j + 2]
                w10, w11, w12 = w[wr + 1, j], w[wr + 1, j + 1], w[wr + 1, j + 2]
                w20, w21, w22 = w[wr + 2, j], w[wr + 2, j + 1], w[wr + 2, j + 2]
                w30, w31, w32 = w[wr + 3, j], w[wr + 3, j + 1], w[wr + 3, j + 2]
                for p in range(n):
                    v0, v1, v2 = x0[p], x1[p], x2[p]
                    a0[p] += w00 * v0 + w01 * v1 + w02 * v2
                    a1[p] += w10 * v0 + w11 * v1 + w12 * v2
                    a2[p] += w20 * v0 + w21 * v1 + w22 * v2
                    a3[p] += w30 * v0 + w31 * v1 + w32 * v2
                j += 3
            b += 4
        # what the blocks left: outputs b: of every source, sources past the last triple
        jt = j0 + (j1 - j0) // 3 * 3
        for bb in range(nb):
            first = j0 if bb >= b else jt
            out = acc[bb, c0:c0 + n]
            for j in range(first, j1):
                wv = w[wrow + bb, j]
                x0 = flat[off[j] + c0:off[j] + c0 + n]
                for p in range(n):
                    out[p] += wv * x0[p]

    @njit(fastmath=True, cache=True)
    def _dots(part, gy, flat, off, n):
        # part[b, j] = sum_p gy[b, p] * flat[off[j] + p], p < n; 4 outputs x 3 sources per pass.
        nb, nj = part.shape[0], part.shape[1]
        zero = part.dtype.type(0)
        b = 0
        while b + 4 <= nb:
            g0, g1, g2, g3 = gy[b, :n], gy[b + 1, :n], gy[b + 2, :n], gy[b + 3, :n]
            j = 0
            while j + 3 <= nj:
                x0 = flat[off[j]:off[j] + n]
                x1 = flat[off[j + 1]:off[j + 1] + n]
                x2 = flat[off[j + 2]:off[j + 2] + n]
                s00 = s01 = s02 = s10 = s11 = s12 = zero
                s20 = s21 = s22 = s30 = s31 = s32 = zero
                for p in range(n):
                    v0, v1, v2 = x0[p], x1[p], x2[p]
                    h0, h1, h2, h3 = g0[p], g1[p], g2[p], g3[p]
                    s00 += h0 * v0
                    s01 += h0 * v1
                    s02 += h0 * v2
                    s10 += h1 * v0
                    s11 += h1 * v1
                    s12 += h1 * v2
                    s20 += h2 * v0
                    s21 += h2 * v1
                    s22 += h2 * v2
                    s30 += h3 * v0
                    s31 += h3 * v1
                    s32 += h3 * v2
                part[b, j], part[b, j + 1], part[b, j + 2] = s00, s01, s02
                part[b + 1, j], part[b + 1, j + 1], part[b + 1, j + 2] = s10, s11, s12
                part[b + 2, j], part[b + 2, j + 1], part[b + 2, j + 2] = s20, s21, s22
                part[b + 3, j], part[b + 3, j + 1], part[b + 3, j + 2] = s30, s31, s32
                j += 3
            b += 4
        jt = nj // 3 * 3
        for bb in range(nb):
            g0 = gy[bb, :n]
            for j in range(0 if bb >= b else jt, nj):
                x0 = flat[off[j]:off[j] + n]
                s00 = zero
                for p in range(n):
                    s00 += g0[p] * x0[p]
                part[bb, j] = s00

    @njit(fastmath=True, cache=True)
    def _store_phase(acc, gx, r0, r1, r2, s, lo, mlo, ngrid, pgrid):
        # gx[b, i] <- acc[b, m - mlo at the pgrid pitch] for every i = m*s + r - lo inside
        # gx (B, X0, X1, X2); the grid covers all of gx's positions of phase r
        x0_, x1_, x2_ = gx.shape[1], gx.shape[2], gx.shape[3]
        s2, lo2, mlo2 = s[2], lo[2], mlo[2]
        # grid positions of the last axis inside gx (divisions kept out of the row loops)
        a = max(mlo2, -((r2 - lo2) // s2))
        e = min(mlo2 + ngrid[2], (x2_ - 1 - r2 + lo2) // s2 + 1)
        if e <= a:
            return
        for b in range(gx.shape[0]):
            for m0 in range(mlo[0], mlo[0] + ngrid[0]):
                i0 = m0 * s[0] + r0 - lo[0]
                if i0 < 0 or i0 >= x0_:
                    continue
                for m1 in range(mlo[1], mlo[1] + ngrid[1]):
                    i1 = m1 * s[1] + r1 - lo[1]
                    if i1 < 0 or i1 >= x1_:
                        continue
                    at = ((m0 - mlo[0]) * pgrid[1] + m1 - mlo[1]) * pgrid[2] - mlo2
                    row = gx[b, i0, i1]
                    src = acc[b, at + a:at + e]
                    if s2 == 1:    # a contiguous copy (vectorised)
                        dst = row[a - lo2:e - lo2]
                        for t in range(e - a):
                            dst[t] = src[t]
                    else:
                        for t in range(e - a):
                            row[(a + t) * s2 + r2 - lo2] = src[t]

    @njit(fastmath=True, cache=True)
    def _forward_job(x, w, wrow, off, y, flat, acc, length, lo, s, grid):
        _load(x, flat, lo[0], lo[1], lo[2], s[0], s[1], s[2], grid[0], grid[1], grid[2])
        step = _chunk(length)
        for c0 in range(0, length, step):
            _accumulate(acc, flat, w, wrow, off, 0, off.shape[0], c0, min(step, length - c0))
        for b in range(y.shape[0]):      # y (B, O0, O1, O2) <- acc (B, L) at the grid pitch
            _store_plane(acc[b], y[b], grid[1] * grid[2], grid[2])

    @reading("x", "w", "off", "lo", "s", "grid")
    @njit(parallel=True, fastmath=True, cache=True)
    def forward(x, w, off, y, groups, lo, s, grid):
        """y (N, Cy, O..) = conv(x (N, Cx, X..), w (Cy, J)); source j of a group reads
        its flat phase planes (grid, as 3) at off[j]."""
        n_, cg, yg = x.shape[0], x.shape[1] // groups, y.shape[1] // groups
        o0_, o1_, o2_ = y.shape[2], y.shape[3], y.shape[4]
        length = ((o0_ - 1) * grid[1] + o1_ - 1) * grid[2] + o2_
        planes = cg * s[0] * s[1] * s[2] * grid[0] * grid[1] * grid[2]
        for job in prange(n_ * groups):
            n = job // groups
            g = job % groups
            flat = np.empty(planes, dtype=y.dtype)
            acc = np.empty((yg, _padded(length)), dtype=y.dtype)
            _forward_job(x[n, g * cg:(g + 1) * cg], w, g * yg, off, y[n, g * yg:(g + 1) * yg], flat, acc,
                         length, lo, s, grid)

    @njit(fastmath=True, cache=True)
    def _transposed_job(gy, w, wrow, off, starts, gx, flat, acc, length, plo, pgrid, s, lo, mlo, ngrid):
        _load(gy, flat, plo[0], plo[1], plo[2], 1, 1, 1, pgrid[0], pgrid[1], pgrid[2])
        step = _chunk(length)
        for r0 in range(s[0]):
            for r1 in range(s[1]):
                for r2 in range(s[2]):
                    rf = (r0 * s[1] + r1) * s[2] + r2
                    for c0 in range(0, length, step):
                        _accumulate(acc, flat, w, wrow, off, starts[rf], starts[rf + 1], c0,
                                    min(step, length - c0))
                    _store_phase(acc, gx, r0, r1, r2, s, lo, mlo, ngrid, pgrid)

    @reading("gy", "w", "off", "starts", "plo", "pgrid", "s", "lo", "mlo", "ngrid")
    @njit(parallel=True, fastmath=True, cache=True)
    def backward_input(gy, w, off, starts, gx, groups, plo, pgrid, s, lo, mlo, ngrid):
        """gx (N, Cx, X..) = conv^T(gy (N, Cy, O..)): phase r of the padded gx at grid
        positions mlo + m (ngrid of them) sums w (Cx, J) columns starts[r]:starts[r+1]
        times gy's planes (padded into pgrid by plo) at off[j] + flat(m)."""
        n_, cg, yg = gx.shape[0], gx.shape[1] // groups, gy.shape[1] // groups
        length = ((ngrid[0] - 1) * pgrid[1] + ngrid[1] - 1) * pgrid[2] + ngrid[2]
        planes = yg * pgrid[0] * pgrid[1] * pgrid[2]
        for job in prange(n_ * groups):
            n = job // groups
            g = job % groups
            flat = np.empty(planes, dtype=gx.dtype)
            acc = np.empty((cg, _padded(length)), dtype=gx.dtype)
            _transposed_job(gy[n, g * yg:(g + 1) * yg], w, g * cg, off, starts, gx[n, g * cg:(g + 1) * cg],
                            flat, acc, length, plo, pgrid, s, lo, mlo, ngrid)

    @njit(fastmath=True, cache=True)
    def _weight_job(x, gy, off, gw, flat, gflat, part, length, lo, s, grid):
        # gw (Cy/G, J) of one group, summed over the batch in order (in float64)
        total = np.zeros(gw.shape, dtype=np.float64)
        gflat[:] = 0     # positions between rows stay zero
        for n in range(x.shape[0]):
            _load(x[n], flat, lo[0], lo[1], lo[2], s[0], s[1], s[2], grid[0], grid[1], grid[2])
            for b in range(gflat.shape[0]):     # gflat (B, L) at the grid pitch <- gy[n]
                _scatter_plane(gy[n, b], gflat[b], grid[1] * grid[2], grid[2])
            _dots(part, gflat, flat, off, length)
            for b in range(gw.shape[0]):
                for j in range(gw.shape[1]):
                    total[b, j] += part[b, j]
        for b in range(gw.shape[0]):
            for j in range(gw.shape[1]):
                gw[b, j] = total[b, j]

    @reading("x", "gy", "off", "lo", "s", "grid")
    @njit(parallel=True, fastmath=True, cache=True)
    def backward_weight(x, gy, off, gw, groups, lo, s, grid):
        """gw (Cy, J) = sum over samples and outputs of gy times source j (as in forward)."""
        cg, yg = x.shape[1] // groups, gy.shape[1] // groups
        o0_, o1_, o2_ = gy.shape[2], gy.shape[3], gy.shape[4]
        length = ((o0_ - 1) * grid[1] + o1_ - 1) * grid[2] + o2_
        planes = cg * s[0] * s[1] * s[2] * grid[0] * grid[1] * grid[2]
        for g in prange(groups):
            flat = np.empty(planes, dtype=gw.dtype)
            gflat = np.empty((yg, _padded(length)), dtype=gw.dtype)
            part = np.empty((yg, gw.shape[1]), dtype=gw.dtype)
            _weight_job(x[:, g * cg:(g + 1) * cg], gy[:, g * yg:(g + 1) * yg], off, gw[g * yg:(g + 1) * yg],
                        flat, gflat, part, length, lo, s, grid)


# ---------------------------------------------------------------- plans (host side)

def _pad3(t, fill):
    return (fill,) * (3 - len(t)) + tuple(int(v) for v in t)


def _flat_index(pos, dims):
    at = 0
    for p, m in zip(pos, dims):
        at = at * m + p
    return at


def _reach(g):
    """Grid positions per phase a tap can reach, per dim: Q = d(k-1)//s + 1."""
    return [d * (k - 1) // s + 1 for k, d, s in zip(g.kernel, g.dilation, g.stride)]


@functools.lru_cache(maxsize=256)
def conv_plan(g):
    """Sources of the forward / weight-gradient loops: (offsets (Cx/G*K,), lo, s, grid).

    Source j = (c, k) in w's own order reads plane (r, c) at grid offset q, where per
    dim k*d = q*s + r; the grid holds Y - 1 + Q positions per dim, Q = d(k-1)//s + 1.
    """
    cg = g.x_channels // g.groups
    grid = _pad3([o - 1 + e for o, e in zip(g.y_size, _reach(g))], 1)
    s3 = _pad3(g.stride, 1)
    mtot = grid[0] * grid[1] * grid[2]
    offsets = []
    for c in range(cg):
        for tap in np.ndindex(*g.kernel):
            kd = [t * d for t, d in zip(tap, g.dilation)]
            r = _pad3([v % s for v, s in zip(kd, g.stride)], 0)
            q = _pad3([v // s for v, s in zip(kd, g.stride)], 0)
            offsets.append((_flat_index(r, s3) * cg + c) * mtot + _flat_index(q, grid))
    return (np.array(offsets, dtype=np.int64), np.array(_pad3(g.pad_lo, 0), dtype=np.int64),
            np.array(s3, dtype=np.int64), np.array(grid, dtype=np.int64))


@functools.lru_cache(maxsize=256)
def transposed_plan(g):
    """Sources of the input-gradient loop, grouped by the phase of the padded input.

    Phase r, grid position m (padded input m*s + r) gets tap k (k*d = q*s + r) of gy
    at o = m - q.  gy is placed so that plane position u = m - mlo + Q - 1 - q reads
    o: padding plo = Q - 1 - mlo before it.  Returns (offsets, starts, columns
    (co, k) of each source, plo, pgrid, s, lo, mlo, ngrid).
    """
    yg = g.y_channels // g.groups
    ext = _reach(g)
    mlo = [lo // s for lo, s in zip(g.pad_lo, g.stride)]
    mhi = [(x - 1 + lo) // s + 1 for x, lo, s in zip(g.x_size, g.pad_lo, g.stride)]
    ngrid = _pad3([b - a for a, b in zip(mlo, mhi)], 1)
    pgrid = _pad3([n + e - 1 for n, e in zip(ngrid[3 - g.nd:], ext)], 1)
    plo = _pad3([e - 1 - a for e, a in zip(ext, mlo)], 0)
    ptot = pgrid[0] * pgrid[1] * pgrid[2]
    s3 = _pad3(g.stride, 1)
    phases = {}
    for kf, tap in enumerate(np.ndindex(*g.kernel)):
        kd = [t * d for t, d in zip(tap, g.dilation)]
        r = _flat_index(_pad3([v % s for v, s in zip(kd, g.stride)], 0), s3)
        back = _pad3([e - 1 - v // s for v, s, e in zip(kd, g.stride, ext)], 0)
        phases.setdefault(r, []).append((kf, _flat_index(back, pgrid)))
    offsets, cols, starts = [], [], [0]
    for r in range(s3[0] * s3[1] * s3[2]):
        for co in range(yg):
            for kf, at in sorted(phases.get(r, []), key=lambda t: t[1]):
                offsets.append(co * ptot + at)
                cols.append((co, kf))
        starts.append(len(offsets))
    cols = np.array(cols, dtype=np.int64).reshape(-1, 2)
    return (np.array(offsets, dtype=np.int64), np.array(starts, dtype=np.int64), cols,
            np.array(plo, dtype=np.int64), np.array(pgrid, dtype=np.int64), np.array(s3, dtype=np.int64),
            np.array(_pad3(g.pad_lo, 0), dtype=np.int64), np.array(_pad3(mlo, 0), dtype=np.int64),
            np.array(ngrid, dtype=np.int64))


def transposed_weight(w, g, cols, dt):
    """(Cy, Cx/G, *k) -> (Cx, J): row (group, c), column j = w[(group, co_j), c, k_j]."""
    yg, cg = g.y_channels // g.groups, g.x_channels // g.groups
    v = np.asarray(w, dtype=dt).reshape(g.groups, yg, cg, -1).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(v[:, :, cols[:, 0], cols[:, 1]]).reshape(g.x_channels, len(cols))


def buffer_bytes(g, itemsize, threads):
    """Per-thread buffers of the three loops at once (a bound), times the threads."""
    cg, yg = g.x_channels // g.groups, g.y_channels // g.groups
    grid = int(np.prod(conv_plan(g)[3]))
    pgrid = int(np.prod(transposed_plan(g)[4]))
    planes = cg * int(np.prod(g.stride)) * grid
    return itemsize * threads * max(planes + 2 * yg * grid, (yg + cg) * pgrid)
