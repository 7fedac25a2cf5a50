"""Compiled (numba) loops for depthwise convolution on the CPU.

Depthwise convolutions (each group reads one input channel, with channel
multiplier M = Cy / Cx) do too little arithmetic per byte for BLAS; these loops
read each padded plane once per tap from L1 and vectorise along the last axis.
Every array is 5-D (N, C, D, H, W): 1-D and 2-D calls add unit axes.  Each
parallel iteration owns its output plane, so results do not depend on threading.

Stride 1 forward and input gradient run the sliding micro-kernel ``slide`` (LLVM
IR through numba's ``intrinsic``, as cpu_direct's tile): blocks of SLIDE_V vectors
of outputs stay in registers for the whole sum over taps, one unaligned load per
FMA.  1-D planes read x in place (``slide_row``); 2-D/3-D planes are padded into a
buffer and read flat at the padded pitch (``slide_taps``).  Long 1-D kernels of unit
dilation (``use_align``) copy each padded row into an aligned buffer and run
``align_slide`` instead, which makes the shifted vectors from aligned loads and
shuffles.  Other strides use the plain loops (``forward``, ``backward_input``); the
weight gradient uses ``flat_backward_weight`` (stride 1) or ``backward_weight``.
"""
import numpy as np

from . import cpu_ir
from .cpu_ir import VECTOR_BYTES, reading

try:
    import numba
    from numba import njit, prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic
    from llvmlite import ir
except ImportError:  # the engine falls back to im2col + BLAS
    numba = None

AVAILABLE = numba is not None
SLIDE_VECTORS = (4, 8, 12, 16)     # block widths of the sliding kernel that are compiled
SLIDE_V = 12                       # the one the drivers use (measured: 4-16 within noise; 12 a little ahead)
SLACK = VECTOR_BYTES // 4          # elements a source buffer must be readable past its last used one

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

    @reading("xp", "w")
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

    @reading("gy", "w")
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

    @reading("xp", "gy")
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
    # computed and dropped (forward and input gradient: slide_taps below; weight
    # gradient: flat_backward_weight).  The loops live in helpers: inside a prange body
    # numba lowers them without vectorising.

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

    @reading("x", "gy", "offsets")
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

