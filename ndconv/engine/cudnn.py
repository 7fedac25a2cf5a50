"""cuDNN as one candidate algorithm of the GPU engine, through its C API with ctypes.

The library is looked for in the ``nvidia-cudnn`` wheel (``nvidia/cudnn/lib`` in
any ``site-packages``, found through the ``nvidia.cudnn`` package path when it
imports, else by a directory search), then under the plain name ``libcudnn.so.9``.
PyTorch is never imported.  Nothing here fails when cuDNN is absent:
:func:`available` is False and the algorithm's ``supports`` says no.

The three primitives map onto the legacy convolution API with N-d descriptors:
forward -> cudnnConvolutionForward, backward_input -> cudnnConvolutionBackwardData,
backward_weight -> cudnnConvolutionBackwardFilter; cross-correlation, group count,
symmetric padding only (a geometry whose output size needs more padding on the
low side than on the high side is "not supported", so the registry moves on).
1-D problems get a unit leading spatial dim (cuDNN wants 4-d tensors at least).
float32 runs with CUDNN_FMA_MATH (no TF32); float16 stores half and accumulates
in float; float64 is double throughout.

The cuDNN algorithm of each call is found once with cudnnFind*AlgorithmEx (on
the call's own buffers, workspace from CuPy's allocator up to the engine's
workspace limit); only algorithms cuDNN reports as deterministic are kept while
the engine is deterministic.  The choice is remembered in memory and in the
engine's autotune cache, so later runs use the same cuDNN algorithm and give the
same bits.
"""
from __future__ import annotations

import ctypes
import glob
import math
import os
import site
import sys
import threading

import numpy as np

from .registry import OPS, Algorithm, NotApplicable

# enums of cudnn.h (stable across cuDNN 8 and 9)
_SUCCESS = 0
_DATA = {"float32": 0, "float64": 1, "float16": 2}
_NCHW = 0
_CROSS_CORRELATION = 1
_DEFAULT_MATH, _TENSOR_OP_MATH, _TENSOR_OP_ALLOW_CONVERSION, _FMA_MATH = 0, 1, 2, 3
_DETERMINISTIC = 1
_MAX_ALGOS = 16
_INT_MAX = 2 ** 31 - 1


class _Perf(ctypes.Structure):
    """cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t (one layout for all three)."""
    _fields_ = [("algo", ctypes.c_int), ("status", ctypes.c_int), ("time", ctypes.c_float),
                ("memory", ctypes.c_size_t), ("determinism", ctypes.c_int),
                ("mathType", ctypes.c_int), ("reserved", ctypes.c_int * 3)]


_lib = None
_load_error = None
_lock = threading.Lock()


def _candidate_dirs():
    dirs = []
    try:
        import nvidia.cudnn as pkg  # the wheel's namespace package, not PyTorch
        for p in getattr(pkg, "__path__", []):
            dirs.append(os.path.join(p, "lib"))
    except Exception:  # noqa: BLE001 - absent or broken: search the directories below
        pass
    roots = list(sys.path)
    try:
        roots += site.getsitepackages() + [site.getusersitepackages()]
    except Exception:  # noqa: BLE001 - virtualenvs without site.getsitepackages
        pass
    for root in roots:
        if root and os.path.isdir(os.path.join(root, "nvidia")):
            dirs.append(os.path.join(root, "nvidia", "cudnn", "lib"))
            dirs += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "lib")))
    seen, out = set(), []
    for d in dirs:
        d = os.path.abspath(d)
        if d not in seen and os.path.isfile(os.path.join(d, "libcudnn.so.9")):
            seen.add(d)
            out.append(d)
    return out


