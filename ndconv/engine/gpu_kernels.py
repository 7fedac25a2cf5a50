"""CUDA C++ sources of the GPU engine, one module per (dimension count, dtype).

The dimension count is a compile-time constant (so per-dimension loops unroll into
registers) while the geometry itself travels as a small device array of 64-bit
ints, so a new shape never triggers a compilation.  Layout of that array:

    [N, Cx, Cy, G, X[nd], Y[nd], K[nd], S[nd], D[nd], L[nd]]

(x sizes, y sizes, kernel, stride, dilation, low padding).  Every flat index is a
``long long``: tensors over 2^31 elements are indexed correctly.  float16 is
stored as raw 16-bit words and converted with the PTX ``cvt`` instructions (no
header needed) and accumulated in float32.

Kernels:
  im2col            x -> columns (Cx*K, nb, P) for output rows a..a+rows
  col2im_store      columns -> gx (gather: each x element sums its (tap, output)
                    pairs in a fixed order; full output rows, so each x is written once)
  col2im_add        the same, added into a float buffer of one sample (row chunks)
  dw_forward        depthwise (Cx/G == 1, any multiplier) forward, gather
  dw_backward_input depthwise input gradient, gather (no zeros inserted for strides)
  dw_wgrad_partial  depthwise weight gradient, stage 1: per-block partial sums
  dw_wgrad_final    stage 2: fixed-order sum of the partials
"""

WGRAD_THREADS = 256

# Loads and stores of the storage type T in the accumulation type ACC: float16 goes
# through PTX conversions (no cuda_fp16.h needed).
_HALF_IO = r"""#if IS_HALF
__device__ __forceinline__ ACC ld(const T* p, i64 i) {
    float f;
    unsigned short h = p[i];
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ void st(T* p, i64 i, ACC v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p[i] = h;
}
#else
__device__ __forceinline__ ACC ld(const T* p, i64 i) { return (ACC)p[i]; }
__device__ __forceinline__ void st(T* p, i64 i, ACC v) { p[i] = (T)v; }
#endif"""

