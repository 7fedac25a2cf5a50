"""Pieces shared by the compiled CPU kernels (numba).

* ``reading``: how every kernel takes its input arrays (read-only views, one
  compiled variant per dtype).
* LLVM IR for the micro-kernels (``cpu_direct``'s tile and ``cpu_depthwise``'s
  sliding kernel), which numba's ``intrinsic`` emits directly because numba cannot
  keep an array of accumulators in vector registers.  Vectors are 64 bytes (AVX-512;
  LLVM splits them on narrower machines) of float32 or float64; every load and
  store is unaligned (``align=1``).
"""
import functools
import inspect

try:
    from llvmlite import ir
    from numba.core import cgutils
except ImportError:  # the engine falls back to its BLAS paths
    ir = None

VECTOR_BYTES = 64


def readonly(a):
    """``a``, or a read-only view of it."""
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def reading(*names):
    """Decorator of a compiled kernel: the named array parameters reach it as read-only views.

    numba compiles a kernel once per combination of its arguments' types, and an
    array's type includes whether it is writeable; callers' arrays come both ways
    (memory maps, ``np.broadcast_to``, our cached index maps), so without this a kernel
    of three inputs compiled up to 8 times per dtype, seconds each on a first call.
    """
    def wrap(kernel):
        params = list(inspect.signature(kernel.py_func).parameters)
        at = [params.index(n) for n in names]

        @functools.wraps(kernel.py_func)
        def call(*args):
            args = list(args)
            for i in at:
                args[i] = readonly(args[i])
            return kernel(*args)
        call.kernel, call.reads = kernel, at
        return call
    return wrap


def vector_type(scalar):
    """The 64-byte vector type of ``scalar`` (an LLVM float or double type)."""
    return ir.VectorType(scalar, VECTOR_BYTES // (8 if scalar == ir.DoubleType() else 4))


def fma(builder, vec):
    """``llvm.fma`` on vectors of type ``vec``, declared once per module."""
    name = "llvm.fma.v%d%s" % (vec.count, "f64" if vec.element == ir.DoubleType() else "f32")
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec] * 3), name)


def splat(builder, vec, s):
    """The scalar ``s`` in every lane of a ``vec``."""
    i32 = ir.IntType(32)
    undef = ir.Constant(vec, ir.Undefined)
    zeros = ir.Constant(ir.VectorType(i32, vec.count), [0] * vec.count)
    return builder.shuffle_vector(builder.insert_element(undef, s, ir.Constant(i32, 0)), undef, zeros)


def vector_at(builder, base, j, vec):
    """A ``vec`` pointer to vector ``j`` from the scalar pointer ``base``."""
    return builder.bitcast(builder.gep(base, [ir.Constant(ir.IntType(64), vec.count * j)]), vec.as_pointer())


def transpose(builder, rows):
    """The columns of the square matrix whose rows are the L ``rows`` (vectors of L lanes, L
    a power of two): log2(L) rounds of interleaving the first half of the vectors with
    the second (each round moves every element's row index one bit into its lane index)."""
    count = len(rows)
    half = count // 2
    i32 = ir.VectorType(ir.IntType(32), count)
    low = ir.Constant(i32, [v for i in range(half) for v in (i, i + count)])
    high = ir.Constant(i32, [v for i in range(half, count) for v in (i, i + count)])
    for _ in range(count.bit_length() - 1):
        rows = [r for i in range(half) for r in (builder.shuffle_vector(rows[i], rows[i + half], low),
                                                 builder.shuffle_vector(rows[i], rows[i + half], high))]
    return rows


def store(builder, add, p, v, align=1):
    """``*p = v``, or ``*p += v`` where the i1 ``add`` is set."""
    builder.store(builder.select(add, builder.fadd(v, builder.load(p, align=align)), v), p, align=align)


def prefetch(builder, p, write=False):
    """Prefetch the cache line holding ``*p`` (never faults, whatever the address)."""
    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(i32, int(write)), ir.Constant(i32, 3), ir.Constant(i32, 1)])