if AVAILABLE:
    # The sliding micro-kernel (stride 1): out[o + i] (+)= sum_t w[w_off + t] * src[s_off + toff[t] + i]
    # for i < n.  Blocks of nv vectors keep their accumulators in registers for the whole
    # sum over taps: per tap one broadcast of w[t] and, per vector, one unaligned load
    # folded into an FMA.  The last block (fewer vectors) comes from a switch over
    # compiled narrower blocks; its last vector is stored lane by lane, so out is never
    # written past o + n, but src is read up to SLACK - 1 elements past the last element
    # the sum uses (the lanes past n are computed and dropped).  Written as LLVM IR
    # (as cpu_direct's tile): numba keeps no array of accumulators in registers.

    def _make_slide(nv):
        @intrinsic
        def slide(typingctx, out, o, src, s_off, toff, w, w_off, n, accumulate):
            sig = types.void(out, o, src, s_off, toff, w, w_off, n, accumulate)

            def codegen(context, builder, sig, args):
                i64 = ir.IntType(64)
                out_a, src_a, toff_a, w_a = (context.make_array(sig.args[i])(context, builder, args[i])
                                             for i in (0, 2, 4, 5))
                o, s_off, w_off, n, accumulate = (context.cast(builder, args[i], sig.args[i], types.int64)
                                                  for i in (1, 3, 6, 7, 8))
                taps = builder.extract_value(toff_a.shape, 0)
                scalar = context.get_value_type(sig.args[0].dtype)
                vec = cpu_ir.vector_type(scalar)
                width = vec.count
                fma = cpu_ir.fma(builder, vec)
                # allocas in the entry block: mem2reg turns them into registers
                acc = [cgutils.alloca_once(builder, vec) for _ in range(nv)]
                spill = cgutils.alloca_once(builder, vec)
                add = builder.icmp_signed("!=", accumulate, ir.Constant(i64, 0))
                out0 = builder.gep(out_a.data, [o])
                src0 = builder.gep(src_a.data, [s_off])
                w0 = builder.gep(w_a.data, [w_off])
                tp = toff_a.data

                def block(base, count, last=None):
                    # count vectors from element base; last: how many lanes of the last one to store
                    for cell in acc[:count]:
                        builder.store(ir.Constant(vec, None), cell)
                    with cgutils.for_range(builder, taps) as tloop:
                        t = tloop.index
                        sv = cpu_ir.splat(builder, vec, builder.load(builder.gep(w0, [t])))
                        row = builder.gep(src0, [builder.add(base, builder.load(builder.gep(tp, [t])))])
                        for j in range(count):
                            x = builder.load(cpu_ir.vector_at(builder, row, j, vec), align=1)
                            builder.store(builder.call(fma, [sv, x, builder.load(acc[j])]), acc[j])
                    dst = builder.gep(out0, [base])
                    for j in range(count if last is None else count - 1):
                        cpu_ir.store(builder, add, cpu_ir.vector_at(builder, dst, j, vec), builder.load(acc[j]))
                    if last is not None:
                        builder.store(builder.load(acc[count - 1]), spill)
                        lanes = builder.bitcast(spill, scalar.as_pointer())
                        tail = builder.gep(dst, [ir.Constant(i64, width * (count - 1))])
                        with cgutils.for_range(builder, last) as e:
                            q = builder.gep(tail, [e.index])
                            cpu_ir.store(builder, add, q, builder.load(builder.gep(lanes, [e.index])), align=None)

                span = ir.Constant(i64, nv * width)
                blocks = builder.sdiv(n, span)
                with cgutils.for_range(builder, blocks) as bloop:
                    block(builder.mul(bloop.index, span), nv)
                base = builder.mul(blocks, span)
                rem = builder.sub(n, base)
                wide = ir.Constant(i64, width)
                count = builder.sdiv(builder.add(rem, ir.Constant(i64, width - 1)), wide)
                last = builder.sub(rem, builder.mul(builder.sub(count, ir.Constant(i64, 1)), wide))
                done = builder.append_basic_block("slide_done")
                switch = builder.switch(count, done)        # count 0 (n a multiple of the span): nothing left
                for c in range(1, nv + 1):
                    case = builder.append_basic_block("slide_tail%d" % c)
                    switch.add_case(ir.Constant(i64, c), case)
                    builder.position_at_end(case)
                    block(base, c, last)
                    builder.branch(done)
                builder.position_at_end(done)
                return context.get_dummy_value()
            return sig, codegen
        return slide

    _slides = {nv: _make_slide(nv) for nv in SLIDE_VECTORS}
    _slide4, _slide8, _slide12, _slide16 = (_slides[nv] for nv in SLIDE_VECTORS)

    @njit(inline="always")
    def slide(nv, out, o, src, s_off, toff, w, w_off, n, accumulate):
        """out[o + i] (+)= sum_t w[w_off + t] * src[s_off + toff[t] + i] for i < n, in blocks of nv vectors."""
        if nv == 16:
            _slide16(out, o, src, s_off, toff, w, w_off, n, accumulate)
        elif nv == 12:
            _slide12(out, o, src, s_off, toff, w, w_off, n, accumulate)
        elif nv == 8:
            _slide8(out, o, src, s_off, toff, w, w_off, n, accumulate)
        else:
            _slide4(out, o, src, s_off, toff, w, w_off, n, accumulate)

    # The aligned sliding kernel (1-D, stride 1, unit dilation, long kernels).  Output
    # vector v reads, for tap j = s + LANES*q, the source vector from element LANES*(v + q) + s:
    # one shuffle (valignd) of the aligned vectors v + q and v + q + 1.  The taps go by
    # shift s, q and q + 1 together, so each shifted vector feeds two FMAs (outputs v and
    # v - 1).  ``slide`` instead loads every (tap, vector) unaligned, 15 of 16 of them
    # split across two cache lines, and is bound by its loads.
    ALIGN_R = 12                   # output vectors per block (accumulators in registers)
    ALIGN_ROWS = (2, 3, 4)         # vectors of taps (rounded up) it is compiled for, unrolled

    def _make_align_slide(nv, rows):
        @intrinsic
        def align_slide(typingctx, out, o, src, s_off, w, w_off, taps, n, accumulate, ahead):
            sig = types.void(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead)

            def codegen(context, builder, sig, args):
                i64 = ir.IntType(64)
                out_a, src_a, w_a, ahead_a = (context.make_array(sig.args[i])(context, builder, args[i])
                                              for i in (0, 2, 4, 9))
                o, s_off, w_off, taps, n, accumulate = (context.cast(builder, args[i], sig.args[i], types.int64)
                                                        for i in (1, 3, 5, 6, 7, 8))
                vec = cpu_ir.vector_type(context.get_value_type(sig.args[0].dtype))
                width = vec.count
                fma = cpu_ir.fma(builder, vec)
                acc = [cgutils.alloca_once(builder, vec) for _ in range(nv)]
                add = builder.icmp_signed("!=", accumulate, ir.Constant(i64, 0))
                out0 = builder.gep(out_a.data, [o])
                src0 = builder.gep(src_a.data, [s_off])
                w0 = builder.gep(w_a.data, [w_off])

                def c(v):
                    return ir.Constant(i64, v)

                def shifted(row, v, s):
                    # the vector from element width*v + s of row
                    if s % 3 == 2:
                        # an unaligned load (a split line) instead of a shuffle: shuffles share
                        # port 5 with the FMAs, loads have ports of their own (measured: a
                        # third of the shifts as loads, 1.1x)
                        return builder.load(cpu_ir.vector_at(builder, builder.gep(row, [c(s)]), v, vec), align=1)
                    lo = builder.load(cpu_ir.vector_at(builder, row, v, vec), align=1)
                    if s == 0:
                        return lo
                    hi = builder.load(cpu_ir.vector_at(builder, row, v + 1, vec), align=1)
                    # as integers: LLVM picks valignd/valignq, not vpermt2ps (which overwrites a source)
                    ivec = ir.VectorType(ir.IntType(32 if width == 16 else 64), width)
                    mask = ir.Constant(ir.VectorType(ir.IntType(32), width), list(range(s, s + width)))
                    both = builder.shuffle_vector(builder.bitcast(lo, ivec), builder.bitcast(hi, ivec), mask)
                    return builder.bitcast(both, vec)

                def block(p, count):
                    # count output vectors from vector p
                    cells = acc[:count]
                    dst = builder.gep(out0, [builder.mul(p, c(width))])
                    # from memory while the block computes: the lines it stores, and as many
                    # of ahead (the caller's next source row)
                    ahead = builder.gep(ahead_a.data, [builder.mul(p, c(width))])
                    for j in range(count):
                        cpu_ir.prefetch(builder, cpu_ir.vector_at(builder, dst, j, vec), write=True)
                        cpu_ir.prefetch(builder, cpu_ir.vector_at(builder, ahead, j, vec))
                    for cell in cells:
                        builder.store(ir.Constant(vec, None), cell)
                    # out read here, not added at the end (LLVM hoists those loads and spills
                    # the accumulators: 3x slower), and only to add to: a read of a fresh
                    # page maps the zero page, and the store then faults a second time
                    with builder.if_then(add):
                        for j, cell in enumerate(cells):
                            builder.store(builder.load(cpu_ir.vector_at(builder, dst, j, vec), align=1), cell)

                    def fmas(row, q, s, taps):
                        # taps t*width + s for the taps rows t from q: tap q + i of output v - i
                        ws = [cpu_ir.splat(builder, vec, builder.load(builder.gep(w0, [c(t * width + s)])))
                              for t in range(q, q + taps)]
                        for v in range(count + taps - 1):
                            x = shifted(row, v, s)
                            for i, wv in enumerate(ws):
                                if 0 <= v - i < count:
                                    builder.store(builder.call(fma, [wv, x, builder.load(cells[v - i])]), cells[v - i])

                    for q in range(0, rows, 2):
                        row = builder.gep(src0, [builder.mul(builder.add(p, c(q)), c(width))])
                        pair = min(2, rows - q)
                        for s in range(width):
                            # row through an empty asm: each shift loads its vectors again (else
                            # LLVM keeps them all in registers, spills, and uses vpermt2ps)
                            seen = builder.asm(ir.FunctionType(row.type, [row.type]), "", "=r,0", [row], False)
                            if q + pair < rows:
                                fmas(seen, q, s, pair)
                                continue
                            # the last row of taps: tap s of it may be past the end
                            there = builder.icmp_signed("<", c((rows - 1) * width + s), taps)
                            with builder.if_else(there) as (yes, no):
                                with yes:
                                    fmas(seen, q, s, pair)
                                with no:
                                    if pair > 1:
                                        fmas(seen, q, s, pair - 1)
                    for j, cell in enumerate(cells):
                        builder.store(builder.load(cell), cpu_ir.vector_at(builder, dst, j, vec), align=1)

                # blocks of nv vectors, then of 4, then single ones
                done = c(0)
                for size in (nv, 4, 1):
                    count = builder.sdiv(builder.sub(n, done), c(size))
                    start = done
                    with cgutils.for_range(builder, count) as bl:
                        block(builder.add(start, builder.mul(bl.index, c(size))), size)
                    done = builder.add(done, builder.mul(count, c(size)))
                return context.get_dummy_value()
            return sig, codegen
        return align_slide

    _align2, _align3, _align4 = (_make_align_slide(ALIGN_R, rows) for rows in ALIGN_ROWS)

    @njit(inline="always")
    def align_slide(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead):
        """out[o + i] (+)= sum_{j < taps} w[w_off + j] * src[s_off + i + j] for i < LANES*n (n
        whole vectors; taps from LANES + 1 to 4*LANES).  src + s_off should lie on a 64-byte
        boundary (the loads are meant aligned), and every element the sum reads must lie
        inside src.  The first LANES*n elements of ahead (the caller's next source row) are
        prefetched on the way."""
        rows = (taps + _lanes(out) - 1) // _lanes(out)
        if rows == 2:
            _align2(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead)
        elif rows == 3:
            _align3(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead)
        else:
            _align4(out, o, src, s_off, w, w_off, taps, n, accumulate, ahead)

    @njit(inline="always")
    def _lanes(a):
        return VECTOR_BYTES // a.itemsize

    @njit(cache=True)
    def use_align(k, span, lanes):
        """Whether align_slide beats slide for k taps spanning span: unit dilation, 20 taps or
        more, in 2-4 vectors the last at least a quarter full.  Measured (1-D rows of 2048,
        one thread, time against slide's): float32 16, 24, 31, 40, 48, 64 taps 0.68-0.93x,
        but 8-12, 17-20, 33, 65 taps 1.0-1.45x; float64 20-32 taps 0.74-0.90x, 12 taps 1.1x."""
        rows = (k + lanes - 1) // lanes
        return k == span and k >= 20 and ALIGN_ROWS[0] <= rows <= ALIGN_ROWS[-1] and 4 * k >= 3 * rows * lanes

    @reading("src", "w", "offsets")
    @njit(parallel=True, fastmath=True, cache=True)
    def slide_taps(src, w, offsets, out, o0_, o1_, o2_, lo0, lo1, lo2, p0_, p1_, p2_, mult, gather, rows):
        """out (N, C_out, O0*O1*O2) from padded planes of src (N, C_src, ...) and w (Cy*K).

        Forward (gather False): out channel j reads src channel j // mult with w[j].
        Input gradient (gather True, w flipped, src = gy with the complementary padding):
        out channel c sums src channels c*mult + m with w[c*mult + m].

        rows: one kernel call per output row, straight into out (long rows); else one
        call over the whole plane at the padded pitch into a buffer, copied out without
        the wrap-around positions (short rows).
        """
        n_, cout = out.shape[0], out.shape[1]
        k = offsets.shape[0]
        length = ((o0_ - 1) * p1_ + o1_ - 1) * p2_ + o2_
        size = p0_ * p1_ * p2_
        for job in prange(n_ * cout):
            n = job // cout
            j = job % cout
            plane = np.empty(size + SLACK, dtype=out.dtype)
            plane[size:] = 0
            dst = out[n, j]
            acc = np.empty(0 if rows else length, dtype=out.dtype)
            for m in range(mult if gather else 1):
                row = j * mult + m if gather else j
                _load_plane(src[n, row if gather else j // mult], plane, lo0, lo1, lo2, p0_, p1_, p2_)
                if rows:
                    for a in range(o0_):
                        for b in range(o1_):
                            slide(SLIDE_V, dst, (a * o1_ + b) * o2_, plane, (a * p1_ + b) * p2_, offsets, w,
                                  row * k, o2_, m)
                else:
                    slide(SLIDE_V, acc, 0, plane, 0, offsets, w, row * k, length, m)
            if not rows:
                _store_plane(acc, dst.reshape(o0_, o1_, o2_), p1_ * p2_, p2_)

    @njit(fastmath=True, cache=True)
    def _edge(row, buf, q0, count, lo):
        # buf[e] = padded row[q0 + e] for e < count (x[q - lo] inside x, zero outside), then SLACK zeros
        x_len = row.shape[0]
        for e in range(count):
            i = q0 + e - lo
            buf[e] = row[i] if 0 <= i < x_len else 0
        buf[count:count + SLACK] = 0

    @njit(cache=True)
    def _aligned_zeros(size, like):
        # size zeros of like's dtype from a 64-byte boundary
        lanes = VECTOR_BYTES // like.itemsize
        buf = np.zeros(size + lanes, dtype=like.dtype)
        skip = -(buf.ctypes.data // like.itemsize) % lanes
        return buf[skip:skip + size]

    @njit(fastmath=True, cache=True)
    def _copy(src, dst):
        # dst[:] = src[:len(dst)], in a helper: inside a prange body the loop is not vectorised
        for e in range(dst.shape[0]):
            dst[e] = src[e]

    @reading("src", "w", "offsets")
    @njit(parallel=True, fastmath=True, cache=True)
    def slide_row(src, w, offsets, out, lo, mult, gather):
        """slide_taps for planes of one row (1-D).

        src (N, C_src, X), out (N, C_out, O).  Kernels that align_slide takes faster
        (use_align): each row is copied into an aligned buffer with its padding, and
        align_slide computes the whole vectors of outputs from it (slide the last few).
        Other kernels read the row in place (slide) where the window (and the vector the
        kernel reads past it) lies inside x, and a small padded copy of the row's ends.
        """
        n_, cout, o_ = out.shape[0], out.shape[1], out.shape[2]
        x_len = src.shape[2]
        k = offsets.shape[0]
        span = offsets[k - 1] + 1 if k else 1
        lanes = VECTOR_BYTES // out.itemsize
        aligned = use_align(k, span, lanes)
        whole = o_ // lanes * lanes if aligned else 0                 # outputs from align_slide
        copied = max(0, min(x_len, o_ + span - 1 - lo))               # elements of x any output reads
        i0 = min(o_, lo)                                              # first output read from x itself
        i1 = min(o_, max(i0, x_len + lo - span - SLACK + 2))          # end of those
        size = max(i0, o_ - i1) + span + SLACK
        if aligned:
            size = o_ + span + SLACK
        chunk = 8
        for part in prange((n_ * cout + chunk - 1) // chunk):
            buf = _aligned_zeros(size, out)
            for job in range(part * chunk, min(n_ * cout, part * chunk + chunk)):
                n = job // cout
                j = job % cout
                dst = out[n, j]
                for m in range(mult if gather else 1):
                    c = j * mult + m if gather else j
                    row = src[n, c if gather else j // mult]
                    if aligned:
                        # the row the next call copies, fetched while this one computes
                        nxt = min(n_ * cout - 1, job + 1)
                        ahead = src[nxt // cout, nxt % cout * mult if gather else nxt % cout // mult]
                        # buf: the padded row (the zeros outside x stay from the allocation)
                        _copy(row, buf[lo:lo + copied])
                        align_slide(dst, 0, buf, 0, w, c * k, k, whole // lanes, m, ahead)
                        if o_ > whole:
                            slide(SLIDE_V, dst, whole, buf, whole, offsets, w, c * k, o_ - whole, m)
                        continue
                    if i0 > 0:
                        _edge(row, buf, 0, i0 + span - 1, lo)
                        slide(SLIDE_V, dst, 0, buf, 0, offsets, w, c * k, i0, m)
                    if i1 > i0:
                        slide(SLIDE_V, dst, i0, row, i0 - lo, offsets, w, c * k, i1 - i0, m)
                    if o_ > i1:
                        _edge(row, buf, i1, o_ - i1 + span - 1, lo)
                        slide(SLIDE_V, dst, i1, buf, 0, offsets, w, c * k, o_ - i1, m)


def as5d(a, nd):
    """(N, C, *s) -> (N, C, 1.., *s) with 5 dims, a view."""
    return a.reshape(a.shape[:2] + (1,) * (3 - nd) + a.shape[2:])


def pad3(t, nd, fill):
    return (fill,) * (3 - nd) + tuple(t)