_TEMPLATE = r"""
#define ND __ND__
#define IS_HALF __IS_HALF__
#define WG_THREADS __WG_THREADS__
typedef long long i64;
typedef __STORAGE__ T;
typedef __ACC__ ACC;

__HALF_IO__

// The index type of the im2col family: int where every flat index of the call fits
// in 31 bits (the host picks that module), else 64-bit.  32-bit division is several
// times cheaper than 64-bit on the GPU, and these kernels divide per element.
typedef __IX__ ix;

template <typename I> struct GeoT {
    I N, Cx, Cy, G;
    I X[ND], Y[ND], K[ND], S[ND], D[ND], L[ND];
};
typedef GeoT<i64> Geo;

// GEO_CONST (a module compiled for one geometry): the sizes are compile-time constants
// instead of the p array, so every division by them is a multiply and shift.
template <typename I = i64>
__device__ __forceinline__ GeoT<I> load_geo(const i64* __restrict__ p_) {
#ifdef GEO_CONST
    constexpr i64 p[] = {GEO_CONST};
#else
    const i64* __restrict__ p = p_;
#endif
    GeoT<I> g;
    g.N = (I)p[0]; g.Cx = (I)p[1]; g.Cy = (I)p[2]; g.G = (I)p[3];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
        g.X[d] = (I)p[4 + d];
        g.Y[d] = (I)p[4 + ND + d];
        g.K[d] = (I)p[4 + 2 * ND + d];
        g.S[d] = (I)p[4 + 3 * ND + d];
        g.D[d] = (I)p[4 + 4 * ND + d];
        g.L[d] = (I)p[4 + 5 * ND + d];
    }
    return g;
}

template <typename I>
__device__ __forceinline__ I prod3(const I* v) {
    I p = 1;
#pragma unroll
    for (int d = 0; d < ND; ++d) p *= v[d];
    return p;
}

// Odometer over the kernel taps, last dimension fastest (the weight's layout).
template <typename I>
__device__ __forceinline__ void next_tap(I* k, const GeoT<I>& g) {
#pragma unroll
    for (int d = ND - 1; d >= 0; --d) {
        if (++k[d] < g.K[d]) return;
        k[d] = 0;
    }
}

#define GRID_LOOP(i, total) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (i64)blockDim.x * gridDim.x)

__TF32_SPLIT__
// ------------------------------------------------------------------ im2col / col2im

// cols[r = c*K + tap, n, p] = x[n0+n, c, o*S - L + k*D] (zero outside), where p runs
// over output rows a..a+rows (first dim) and all of the other output dims.  Grid:
// y over the rows r (the tap's offsets are worked out once per row), x over (n, p).
// With ``lo`` (not null) cols gets each value's TF32 hi part and lo its lo part; row r
// goes to row r + (r / R) * E of both (E = R: every group's R hi rows followed by its R
// lo rows, with lo = cols + R * Q; E = 0: plain rows).
extern "C" __global__ void im2col(const T* __restrict__ x, ACC* __restrict__ cols, ACC* __restrict__ lo,
                                  i64 R_, i64 E_, const i64* __restrict__ gp,
                                  i64 n0_, i64 nb_, i64 a_, i64 rows_) {
    const GeoT<ix> g = load_geo<ix>(gp);
    const ix n0 = (ix)n0_, nb = (ix)nb_, a = (ix)a_;
    ix Yc[ND];
#ifdef ROWS_FULL
    Yc[0] = g.Y[0];                      // every output row: a compile-time P
#else
    Yc[0] = (ix)rows_;
#endif
#pragma unroll
    for (int d = 1; d < ND; ++d) Yc[d] = g.Y[d];
    const ix P = prod3(Yc), K = prod3(g.K), Q = nb * P;
    for (ix r = blockIdx.y; r < g.Cx * K; r += gridDim.y) {
        ix tap = r % K;
        const ix c = r / K;
        ix first[ND];                    // input position of output 0 for this tap
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) {
            first[d] = (tap % g.K[d]) * g.D[d] - g.L[d] + (d == 0 ? a * g.S[0] : 0);
            tap /= g.K[d];
        }
        const i64 row = (i64)r + ((i64)r / R_) * E_;
        ACC* out = cols + row * Q;
        for (ix q = blockIdx.x * blockDim.x + threadIdx.x; q < Q; q += blockDim.x * gridDim.x) {
            ix p = q % P;
            const ix n = q / P;
            ix pos[ND];
            bool inside = true;
#pragma unroll
            for (int d = ND - 1; d >= 0; --d) {
                ix o = p;
                if (d > 0) { o = p % Yc[d]; p /= Yc[d]; }
                const ix i = o * g.S[d] + first[d];
                pos[d] = i;
                inside = inside && i >= 0 && i < g.X[d];
            }
            ACC v = 0;
            if (inside) {
                ix off = (n0 + n) * g.Cx + c;
#pragma unroll
                for (int d = 0; d < ND; ++d) off = off * g.X[d] + pos[d];
                v = ld(x, off);
            }
            if (lo) {
                ACC h, l;
                tf32_split(v, h, l);
                out[q] = h;
                lo[row * Q + q] = l;
            } else {
                out[q] = v;
            }
        }
    }
}

// The taps k of one dim (in increasing order) that input position t = i + L reaches an
// output through: t - k*D a multiple of S, output o = (t - k*D)/S - lo in [0, Y).  With
// D == 1 they are every S-th tap from t mod S, found without a division per tap
// (3x faster col2im on an H200 than testing every tap).
struct DimHits {
    ix t, K, S, D, lo, Y, k, q;
    __device__ __forceinline__ DimHits(ix t_, ix K_, ix S_, ix D_, ix lo_, ix Y_)
        : t(t_), K(K_), S(S_), D(D_), lo(lo_), Y(Y_), k(0), q(0) {
        if (D == 1 && t >= 0) { q = t / S; k = t - q * S; }
    }
    __device__ __forceinline__ bool next(ix& kk, ix& o) {
        while (k < K) {
            const ix tk = t - k * D;
            if (tk < 0) return false;
            ix ok;
            kk = k;
            if (D == 1) { ok = q; q -= 1; k += S; }
            else { ok = tk / S; k += 1; if (ok * S != tk) continue; }
            ok -= lo;
            if (ok < 0) return false;      // o only falls as k grows
            if (ok < Y) { o = ok; return true; }
        }
        return false;
    }
};

// Sum over taps (flat tap order) of the columns that x[n, c, i] fed.  i[0] is absolute.
// The loops run per dim, so an inner dim is only visited for the outer taps that hit.
__device__ __forceinline__ ACC col2im_sum(const ACC* __restrict__ gcols, const GeoT<ix>& g,
                                          const ix* Yc, ix P, ix K, ix nb, ix n, ix c,
                                          const ix* i, ix a) {
    const ACC* base = gcols + ((i64)c * K * nb + n) * P;
    const i64 ts = (i64)nb * P;          // between consecutive taps
    ACC acc = 0;
    DimHits h0(i[0] + g.L[0], g.K[0], g.S[0], g.D[0], a, Yc[0]);
    ix k0, o0;
    while (h0.next(k0, o0)) {
#if ND == 1
        acc += base[k0 * ts + o0];
#else
        DimHits h1(i[1] + g.L[1], g.K[1], g.S[1], g.D[1], 0, Yc[1]);
        ix k1, o1;
        while (h1.next(k1, o1)) {
#if ND == 2
            acc += base[(k0 * g.K[1] + k1) * ts + o0 * Yc[1] + o1];
#else
            DimHits h2(i[2] + g.L[2], g.K[2], g.S[2], g.D[2], 0, Yc[2]);
            ix k2, o2;
            while (h2.next(k2, o2))
                acc += base[((k0 * g.K[1] + k1) * g.K[2] + k2) * ts + (o0 * Yc[1] + o1) * Yc[2] + o2];
#endif
        }
#endif
    }
    return acc;
}

// gx[n0:n0+nb] from the columns of all output rows: every element written once.
extern "C" __global__ void col2im_store(const ACC* __restrict__ gcols, T* __restrict__ gx,
                                        const i64* __restrict__ gp, i64 n0, i64 nb_) {
    const GeoT<ix> g = load_geo<ix>(gp);
    const ix nb = (ix)nb_;
    const ix P = prod3(g.Y), K = prod3(g.K), XS = prod3(g.X);
    const ix total = nb * g.Cx * XS;
    for (ix idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += blockDim.x * gridDim.x) {
        ix r = idx;
        ix i[ND];
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) { i[d] = r % g.X[d]; r /= g.X[d]; }
        const ix c = r % g.Cx;
        const ix n = r / g.Cx;
        st(gx, n0 * g.Cx * XS + idx, col2im_sum(gcols, g, g.Y, P, K, nb, n, c, i, 0));
    }
}

// buf (one sample, (Cx, *X), ACC) += contributions of output rows a..a+rows, over the
// input rows i0..i0+irows that those outputs read.
extern "C" __global__ void col2im_add(const ACC* __restrict__ gcols, ACC* __restrict__ buf,
                                      const i64* __restrict__ gp, i64 a_, i64 rows_,
                                      i64 i0_, i64 irows_) {
    const GeoT<ix> g = load_geo<ix>(gp);
    const ix a = (ix)a_, i0 = (ix)i0_, irows = (ix)irows_;
    ix Yc[ND];
    Yc[0] = (ix)rows_;
#pragma unroll
    for (int d = 1; d < ND; ++d) Yc[d] = g.Y[d];
    const ix P = prod3(Yc), K = prod3(g.K), XS = prod3(g.X);
    const ix total = g.Cx * irows * (XS / g.X[0]);
    for (ix idx = blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += blockDim.x * gridDim.x) {
        ix r = idx;
        ix i[ND];
#pragma unroll
        for (int d = ND - 1; d >= 1; --d) { i[d] = r % g.X[d]; r /= g.X[d]; }
        i[0] = i0 + r % irows;
        const ix c = r / irows;
        ix off = c;
#pragma unroll
        for (int d = 0; d < ND; ++d) off = off * g.X[d] + i[d];
        buf[off] += col2im_sum(gcols, g, Yc, P, K, 1, 0, c, i, a);
    }
}

// ------------------------------------------------------------------ depthwise (Cx/G == 1)

// y[n, co, o] = sum_k w[co, k] x[n, co/M, o*S - L + k*D]
extern "C" __global__ void dw_forward(const T* __restrict__ x, const T* __restrict__ w,
                                      T* __restrict__ y, const i64* __restrict__ gp) {
    const Geo g = load_geo(gp);
    const i64 M = g.Cy / g.Cx, K = prod3(g.K), XS = prod3(g.X), YS = prod3(g.Y);
    const i64 total = g.N * g.Cy * YS;
    GRID_LOOP(idx, total) {
        i64 r = idx;
        i64 o[ND];
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) { o[d] = r % g.Y[d]; r /= g.Y[d]; }
        const i64 co = r % g.Cy;
        const i64 n = r / g.Cy;
        const T* xc = x + (n * g.Cx + co / M) * XS;
        const T* wc = w + co * K;
        i64 k[ND];
#pragma unroll
        for (int d = 0; d < ND; ++d) k[d] = 0;
        ACC acc = 0;
        for (i64 tap = 0; tap < K; ++tap) {
            bool ok = true;
            i64 off = 0;
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const i64 i = o[d] * g.S[d] - g.L[d] + k[d] * g.D[d];
                ok = ok && i >= 0 && i < g.X[d];
                off = off * g.X[d] + i;
            }
            if (ok) acc += ld(wc, tap) * ld(xc, off);
            next_tap(k, g);
        }
        st(y, idx, acc);
    }
}

// gx[n, c, i] = sum_m sum_k w[c*M+m, k] gy[n, c*M+m, (i + L - k*D)/S] over the taps
// where that division is exact and in range: a gather, so a strided transposed
// convolution never sees inserted zeros.
extern "C" __global__ void dw_backward_input(const T* __restrict__ gy, const T* __restrict__ w,
                                             T* __restrict__ gx, const i64* __restrict__ gp) {
    const Geo g = load_geo(gp);
    const i64 M = g.Cy / g.Cx, K = prod3(g.K), XS = prod3(g.X), YS = prod3(g.Y);
    const i64 total = g.N * g.Cx * XS;
    GRID_LOOP(idx, total) {
        i64 r = idx;
        i64 i[ND];
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) { i[d] = r % g.X[d]; r /= g.X[d]; }
        const i64 c = r % g.Cx;
        const i64 n = r / g.Cx;
        ACC acc = 0;
        for (i64 m = 0; m < M; ++m) {
            const i64 co = c * M + m;
            const T* gyc = gy + (n * g.Cy + co) * YS;
            const T* wc = w + co * K;
            i64 k[ND];
#pragma unroll
            for (int d = 0; d < ND; ++d) k[d] = 0;
            for (i64 tap = 0; tap < K; ++tap) {
                bool ok = true;
                i64 off = 0;
#pragma unroll
                for (int d = 0; d < ND; ++d) {
                    const i64 t = i[d] + g.L[d] - k[d] * g.D[d];
                    const i64 o = t >= 0 ? t / g.S[d] : -1;
                    ok = ok && t >= 0 && o * g.S[d] == t && o < g.Y[d];
                    off = off * g.Y[d] + o;
                }
                if (ok) acc += ld(wc, tap) * ld(gyc, off);
                next_tap(k, g);
            }
        }
        st(gx, idx, acc);
    }
}

// Stage 1: block `part` = (co, tap, s) sums gy*x over slice s of the N*prod(Y) outputs,
// a fixed tree reduction in shared memory; no atomics, so the result never varies.
extern "C" __global__ void dw_wgrad_partial(const T* __restrict__ x, const T* __restrict__ gy,
                                            ACC* __restrict__ partial, const i64* __restrict__ gp,
                                            i64 splits) {
    __shared__ ACC sh[WG_THREADS];
    const Geo g = load_geo(gp);
    const i64 M = g.Cy / g.Cx, K = prod3(g.K), XS = prod3(g.X), YS = prod3(g.Y);
    const i64 len = g.N * YS;
    const i64 span = (len + splits - 1) / splits;
    const i64 nparts = g.Cy * K * splits;
    for (i64 part = blockIdx.x; part < nparts; part += gridDim.x) {
        const i64 s = part % splits;
        const i64 ct = part / splits;
        i64 tap = ct % K;
        const i64 co = ct / K;
        const i64 c = co / M;
        i64 k[ND];
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) { k[d] = tap % g.K[d]; tap /= g.K[d]; }
        const i64 j0 = s * span;
        const i64 j1 = min(len, j0 + span);
        ACC acc = 0;
        for (i64 j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
            const i64 op = j % YS;
            const i64 n = j / YS;
            i64 r = op;
            i64 o[ND];
#pragma unroll
            for (int d = ND - 1; d >= 0; --d) { o[d] = r % g.Y[d]; r /= g.Y[d]; }
            bool ok = true;
            i64 off = 0;
#pragma unroll
            for (int d = 0; d < ND; ++d) {
                const i64 i = o[d] * g.S[d] - g.L[d] + k[d] * g.D[d];
                ok = ok && i >= 0 && i < g.X[d];
                off = off * g.X[d] + i;
            }
            if (ok) acc += ld(gy, (n * g.Cy + co) * YS + op) * ld(x, (n * g.Cx + c) * XS + off);
        }
        sh[threadIdx.x] = acc;
        __syncthreads();
        for (int half = WG_THREADS / 2; half > 0; half >>= 1) {
            if (threadIdx.x < half) sh[threadIdx.x] += sh[threadIdx.x + half];
            __syncthreads();
        }
        if (threadIdx.x == 0) partial[part] = sh[0];
        __syncthreads();
    }
}

// Stage 2: gw[co, tap] = sum over s of partial[(co, tap), s], in order.
extern "C" __global__ void dw_wgrad_final(const ACC* __restrict__ partial, T* __restrict__ gw,
                                          const i64* __restrict__ gp, i64 splits) {
    const Geo g = load_geo(gp);
    const i64 total = g.Cy * prod3(g.K);
    GRID_LOOP(idx, total) {
        ACC acc = 0;
        for (i64 s = 0; s < splits; ++s) acc += partial[idx * splits + s];
        st(gw, idx, acc);
    }
}
"""

_TYPES = {
    "float16": ("unsigned short", "float", 1),
    "float32": ("float", "float", 0),
    "float64": ("double", "double", 0),
}


# The two TF32 parts of a float: round to nearest (ties away) at fraction bit 13;
# infinities and NaN keep lo = 0 (tf32_split_reference in the tests is the same in
# NumPy).  Used by im2col here and by gpu_blas's split kernels.  Doubles are never
# split: hi = v, lo = 0.
TF32_SPLIT = r"""
__device__ __forceinline__ void tf32_split(float v, float& hi, float& lo) {
    if (!isfinite(v)) { hi = v; lo = 0.0f; return; }
    const unsigned int u = __float_as_uint(v);
    float h = __uint_as_float((u + 0x1000u) & 0xffffe000u);
    if (!isfinite(h)) h = __uint_as_float(u & 0xffffe000u);   // rounding up overflowed
    hi = h;
    lo = __uint_as_float((__float_as_uint(v - h) + 0x1000u) & 0xffffe000u);   // v - h is exact
}
__device__ __forceinline__ void tf32_split(double v, double& hi, double& lo) { hi = v; lo = 0.0; }
"""


