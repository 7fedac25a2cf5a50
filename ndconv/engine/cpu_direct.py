"""Register-blocked direct convolution on the CPU (numba), channels last.

BLAS runs a convolution's GEMMs (64-256 channels, one GEMM per tap or an im2col
copy) at 55-100 GFLOP/s on two cores where oneDNN's direct kernels reach 130-170.
The difference is register blocking: oneDNN keeps a tile of outputs in vector
registers while it runs the whole sum over (tap, input channel).  This module
does the same:

* Data are channels last at the padded row pitch ("flat" layout): position q of
  ``xl (L + slack, Cx)`` is one padded-input position of one sample, and every
  kernel tap t reads position ``q + offset_t``, as in the ``taps`` algorithm.  The
  outputs are computed at the same pitch; positions between rows and past the end
  are computed and dropped when copied out.
* The micro-kernel (``_tile``, written as LLVM IR through numba's ``intrinsic``
  because numba cannot keep an array of accumulators in registers) computes
  ``C[i, 0:NR] (+)= sum_t sum_k A[i, k; t] * B[k, 0:NR; t]`` for MR rows: each step
  of k broadcasts MR elements of A and loads NR/VW vectors of B.  MR x NR is sized
  to fill the vector registers: NR = VW * nv with nv <= 4 vectors of 64 bytes
  (AVX-512; LLVM splits them on narrower machines) and MR = ``MR_FOR[nv]``.
* Forward: rows are MR output positions, columns are up to 64 output channels,
  k runs over the input channels of every tap (``A`` = xl, ``B`` = the weights as
  (tap, Cx, Cy)).  The tile stays in registers for the whole sum.
* Weight gradient: rows are MR input channels, columns output channels, k runs
  over positions (``A`` = xl shifted by the tap, ``B`` = gy in the same layout).
  The positions are cut into ``PARTS`` fixed ranges (not one per thread) summed
  in order afterwards, so results do not depend on the number of threads.
* The input gradient is the forward of the flipped kernel (the engine arranges it).

Copies in and out (``pack``/``unpack``) go through per-position offset maps, so
one pair of loops serves 1-D, 2-D and 3-D, padding and groups.
"""
import functools
import math

import numpy as np

try:
    import numba
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from llvmlite import ir
except ImportError:  # the engine falls back to its BLAS paths
    numba = None

