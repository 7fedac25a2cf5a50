"""Register-blocked direct convolution on the CPU (numba), channels last.

BLAS runs a convolution's GEMMs (64-256 channels, one GEMM per tap or an im2col
copy) at 55-100 GFLOP/s on two cores where oneDNN's direct kernels reach 130-170.
The difference is register blocking: oneDNN keeps a tile of outputs in vector
registers while it runs the whole sum over (tap, input channel).  This module
does the same:

* x is copied once to channels-last rows ``xl (positions, Cx)`` of its padded grid
  (the extent the windows read, as in the ``taps`` algorithm); kernel tap t of an
  output reads the row of its window corner plus ``offset_t``.  Outputs are taken
  in segments of one output row (``segments``), so a stride is a fixed step between
  the rows a tile reads and no position between rows is computed; only a segment's
  last tile computes a few outputs past its end, which are dropped.
* The micro-kernel (``_tile``, written as LLVM IR through numba's ``intrinsic``
  because numba cannot keep an array of accumulators in registers) computes
  ``C[i, 0:NR] (+)= sum_t sum_k A[i, k; t] * B[k, 0:NR; t]`` for MR rows: each step
  of k broadcasts MR elements of A and loads NR/VW vectors of B.  MR x NR is sized
  to fill the vector registers: NR = VW * nv with nv <= 4 vectors of 64 bytes
  (AVX-512; LLVM splits them on narrower machines) and MR = ``MR_FOR[nv]``.
* Forward: rows are MR outputs of a segment, columns up to 64 output channels,
  k runs over the input channels of every tap (``A`` = xl, ``B`` = the weights as
  (tap, Cx, Cy)).  The tile stays in registers for the whole sum (wide layers: for
  each chunk of input channels whose weights fit ``WEIGHT_BYTES``).
* Weight gradient: rows are MR input channels, columns output channels, k runs
  over the outputs of a run of segments (``A`` = xl shifted by the tap, ``B`` = a
  dense channels-last copy of gy).  The segments are cut into ``PARTS`` fixed
  ranges (not one per thread) summed in order afterwards, so results do not depend
  on the number of threads.
* The input gradient is the forward of the flipped kernel (the engine arranges it);
  when strided, one forward per phase of x (``transposed_phases``) with that phase's
  taps at negative offsets on gy's grid, written into x with a step (``y_step``).

Copies in (``pack``) go through per-position offset maps, so one loop serves 1-D,
2-D and 3-D, padding and groups, and move square blocks of positions by channels
through an in-register transpose; the forward copies each job's tile out to y while
it is still in cache.
"""
import functools
import itertools
import math

import numpy as np

from . import cpu_ir
from .cpu_ir import VECTOR_BYTES, reading

try:
    import numba
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from llvmlite import ir
except ImportError:  # the engine falls back to its BLAS paths
    numba = None

AVAILABLE = numba is not None
MR_FOR = (0, 16, 12, 8, 6)        # rows per tile for nv = 1..4 vectors of columns (measured)
SHORT = 2                          # a forward tile may take up to this many rows fewer (no tail waste)
# ... per vector count: 2 vectors (12 rows) also as 8 or 9, so that a row of 16 outputs is two
# tiles, not 24 rows (t3d_k4s2p1's input gradient: 32 channels, phases of 16 x 16 x 16)
SHORT_FOR = (0, SHORT, 4, SHORT, SHORT)
# ... and up to this many rows more, where that takes at most 2/3 of the tiles: 4 vectors by
# 7 rows make a row of 13-14 outputs two tiles, not three (c2d_resnet_s2's 14 x 14: forward
# 0.94x; rows of 56 as 7-row tiles were 1.09x slower than as 6 and 5)
LONG_FOR = (0, 0, 0, 0, 1)
PARTS = 4                          # fixed position ranges of the weight gradient
BLOCK_BYTES = 128 << 10            # rows of xl one forward job covers at most (measured 32-512 KiB)
# ... when strided: a job re-reads its weights, which serve fewer outputs per row of xl (the
# kernel's time at 128 KiB: c2d_resnet_s2 1.04x, t2d_dcgan_k4s2 1.11x, t3d_k4s2p1 1.01x; at
# 256 KiB stride 1 lost 5% on c2d_resnet3x3 and c3d_unet)
STRIDED_BLOCK_BYTES = 256 << 10
SEGMENT = 384                      # outputs of a row per segment at most
WEIGHT_BYTES = 128 << 10           # weights one forward pass over a job's tiles reads (measured 48-448 KiB)
TAP_BYTES = 16 << 10               # weight rows of one tap in a chunk: L1 keeps the tile's x rows across taps
GRADIENT_BYTES = 256 << 10         # rows of x and gy one weight-gradient tile call walks (measured)
JOBS = 32                          # weight gradient by runs: jobs per run at least (rows split in halves)
GRADIENT_RUNS = None               # weight gradient by runs (True), by parts (False), or by the rule below (None)
RUNS_BYTES = 128                   # ... by runs when PARTS copies of gw take this many bytes per position or more
GRADIENT_UNPACKED = True           # weight gradient reading x itself where unpadded and the tiles fit