# The TF32 parts of a float32 array of up to 4 dims (any strides), written where
# gpu_blas's split and stacked operands want them: hi at hi + D(i), lo at lo + D(i),
# and, with h2 >= 0, hi again at hi + h2 + D(i), where D and the source offset are
# the dims' strides (elements) dotted with the index.  p = [n1, n2, n3, s0..s3,
# d0..d3, h2] (n0 is implied by the row count).  Grid: x along the last dim, y over
# the rows (the other three dims), so each row's offsets are worked out once.
STACK_SOURCE = r"""
typedef long long i64;
""" + TF32_SPLIT + r"""
// vec: every row of the last dim is contiguous and 16-byte aligned in src, hi, lo and
// hi + h2, n3 a multiple of 4: float4 loads and stores, 4 values per thread.
extern "C" __global__ void tf32_stack(const float* __restrict__ src, float* __restrict__ hi,
                                      float* __restrict__ lo, const i64* __restrict__ p, i64 rows, int vec) {
    const i64 n1 = p[0], n2 = p[1], n3 = p[2];
    const i64 s0 = p[3], s1 = p[4], s2 = p[5], s3 = p[6];
    const i64 d0 = p[7], d1 = p[8], d2 = p[9], d3 = p[10], h2 = p[11];
    for (i64 r = blockIdx.y; r < rows; r += gridDim.y) {
        const i64 i2 = r % n2, t = r / n2;
        const i64 i1 = t % n1, i0 = t / n1;
        const float* s = src + i0 * s0 + i1 * s1 + i2 * s2;
        const i64 d = i0 * d0 + i1 * d1 + i2 * d2;
        if (vec) {
            for (i64 i = 4 * ((i64)blockIdx.x * blockDim.x + threadIdx.x); i < n3; i += 4 * (i64)blockDim.x * gridDim.x) {
                const float4 v = *reinterpret_cast<const float4*>(s + i);
                float4 h, l;
                tf32_split(v.x, h.x, l.x);
                tf32_split(v.y, h.y, l.y);
                tf32_split(v.z, h.z, l.z);
                tf32_split(v.w, h.w, l.w);
                *reinterpret_cast<float4*>(hi + d + i) = h;
                *reinterpret_cast<float4*>(lo + d + i) = l;
                if (h2 >= 0) *reinterpret_cast<float4*>(hi + d + i + h2) = h;
            }
            continue;
        }
        for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n3; i += (i64)blockDim.x * gridDim.x) {
            float h, l;
            tf32_split(s[i * s3], h, l);
            const i64 o = d + i * d3;
            hi[o] = h;
            lo[o] = l;
            if (h2 >= 0) hi[o + h2] = h;
        }
    }
}
"""


# out[j] = sum over i of a[i, j], i in order (a: (n, m), C order): a batch sum whose
# rounding never depends on the launch.
SUM_BATCH_SOURCE = r"""
typedef long long i64;
template <typename T>
__device__ __forceinline__ void sum_batch(const T* __restrict__ a, T* __restrict__ out, i64 n, i64 m) {
    for (i64 j = (i64)blockIdx.x * blockDim.x + threadIdx.x; j < m; j += (i64)blockDim.x * gridDim.x) {
        T s = a[j];
        for (i64 i = 1; i < n; ++i) s += a[i * m + j];
        out[j] = s;
    }
}
extern "C" __global__ void sum_batch_f(const float* a, float* out, i64 n, i64 m) { sum_batch(a, out, n, m); }
extern "C" __global__ void sum_batch_d(const double* a, double* out, i64 n, i64 m) { sum_batch(a, out, n, m); }
"""


def source(nd, dtype_name, index32=False, geometry=None):
    """The CUDA source for ``nd`` spatial dims and one of float16/float32/float64.

    ``index32``: the im2col family indexes with 32-bit ints (the caller checks that
    every flat index of the call fits).  ``geometry``: the parameter array's values
    (see ``load_geo``), compiled in as constants (``im2col`` then also assumes a chunk
    of every output row)."""
    if nd not in (1, 2, 3):
        raise ValueError(f"nd must be 1, 2 or 3, got nd={nd!r}")
    try:
        storage, acc, is_half = _TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype must be float16, float32 or float64, got dtype={dtype_name!r}") from None
    head = "" if geometry is None else \
        f"#define GEO_CONST {', '.join(str(int(v)) for v in geometry)}\n#define ROWS_FULL 1\n"
    return head + (_TEMPLATE.replace("__HALF_IO__", _HALF_IO).replace("__TF32_SPLIT__", TF32_SPLIT)
            .replace("__ND__", str(nd)).replace("__IS_HALF__", str(is_half))
            .replace("__WG_THREADS__", str(WGRAD_THREADS)).replace("__IX__", "int" if index32 else "i64")
            .replace("__STORAGE__", storage).replace("__ACC__", acc))


# ====================================================================== depthwise, tiled
#
# One module per (dtype, kernel, stride, dilation, tile shape): every loop over taps
# and over a thread's outputs has compile-time bounds, so it unrolls into registers.
# Every problem is seen as 3-D (Z, Y, X): a 1-D or 2-D geometry has leading dims of
# size 1 (kernel 1, stride 1, dilation 1, no padding).  Sizes, paddings and counts
# are 64-bit kernel arguments.
#
# A block of NT = BX*BY threads owns a tile of TY = BY rows by TX = BX*VX outputs of
# one (n, channel, output depth) plane; thread (bx, by) computes the VX consecutive
# outputs row by, columns bx*VX .. bx*VX+VX-1.  The input rows those outputs read
# (all KZ depth taps, tile + halo) are loaded once into shared memory, coalesced
# along X, with zeros outside the input.  Each thread then reads, per (kz, ky) tap
# row, the window of WIN consecutive values its VX outputs need into registers
# (vector loads of VEC values when the tile layout keeps them aligned), and does
# all KX taps from registers.
#
# Kernels:
#   dw_tiled_forward    y[n, co] = sum_k w[co, k] x[n, co/M, o*S - L + k*D]
#   dw_tiled_backward   stride 1 only: gx[n, c] = sum_m (gy[n, c*M+m] correlated with
#                       the flipped w[c*M+m]) with padding (K-1)*D - L: the same
#                       tile code, reading gy
#   dw_tiled_wgrad      per block: partial sums of gy*x for all taps of one channel
#                       over a fixed chunk of (n, depth, tile) steps, reduced inside
#                       the block in a fixed order -> partial[co, chunk, tap]
#   dw_tiled_wgrad_final  gw[co, tap] = sum over chunks, in order
# No atomics anywhere: the results are bitwise reproducible.

# A thread's window of one shared-memory row into registers, VEC values per load.
_LOAD_WIN = r"""// win[0 .. WINV) = row[0 .. WINV); row is VEC-aligned (the layouts keep row starts multiples of VEC).
__device__ __forceinline__ void load_win(const ACC* row, ACC* win) {
#if VEC == 4
#pragma unroll
    for (int j = 0; j < WINV; j += 4) {
        const VT q = *reinterpret_cast<const VT*>(row + j);
        win[j] = q.x; win[j + 1] = q.y; win[j + 2] = q.z; win[j + 3] = q.w;
    }
#elif VEC == 2
#pragma unroll
    for (int j = 0; j < WINV; j += 2) {
        const VT q = *reinterpret_cast<const VT*>(row + j);
        win[j] = q.x; win[j + 1] = q.y;
    }
#else
#pragma unroll
    for (int j = 0; j < WINV; ++j) win[j] = row[j];
#endif
}
"""