def _load():
    """Load libcudnn once; returns the CDLL or None (with the reason in _load_error)."""
    global _lib, _load_error
    with _lock:
        if _lib is not None or _load_error is not None:
            return _lib
        if os.environ.get("NDCONV_DISABLE_CUDNN", "") not in ("", "0"):
            _load_error = "disabled by NDCONV_DISABLE_CUDNN"
            return None
        errors = []
        for d in _candidate_dirs() + [None]:
            try:
                if d is not None:
                    # cuDNN 9's front library dlopens its sub-libraries by soname; loading
                    # them first from the same directory makes those lookups succeed.
                    for sub in ("graph", "engines_runtime_compiled", "engines_precompiled",
                                "heuristic", "ops", "cnn", "adv"):
                        path = os.path.join(d, f"libcudnn_{sub}.so.9")
                        if os.path.isfile(path):
                            try:
                                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                            except OSError as e:
                                errors.append(f"{path}: {e}")
                lib = ctypes.CDLL(os.path.join(d, "libcudnn.so.9") if d else "libcudnn.so.9",
                                  mode=ctypes.RTLD_GLOBAL)
                _declare(lib)
                if lib.cudnnGetVersion() < 8000:
                    raise OSError(f"cuDNN {lib.cudnnGetVersion()} is older than 8.0")
                _lib = lib
                return lib
            except (OSError, AttributeError) as e:
                errors.append(str(e))
        _load_error = "; ".join(errors) or "libcudnn.so.9 not found"
        return None


def available():
    return _load() is not None


def version():
    lib = _load()
    return None if lib is None else int(lib.cudnnGetVersion())


def load_error():
    _load()
    return _load_error