def lanes(dtype):
    return VECTOR_BYTES // np.dtype(dtype).itemsize


def vectors(columns, dtype):
    """Vectors per tile for a column count (already a multiple of the lanes)."""
    return min(4, columns // lanes(dtype))


if AVAILABLE:
    def _make_tile(mr, nv):
        @intrinsic
        def tile(typingctx, c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate):
            """c[c_off + i*ldc + n] (+)= sum over t, k of a[a_off + toff_a[t] + i*a_rs + k*a_cs]
            * b[b_off + toff_b[t] + k*b_rs + n], for i < mr, n < nv vectors."""
            sig = types.void(c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)

            def codegen(context, builder, sig, args):
                (c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate) = args
                arrays = {i: context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 3, 7, 11, 12)}
                cp, ap, bp, tap, tbp = (arrays[i].data for i in (0, 3, 7, 11, 12))
                taps = builder.extract_value(arrays[11].shape, 0)
                vec = cpu_ir.vector_type(context.get_value_type(sig.args[0].dtype))
                i64 = ir.IntType(64)
                fma = cpu_ir.fma(builder, vec)
                # allocas in the entry block: mem2reg turns them into registers
                acc = [[cgutils.alloca_once(builder, vec) for _ in range(nv)] for _ in range(mr)]
                for row in acc:
                    for cell in row:
                        builder.store(ir.Constant(vec, None), cell)
                with cgutils.for_range(builder, taps) as tloop:
                    t = tloop.index
                    a_t = builder.gep(ap, [builder.add(a_off, builder.load(builder.gep(tap, [t])))])
                    b_t = builder.gep(bp, [builder.add(b_off, builder.load(builder.gep(tbp, [t])))])
                    with cgutils.for_range(builder, k_len) as kloop:
                        k = kloop.index
                        b_row = builder.gep(b_t, [builder.mul(k, b_rs)])
                        bv = [builder.load(cpu_ir.vector_at(builder, b_row, j, vec), align=1) for j in range(nv)]
                        a_col = builder.gep(a_t, [builder.mul(k, a_cs)])
                        for i in range(mr):
                            s = builder.load(builder.gep(a_col, [builder.mul(ir.Constant(i64, i), a_rs)]))
                            sv = cpu_ir.splat(builder, vec, s)
                            for j in range(nv):
                                builder.store(builder.call(fma, [sv, bv[j], builder.load(acc[i][j])]), acc[i][j])
                add = builder.icmp_signed("!=", accumulate, ir.Constant(accumulate.type, 0))
                for i in range(mr):
                    row = builder.gep(cp, [builder.add(c_off, builder.mul(ir.Constant(i64, i), ldc))])
                    for j in range(nv):
                        cpu_ir.store(builder, add, cpu_ir.vector_at(builder, row, j, vec), builder.load(acc[i][j]))
                return context.get_dummy_value()
            return sig, codegen
        return tile

    # every (vectors, rows) shape a tile call may take: MR_FOR[nv] rows, up to SHORT_FOR[nv] fewer
    # or LONG_FOR[nv] more
    _TILES = {(nv, mr): _make_tile(mr, nv) for nv in (1, 2, 3, 4)
              for mr in range(MR_FOR[nv] - SHORT_FOR[nv], MR_FOR[nv] + LONG_FOR[nv] + 1)}
    _ARGS = "c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate"

    def _dispatcher():
        """``_tile(nv, mr, c, ..., accumulate)``: the tile of nv vectors by mr rows (a shape
        of _TILES), as one if-chain written out for every shape (numba cannot index a
        tuple of different intrinsics)."""
        names = {f"_t{nv}_{mr}": tile for (nv, mr), tile in _TILES.items()}
        lines = [f"def _tile(nv, mr, {_ARGS}):"]
        for i, (nv, mr) in enumerate(_TILES):
            lines += [f"    {'elif' if i else 'if'} nv == {nv} and mr == {mr}:", f"        _t{nv}_{mr}({_ARGS})"]
        exec("\n".join(lines), names)
        return njit(inline="always")(names["_tile"])

    _tile = _dispatcher()

    @njit(inline="always")
    def _run_end(items, m, end, chunk):
        """End of the run from item m: up to ``chunk`` consecutive items of one length, before end."""
        n, m1 = items[m, 2], m + 1
        while m1 < end and m1 - m < chunk and items[m1, 2] == n:
            m1 += 1
        return m1

    @njit(inline="always")
    def _part_span(count, parts, part):
        """[m, end) of the items that fixed part ``part`` of ``parts`` sums."""
        per = (count + parts - 1) // parts
        return part * per, min(count, part * per + per)

    @njit(inline="always")
    def _columns(nv, ygp, n0, width):
        """(vectors, tile rows) of the column block starting at n0: a full one, or the narrower tail."""
        v = min(nv, (ygp - n0) // (width // nv))
        return v, MR_FOR[v]

    @intrinsic
    def _transposed_block(typingctx, x, x_off, plane, out, o_off, ldo):
        """out[o_off + p*ldo + i] = x[x_off + i*plane + p] for p, i < L (the lanes): L vector
        loads, an in-register transpose, L vector stores (a scalar copy of the same
        block: L*L loads from L pages)."""
        sig = types.void(x, x_off, plane, out, o_off, ldo)

        def codegen(context, builder, sig, args):
            xp = context.make_array(sig.args[0])(context, builder, args[0]).data
            op = context.make_array(sig.args[3])(context, builder, args[3]).data
            x_off, plane, o_off, ldo = args[1], args[2], args[4], args[5]
            vec = cpu_ir.vector_type(context.get_value_type(sig.args[0].dtype))
            i64 = ir.IntType(64)

            def at(base, offset, step, i):
                p = builder.gep(base, [builder.add(offset, builder.mul(ir.Constant(i64, i), step))])
                return builder.bitcast(p, vec.as_pointer())
            rows = [builder.load(at(xp, x_off, plane, i), align=1) for i in range(vec.count)]
            for p, column in enumerate(cpu_ir.transpose(builder, rows)):
                builder.store(column, at(op, o_off, ldo, p), align=1)
            return context.get_dummy_value()
        return sig, codegen

    @njit(inline="always")
    def _transposed_run(x, x_off, x_step, plane, out, o_off, o_step, ldo, n):
        """``_transposed_block`` along a run of n >= L blocks' worth: block k starts at
        x_off + k*x_step and o_off + k*o_step; the last one overlaps the one before it
        (rewriting the same values) instead of running past the run."""
        lanes = VECTOR_BYTES // out.itemsize
        for k in range(0, n, lanes):
            k0 = min(k, n - lanes)
            _transposed_block(x, x_off + k0 * x_step, plane, out, o_off + k0 * o_step, ldo)

    @njit(inline="always")
    def _gather_rows(x, s, cmap, out, q0, q1, j0, j1):
        """out[q, j] = x[s + q - q0 + cmap[j]] (zero where cmap[j] < 0) for q0 <= q < q1, j0 <= j < j1."""
        for q in range(q0, q1):
            for j in range(j0, j1):
                m = cmap[j]
                out[q, j] = x[s + q - q0 + m] if m >= 0 else 0

    @reading("x", "src", "cmap")
    @njit(parallel=True, cache=True)
    def pack(x, src, cmap, plane, out):
        """out[q, j] = x[src[q] + cmap[j]], zero where either is negative (padding, junk).

        Runs of positions that are consecutive in x (``src[q + 1] = src[q] + 1``), L or
        more long, go in blocks of L positions by L columns through ``_transposed_run``
        for each whole block of columns (L consecutive channels: cmap[b*L + i] =
        cmap[b*L] + i*plane).  Other columns and short runs are gathered element by
        element.  Measured against the gather alone (2 threads): 2.5x faster on an
        unpadded 16 MiB gy, 2.5x on c2d_dilated's padded x, 1.8x on c2d_resnet3x3's.
        """
        rows, cols = out.shape
        lanes = VECTOR_BYTES // out.itemsize
        whole = np.zeros(cols // lanes, np.bool_)
        for b in range(whole.shape[0]):
            whole[b] = cmap[b * lanes] >= 0
            for i in range(1, lanes):
                whole[b] &= cmap[b * lanes + i] == cmap[b * lanes] + i * plane
        span = 256
        for blk in prange((rows + span - 1) // span):
            q, end = blk * span, min(rows, blk * span + span)
            while q < end:
                s = src[q]
                if s < 0:
                    out[q, :] = 0
                    q += 1
                    continue
                e = q + 1
                while e < end and src[e] == s + (e - q):
                    e += 1
                if e - q < lanes:
                    _gather_rows(x, s, cmap, out, q, e, 0, cols)
                else:
                    for j0 in range(0, cols, lanes):
                        if j0 + lanes <= cols and whole[j0 // lanes]:
                            _transposed_run(x, s + cmap[j0], 1, plane, out, q * cols + j0, cols, cols, e - q)
                        else:
                            _gather_rows(x, s, cmap, out, q, e, j0, min(cols, j0 + lanes))
                q = e

    @reading("w", "taps")
    @njit(parallel=True, cache=True)
    def weights(w, taps, swap, out):
        """out[j, t, a, b] = w[j, b, a, taps[t]] (swap: w[j, a, b, taps[t]]), zero for b past
        w's extent: the kernel as a tile's B operand.  Blocks of 16 x 16 (a, b) keep the
        rows of w they read in L1 for every tap (NumPy's strided transpose of the same
        took 1.5 ms for 256 x 128 x 16 taps, this 0.4)."""
        ng, count, extent_a, padded = out.shape
        extent_b = w.shape[2] if swap else w.shape[1]
        blocks = (padded + 15) // 16
        for job in prange(ng * blocks):
            j, b0 = job // blocks, (job % blocks) * 16
            b1 = min(b0 + 16, padded)
            for a0 in range(0, extent_a, 16):
                for t in range(count):
                    k = taps[t]
                    for a in range(a0, min(a0 + 16, extent_a)):
                        row = out[j, t, a]
                        if swap:
                            for b in range(b0, min(b1, extent_b)):
                                row[b] = w[j, a, b, k]
                        else:
                            for b in range(b0, min(b1, extent_b)):
                                row[b] = w[j, b, a, k]
                        for b in range(max(b0, extent_b), b1):
                            row[b] = 0

    @reading("xl", "wl", "offsets", "items")
    @njit(parallel=True, fastmath=True, cache=True)
    def forward(xl, wl, offsets, groups, cg, yg, nv, kc, items, s_last, pitch, per_job, y_stride, y_step, y):
        """y = the convolution over segments of output rows.

        Segment i = items[i] = (grid position of its first output, offset of its channel 0
        in y, length n <= pitch): output p of it reads xl rows ``items[i, 0] + p*s_last +
        offsets[t]``.  A job is ``per_job`` segments times one group j times one block of
        columns (vectors) n0: it computes ``tile[p, col] = sum over taps t, channels k of
        xl[.., j*cg + k] * wl[j, t, k, n0 + col]`` for its segments (``pitch`` rows each) in
        chunks of ``kc`` channels, then copies channel c = j*yg + n0 + col out to
        ``y[offset + c*y_stride + q*y_step]`` for q < n (y_step > 1: one phase of a strided
        transposed convolution), through ``_transposed_block`` where y_step is 1.  The
        jobs of one run of segments follow each other, so a thread reads that run's rows
        of xl from its cache once per column block.
        """
        taps, ygp = wl.shape[1], wl.shape[3]
        ldx = xl.shape[1]
        lanes = VECTOR_BYTES // xl.itemsize
        xf, wf = xl.reshape(-1), wl.reshape(-1)
        toff_a = offsets * ldx
        toff_b = np.arange(taps) * (cg * ygp)
        width = nv * lanes
        blocks = (ygp + width - 1) // width
        count = items.shape[0]
        runs = (count + per_job - 1) // per_job
        for job in prange(runs * groups * blocks):
            run, rest = job // (groups * blocks), job % (groups * blocks)
            j, n0 = rest // blocks, (rest % blocks) * width
            i0, i1 = run * per_job, min(count, run * per_job + per_job)
            v, mr = _columns(nv, ygp, n0, width)
            ldt = v * lanes
            size = (i1 - i0) * pitch * ldt
            buf = np.empty(size + lanes, xl.dtype)
            skip = ((-buf.ctypes.data) % VECTOR_BYTES) // xl.itemsize      # 64-byte aligned rows
            tile = buf[skip:skip + size]
            for k0 in range(0, cg, kc):
                for i in range(i0, i1):
                    start, n = items[i, 0], items[i, 2]
                    # t tiles of base or base + 1 rows when that many fit the shapes, else
                    # tiles of mr rows, the last one computing rows past n (dropped)
                    t = (n + mr - 1) // mr
                    base = n // t
                    if base < mr - SHORT_FOR[v]:
                        base = mr
                    extra = max(0, n - base * t)
                    longer = (n + mr + LONG_FOR[v] - 1) // (mr + LONG_FOR[v])
                    if 3 * longer <= 2 * t:
                        t = longer
                        base, extra = n // t, n % t
                    p = 0
                    for q in range(t):
                        r = base + 1 if q < extra else base
                        _tile(v, r, tile, ((i - i0) * pitch + p) * ldt, ldt,
                              xf, (start + p * s_last) * ldx + j * cg + k0, s_last * ldx, 1,
                              wf, (j * taps * cg + k0) * ygp + n0, ygp, min(kc, cg - k0),
                              toff_a, toff_b, k0)
                        p += r
            columns = min(ldt, yg - n0)
            for i in range(i0, i1):
                d, n = items[i, 1], items[i, 2]
                first = (i - i0) * pitch * ldt
                at = d + (j * yg + n0) * y_stride
                # blocks of lanes x lanes through the transpose where y's rows are contiguous,
                # the rest element by element
                whole = columns // lanes * lanes if y_step == 1 and n >= lanes else 0
                for col in range(0, whole, lanes):
                    _transposed_run(tile, first + col, ldt, ldt, y, at + col * y_stride, 1, y_stride, n)
                for col in range(whole, columns):
                    for q in range(n):
                        y[at + col * y_stride + q * y_step] = tile[first + col + q * ldt]

    @reading("xl", "gyl", "offsets", "items")
    @njit(parallel=True, fastmath=True, cache=True)
    def weight_grad(xl, gyl, offsets, gw, groups, cg, nv, items, s_last, chunk):
        """gw[p, t, j, i, col] = sum over the segments of part p of xl[.., j*cg + i] * gyl[.., j*ygp + col].

        Segment items[m] = (grid position of its first output, its first row in gyl,
        length n): output q of it is gyl row ``items[m, 1] + q`` and reads xl row
        ``items[m, 0] + q*s_last + offsets[t]``.  Runs of up to ``chunk`` segments of one
        length are one tile call each (its taps loop walks the segments), so the tile
        stays in registers across them.  gw (PARTS, T, G, cgp, ygp) need not be zeroed: a
        part's first run writes its tiles, later ones add; cgp is a multiple of the tile
        rows and xl has columns up to (G-1)*cg + cgp.
        """
        parts, taps, cgp, ygp = gw.shape[0], gw.shape[1], gw.shape[3], gw.shape[4]
        ldy, ldx = gyl.shape[1], xl.shape[1]
        xf, yf = xl.reshape(-1), gyl.reshape(-1)
        width = nv * (VECTOR_BYTES // gyl.itemsize)
        count = items.shape[0]
        for part in prange(parts):
            out = gw[part].reshape(-1)
            m, end = _part_span(count, parts, part)
            if m >= end:
                out[:] = 0
            first = m
            while m < end:
                n, m1 = items[m, 2], _run_end(items, m, end, chunk)
                rows_a = items[m:m1, 0] * ldx
                rows_b = items[m:m1, 1] * ldy
                for t in range(taps):
                    for j in range(groups):
                        for n0 in range(0, ygp, width):
                            v, mr = _columns(nv, ygp, n0, width)
                            for i0 in range(0, cgp, mr):
                                _tile(v, mr, out, ((t * groups + j) * cgp + i0) * ygp + n0, ygp,
                                      xf, offsets[t] * ldx + j * cg + i0, 1, s_last * ldx,
                                      yf, j * ygp + n0, ldy, n, rows_a, rows_b, m > first)
                m = m1

    @reading("x", "x_taps", "x_rows", "gyl", "items")
    @njit(parallel=True, fastmath=True, cache=True)
    def weight_grad_parts_unpacked(x, plane, x_taps, x_rows, s_last, gyl, gw, groups, cg, nv, items, chunk):
        """``weight_grad`` reading x itself as ``weight_grad_unpacked`` does (rows of gw
        i < cg in tiles of MR_FOR[nv] or up to SHORT fewer rows): the same bits as the copy."""
        parts, taps, cgp, ygp = gw.shape[0], gw.shape[1], gw.shape[3], gw.shape[4]
        ldy = gyl.shape[1]
        yf = gyl.reshape(-1)
        width = nv * (VECTOR_BYTES // gyl.itemsize)
        count = items.shape[0]
        for part in prange(parts):
            out = gw[part].reshape(-1)
            m, end = _part_span(count, parts, part)
            if m >= end:
                out[:] = 0
            first = m
            while m < end:
                n, m1 = items[m, 2], _run_end(items, m, end, chunk)
                rows_a = x_rows[m:m1]
                rows_b = items[m:m1, 1] * ldy
                for t in range(taps):
                    for j in range(groups):
                        for n0 in range(0, ygp, width):
                            v, mr = _columns(nv, ygp, n0, width)
                            tiles = (cg + mr - 1) // mr          # of base or base + 1 rows
                            base, extra = cg // tiles, cg % tiles
                            for q in range(tiles):
                                i0, mq = q * base + min(q, extra), base + (1 if q < extra else 0)
                                _tile(v, mq, out, ((t * groups + j) * cgp + i0) * ygp + n0, ygp,
                                      x, x_taps[t] + (j * cg + i0) * plane, plane, s_last,
                                      yf, j * ygp + n0, ldy, n, rows_a, rows_b, m > first)
                m = m1

    @njit(cache=True)
    def gradient_runs(items, chunk):
        """[m0, m1) ranges of items, in order: up to ``chunk`` consecutive segments of one length."""
        count = items.shape[0]
        runs = np.empty((max(1, count), 2), np.int64)
        r, m = 0, 0
        while m < count:
            m1 = _run_end(items, m, count, chunk)
            runs[r, 0], runs[r, 1] = m, m1
            r += 1
            m = m1
        return runs[:r]

    @reading("xl", "gyl", "offsets", "items", "runs")
    @njit(parallel=True, fastmath=True, cache=True)
    def weight_grad_runs(xl, gyl, offsets, gw, groups, cg, nv, items, s_last, runs):
        """gw[t, j, i, col] = sum over all segments of xl[.., j*cg + i] * gyl[.., j*ygp + col].

        Segments as in ``weight_grad``; the runs (``gradient_runs``) are taken one after
        another, each split over threads by (tap, group, column block), each job adding
        its run to its own tiles of gw: every element of gw gets its sums in run order,
        whatever the number of threads, with no partial copies of gw to write and sum
        (4 parts of 1.2 MB and their sum were 4.6 of 15 ms for c2d_resnet_s2).  A job's
        run rows (GRADIENT_BYTES) and its tiles of gw stay in its core's L2 across runs.
        gw (T, G, cgp, ygp) need not be zeroed when there is a run.
        """
        taps, cgp, ygp = gw.shape[0], gw.shape[2], gw.shape[3]
        ldy, ldx = gyl.shape[1], xl.shape[1]
        xf, yf = xl.reshape(-1), gyl.reshape(-1)
        out = gw.reshape(-1)
        width = nv * (VECTOR_BYTES // gyl.itemsize)
        blocks = (ygp + width - 1) // width
        # rows of a job: all cgp, or halves while there are fewer than JOBS jobs (balance)
        split = 1
        while taps * groups * blocks * split < JOBS and cgp // (2 * split) >= 2 * MR_FOR[nv]:
            split *= 2
        if runs.shape[0] == 0:
            out[:] = 0
        for r in range(runs.shape[0]):
            m, m1 = runs[r, 0], runs[r, 1]
            n = items[m, 2]
            rows_a = items[m:m1, 0] * ldx
            rows_b = items[m:m1, 1] * ldy
            for job in prange(taps * groups * blocks * split):
                t, rest = job // (groups * blocks * split), job % (groups * blocks * split)
                j, rest = rest // (blocks * split), rest % (blocks * split)
                n0, h = (rest // split) * width, rest % split
                v, mr = _columns(nv, ygp, n0, width)
                tiles = cgp // mr
                for i0 in range(h * tiles // split * mr, (h + 1) * tiles // split * mr, mr):
                    _tile(v, mr, out, ((t * groups + j) * cgp + i0) * ygp + n0, ygp,
                          xf, offsets[t] * ldx + j * cg + i0, 1, s_last * ldx,
                          yf, j * ygp + n0, ldy, n, rows_a, rows_b, r > 0)

    @reading("x", "x_taps", "x_rows", "gyl", "items", "runs")
    @njit(parallel=True, fastmath=True, cache=True)
    def weight_grad_unpacked(x, plane, x_taps, x_rows, s_last, gyl, gw, groups, cg, nv, items, runs):
        """``weight_grad_runs`` reading x itself (flat, unpadded windows) instead of a
        channels-last copy: output q of segment m, tap t, channel c reads
        ``x[x_rows[m] + x_taps[t] + c*plane + q*s_last]``.  The cg rows of gw (of cgp) go
        in tiles of MR_FOR[nv] rows or up to SHORT fewer (``gradient_tiles`` checks they
        fit); each element gets its sums in the order of ``weight_grad_runs``, so the same
        bits.  A tile's rows are broadcasts from cg planes of x, each line of which serves
        16 / s_last outputs.
        """
        taps, cgp, ygp = gw.shape[0], gw.shape[2], gw.shape[3]
        ldy = gyl.shape[1]
        yf = gyl.reshape(-1)
        out = gw.reshape(-1)
        width = nv * (VECTOR_BYTES // gyl.itemsize)
        blocks = (ygp + width - 1) // width
        split = 1
        while taps * groups * blocks * split < JOBS and cg // (2 * split) >= 2 * MR_FOR[nv]:
            split *= 2
        if runs.shape[0] == 0:
            out[:] = 0
        for r in range(runs.shape[0]):
            m, m1 = runs[r, 0], runs[r, 1]
            n = items[m, 2]
            rows_a = x_rows[m:m1]
            rows_b = items[m:m1, 1] * ldy
            for job in prange(taps * groups * blocks * split):
                t, rest = job // (groups * blocks * split), job % (groups * blocks * split)
                j, rest = rest // (blocks * split), rest % (blocks * split)
                n0, h = (rest // split) * width, rest % split
                v, mr = _columns(nv, ygp, n0, width)
                tiles = (cg + mr - 1) // mr          # of base or base + 1 rows
                base, extra = cg // tiles, cg % tiles
                for q in range(h * tiles // split, (h + 1) * tiles // split):
                    i0, mq = q * base + min(q, extra), base + (1 if q < extra else 0)
                    _tile(v, mq, out, ((t * groups + j) * cgp + i0) * ygp + n0, ygp,
                          x, x_taps[t] + (j * cg + i0) * plane, plane, s_last,
                          yf, j * ygp + n0, ldy, n, rows_a, rows_b, r > 0)

    @reading("gw")
    @njit(parallel=True, fastmath=False, cache=True)
    def sum_parts(gw, cg, yg, out):
        """out[j, col, i, t] = sum over p in order of gw[p, t, j, i, col] (i < cg, col < yg).

        A job takes one row i of group j: it sums the parts' rows (t, j, i) whole into
        buf (taps, cols), then writes each column's taps to out.  (One column per job
        read a line of every part for each element it wrote: 2.3-2.6x slower.)
        """
        parts, taps, groups, cols = gw.shape[0], gw.shape[1], gw.shape[2], gw.shape[4]
        for job in prange(groups * cg):
            j, i = job // cg, job % cg
            buf = np.empty((taps, cols), gw.dtype)
            for t in range(taps):
                acc = buf[t]
                first = gw[0, t, j, i]
                for c in range(cols):
                    acc[c] = first[c]
                for p in range(1, parts):
                    more = gw[p, t, j, i]
                    for c in range(cols):
                        acc[c] += more[c]
            for c in range(yg):
                row = out[j, c, i]
                for t in range(taps):
                    row[t] = buf[t, c]


def gradient_tiles(rows, tile_rows):
    """Whether ``rows`` rows cut into tiles of mr or up to SHORT fewer for every mr of
    ``tile_rows`` (weight_grad_unpacked's tiles over gw's cg rows)."""
    return all(rows // -(-rows // mr) >= mr - SHORT for mr in tile_rows)


def round_up(n, m):
    return -(-n // m) * m


def aligned_empty(shape, dtype, zero=False):
    """An array whose data starts on a 64-byte boundary (NumPy's are 16-byte aligned, and
    every 64-byte vector load of a misaligned row splits across two cache lines)."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buf = (np.zeros if zero else np.empty)(nbytes + VECTOR_BYTES, np.uint8)
    skip = -buf.ctypes.data % VECTOR_BYTES
    return buf[skip:skip + nbytes].view(dtype).reshape(shape)


def forward_chunk(cg, taps, nv):
    """Input channels per forward pass: the weights of a chunk fit WEIGHT_BYTES and one tap's
    rows of them TAP_BYTES (measured: 64-byte rows, 64 channels of 4 taps 1.5x faster than 128)."""
    row = nv * VECTOR_BYTES
    return chunk(cg, max(8, min(TAP_BYTES // row, WEIGHT_BYTES // (taps * row))))


def chunk(total, most):
    """Equal chunks of at most ``most`` (not ``most, most, .., remainder``): the chunk length."""
    return -(-total // -(-total // max(1, most)))


@functools.lru_cache(maxsize=64)
def position_map(nb, extent, size, lo, channels, length):
    """Offsets of channel 0 of an (nb, channels, *size) array at each position of the
    padded grid (nb, *extent) (flattened, then extended with -1 to ``length``), or -1
    where the grid position is padding.  Grid position q holds element (q's
    coordinates - lo)."""
    offset = np.zeros((), np.int64)
    valid = np.ones((), bool)
    pitch = math.prod(size)
    for e, s, l, p in zip(extent, size, lo, [math.prod(size[i + 1:]) for i in range(len(size))]):
        c = np.arange(e) - l
        offset = np.add.outer(offset, c * p)
        valid = np.logical_and.outer(valid, (c >= 0) & (c < s))
    full = np.add.outer(np.arange(nb, dtype=np.int64) * channels * pitch, offset)
    full[:, ~valid] = -1
    out = np.full(length, -1, np.int64)
    out[:full.size] = full.reshape(-1)
    out.flags.writeable = False
    return out


@functools.lru_cache(maxsize=64)
def segments(g, length):
    """Output rows of geometry g (its last dim), cut into segments of at most ``length``.

    Returns (items (S, 3) of (grid position of the first output on the padded grid
    of ``need_extent(g)``, offset of its channel 0 in y, n), the same with the row
    of a dense channels-last copy of y in the second column).
    """
    need = tuple((o - 1) * s + d * (k - 1) + 1 for o, s, d, k in zip(g.y_size, g.stride, g.dilation, g.kernel))
    grid_pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]
    out = g.y_size[-1]
    grid = np.arange(g.batch, dtype=np.int64) * math.prod(need)      # (n, o_0, ..., o_{nd-2}) in order
    for o, s, p in zip(g.y_size[:-1], g.stride[:-1], grid_pitch[:-1]):
        grid = np.add.outer(grid, np.arange(o) * s * p).reshape(-1)
    dense = np.arange(grid.size, dtype=np.int64) * out                 # each row's first output in y, dense
    starts = np.arange(0, out, length)
    first = np.add.outer(grid, starts * g.stride[-1]).reshape(-1)
    n = np.minimum(length, out - starts)
    rows = np.add.outer(dense, starts).reshape(-1)
    sample = rows // math.prod(g.y_size)
    y_off = rows + sample * (g.y_channels - 1) * math.prod(g.y_size)
    counts = np.tile(n, grid.size)
    fwd = np.stack([first, y_off, counts], axis=1).astype(np.int64)
    bwd = np.stack([first, rows, counts], axis=1).astype(np.int64)
    fwd.flags.writeable = bwd.flags.writeable = False
    return fwd, bwd


@functools.lru_cache(maxsize=64)
def transposed_phases(g, length=SEGMENT):
    """The input gradient of a strided g as one stride-1 forward per phase of x.

    x index i = m*s + r - lo (per dim) is the sum over the taps k with k*d = q*s + r of
    gy[m - q] w[k].  gy goes channels last onto a padded grid ``need`` (gy element o at
    grid position o + ``lo``).  Returns (need, lo, parts), one part per phase with outputs:
    (items (S, 3) of (grid position of output m's gy element, offset of its channel 0 in x,
    n outputs of one x row, consecutive m), flat indices of the phase's taps in w (none:
    that phase of x is zero), their offsets on the grid (-q flattened)).
    """
    per_dim = []
    for size, s, d, k, lo in zip(g.x_size, g.stride, g.dilation, g.kernel, g.pad_lo):
        per = []
        for r in range(s):
            m0, m1 = -((r - lo) // s), (size - 1 + lo - r) // s
            ks = [t for t in range(k) if t * d % s == r]
            per.append((m0, max(0, m1 - m0 + 1), ks, [t * d // s for t in ks]))
        per_dim.append(per)
    lo_g, need = [], []
    for size, per in zip(g.y_size, per_dim):
        used = [(m0, n, qs) for m0, n, ks, qs in per if n and ks]
        low = min([m0 - max(qs) for m0, n, qs in used], default=0)
        high = max([m0 + n - 1 - min(qs) for m0, n, qs in used], default=0)
        lo_g.append(max(0, -low))
        need.append(max(lo_g[-1] + size, lo_g[-1] + high + 1))
    pitch = [math.prod(need[i + 1:]) for i in range(g.nd)]
    x_pitch = [math.prod(g.x_size[i + 1:]) for i in range(g.nd)]
    parts = []
    for rho in itertools.product(*(range(s) for s in g.stride)):
        sel = [per_dim[i][r] for i, r in enumerate(rho)]
        if any(n == 0 for _, n, _, _ in sel):
            continue
        taps, offsets = [], []
        for combo in itertools.product(*(range(len(ks)) for _, _, ks, _ in sel)):
            taps.append(int(np.ravel_multi_index(tuple(sel[i][2][c] for i, c in enumerate(combo)), g.kernel)))
            offsets.append(-sum(sel[i][3][c] * pitch[i] for i, c in enumerate(combo)))
        start = np.arange(g.batch, dtype=np.int64) * math.prod(need)
        y_off = np.arange(g.batch, dtype=np.int64) * g.x_channels * math.prod(g.x_size)
        for i in range(g.nd - 1):
            m = sel[i][0] + np.arange(sel[i][1])
            start = np.add.outer(start, (m + lo_g[i]) * pitch[i]).reshape(-1)
            y_off = np.add.outer(y_off, (m * g.stride[i] + rho[i] - g.pad_lo[i]) * x_pitch[i]).reshape(-1)
        m0, n = sel[-1][0], sel[-1][1]
        c0 = np.arange(0, n, length)
        m = m0 + c0
        first = np.add.outer(start, m + lo_g[-1]).reshape(-1)
        y_first = np.add.outer(y_off, m * g.stride[-1] + rho[-1] - g.pad_lo[-1]).reshape(-1)
        counts = np.tile(np.minimum(length, n - c0), start.size)
        items = np.stack([first, y_first, counts], axis=1).astype(np.int64)
        for a in (items, taps := np.array(taps, dtype=np.int64), offsets := np.array(offsets, dtype=np.int64)):
            a.flags.writeable = False
        parts.append((items, taps, offsets))
    return tuple(need), tuple(lo_g), parts