_TILED_TEMPLATE = r"""
#define IS_HALF __IS_HALF__
typedef long long i64;
typedef __STORAGE__ T;
typedef __ACC__ ACC;
typedef __VEC_T__ VT;

__HALF_IO__

#define KZ __KZ__
#define KY __KY__
#define KX __KX__
#define SZ __SZ__
#define SY __SY__
#define SX __SX__
#define DZ __DZ__
#define DY __DY__
#define DX __DX__
#define BX __BX__
#define BY __BY__
#define VX __VX__
#define VEC __VEC__
#define USE_WIN __USE_WIN__

#define NT (BX * BY)
#define NWARPS (NT / 32)
#define TX (BX * VX)
#define TY BY
#define KT (KZ * KY * KX)
#define IH ((TY - 1) * SY + (KY - 1) * DY + 1)
#define WIN ((VX - 1) * SX + (KX - 1) * DX + 1)
#define WINV (((WIN + VEC - 1) / VEC) * VEC)
#define IWP ((BX - 1) * VX * SX + WINV)
#define TILE (KZ * IH * IWP)
#define LOAD_BATCH (((TILE + NT - 1) / NT) < 8 ? ((TILE + NT - 1) / NT) : 8)

// The tile of the input plane `src` (sizes XZ, XY, XX) that output tile (oz, oy0, ox0)
// reads: rows iy0 .. iy0+IH-1 of the KZ depth slices iz0 + kz*DZ, columns ix0 ..
// ix0+IWP-1; zero outside the plane.
__device__ __forceinline__ void load_tile(ACC* sx, const T* __restrict__ src, i64 iz0, i64 iy0,
                                          i64 ix0, i64 XZ, i64 XY, i64 XX) {
    // Batches of LOAD_BATCH loads per thread are issued before their stores to shared
    // memory, so that many loads are in flight at once.
    const int tid = threadIdx.x;
#pragma unroll 1
    for (int i0 = 0; i0 < TILE; i0 += LOAD_BATCH * NT) {
        ACC v[LOAD_BATCH];
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const int i = i0 + b * NT + tid;
            v[b] = 0;
            if (i < TILE) {
                const int col = i % IWP;
                const int r = i / IWP;
                const int yy = r % IH;
                const int kz = r / IH;
                const i64 iz = iz0 + (i64)kz * DZ, iy = iy0 + yy, ix = ix0 + col;
                if (iz >= 0 && iz < XZ && iy >= 0 && iy < XY && ix >= 0 && ix < XX)
                    v[b] = ld(src, (iz * XY + iy) * XX + ix);
            }
        }
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const int i = i0 + b * NT + tid;
            if (i < TILE) sx[i] = v[b];
        }
    }
}

// q = a / b, r = a % b for 0 <= a, 0 < b, in 32 bits when both fit (much cheaper).
__device__ __forceinline__ void divmod(i64 a, i64 b, i64& q, i64& r) {
    if (((a | b) >> 32) == 0) {
        const unsigned ua = (unsigned)a, ub = (unsigned)b;
        const unsigned uq = ua / ub;
        q = uq;
        r = ua - uq * ub;
    } else {
        q = a / b;
        r = a - q * b;
    }
}

__LOAD_WIN__
// acc[v] += sum over the taps of w * tile, for the thread's VX outputs.
__device__ __forceinline__ void conv_tile(const ACC* sx, const ACC* sw, int bx, int by, ACC* acc) {
#pragma unroll
    for (int kz = 0; kz < KZ; ++kz) {
#pragma unroll
        for (int ky = 0; ky < KY; ++ky) {
            const ACC* row = sx + (kz * IH + by * SY + ky * DY) * IWP + bx * VX * SX;
            const ACC* wk = sw + (kz * KY + ky) * KX;
#if USE_WIN
            ACC win[WINV];
            load_win(row, win);
#pragma unroll
            for (int kx = 0; kx < KX; ++kx) {
                const ACC wv = wk[kx];
#pragma unroll
                for (int v = 0; v < VX; ++v) acc[v] += wv * win[v * SX + kx * DX];
            }
#else
#pragma unroll 4
            for (int kx = 0; kx < KX; ++kx) {
                const ACC wv = wk[kx];
#pragma unroll
                for (int v = 0; v < VX; ++v) acc[v] += wv * row[v * SX + kx * DX];
            }
#endif
        }
    }
}

// FLIP == 0: forward, out channel oc reads input channel oc / M with weight row oc.
// FLIP == 1: input gradient (stride 1), out channel oc sums input channels oc*R + q,
//            q < R, each with its weight row flipped over every axis.
// Grid: x = tile of the plane (ty * tiles_x + tx), y = (out channel, output depth)
// (grid-stride), z = sample (grid-stride): no 64-bit division per tile.
template <int FLIP>
__device__ __forceinline__ void dw_tiled_conv(const T* __restrict__ x, const T* __restrict__ w,
                                              T* __restrict__ y, i64 Cout, i64 Cin, i64 M, i64 R,
                                              i64 XZ, i64 XY, i64 XX, i64 YZ, i64 YY, i64 YX,
                                              i64 LZ, i64 LY, i64 LX, i64 tiles_x, i64 N) {
    __shared__ __align__(16) ACC sx[TILE];
    __shared__ ACC sw[KT];
    const int tid = threadIdx.x, bx = tid % BX, by = tid / BX;
    const i64 XS = XZ * XY * XX, YS = YZ * YY * YX;
    const unsigned tyu = blockIdx.x / (unsigned)tiles_x;
    const i64 ty = tyu, tx = blockIdx.x - tyu * (unsigned)tiles_x;
    const i64 ox0 = tx * TX, oy0 = ty * TY, oy = oy0 + by;
    const i64 CZ = Cout * YZ;
    for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
        for (i64 cz = blockIdx.y; cz < CZ; cz += gridDim.y) {
            i64 oc, oz;
            if (YZ == 1) { oc = cz; oz = 0; } else divmod(cz, YZ, oc, oz);
            ACC acc[VX];
#pragma unroll
            for (int v = 0; v < VX; ++v) acc[v] = 0;
            for (i64 q = 0; q < R; ++q) {
                const i64 ic = FLIP ? oc * R + q : oc / M;
                const i64 wrow = FLIP ? ic : oc;
                __syncthreads();                       // the previous step is done with sx, sw
                for (int i = tid; i < KT; i += NT) sw[i] = ld(w, wrow * KT + (FLIP ? KT - 1 - i : i));
                load_tile(sx, x + (n * Cin + ic) * XS, oz * SZ - LZ, oy0 * SY - LY, ox0 * SX - LX, XZ, XY, XX);
                __syncthreads();
                conv_tile(sx, sw, bx, by, acc);
            }
            if (oy < YY) {
                T* yo = y + (n * Cout + oc) * YS + (oz * YY + oy) * YX;
#pragma unroll
                for (int v = 0; v < VX; ++v) {
                    const i64 ox = ox0 + bx * VX + v;
                    if (ox < YX) st(yo, ox, acc[v]);
                }
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT)
dw_tiled_forward(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
                 i64 Cout, i64 Cin, i64 M, i64 R, i64 XZ, i64 XY, i64 XX, i64 YZ, i64 YY, i64 YX,
                 i64 LZ, i64 LY, i64 LX, i64 tiles_x, i64 N) {
    dw_tiled_conv<0>(x, w, y, Cout, Cin, M, R, XZ, XY, XX, YZ, YY, YX, LZ, LY, LX, tiles_x, N);
}

extern "C" __global__ void __launch_bounds__(NT)
dw_tiled_backward(const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
                  i64 Cout, i64 Cin, i64 M, i64 R, i64 XZ, i64 XY, i64 XX, i64 YZ, i64 YY, i64 YX,
                  i64 LZ, i64 LY, i64 LX, i64 tiles_x, i64 N) {
    dw_tiled_conv<1>(gy, w, gx, Cout, Cin, M, R, XZ, XY, XX, YZ, YY, YX, LZ, LY, LX, tiles_x, N);
}

// Block b = (co, p) sums gy*x over the tile steps p*chunk .. min(per_ch, (p+1)*chunk) of
// channel co (a step = one (n, oz, ty, tx) tile), for all KT taps: each thread keeps KT
// sums over its outputs, then a fixed-order reduction over the block (warp shuffles,
// then the warps in order).  partial[b, tap] gets the result.
extern "C" __global__ void __launch_bounds__(NT)
dw_tiled_wgrad(const T* __restrict__ x, const T* __restrict__ gy, ACC* __restrict__ partial,
               i64 Cy, i64 Cx, i64 M, i64 XZ, i64 XY, i64 XX, i64 YZ, i64 YY, i64 YX,
               i64 LZ, i64 LY, i64 LX, i64 tiles_x, i64 tiles_y, i64 per_ch, i64 chunk, i64 P) {
    __shared__ __align__(16) ACC sx[TILE];
    __shared__ ACC red[NWARPS * KT];
    const int tid = threadIdx.x, bx = tid % BX, by = tid / BX;
    const int lane = tid & 31, warp = tid >> 5;
    const i64 XS = XZ * XY * XX, YS = YZ * YY * YX;
    for (i64 b = blockIdx.x; b < Cy * P; b += gridDim.x) {
        const i64 co = b / P, p = b % P;
        const i64 c = co / M;
        ACC acc[KT];
#pragma unroll
        for (int k = 0; k < KT; ++k) acc[k] = 0;
        const i64 t0 = p * chunk;
        const i64 t1 = per_ch < t0 + chunk ? per_ch : t0 + chunk;
        // (n, oz, ty, tx) of step t0, then stepped like an odometer (no division per step)
        i64 tx, ty, oz, n, r;
        divmod(t0, tiles_x, r, tx);
        divmod(r, tiles_y, r, ty);
        divmod(r, YZ, n, oz);
        for (i64 t = t0; t < t1; ++t) {
            const i64 ox0 = tx * TX, oy0 = ty * TY, oy = oy0 + by;
            __syncthreads();                       // the previous step is done with sx
            load_tile(sx, x + (n * Cx + c) * XS, oz * SZ - LZ, oy0 * SY - LY, ox0 * SX - LX, XZ, XY, XX);
            ACC g[VX];
            const T* gyr = gy + (n * Cy + co) * YS + (oz * YY + oy) * YX;
#pragma unroll
            for (int v = 0; v < VX; ++v) {
                const i64 ox = ox0 + bx * VX + v;
                g[v] = (oy < YY && ox < YX) ? ld(gyr, ox) : (ACC)0;
            }
            __syncthreads();
#pragma unroll
            for (int kz = 0; kz < KZ; ++kz) {
#pragma unroll
                for (int ky = 0; ky < KY; ++ky) {
                    const ACC* row = sx + (kz * IH + by * SY + ky * DY) * IWP + bx * VX * SX;
                    ACC* ak = acc + (kz * KY + ky) * KX;
#if USE_WIN
                    ACC win[WINV];
                    load_win(row, win);
#pragma unroll
                    for (int kx = 0; kx < KX; ++kx) {
                        ACC s = 0;
#pragma unroll
                        for (int v = 0; v < VX; ++v) s += g[v] * win[v * SX + kx * DX];
                        ak[kx] += s;
                    }
#else
#pragma unroll
                    for (int kx = 0; kx < KX; ++kx) {
                        ACC s = 0;
#pragma unroll
                        for (int v = 0; v < VX; ++v) s += g[v] * row[v * SX + kx * DX];
                        ak[kx] += s;
                    }
#endif
                }
            }
            if (++tx == tiles_x) {
                tx = 0;
                if (++ty == tiles_y) {
                    ty = 0;
                    if (++oz == YZ) { oz = 0; ++n; }
                }
            }
        }
#pragma unroll
        for (int k = 0; k < KT; ++k) {
            ACC v = acc[k];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) red[warp * KT + k] = v;
        }
        __syncthreads();
        for (int k = tid; k < KT; k += NT) {
            ACC s = 0;
#pragma unroll
            for (int wi = 0; wi < NWARPS; ++wi) s += red[wi * KT + k];
            partial[b * KT + k] = s;
        }
        __syncthreads();                           // red is read before the next block reuses it
    }
}

// gw[co, tap] = sum over p < P of partial[co, p, tap], in order.
extern "C" __global__ void dw_tiled_wgrad_final(const ACC* __restrict__ partial, T* __restrict__ gw,
                                                i64 Cy, i64 P) {
    const i64 total = Cy * KT;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const i64 co = idx / KT, k = idx % KT;
        ACC s = 0;
        for (i64 p = 0; p < P; ++p) s += partial[(co * P + p) * KT + k];
        st(gw, idx, s);
    }
}
"""