def _declare(lib):
    P, I, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    IP = ctypes.POINTER(ctypes.c_int)
    sig = {
        "cudnnGetVersion": (S, []),
        "cudnnGetErrorString": (ctypes.c_char_p, [I]),
        "cudnnCreate": (I, [ctypes.POINTER(P)]),
        "cudnnSetStream": (I, [P, P]),
        "cudnnCreateTensorDescriptor": (I, [ctypes.POINTER(P)]),
        "cudnnSetTensorNdDescriptor": (I, [P, I, I, IP, IP]),
        "cudnnDestroyTensorDescriptor": (I, [P]),
        "cudnnCreateFilterDescriptor": (I, [ctypes.POINTER(P)]),
        "cudnnSetFilterNdDescriptor": (I, [P, I, I, I, IP]),
        "cudnnDestroyFilterDescriptor": (I, [P]),
        "cudnnCreateConvolutionDescriptor": (I, [ctypes.POINTER(P)]),
        "cudnnSetConvolutionNdDescriptor": (I, [P, I, IP, IP, IP, I, I]),
        "cudnnSetConvolutionGroupCount": (I, [P, I]),
        "cudnnSetConvolutionMathType": (I, [P, I]),
        "cudnnDestroyConvolutionDescriptor": (I, [P]),
        "cudnnFindConvolutionForwardAlgorithmEx":
            (I, [P, P, P, P, P, P, P, P, I, IP, ctypes.POINTER(_Perf), P, S]),
        "cudnnFindConvolutionBackwardDataAlgorithmEx":
            (I, [P, P, P, P, P, P, P, P, I, IP, ctypes.POINTER(_Perf), P, S]),
        "cudnnFindConvolutionBackwardFilterAlgorithmEx":
            (I, [P, P, P, P, P, P, P, P, I, IP, ctypes.POINTER(_Perf), P, S]),
        "cudnnConvolutionForward": (I, [P, P, P, P, P, P, P, I, P, S, P, P, P]),
        "cudnnConvolutionBackwardData": (I, [P, P, P, P, P, P, P, I, P, S, P, P, P]),
        "cudnnConvolutionBackwardFilter": (I, [P, P, P, P, P, P, P, I, P, S, P, P, P]),
        # the backend (graph) API, used by cudnn_graph.py
        "cudnnBackendCreateDescriptor": (I, [I, ctypes.POINTER(P)]),
        "cudnnBackendDestroyDescriptor": (I, [P]),
        "cudnnBackendSetAttribute": (I, [P, I, I, ctypes.c_int64, P]),
        "cudnnBackendGetAttribute": (I, [P, I, I, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64), P]),
        "cudnnBackendFinalize": (I, [P]),
        "cudnnBackendExecute": (I, [P, P, P]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def _check(status, what):
    if status != _SUCCESS:
        msg = _lib.cudnnGetErrorString(status)
        raise RuntimeError(f"cuDNN {what} failed: {msg.decode() if msg else status}")


def _ints(values):
    values = [int(v) for v in values]
    return (ctypes.c_int * len(values))(*values)


# ------------------------------------------------------------------ geometry mapping

def symmetric_padding(g):
    """The per-dim padding cuDNN would use for ``g``, or None when it cannot express it.

    cuDNN pads both sides by p and takes floor((X + 2p - D(K-1) - 1)/S) + 1 outputs;
    that matches ``g`` when p = pad_lo gives exactly ``y_size`` (any extra high padding
    is never read, and zero padding reads zeros wherever it is).
    """
    pads = []
    for x, y, k, s, d, lo in zip(g.x_size, g.y_size, g.kernel, g.stride, g.dilation, g.pad_lo):
        span = x + 2 * lo - d * (k - 1) - 1
        if lo < 0 or span < 0 or span // s + 1 != y:
            return None
        pads.append(lo)
    return tuple(pads)


def _shapes(g):
    """(x dims, w dims, y dims, pads, strides, dilations), with a unit dim added for 1-D."""
    pads = symmetric_padding(g)
    x, w, y = list(g.x_shape), list(g.w_shape), list(g.y_shape)
    s, d = list(g.stride), list(g.dilation)
    pads = list(pads)
    if g.nd == 1:
        x.insert(2, 1), w.insert(2, 1), y.insert(2, 1)
        pads.insert(0, 0), s.insert(0, 1), d.insert(0, 1)
    return x, w, y, pads, s, d


def _strides(dims):
    out, acc = [], 1
    for n in reversed(dims):
        out.append(acc)
        acc *= max(n, 1)
    return out[::-1]


_handles = {}


def cudnn_handle(cp):
    """This device's cuDNN handle (one per process), bound to CuPy's current stream."""
    dev = cp.cuda.runtime.getDevice()
    entry = _handles.get(dev)
    if entry is None:
        h = ctypes.c_void_p()
        _check(_lib.cudnnCreate(ctypes.byref(h)), "cudnnCreate")
        entry = _handles[dev] = [h, None]
    stream = cp.cuda.get_current_stream().ptr
    if entry[1] != stream:
        _check(_lib.cudnnSetStream(entry[0], ctypes.c_void_p(stream)), "cudnnSetStream")
        entry[1] = stream
    return entry[0]


class _Plan:
    """Descriptors of one (geometry, dtype) and the cuDNN algorithm per op."""

    def __init__(self, g, dtype):
        lib = _lib
        self.dtype = np.dtype(dtype)
        dt = _DATA[self.dtype.name]
        xd, wd, yd, pads, s, d = _shapes(g)
        self.x, self.y, self.w, self.conv = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p(), \
            ctypes.c_void_p()
        _check(lib.cudnnCreateTensorDescriptor(ctypes.byref(self.x)), "cudnnCreateTensorDescriptor")
        _check(lib.cudnnCreateTensorDescriptor(ctypes.byref(self.y)), "cudnnCreateTensorDescriptor")
        _check(lib.cudnnCreateFilterDescriptor(ctypes.byref(self.w)), "cudnnCreateFilterDescriptor")
        _check(lib.cudnnCreateConvolutionDescriptor(ctypes.byref(self.conv)),
               "cudnnCreateConvolutionDescriptor")
        _check(lib.cudnnSetTensorNdDescriptor(self.x, dt, len(xd), _ints(xd), _ints(_strides(xd))),
               "cudnnSetTensorNdDescriptor(x)")
        _check(lib.cudnnSetTensorNdDescriptor(self.y, dt, len(yd), _ints(yd), _ints(_strides(yd))),
               "cudnnSetTensorNdDescriptor(y)")
        _check(lib.cudnnSetFilterNdDescriptor(self.w, dt, _NCHW, len(wd), _ints(wd)),
               "cudnnSetFilterNdDescriptor")
        compute = _DATA["float64"] if self.dtype == np.float64 else _DATA["float32"]
        _check(lib.cudnnSetConvolutionNdDescriptor(self.conv, len(pads), _ints(pads), _ints(s), _ints(d),
                                                   _CROSS_CORRELATION, compute),
               "cudnnSetConvolutionNdDescriptor")
        _check(lib.cudnnSetConvolutionGroupCount(self.conv, g.groups), "cudnnSetConvolutionGroupCount")
        # float32: plain FMA math, never TF32; float16: tensor cores (float accumulation).
        self.math = _TENSOR_OP_MATH if self.dtype == np.float16 else _FMA_MATH
        self._math_set = None
        self.set_math(self.math)
        self.algo = {}          # (op, deterministic, workspace limit) -> (algo, workspace bytes, math)
        if self.dtype == np.float64:
            self.alpha, self.beta = ctypes.c_double(1.0), ctypes.c_double(0.0)
        else:
            self.alpha, self.beta = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self.alpha_ref, self.beta_ref = ctypes.byref(self.alpha), ctypes.byref(self.beta)

    def set_math(self, math_type):
        if self._math_set != math_type:
            _check(_lib.cudnnSetConvolutionMathType(self.conv, math_type), "cudnnSetConvolutionMathType")
            self._math_set = math_type

    def __del__(self):
        lib = _lib
        if lib is None:
            return
        try:
            lib.cudnnDestroyTensorDescriptor(self.x)
            lib.cudnnDestroyTensorDescriptor(self.y)
            lib.cudnnDestroyFilterDescriptor(self.w)
            lib.cudnnDestroyConvolutionDescriptor(self.conv)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def acceptable(self, perf, deterministic, limit):
        if perf.status != _SUCCESS or perf.memory > limit:
            return False
        if deterministic and perf.determinism != _DETERMINISTIC:
            return False
        # TF32 stays off for float32/float64 whatever cuDNN reports it could use.
        if self.dtype != np.float16 and perf.mathType in (_TENSOR_OP_MATH, _TENSOR_OP_ALLOW_CONVERSION):
            return False
        return True


_FIND = {"forward": "cudnnFindConvolutionForwardAlgorithmEx",
         "backward_input": "cudnnFindConvolutionBackwardDataAlgorithmEx",
         "backward_weight": "cudnnFindConvolutionBackwardFilterAlgorithmEx"}
_RUN = {"forward": "cudnnConvolutionForward",
        "backward_input": "cudnnConvolutionBackwardData",
        "backward_weight": "cudnnConvolutionBackwardFilter"}


def callable_by_cudnn(op, g, dtype):
    """What both cuDNN algorithms need, padding aside: a primitive, 1-3 spatial dims, a
    dtype cuDNN has, zero padding, int32 sizes, no empty tensor, and the library."""
    if op not in OPS or g.nd not in (1, 2, 3) or np.dtype(dtype).name not in _DATA:
        return False
    if g.padding_mode != "zeros":
        return False
    # The legacy API takes int dims and strides: keep every tensor below 2^31 elements.
    if any(math.prod(s) > _INT_MAX for s in (g.x_shape, g.y_shape, g.w_shape)):
        return False
    if 0 in g.x_shape or 0 in g.y_shape or 0 in g.w_shape:
        return False
    if not every_window_reads_input(g):
        return False
    return available()


def every_window_reads_input(g):
    """Whether every output window has a tap inside x in every dim.

    cuDNN's graph API returned garbage (1e28) for a weight gradient whose only window
    lay wholly in the padding (x of size 1, k 2, s 2, padding (2, 1)); such
    geometries are left to the other algorithms.
    """
    for x, y, k, s, d, lo in zip(g.x_size, g.y_size, g.kernel, g.stride, g.dilation, g.pad_lo):
        pos = np.arange(y)[:, None] * s + np.arange(k)[None, :] * d - lo     # (y, k) input positions
        if not ((pos >= 0) & (pos < x)).any(axis=1).all():
            return False
    return True


def output_and_roles(cp, op, a, b, g):
    """A primitive's new output, and its three arrays in (x, w, y) role order."""
    if op == "forward":
        out = cp.empty(g.y_shape, dtype=a.dtype)
        return out, (a, b, out)
    if op == "backward_input":
        out = cp.empty(g.x_shape, dtype=a.dtype)
        return out, (out, b, a)
    out = cp.empty(g.w_shape, dtype=a.dtype)
    return out, (a, out, b)


# cuDNN's argument order per primitive: the two inputs, then the output (x, w, y = 0, 1, 2)
_ARG_ORDER = {"forward": (0, 1, 2), "backward_input": (1, 2, 0), "backward_weight": (0, 2, 1)}


class CudnnAlgorithm(Algorithm):
    """What both cuDNN algorithms share: the calls they take, and determinism (each keeps
    only cuDNN's deterministic kernels while the engine is deterministic)."""

    deterministic = True

    @staticmethod
    def padding(g):  # pragma: no cover - interface
        """The padding this API can be given for ``g``, or None when it cannot."""
        raise NotImplementedError

    def supports(self, op, g, dtype):
        return callable_by_cudnn(op, g, dtype) and self.padding(g) is not None


class Cudnn(CudnnAlgorithm):
    """cuDNN's convolution kernels through the legacy API."""

    name = "cudnn"
    padding = staticmethod(symmetric_padding)

    def __init__(self):
        self._plans = {}

    # ------------------------------------------------------------------ run

    def _plan(self, cp, g, dtype):
        key = (cp.cuda.runtime.getDevice(), g, dtype.char)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 512:
                self._plans.clear()
            plan = self._plans[key] = _Plan(g, dtype)
        return plan

    def run(self, engine, op, a, b, g):
        import cupy as cp
        plan = self._plan(cp, g, a.dtype)
        handle = cudnn_handle(cp)
        out, arrays = output_and_roles(cp, op, a, b, g)
        descs = (plan.x, plan.w, plan.y)
        # cuDNN's argument order: (desc, data) of the two inputs, then of the output.
        ptr = []
        for role in _ARG_ORDER[op]:
            ptr += [descs[role], ctypes.c_void_p(arrays[role].data.ptr)]
        algo, ws_bytes, math_type = self._algorithm(engine, cp, handle, plan, op, g, ptr)
        # Each algorithm runs with the math type Find measured it with (else BAD_PARAM).
        plan.set_math(math_type)
        ws = None
        if ws_bytes:
            ws = cp.empty(ws_bytes, dtype=np.uint8)
            engine._note(ws)
        status = getattr(_lib, _RUN[op])(handle, plan.alpha_ref, ptr[0], ptr[1], ptr[2], ptr[3],
                                         plan.conv, algo, ctypes.c_void_p(ws.data.ptr if ws_bytes else None),
                                         ws_bytes, plan.beta_ref, ptr[4], ptr[5])
        _check(status, _RUN[op])
        return out

    def _algorithm(self, engine, cp, handle, plan, op, g, ptr):
        limit = engine.workspace_limit
        key = (op, engine.deterministic, limit)
        found = plan.algo.get(key)
        if found is not None:
            return found
        tuner, context = engine._tuner_context()
        disk_key = "cudnn:" + engine._call_key(op, g, plan.dtype)
        remembered = tuner.lookup(context, disk_key) if tuner is not None else None
        perf = (_Perf * _MAX_ALGOS)()
        count = ctypes.c_int(0)
        # Find runs every algorithm on the call's buffers, within a workspace we own.
        ws_size = int(min(limit, 1 << 31))
        try:
            ws = cp.empty(ws_size, dtype=np.uint8)
        except cp.cuda.memory.OutOfMemoryError:
            ws_size = int(min(limit, 1 << 26))
            ws = cp.empty(ws_size, dtype=np.uint8)
        plan.set_math(plan.math)
        _check(getattr(_lib, _FIND[op])(handle, ptr[0], ptr[1], ptr[2], ptr[3], plan.conv, ptr[4], ptr[5],
                                        _MAX_ALGOS, ctypes.byref(count), perf,
                                        ctypes.c_void_p(ws.data.ptr), ws_size), _FIND[op])
        del ws
        ok = [perf[i] for i in range(count.value) if plan.acceptable(perf[i], engine.deterministic, limit)]
        if not ok:
            raise NotApplicable(f"cuDNN has no {'deterministic ' if engine.deterministic else ''}"
                                f"algorithm for {op} within the workspace limit")
        best = ok[0]                     # Find sorts by time
        if remembered is not None:       # a choice made in an earlier run keeps the bits stable
            same = [p for p in ok if str(p.algo) == remembered]
            best = same[0] if same else best
        if tuner is not None and remembered != str(best.algo):
            tuner.record(context, disk_key, str(best.algo), {str(p.algo): float(p.time) for p in ok})
        math_type = int(best.mathType) if plan.dtype == np.float16 else _FMA_MATH
        plan.algo[key] = found = (int(best.algo), int(best.memory), math_type)
        return found
