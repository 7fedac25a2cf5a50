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

_TEMPLATE = r"""
#define ND __ND__
#define IS_HALF __IS_HALF__
#define WG_THREADS __WG_THREADS__
typedef long long i64;
typedef __STORAGE__ T;
typedef __ACC__ ACC;

#if IS_HALF
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
#endif

struct Geo {
    i64 N, Cx, Cy, G;
    i64 X[ND], Y[ND], K[ND], S[ND], D[ND], L[ND];
};

__device__ __forceinline__ Geo load_geo(const i64* __restrict__ p) {
    Geo g;
    g.N = p[0]; g.Cx = p[1]; g.Cy = p[2]; g.G = p[3];
#pragma unroll
    for (int d = 0; d < ND; ++d) {
        g.X[d] = p[4 + d];
        g.Y[d] = p[4 + ND + d];
        g.K[d] = p[4 + 2 * ND + d];
        g.S[d] = p[4 + 3 * ND + d];
        g.D[d] = p[4 + 4 * ND + d];
        g.L[d] = p[4 + 5 * ND + d];
    }
    return g;
}

__device__ __forceinline__ i64 prod3(const i64* v) {
    i64 p = 1;
#pragma unroll
    for (int d = 0; d < ND; ++d) p *= v[d];
    return p;
}

// Odometer over the kernel taps, last dimension fastest (the weight's layout).
__device__ __forceinline__ void next_tap(i64* k, const Geo& g) {
#pragma unroll
    for (int d = ND - 1; d >= 0; --d) {
        if (++k[d] < g.K[d]) return;
        k[d] = 0;
    }
}

#define GRID_LOOP(i, total) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (i64)blockDim.x * gridDim.x)

// ------------------------------------------------------------------ im2col / col2im

// cols[(c*K + tap), n, p] = x[n0+n, c, o*S - L + k*D] (zero outside), where p runs
// over output rows a..a+rows (first dim) and all of the other output dims.
extern "C" __global__ void im2col(const T* __restrict__ x, ACC* __restrict__ cols,
                                  const i64* __restrict__ gp, i64 n0, i64 nb, i64 a, i64 rows) {
    const Geo g = load_geo(gp);
    i64 Yc[ND];
    Yc[0] = rows;
#pragma unroll
    for (int d = 1; d < ND; ++d) Yc[d] = g.Y[d];
    const i64 P = prod3(Yc), K = prod3(g.K);
    const i64 total = g.Cx * K * nb * P;
    GRID_LOOP(idx, total) {
        i64 r = idx;
        i64 p = r % P; r /= P;
        const i64 n = r % nb; r /= nb;
        i64 tap = r % K;
        const i64 c = r / K;
        i64 pos[ND];
        bool inside = true;
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) {
            i64 o = p % Yc[d]; p /= Yc[d];
            const i64 k = tap % g.K[d]; tap /= g.K[d];
            if (d == 0) o += a;
            const i64 i = o * g.S[d] - g.L[d] + k * g.D[d];
            pos[d] = i;
            inside = inside && i >= 0 && i < g.X[d];
        }
        ACC v = 0;
        if (inside) {
            i64 off = (n0 + n) * g.Cx + c;
#pragma unroll
            for (int d = 0; d < ND; ++d) off = off * g.X[d] + pos[d];
            v = ld(x, off);
        }
        cols[idx] = v;
    }
}

// Sum over taps (fixed order) of the columns that x[n, c, i] fed.  i[0] is absolute.
__device__ __forceinline__ ACC col2im_sum(const ACC* __restrict__ gcols, const Geo& g,
                                          const i64* Yc, i64 P, i64 K, i64 nb, i64 n, i64 c,
                                          const i64* i, i64 a) {
    ACC acc = 0;
    i64 k[ND];
#pragma unroll
    for (int d = 0; d < ND; ++d) k[d] = 0;
    const ACC* base = gcols + (c * K * nb + n) * P;
    const i64 tap_stride = nb * P;
    for (i64 tap = 0; tap < K; ++tap) {
        bool ok = true;
        i64 p = 0;
#pragma unroll
        for (int d = 0; d < ND; ++d) {
            const i64 t = i[d] + g.L[d] - k[d] * g.D[d];
            i64 o = t >= 0 ? t / g.S[d] : -1;
            bool hit = t >= 0 && o * g.S[d] == t;
            if (d == 0) o -= a;
            hit = hit && o >= 0 && o < Yc[d];
            ok = ok && hit;
            p = p * Yc[d] + o;
        }
        if (ok) acc += base[tap * tap_stride + p];
        next_tap(k, g);
    }
    return acc;
}

// gx[n0:n0+nb] from the columns of all output rows: every element written once.
extern "C" __global__ void col2im_store(const ACC* __restrict__ gcols, T* __restrict__ gx,
                                        const i64* __restrict__ gp, i64 n0, i64 nb) {
    const Geo g = load_geo(gp);
    const i64 P = prod3(g.Y), K = prod3(g.K), XS = prod3(g.X);
    const i64 total = nb * g.Cx * XS;
    GRID_LOOP(idx, total) {
        i64 r = idx;
        i64 i[ND];
#pragma unroll
        for (int d = ND - 1; d >= 0; --d) { i[d] = r % g.X[d]; r /= g.X[d]; }
        const i64 c = r % g.Cx;
        const i64 n = r / g.Cx;
        st(gx, n0 * g.Cx * XS + idx, col2im_sum(gcols, g, g.Y, P, K, nb, n, c, i, 0));
    }
}

// buf (one sample, (Cx, *X), ACC) += contributions of output rows a..a+rows, over the
// input rows i0..i0+irows that those outputs read.
extern "C" __global__ void col2im_add(const ACC* __restrict__ gcols, ACC* __restrict__ buf,
                                      const i64* __restrict__ gp, i64 a, i64 rows,
                                      i64 i0, i64 irows) {
    const Geo g = load_geo(gp);
    i64 Yc[ND];
    Yc[0] = rows;
#pragma unroll
    for (int d = 1; d < ND; ++d) Yc[d] = g.Y[d];
    const i64 P = prod3(Yc), K = prod3(g.K), XS = prod3(g.X);
    const i64 total = g.Cx * irows * (XS / g.X[0]);
    GRID_LOOP(idx, total) {
        i64 r = idx;
        i64 i[ND];
#pragma unroll
        for (int d = ND - 1; d >= 1; --d) { i[d] = r % g.X[d]; r /= g.X[d]; }
        i[0] = i0 + r % irows;
        const i64 c = r / irows;
        i64 off = c;
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


def source(nd, dtype_name):
    """The CUDA source for ``nd`` spatial dims and one of float16/float32/float64."""
    if nd not in (1, 2, 3):
        raise ValueError(f"nd must be 1, 2 or 3, got nd={nd!r}")
    try:
        storage, acc, is_half = _TYPES[dtype_name]
    except KeyError:
        raise ValueError(f"dtype must be float16, float32 or float64, got dtype={dtype_name!r}") from None
    return (_TEMPLATE.replace("__ND__", str(nd)).replace("__IS_HALF__", str(is_half))
            .replace("__WG_THREADS__", str(WGRAD_THREADS))
            .replace("__STORAGE__", storage).replace("__ACC__", acc))