#: dtype -> (storage type, accumulator, is_half, vector types by width)
_TILED_VECTORS = {"float": {4: "float4", 2: "float2", 1: "float"},
                  "double": {2: "double2", 1: "double"}}


def tiled_source(dtype_name, kernel, stride, dilation, bx, by, vx, vec, use_window):
    """CUDA source of the tiled depthwise kernels for one compile-time configuration.

    ``kernel``, ``stride``, ``dilation``: 3-tuples (Z, Y, X; leading dims of a 1-D or
    2-D problem are 1).  ``bx * by`` threads per block (a multiple of 32), ``vx``
    outputs per thread along X, shared-memory windows read ``vec`` values at a time.
    """
    try:
        storage, acc, is_half = _TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype must be float16, float32 or float64, got dtype={dtype_name!r}") from None
    vec_t = _TILED_VECTORS[acc].get(vec)
    if vec_t is None:
        raise ValueError(f"vec must be one of {sorted(_TILED_VECTORS[acc])} for {dtype_name}, got vec={vec!r}")
    if (bx * by) % 32:
        raise ValueError(f"bx * by must be a multiple of 32, got bx={bx!r}, by={by!r}")
    subs = {"__IS_HALF__": is_half, "__STORAGE__": storage, "__ACC__": acc, "__VEC_T__": vec_t,
            "__BX__": bx, "__BY__": by, "__VX__": vx, "__VEC__": vec, "__USE_WIN__": int(bool(use_window))}
    for axis, i in zip("ZYX", range(3)):
        subs[f"__K{axis}__"] = kernel[i]
        subs[f"__S{axis}__"] = stride[i]
        subs[f"__D{axis}__"] = dilation[i]
    src = _TILED_TEMPLATE.replace("__HALF_IO__", _HALF_IO).replace("__LOAD_WIN__", _LOAD_WIN)
    for key, value in subs.items():
        src = src.replace(key, str(value))
    return src



# ====================================================================== depthwise, register windows
#
# Stride-1 depthwise forward and input gradient with no shared memory (the
# ``depthwise_rows`` algorithm, planned in gpu_depthwise.py).  Every size is a
# #define.  A thread owns VX consecutive outputs of R consecutive rows at RZ consecutive
# depths of one output plane: it walks the RZ + (KZ-1)*DZ input depths and R + (KY-1)*DY
# input rows they read, each row loaded once into a register window (whole float4 blocks
# when VEC4), and adds it into every output it feeds; the L1 cache serves the
# neighbours' overlapping halos.  Measured
# on an H200: 55 against 84 us (plane) for a 3x3x3 depthwise layer of 4x128x32^3,
# 202 against 228 us for 3x3 over 64x384x56^2.
#
#   dw_rows   dst[n, c] = sum over m < MSUM, taps of w * src[n, source plane]
#             forward: MSUM 1, source channel c / M; input gradient (FLIP): the M
#             output channels c*M + m of gy, each kernel flipped
_ROWS_TEMPLATE = r"""
#define IS_HALF __IS_HALF__
typedef long long i64;
typedef __STORAGE__ T;
typedef __ACC__ ACC;

__HALF_IO__

__DEFINES__

#define KT (KZ * KY * KX)
#define WIN (VX + (KX - 1) * DX)
#define RIN (R + (KY - 1) * DY)
#define SEGS ((YX + VX - 1) / VX)
#define CHUNKS ((YY + R - 1) / R)
#define ZCHUNKS ((YZ + RZ - 1) / RZ)
#define ZIN (RZ + (KZ - 1) * DZ)
#define MSUM (FLIP ? M : 1)

#if LANES
// win[0 .. WIN) = row[ox0 - LX ..] of the lane's item, 0 outside the row: the lane
// loads its own float4 (ox0 .. ox0 + 3) and takes the other columns from the lanes
// that hold them.  Every lane of the warp must call it.
__device__ __forceinline__ void lane_window(const T* row, bool ok, int ox0, int lane, ACC* win) {
    float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
    if (ok && ox0 < XX) q = __ldg(reinterpret_cast<const float4*>(row + ox0));
#pragma unroll
    for (int j = 0; j < WIN; ++j) {
        const int o = j - LX, d = o >= 0 ? o / 4 : -((3 - o) / 4), part = o - 4 * d;
        const float c = part == 0 ? q.x : part == 1 ? q.y : part == 2 ? q.z : q.w;
        const float v = d == 0 ? c : __shfl_sync(0xffffffffu, c, lane + d);
        win[j] = (ox0 + o >= 0 && ox0 + o < XX) ? v : 0.f;
    }
}
#endif

#if !WGRAD
extern "C" __global__ void __launch_bounds__(NT)
dw_rows(const T* __restrict__ src, const T* __restrict__ w, T* __restrict__ dst, i64 planes, i64 Csrc, i64 Cdst) {
#if LANES
    // a warp holds GPW items (plane, depth chunk, row chunk) of SEGS lanes each; every
    // lane takes part in the shuffles, live or not
    const int lane = threadIdx.x & 31, grp = lane / SEGS, seg = lane - grp * SEGS;
    const i64 item = (blockIdx.x * (i64)NT + threadIdx.x) / 32 * GPW + grp;
    const i64 p = item / ((i64)ZCHUNKS * CHUNKS);
    const bool live = grp < GPW && p < planes;
    const int r = (int)(item - p * ((i64)ZCHUNKS * CHUNKS));
#else
    const i64 t = blockIdx.x * (i64)NT + threadIdx.x;
    const i64 per_plane = (i64)ZCHUNKS * CHUNKS * SEGS;
    const i64 p = t / per_plane;
    if (p >= planes) return;
    int r = (int)(t - p * per_plane);
    const int seg = r % SEGS;
    r /= SEGS;
#endif
    const int chunk = r % CHUNKS, oz0 = (r / CHUNKS) * RZ;
    const i64 n = p / Cdst, c = p - n * Cdst;
    const int oy0 = chunk * R, ox0 = seg * VX;
    ACC acc[RZ][R][VX];
#pragma unroll
    for (int z = 0; z < RZ; ++z)
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
            for (int v = 0; v < VX; ++v) acc[z][i][v] = 0;
#pragma unroll 1
    for (int m = 0; m < MSUM; ++m) {
        const i64 wc = FLIP ? c * M + m : c;                      // the weight's output channel
        const T* sp = src + (n * Csrc + (FLIP ? c * M + m : c / M)) * ((i64)XZ * XY * XX);
        ACC wk[KT];
#pragma unroll
        for (int k = 0; k < KT; ++k) wk[k] = ld(w, wc * KT + (FLIP ? KT - 1 - k : k));
#pragma unroll
        for (int jz = 0; jz < ZIN; ++jz) {
            const int iz = oz0 - LZ + jz;
            const bool zok = iz >= 0 && iz < XZ;
#pragma unroll
            for (int i = 0; i < RIN; ++i) {
                const int iy = oy0 - LY + i;
                const bool rowok = zok && iy >= 0 && iy < XY;
                const T* row = sp + ((i64)iz * XY + iy) * XX;
                ACC win[WIN];
#if LANES
                lane_window(row, live && rowok, ox0, lane, win);
#elif VEC4
                // whole float4 blocks over [ox0 - LX, ox0 - LX + WIN): each lies inside
                // the row or outside it (XX and ox0 are multiples of 4)
                constexpr int B0 = -((LX + 3) / 4) * 4;
                constexpr int NB = (WIN - LX - B0 + 3) / 4;
                float buf[NB * 4];
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    const int ix = ox0 + B0 + 4 * b;
                    float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
                    if (rowok && ix >= 0 && ix < XX) q = __ldg(reinterpret_cast<const float4*>(row + ix));
                    buf[4 * b] = q.x; buf[4 * b + 1] = q.y; buf[4 * b + 2] = q.z; buf[4 * b + 3] = q.w;
                }
#pragma unroll
                for (int j = 0; j < WIN; ++j) win[j] = buf[j - LX - B0];
#else
#pragma unroll
                for (int j = 0; j < WIN; ++j) {
                    const int ix = ox0 - LX + j;
                    win[j] = (rowok && ix >= 0 && ix < XX) ? ld(row, ix) : (ACC)0;
                }
#endif
#pragma unroll
                for (int kz = 0; kz < KZ; ++kz) {
                    const int rz = jz - kz * DZ;                    // the output depth this plane feeds
                    if (rz < 0 || rz >= RZ) continue;
#pragma unroll
                    for (int ky = 0; ky < KY; ++ky) {
                        const int rr = i - ky * DY;                 // the output row this tap row feeds
                        if (rr < 0 || rr >= R) continue;
#pragma unroll
                        for (int kx = 0; kx < KX; ++kx)
#pragma unroll
                            for (int v = 0; v < VX; ++v)
                                acc[rz][rr][v] += wk[(kz * KY + ky) * KX + kx] * win[v + kx * DX];
                    }
                }
            }
        }
    }
#if LANES
    if (!live) return;
#endif
#pragma unroll
    for (int z = 0; z < RZ; ++z) {
        if (oz0 + z >= YZ) break;
        T* out = dst + p * ((i64)YZ * YY * YX) + (i64)(oz0 + z) * YY * YX;
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int oy = oy0 + i;
            if (oy >= YY) break;
            T* o = out + (i64)oy * YX + ox0;
#if VEC4
            if (ox0 + VX <= YX) {
#pragma unroll
                for (int v = 0; v < VX; v += 4)
                    *reinterpret_cast<float4*>(o + v) =
                        make_float4(acc[z][i][v], acc[z][i][v + 1], acc[z][i][v + 2], acc[z][i][v + 3]);
                continue;
            }
#endif
#pragma unroll
            for (int v = 0; v < VX; ++v)
                if (ox0 + v < YX) st(o, v, acc[z][i][v]);
        }
    }
}
#else
// Weight gradient (LANES only).  A group of SEGS lanes owns one (channel c, part) item
// and sums gy * x for every tap over the part's `chunk` steps (n, depth chunk, row chunk),
// each lane over its float4 columns; the lanes' sums are then added in lane order:
// partial[(c * parts + part) * KT + k].  Every warp runs `chunk` steps (idle lanes and
// steps past the end read zeros), so the shuffles see all lanes.
extern "C" __global__ void __launch_bounds__(NT)
dw_rows_wgrad(const T* __restrict__ src, const T* __restrict__ gy, ACC* __restrict__ partial,
              i64 batch, i64 Csrc, i64 Cdst, i64 parts, i64 chunk) {
    __shared__ ACC red[NT * KT];
    const int lane = threadIdx.x & 31, grp = lane / SEGS, seg = lane - grp * SEGS, ox0 = seg * VX;
    const i64 item = (blockIdx.x * (i64)NT + threadIdx.x) / 32 * GPW + grp;
    const i64 c = item / parts, part = item - c * parts;
    const bool live = grp < GPW && c < Cdst;
    const i64 steps = batch * ZCHUNKS * CHUNKS;
    ACC sum[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) sum[k] = 0;
#pragma unroll 1
    for (i64 step = part * chunk; step < part * chunk + chunk; ++step) {
        const bool on = live && step < steps;
        const i64 n = step / (ZCHUNKS * CHUNKS);
        const int r = (int)(step - n * (ZCHUNKS * CHUNKS));
        const int oy0 = (r % CHUNKS) * R, oz0 = (r / CHUNKS) * RZ;
        const T* gp = gy + (n * Cdst + c) * ((i64)YZ * YY * YX);
        const T* sp = src + (n * Csrc + c / M) * ((i64)XZ * XY * XX);
        ACC g[RZ][R][VX];
#pragma unroll
        for (int z = 0; z < RZ; ++z)
#pragma unroll
            for (int i = 0; i < R; ++i) {
                float4 q = make_float4(0.f, 0.f, 0.f, 0.f);
                if (on && oz0 + z < YZ && oy0 + i < YY)
                    q = __ldg(reinterpret_cast<const float4*>(gp + ((i64)(oz0 + z) * YY + oy0 + i) * YX + ox0));
                g[z][i][0] = q.x; g[z][i][1] = q.y; g[z][i][2] = q.z; g[z][i][3] = q.w;
            }
#pragma unroll
        for (int jz = 0; jz < ZIN; ++jz) {
            const int iz = oz0 - LZ + jz;
            const bool zok = on && iz >= 0 && iz < XZ;
#pragma unroll
            for (int i = 0; i < RIN; ++i) {
                const int iy = oy0 - LY + i;
                ACC win[WIN];
                lane_window(sp + ((i64)iz * XY + iy) * XX, zok && iy >= 0 && iy < XY, ox0, lane, win);
#pragma unroll
                for (int kz = 0; kz < KZ; ++kz) {
                    const int rz = jz - kz * DZ;
                    if (rz < 0 || rz >= RZ) continue;
#pragma unroll
                    for (int ky = 0; ky < KY; ++ky) {
                        const int rr = i - ky * DY;
                        if (rr < 0 || rr >= R) continue;
#pragma unroll
                        for (int kx = 0; kx < KX; ++kx)
#pragma unroll
                            for (int v = 0; v < VX; ++v)
                                sum[(kz * KY + ky) * KX + kx] += g[rz][rr][v] * win[v + kx * DX];
                    }
                }
            }
        }
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) red[threadIdx.x * KT + k] = sum[k];
    __syncwarp();
    if (!live || seg != 0) return;
    for (int k = 0; k < KT; ++k) {
        ACC t = 0;
        for (int l = 0; l < SEGS; ++l) t += red[(threadIdx.x + l) * KT + k];
        partial[(c * parts + part) * KT + k] = t;
    }
}

// gw[c, k] = sum over parts, in order.
extern "C" __global__ void dw_rows_wgrad_final(const ACC* __restrict__ partial, T* __restrict__ gw,
                                               i64 Cdst, i64 parts) {
    const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= Cdst * KT) return;
    const i64 c = idx / KT, k = idx - c * KT;
    ACC t = 0;
    for (i64 p = 0; p < parts; ++p) t += partial[(c * parts + p) * KT + k];
    st(gw, idx, t);
}
#endif
"""