AVAILABLE = numba is not None
VECTOR_BYTES = 64
MR_FOR = (0, 16, 12, 8, 6)        # rows per tile for nv = 1..4 vectors of columns (measured)
ROW_MULTIPLE = 48                  # a multiple of every MR: position counts are padded to it
PARTS = 4                          # fixed position ranges of the weight gradient
BLOCK = 96                         # output positions per forward job (x's rows stay in L2)
CHUNK = 64                         # positions per weight-gradient step (gy's rows stay in L1)


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
                scalar = context.get_value_type(sig.args[0].dtype)
                width = VECTOR_BYTES // (8 if scalar == ir.DoubleType() else 4)
                vec = ir.VectorType(scalar, width)
                i64, i32 = ir.IntType(64), ir.IntType(32)
                name = "llvm.fma.v%d%s" % (width, "f64" if scalar == ir.DoubleType() else "f32")
                fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)
                # allocas in the entry block: mem2reg turns them into registers
                acc = [[cgutils.alloca_once(builder, vec) for _ in range(nv)] for _ in range(mr)]
                for row in acc:
                    for cell in row:
                        builder.store(ir.Constant(vec, None), cell)
                undef = ir.Constant(vec, ir.Undefined)
                splat = ir.Constant(ir.VectorType(i32, width), [0] * width)
                with cgutils.for_range(builder, taps) as tloop:
                    t = tloop.index
                    a_t = builder.gep(ap, [builder.add(a_off, builder.load(builder.gep(tap, [t])))])
                    b_t = builder.gep(bp, [builder.add(b_off, builder.load(builder.gep(tbp, [t])))])
                    with cgutils.for_range(builder, k_len) as kloop:
                        k = kloop.index
                        b_row = builder.gep(b_t, [builder.mul(k, b_rs)])
                        bv = [builder.load(builder.bitcast(builder.gep(b_row, [ir.Constant(i64, width * j)]),
                                                           vec.as_pointer()), align=1) for j in range(nv)]
                        a_col = builder.gep(a_t, [builder.mul(k, a_cs)])
                        for i in range(mr):
                            s = builder.load(builder.gep(a_col, [builder.mul(ir.Constant(i64, i), a_rs)]))
                            sv = builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, splat)
                            for j in range(nv):
                                builder.store(builder.call(fma, [sv, bv[j], builder.load(acc[i][j])]), acc[i][j])
                add = builder.icmp_signed("!=", accumulate, ir.Constant(accumulate.type, 0))
                for i in range(mr):
                    row = builder.gep(cp, [builder.add(c_off, builder.mul(ir.Constant(i64, i), ldc))])
                    for j in range(nv):
                        p = builder.bitcast(builder.gep(row, [ir.Constant(i64, width * j)]), vec.as_pointer())
                        v = builder.load(acc[i][j])
                        builder.store(builder.select(add, builder.fadd(v, builder.load(p, align=1)), v), p, align=1)
                return context.get_dummy_value()
            return sig, codegen
        return tile

    _tile1, _tile2, _tile3, _tile4 = (_make_tile(MR_FOR[nv], nv) for nv in (1, 2, 3, 4))

    @njit(inline="always")
    def _tile(nv, c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate):
        if nv == 4:
            _tile4(c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)
        elif nv == 3:
            _tile3(c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)
        elif nv == 2:
            _tile2(c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)
        else:
            _tile1(c, c_off, ldc, a, a_off, a_rs, a_cs, b, b_off, b_rs, k_len, toff_a, toff_b, accumulate)

    @njit(parallel=True, cache=True)
    def pack(x, src, cmap, out):
        """out[q, j] = x[src[q] + cmap[j]], zero where either is negative (padding, junk)."""
        rows, cols = out.shape
        for blk in prange((rows + 63) // 64):
            for q in range(blk * 64, min(rows, blk * 64 + 64)):
                s = src[q]
                row = out[q]
                if s < 0:
                    row[:] = 0
                else:
                    for j in range(cols):
                        m = cmap[j]
                        row[j] = x[s + m] if m >= 0 else 0

    @njit(parallel=True, cache=True)
    def unpack(yl, dest, cols, stride, y):
        """y[dest[q] + c*stride] = yl[q, cols[c]] where dest[q] >= 0."""
        rows = yl.shape[0]
        for blk in prange((rows + 63) // 64):
            for q in range(blk * 64, min(rows, blk * 64 + 64)):
                d = dest[q]
                if d >= 0:
                    row = yl[q]
                    for c in range(cols.shape[0]):
                        y[d + c * stride] = row[cols[c]]

    @njit(parallel=True, fastmath=True, cache=True)
    def forward(xl, wl, offsets, yl, groups, cg, nv, block):
        """yl[q, j*ygp + n] = sum over taps t, channels k of xl[q + offsets[t], j*cg + k] * wl[j, t, k, n].

        xl (rows >= L + offsets[-1], >= G*cg); wl (G, T, cg, ygp); yl (L, G*ygp), L a
        multiple of ROW_MULTIPLE.
        """
        taps, ygp = wl.shape[1], wl.shape[3]
        rows, ldy, ldx = yl.shape[0], yl.shape[1], xl.shape[1]
        xf, wf, yf = xl.reshape(-1), wl.reshape(-1), yl.reshape(-1)
        toff_a = offsets * ldx
        toff_b = np.arange(taps) * (cg * ygp)
        width = nv * (VECTOR_BYTES // yl.itemsize)
        blocks = (rows + block - 1) // block
        for job in prange(blocks * groups):
            j = job % groups
            q0 = (job // groups) * block
            q1 = min(q0 + block, rows)
            for n0 in range(0, ygp, width):
                v = min(nv, (ygp - n0) // (width // nv))
                mr = MR_FOR[v]
                for q in range(q0, q1, mr):
                    _tile(v, yf, q * ldy + j * ygp + n0, ldy, xf, q * ldx + j * cg, ldx, 1,
                          wf, j * taps * cg * ygp + n0, ygp, cg, toff_a, toff_b, 0)

    @njit(parallel=True, fastmath=True, cache=True)
    def weight_grad(xl, gyl, offsets, gw, groups, cg, nv, chunk):
        """gw[p, t, j, i, n] = sum over q in part p of xl[q + offsets[t], j*cg + i] * gyl[q, j*ygp + n].

        gw (PARTS, T, G, cgp, ygp) zeroed, cgp a multiple of the tile rows; xl has
        columns up to (G-1)*cg + cgp.
        """
        parts, taps, cgp, ygp = gw.shape[0], gw.shape[1], gw.shape[3], gw.shape[4]
        rows, ldy, ldx = gyl.shape[0], gyl.shape[1], xl.shape[1]
        xf, yf = xl.reshape(-1), gyl.reshape(-1)
        none = np.zeros(1, np.int64)
        width = nv * (VECTOR_BYTES // gyl.itemsize)
        per = ((rows + parts - 1) // parts + chunk - 1) // chunk * chunk
        for p in prange(parts):
            out = gw[p].reshape(-1)
            for c0 in range(p * per, min(rows, (p + 1) * per), chunk):
                k_len = min(chunk, rows - c0)
                for t in range(taps):
                    for j in range(groups):
                        for n0 in range(0, ygp, width):
                            v = min(nv, (ygp - n0) // (width // nv))
                            mr = MR_FOR[v]
                            for i0 in range(0, cgp, mr):
                                _tile(v, out, ((t * groups + j) * cgp + i0) * ygp + n0, ygp,
                                      xf, (c0 + offsets[t]) * ldx + j * cg + i0, 1, ldx,
                                      yf, c0 * ldy + j * ygp + n0, ldy, k_len, none, none, 1)


def round_up(n, m):
    return -(-n // m) * m


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