def rows_source(dtype_name, consts):
    """CUDA source of ``dw_rows`` for one geometry (``consts``: name -> int, as
    :func:`ndconv.engine.gpu_depthwise.rows_plan` gives them)."""
    try:
        storage, acc, is_half = _TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype must be float16, float32 or float64, got dtype={dtype_name!r}") from None
    defines = "\n".join(f"#define {k} {int(v)}" for k, v in sorted(dict(consts).items()))
    return (_ROWS_TEMPLATE.replace("__HALF_IO__", _HALF_IO).replace("__DEFINES__", defines)
            .replace("__IS_HALF__", str(is_half)).replace("__STORAGE__", storage).replace("__ACC__", acc))

# ====================================================================== grouped, whole planes
#
# See gpu_plane.py for the plan.  Every size is a compile-time #define (__DEFINES__):
# CIG/COG input/output channels per group, K*/S*/D* kernel, stride, dilation, X*/Y*
# source and destination sizes, L* low padding, TZ output slices per block, VX outputs
# per thread along X, VEC values per shared-memory load, NT threads, FLIP (input
# gradient: gy in, kernel flipped, group block transposed), USE_WIN, VST (vector
# stores), FILL_VEC (16-byte loads of the input possible), MINB (weight gradient: blocks
# per SM the registers must leave room for; CMINB the same for plane_conv), WGRAD (which
# kernels the module holds), CHUNK (weight gradient: steps per part).
#
#   plane_conv          dst[n, grp*COG+o] = sum_{ic, k} w * src[n, grp*CIG+ic]
#   plane_wgrad         partial[(cob, icb, part), o, ic, tap] = sum over the part's
#                       (n, slab) steps, for OCB output and CIB input channels
#   plane_wgrad_final   gw[co, ic, tap] = sum over parts, in order
_PLANE_TEMPLATE = r"""
#define IS_HALF __IS_HALF__
typedef long long i64;
typedef __STORAGE__ T;
typedef __ACC__ ACC;
typedef __VEC_T__ VT;

__HALF_IO__

__DEFINES__

#define KT (KZ * KY * KX)
#define SEGS ((YX + VX - 1) / VX)
#define WIN ((VX - 1) * SX + (KX - 1) * DX + 1)
#define WINV (((WIN + VEC - 1) / VEC) * VEC)
#define IZ ((TZ - 1) * SZ + (KZ - 1) * DZ + 1)
#define PY ((YY - 1) * SY + (KY - 1) * DY + 1)
#define PXP ((SEGS - 1) * VX * SX + WINV)
#define SLAB (IZ * PY * PXP)
#define ITEMS (TZ * YY * SEGS)
#define NWARPS (NT / 32)
#define XS ((i64)XZ * XY * XX)
#define YPLANE ((i64)YY * YX)
#define LOAD_BATCH 8
#define VEC_BATCH 4

__LOAD_WIN__

#if IS_HALF
__device__ __forceinline__ float half_bits_to_float(unsigned h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"((unsigned short)h));
    return f;
}

__device__ __forceinline__ unsigned float_to_half_bits(float v) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif

// s = the C planes of src (channel stride XS) over input depths z0 .. z0+IZ-1, all
// rows and columns with the padding, zero outside the input.  Loads are issued in
// batches before their shared-memory stores, so that many are in flight.
template <int C>
__device__ __forceinline__ void fill(ACC* s, const T* __restrict__ src, int z0) {
    const int tid = threadIdx.x;
#pragma unroll 1
    for (int i0 = 0; i0 < C * SLAB; i0 += LOAD_BATCH * NT) {
        ACC v[LOAD_BATCH];
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const int i = i0 + b * NT + tid;
            v[b] = 0;
            if (i < C * SLAB) {
                const int ic = i / SLAB, r = i - ic * SLAB;
                const int row = r / PXP, col = r - row * PXP;
                const int zz = row / PY, yy = row - zz * PY;
                const int iz = z0 + zz, iy = yy - LY, ix = col - LX;
                if (iz >= 0 && iz < XZ && iy >= 0 && iy < XY && ix >= 0 && ix < XX)
                    v[b] = ld(src, ic * XS + ((i64)iz * XY + iy) * XX + ix);
            }
        }
#pragma unroll
        for (int b = 0; b < LOAD_BATCH; ++b) {
            const int i = i0 + b * NT + tid;
            if (i < C * SLAB) s[i] = v[b];
        }
    }
}

#if FILL_VEC
// The same copy when the whole input plane sits inside the shared window (FILL_VEC:
// XX % 4 == 0, padding >= 0 on the low sides, nothing cut off on the high ones) and
// src is 16-byte aligned: one load per 4 inputs (16 bytes, 8 in float16).  The padding cells are
// never written by it: zero_halo clears them once per block.
template <int C>
__device__ __forceinline__ void zero_halo(ACC* s) {
    // one thread per shared row (C*IZ*PY rows of PXP): its padding columns, or all of
    // it when the row lies in the Y padding (depth padding: fill_vec loads zeros)
    for (int r = threadIdx.x; r < C * IZ * PY; r += NT) {
        const int yy = r % PY;
        ACC* row = s + r * PXP;
        if (yy < LY || yy >= LY + XY) {
            for (int c = 0; c < PXP; ++c) row[c] = 0;
        } else {
            for (int c = 0; c < LX; ++c) row[c] = 0;
            for (int c = LX + XX; c < PXP; ++c) row[c] = 0;
        }
    }
}

// v[0..3] = p[0..3], one 16-byte (float) or 8-byte (float16) load.
__device__ __forceinline__ void load4(const T* __restrict__ p, ACC* v) {
#if IS_HALF
    const uint2 q = *reinterpret_cast<const uint2*>(p);
    v[0] = half_bits_to_float(q.x & 0xffffu); v[1] = half_bits_to_float(q.x >> 16);
    v[2] = half_bits_to_float(q.y & 0xffffu); v[3] = half_bits_to_float(q.y >> 16);
#else
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
#endif
}

template <int C>
__device__ __forceinline__ void fill_vec(ACC* s, const T* __restrict__ src, int z0) {
    constexpr int Q = XX / 4, TOTAL = C * IZ * XY * Q;
    const int tid = threadIdx.x;
#pragma unroll 1
    for (int i0 = 0; i0 < TOTAL; i0 += VEC_BATCH * NT) {
        ACC v[VEC_BATCH][4];
        int at[VEC_BATCH];
#pragma unroll
        for (int b = 0; b < VEC_BATCH; ++b) {
            const int i = i0 + b * NT + tid;
            v[b][0] = v[b][1] = v[b][2] = v[b][3] = 0;
            at[b] = -1;
            if (i < TOTAL) {
                const int q = i % Q, row = i / Q;
                const int iy = row % XY, r2 = row / XY;
                const int zz = r2 % IZ, ic = r2 / IZ;
                const int iz = z0 + zz;
                at[b] = ic * SLAB + (zz * PY + iy + LY) * PXP + LX + 4 * q;
                if (iz >= 0 && iz < XZ) load4(src + ic * XS + ((i64)iz * XY + iy) * XX + 4 * q, v[b]);
            }
        }
#pragma unroll
        for (int b = 0; b < VEC_BATCH; ++b) {
            if (at[b] >= 0) {
                ACC* d = s + at[b];
                d[0] = v[b][0]; d[1] = v[b][1]; d[2] = v[b][2]; d[3] = v[b][3];
            }
        }
    }
}
#endif

// fill, through fill_vec when it applies (aligned: src is 16-byte aligned; the
// caller ran zero_halo once when it did).
template <int C>
__device__ __forceinline__ void fill_any(ACC* s, const T* __restrict__ src, int z0, int aligned) {
#if FILL_VEC
    if (aligned) { fill_vec<C>(s, src, z0); return; }
#endif
    fill<C>(s, src, z0);
}

// VX outputs at p (p is VX-aligned when VST says so).
__device__ __forceinline__ void store_outputs(T* p, int ox0, const ACC* a) {
#if VST && VX == 4 && IS_HALF
    uint2 q;
    q.x = float_to_half_bits(a[0]) | (float_to_half_bits(a[1]) << 16);
    q.y = float_to_half_bits(a[2]) | (float_to_half_bits(a[3]) << 16);
    *reinterpret_cast<uint2*>(p) = q;
#elif VST && VX == 4
    float4 q;
    q.x = a[0]; q.y = a[1]; q.z = a[2]; q.w = a[3];
    *reinterpret_cast<float4*>(p) = q;
#elif VST && VX == 2
    double2 q;
    q.x = a[0]; q.y = a[1];
    *reinterpret_cast<double2*>(p) = q;
#else
#pragma unroll
    for (int v = 0; v < VX; ++v)
        if (ox0 + v < YX) st(p, v, a[v]);
#endif
}

#if !WGRAD
#if CMINB > 1
#define CONV_BOUNDS __launch_bounds__(NT, CMINB)
#else
#define CONV_BOUNDS __launch_bounds__(NT)
#endif
extern "C" __global__ void CONV_BOUNDS
plane_conv(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
           i64 Csrc, i64 Cdst, i64 N, int aligned) {
    __shared__ __align__(16) ACC sx[CIG * SLAB];
    __shared__ ACC sw[CIG * COG * KT];
    const int tid = threadIdx.x;
    const int oz0 = blockIdx.x * TZ;
    const i64 grp = blockIdx.y;
    // sw[ic, o, tap]: the weight that output channel o of the group applies to input
    // channel ic (FLIP: the forward weight of the swapped pair, flipped)
    for (int i = tid; i < CIG * COG * KT; i += NT) {
        const int ic = i / (COG * KT), o = (i / KT) % COG, k = i % KT;
#if FLIP
        sw[i] = ld(w, ((grp * CIG + ic) * COG + o) * KT + (KT - 1 - k));
#else
        sw[i] = ld(w, ((grp * COG + o) * CIG + ic) * KT + k);
#endif
    }
#if FILL_VEC
    if (aligned) zero_halo<CIG>(sx);
#endif
    for (i64 n = blockIdx.z; n < N; n += gridDim.z) {
        __syncthreads();                           // sw is written; sx is free
        fill_any<CIG>(sx, x + (n * Csrc + grp * CIG) * XS, oz0 * SZ - LZ, aligned);
        __syncthreads();
        for (int item = tid; item < ITEMS; item += NT) {
            const int ozl = item / (YY * SEGS), r = item - ozl * (YY * SEGS);
            const int oy = r / SEGS, seg = r - oy * SEGS;
            const int oz = oz0 + ozl;
            if (oz >= YZ) break;                   // items run in depth order
            ACC acc[COG][VX];
#pragma unroll
            for (int o = 0; o < COG; ++o)
#pragma unroll
                for (int v = 0; v < VX; ++v) acc[o][v] = 0;
#pragma unroll 1
            for (int ic = 0; ic < CIG; ++ic) {
                const ACC* base = sx + ic * SLAB + (ozl * SZ * PY + oy * SY) * PXP + seg * VX * SX;
                const ACC* wic = sw + ic * COG * KT;
#pragma unroll
                for (int kz = 0; kz < KZ; ++kz) {
#pragma unroll
                    for (int ky = 0; ky < KY; ++ky) {
                        const ACC* row = base + (kz * DZ * PY + ky * DY) * PXP;
                        const ACC* wk = wic + (kz * KY + ky) * KX;
#if USE_WIN
                        ACC win[WINV];
                        load_win(row, win);
#pragma unroll
                        for (int kx = 0; kx < KX; ++kx)
#pragma unroll
                            for (int o = 0; o < COG; ++o) {
                                const ACC wv = wk[o * KT + kx];
#pragma unroll
                                for (int v = 0; v < VX; ++v) acc[o][v] += wv * win[v * SX + kx * DX];
                            }
#else
#pragma unroll 4
                        for (int kx = 0; kx < KX; ++kx)
#pragma unroll
                            for (int o = 0; o < COG; ++o) {
                                const ACC wv = wk[o * KT + kx];
#pragma unroll
                                for (int v = 0; v < VX; ++v) acc[o][v] += wv * row[v * SX + kx * DX];
                            }
#endif
                    }
                }
            }
            const int ox0 = seg * VX;
#pragma unroll
            for (int o = 0; o < COG; ++o)
                store_outputs(y + ((n * Cdst + grp * COG + o) * YZ + oz) * YPLANE + oy * YX + ox0, ox0, acc[o]);
        }
    }
}

#else
// Block b = (cob, icb, part): sums gy * x for the weights joining output channels
// cob*OCB .. +OCB and input channels icb*CIB .. +CIB of their group, over steps
// part*CHUNK .. (a step = one (n, slab)).  Each shared-memory window serves OCB
// output channels and each gy value CIB input channels.  Every thread keeps
// OCB*CIB*KT sums, then a fixed-order reduction (warp shuffles, then the warps in
// order) writes partial[b, o, ic, tap].
#define WACC (OCB * CIB * KT)
extern "C" __global__ void __launch_bounds__(NT, MINB)
plane_wgrad(const T* __restrict__ x, const T* __restrict__ gy, ACC* __restrict__ partial,
            i64 Cx, i64 Cy, i64 N, i64 P, int aligned) {
    __shared__ __align__(16) ACC sx[CIB * SLAB];
    __shared__ ACC red[NWARPS * WACC];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 slabs = (YZ + TZ - 1) / TZ, steps = N * slabs;
#if FILL_VEC
    if (aligned) zero_halo<CIB>(sx);
#endif
    for (i64 b = blockIdx.x; b < Cy / OCB * ICBLK * P; b += gridDim.x) {
        const i64 cob = b / (ICBLK * P), r0 = b - cob * (ICBLK * P);
        const i64 icb = r0 / P, part = r0 - icb * P;
        const i64 co0 = cob * OCB, c0 = co0 / COG * CIG + icb * CIB;
        ACC acc[WACC];
#pragma unroll
        for (int j = 0; j < WACC; ++j) acc[j] = 0;
        const i64 t0 = part * CHUNK, t1 = steps < t0 + CHUNK ? steps : t0 + CHUNK;
        for (i64 t = t0; t < t1; ++t) {
            const i64 n = t / slabs;
            const int oz0 = (int)(t - n * slabs) * TZ;
            __syncthreads();                       // the previous step is done with sx
            fill_any<CIB>(sx, x + (n * Cx + c0) * XS, oz0 * SZ - LZ, aligned);
            __syncthreads();
            for (int item = tid; item < ITEMS; item += NT) {
                const int ozl = item / (YY * SEGS), r = item - ozl * (YY * SEGS);
                const int oy = r / SEGS, seg = r - oy * SEGS;
                const int oz = oz0 + ozl;
                if (oz >= YZ) break;
                const int ox0 = seg * VX;
                ACC gv[OCB][VX];
#pragma unroll
                for (int o = 0; o < OCB; ++o) {
                    const T* gyr = gy + ((n * Cy + co0 + o) * YZ + oz) * YPLANE + oy * YX + ox0;
#pragma unroll
                    for (int v = 0; v < VX; ++v) gv[o][v] = ox0 + v < YX ? ld(gyr, v) : (ACC)0;
                }
#pragma unroll
                for (int ic = 0; ic < CIB; ++ic) {
                    const ACC* base = sx + ic * SLAB + (ozl * SZ * PY + oy * SY) * PXP + seg * VX * SX;
#pragma unroll
                    for (int kz = 0; kz < KZ; ++kz) {
#pragma unroll
                        for (int ky = 0; ky < KY; ++ky) {
                            const ACC* row = base + (kz * DZ * PY + ky * DY) * PXP;
#if USE_WIN
                            ACC win[WINV];
                            load_win(row, win);
#else
                            const ACC* win = row;
#endif
#pragma unroll
                            for (int o = 0; o < OCB; ++o) {
                                ACC* ak = acc + (o * CIB + ic) * KT + (kz * KY + ky) * KX;
#pragma unroll
                                for (int kx = 0; kx < KX; ++kx) {
                                    ACC s = 0;
#pragma unroll
                                    for (int v = 0; v < VX; ++v) s += gv[o][v] * win[v * SX + kx * DX];
                                    ak[kx] += s;
                                }
                            }
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < WACC; ++j) {
            ACC v = acc[j];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
            if (lane == 0) red[warp * WACC + j] = v;
        }
        __syncthreads();
        for (int j = tid; j < WACC; j += NT) {
            ACC s = 0;
#pragma unroll
            for (int wi = 0; wi < NWARPS; ++wi) s += red[wi * WACC + j];
            partial[b * WACC + j] = s;
        }
        __syncthreads();                           // red is read before the next b reuses it
    }
}

// gw[co, ic, tap] = sum over parts p < P of partial[(co/OCB, ic/CIB, p), co%OCB, ic%CIB, tap], in order.
extern "C" __global__ void plane_wgrad_final(const ACC* __restrict__ partial, T* __restrict__ gw,
                                             i64 Cy, i64 P) {
    const i64 total = Cy * CIG * KT;
    for (i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (i64)blockDim.x * gridDim.x) {
        const i64 co = idx / (CIG * KT), j = idx - co * (CIG * KT);
        const i64 ic = j / KT, tap = j - ic * KT;
        const i64 b0 = ((co / OCB) * ICBLK + ic / CIB) * P;
        const ACC* src = partial + b0 * WACC + ((co % OCB) * CIB + ic % CIB) * KT + tap;
        ACC s = 0;
        for (i64 p = 0; p < P; ++p) s += src[p * WACC];
        st(gw, idx, s);
    }
}
#endif
"""


def plane_source(dtype_name, consts):
    """CUDA source of the whole-plane grouped kernels for one geometry (``consts``: name -> int,
    as :func:`ndconv.engine.gpu_plane.plan` gives them)."""
    try:
        storage, acc, is_half = _TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype must be float16, float32 or float64, got dtype={dtype_name!r}") from None
    consts = dict(consts)
    vx, yx = consts["VX"], consts["YX"]
    vst = int((storage in ("float", "unsigned short") and vx == 4 or storage == "double" and vx == 2)
              and yx % vx == 0)
    for name, value in (("CHUNK", 1), ("CIB", consts["CIG"]), ("ICBLK", 1), ("OCB", 1), ("FILL_VEC", 0), ("MINB", 1),
                        ("CMINB", 1)):
        consts.setdefault(name, value)
    defines = "\n".join(f"#define {k} {int(v)}" for k, v in sorted(consts.items())) + f"\n#define VST {vst}"
    return (_PLANE_TEMPLATE.replace("__HALF_IO__", _HALF_IO).replace("__LOAD_WIN__", _LOAD_WIN)
            .replace("__DEFINES__", defines).replace("__IS_HALF__", str(is_half))
            .replace("__STORAGE__", storage).replace("__ACC__", acc)
            .replace("__VEC_T__", _TILED_VECTORS[acc][consts["VEC"]]))


# ====================================================================== phase shuffle
#
# The rearrangement behind phases.space_to_depth / depth_to_space, as one kernel:
# space layout X (A, C, M0, S0, M1, S1, M2, S2) <-> phase layout P (A, S0, S1, S2, C,
# M0, M1, M2) (1-D and 2-D calls have leading unit dims).  A row is one
# (a, c, m0, r0, m1, r1) of X; each thread row takes RPT consecutive rows (one index
# decomposition, then odometer steps); threads run along m2, each moving its S2
# neighbours (S2 compiled in), so both sides move whole runs (threads along the space
# row made the way back 1.5x slower on an H200).  A thread issues the loads of all its
# rows before their stores, so that many are in flight.  32-bit indices: the caller
# checks that the array fits.  Elements are moved as raw words.
_SHUFFLE_TEMPLATE = r"""
typedef __WORD__ W;
#define RPT __RPT__
#define S2 __S2__
extern "C" __global__ void phase_shuffle(const W* __restrict__ src, W* __restrict__ dst, int to_phases,
                                         int A, int C, int M0, int M1, int M2, int S0, int S1) {
    const int rows = A * C * M0 * S0 * M1 * S1;
    const int r2_step = C * M0 * M1 * M2;            // P distance between r2 and r2 + 1
    const int span = gridDim.y * blockDim.y * RPT;
    for (int first = (blockIdx.y * blockDim.y + threadIdx.y) * RPT; first < rows; first += span) {
        // Decompose the first row once, then step the others like an odometer.
        int t = first;
        int r1 = t % S1; t /= S1;
        int m1 = t % M1; t /= M1;
        int r0 = t % S0; t /= S0;
        int m0 = t % M0; t /= M0;
        int c = t % C;
        int a = t / C;
        int xb[RPT], pb[RPT];                         // row bases in X and P; xb -1: past the end
#pragma unroll
        for (int k = 0; k < RPT; ++k) {
            xb[k] = first + k < rows ? (first + k) * M2 * S2 : -1;
            pb[k] = (((a * S0 + r0) * S1 + r1) * S2 * C + c) * (M0 * M1 * M2) + (m0 * M1 + m1) * M2;
            if (++r1 == S1) { r1 = 0;
                if (++m1 == M1) { m1 = 0;
                    if (++r0 == S0) { r0 = 0;
                        if (++m0 == M0) { m0 = 0;
                            if (++c == C) { c = 0; ++a; } } } } }
        }
        for (int m2 = blockIdx.x * blockDim.x + threadIdx.x; m2 < M2; m2 += gridDim.x * blockDim.x) {
            W v[RPT][S2];
#pragma unroll
            for (int k = 0; k < RPT; ++k)
#pragma unroll
                for (int r2 = 0; r2 < S2; ++r2)
                    if (xb[k] >= 0) v[k][r2] = to_phases ? src[xb[k] + m2 * S2 + r2] : src[pb[k] + r2 * r2_step + m2];
#pragma unroll
            for (int k = 0; k < RPT; ++k)
#pragma unroll
                for (int r2 = 0; r2 < S2; ++r2) {
                    if (xb[k] < 0) continue;
                    if (to_phases) dst[pb[k] + r2 * r2_step + m2] = v[k][r2];
                    else dst[xb[k] + m2 * S2 + r2] = v[k][r2];
                }
        }
    }
}
"""

#: words a thread moves at once (RPT rows of S2 each)
SHUFFLE_WORDS_PER_THREAD = 16


def shuffle_rows_per_thread(s2):
    """Rows of the space layout a thread moves at once for a last-dim stride ``s2``."""
    return max(1, SHUFFLE_WORDS_PER_THREAD // s2)


def shuffle_source(itemsize, s2):
    """CUDA source of ``phase_shuffle`` for elements of ``itemsize`` bytes and a last-dim stride ``s2``."""
    words = {2: "unsigned short", 4: "unsigned int", 8: "unsigned long long"}
    if itemsize not in words:
        raise ValueError(f"itemsize must be 2, 4 or 8, got itemsize={itemsize!r}")
    return (_SHUFFLE_TEMPLATE.replace("__WORD__", words[itemsize]).replace("__S2__", str(int(s2)))
            .replace("__RPT__", str(shuffle_rows_per_thread(s2))))
