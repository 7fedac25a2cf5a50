"""cuDNN's graph (backend) API as one more GPU algorithm, ``cudnn_graph``.

The legacy API of ``cudnn.py`` reaches only cuDNN's fixed list of legacy algorithms.
The backend API describes one convolution as a one-node operation graph and asks
cuDNN's heuristics for engine configurations; these include the engines PyTorch's
cuDNN path runs.  The first call of each (op, geometry, dtype, alignment) builds an
execution plan for every configuration the heuristics (modes A and fallback) name,
times them on the call's own buffers and keeps the fastest, as ``cudnn.benchmark``
does; the choice is written to the engine's autotune cache so later runs take the
same engine and give the same bits.

Engines are filtered as in the legacy path: float32 and float64 never use tensor cores
(no TF32), float16 never reduces in half precision, and engines cuDNN marks
non-deterministic are skipped while the GPU engine is deterministic.  Padding is
passed as separate pre and post paddings; like the legacy path, calls that need more
padding after than before go to other algorithms (see :func:`graph_padding`).

A second algorithm, ``cudnn_tf32x3`` (:class:`CudnnGraphTF32x3`), takes the TF32
tensor-core engines too, on float32 operands split into TF32 parts and stacked along
the summed channels so that the result keeps float32 accuracy.
"""
from __future__ import annotations

import ctypes
from dataclasses import replace

import numpy as np

from . import autotune, cudnn
from .registry import NotApplicable

# cudnnBackendDescriptorType_t
_ENGINE, _ENGINECFG, _ENGINEHEUR, _EXECUTION_PLAN, _KNOB_CHOICE = 2, 3, 4, 5, 7
_CONVOLUTION, _OPERATIONGRAPH, _VARIANT_PACK, _TENSOR = 1, 15, 16, 17
# cudnnBackendAttributeType_t
_T_HANDLE, _T_DATA_TYPE, _T_INT64, _T_FLOAT, _T_DOUBLE, _T_VOID_PTR = 0, 1, 3, 4, 5, 6
_T_CONV_MODE, _T_HEUR_MODE, _T_KNOB_TYPE, _T_NUMERICAL_NOTE, _T_DESCRIPTOR = 7, 8, 9, 11, 15
# cudnnBackendAttributeName_t
_CONV_COMP_TYPE, _CONV_MODE, _CONV_DILATIONS, _CONV_STRIDES = 100, 101, 102, 103
_CONV_POST_PADDINGS, _CONV_PRE_PADDINGS, _CONV_SPATIAL_DIMS = 104, 105, 106
_HEUR_MODE, _HEUR_GRAPH, _HEUR_RESULTS = 200, 201, 202
_CFG_ENGINE, _CFG_KNOB_CHOICES = 300, 302
_PLAN_HANDLE, _PLAN_CONFIG, _PLAN_WORKSPACE = 400, 401, 402
_KNOB_TYPE, _KNOB_VALUE = 600, 601
_GRAPH_HANDLE, _GRAPH_OPS = 800, 801
_TENSOR_ALIGNMENT, _TENSOR_DATA_TYPE, _TENSOR_DIMS, _TENSOR_STRIDES, _TENSOR_UID = 900, 901, 902, 903, 906
_PACK_UIDS, _PACK_POINTERS, _PACK_WORKSPACE = 1000, 1001, 1003
_ENGINE_INDEX, _ENGINE_NUMERICAL_NOTE = 1301, 1303
# cudnnBackendHeurMode_t, cudnnBackendNumericalNote_t
_HEUR_FALLBACK, _HEUR_A = 2, 3
_NOTE_TENSOR_CORE, _NOTE_DOWN_CONVERT, _NOTE_REDUCED_PRECISION, _NOTE_NONDETERMINISTIC = 0, 1, 2, 4
_NOT_SUPPORTED = 9

# Operation descriptor type and its attributes: alpha, beta, conv, then the tensor of
# each role.  The unique ids are fixed: 1 = x-shaped, 2 = w-shaped, 3 = y-shaped.
_OPERATIONS = {
    "forward": (10, 700, 701, 702, {"x": 704, "w": 703, "y": 705}),
    "backward_input": (12, 706, 707, 708, {"x": 710, "w": 709, "y": 711}),
    "backward_weight": (11, 712, 713, 714, {"x": 716, "w": 715, "y": 717}),
}
_UIDS = {"x": 1, "w": 2, "y": 3}
#: how many engine configurations the first call of a shape times at most
MAX_TRIED = 16


def _int64s(values):
    values = [int(v) for v in values]
    return (ctypes.c_int64 * len(values))(*values)


class _Desc:
    """One backend descriptor, destroyed with the object.

    It also holds (in ``keep``) every host array and descriptor handed to ``set``:
    cuDNN may use them again after the call -- an execution plan runs the engine
    configuration it was built from, which must therefore outlive it.
    """

    __slots__ = ("ptr", "keep")

    def __init__(self, kind):
        self.keep = []
        self.ptr = ctypes.c_void_p()
        cudnn._check(cudnn._lib.cudnnBackendCreateDescriptor(kind, ctypes.byref(self.ptr)),
                     f"cudnnBackendCreateDescriptor({kind})")

    def set(self, attr, kind, values):
        cudnn._check(cudnn._lib.cudnnBackendSetAttribute(self.ptr, attr, kind, len(values), values),
                     f"cudnnBackendSetAttribute({attr})")
        self.keep.append(values)
        return self

    def set_descriptors(self, attr, descs):
        self.keep.extend(descs)          # e.g. a plan uses its engine config, never copies it
        return self.set(attr, _T_DESCRIPTOR, (ctypes.c_void_p * len(descs))(*[d.ptr.value for d in descs]))

    def finalize(self, what):
        cudnn._check(cudnn._lib.cudnnBackendFinalize(self.ptr), f"cudnnBackendFinalize({what})")
        return self

    def get(self, attr, kind, ctype, most):
        out = (ctype * most)()
        count = ctypes.c_int64(0)
        cudnn._check(cudnn._lib.cudnnBackendGetAttribute(self.ptr, attr, kind, most, ctypes.byref(count), out),
                     f"cudnnBackendGetAttribute({attr})")
        return list(out[:count.value])

    def get_descriptors(self, attr, kind, most):
        """Fill up to ``most`` fresh descriptors of ``kind`` from a descriptor-valued attribute."""
        descs = [_Desc(kind) for _ in range(most)]
        arr = (ctypes.c_void_p * most)(*[d.ptr.value for d in descs])
        count = ctypes.c_int64(0)
        cudnn._check(cudnn._lib.cudnnBackendGetAttribute(self.ptr, attr, _T_DESCRIPTOR, most,
                                                         ctypes.byref(count), arr),
                     f"cudnnBackendGetAttribute({attr})")
        return descs[:count.value]

    def __del__(self):
        try:
            if self.ptr:
                cudnn._lib.cudnnBackendDestroyDescriptor(self.ptr)
        except Exception:  # noqa: BLE001 - interpreter shutdown: the module may be gone
            pass


def graph_padding(g):
    """(pre, post) paddings per dim that give ``g``'s output size, or None.

    cuDNN takes floor((X + pre + post - D(K-1) - 1)/S) + 1 outputs.  ``pre`` is the
    geometry's low padding; ``post`` is the least high padding that yields ``y_size``
    (padding never read changes nothing).  Only post <= pre is taken: with more
    padding after than before, some of cuDNN's weight-gradient engines gave wrong
    results on an H200 (cuDNN 9.19; e.g. a 1x1 kernel over a width-1 input with
    post padding 1), and PyTorch never asks cuDNN for such padding.
    """
    pre, post = [], []
    for x, y, k, s, d, lo in zip(g.x_size, g.y_size, g.kernel, g.stride, g.dilation, g.pad_lo):
        hi = max((y - 1) * s + d * (k - 1) + 1 - x - lo, 0)
        span = x + lo + hi - d * (k - 1) - 1
        if lo < 0 or hi > lo or span < 0 or span // s + 1 != y:
            return None
        pre.append(lo)
        post.append(hi)
    return tuple(pre), tuple(post)


def _alignment(*ptrs):
    """Largest power of two up to 16 that divides every address."""
    align = 16
    while align > 1 and any(p % align for p in ptrs):
        align //= 2
    return align


class _Graph:
    """The one-node operation graph of (op, geometry, dtype, alignment), and its plans."""

    def __init__(self, handle, op, g, dtype, align, tf32=False):
        self.tf32 = tf32
        dt = cudnn._DATA[dtype.name]
        dims = {"x": list(g.x_shape), "w": list(g.w_shape), "y": list(g.y_shape)}
        pre, post = graph_padding(g)
        pre, post, s, d = list(pre), list(post), list(g.stride), list(g.dilation)
        if g.nd == 1:                    # cuDNN wants 4-d tensors at least: add a unit dim
            for v in dims.values():
                v.insert(2, 1)
            pre.insert(0, 0), post.insert(0, 0), s.insert(0, 1), d.insert(0, 1)
        self.tensors = {}
        for role, shape in dims.items():
            self.tensors[role] = (_Desc(_TENSOR)
                                  .set(_TENSOR_DATA_TYPE, _T_DATA_TYPE, (ctypes.c_int * 1)(dt))
                                  .set(_TENSOR_DIMS, _T_INT64, _int64s(shape))
                                  .set(_TENSOR_STRIDES, _T_INT64, _int64s(cudnn._strides(shape)))
                                  .set(_TENSOR_UID, _T_INT64, _int64s([_UIDS[role]]))
                                  .set(_TENSOR_ALIGNMENT, _T_INT64, _int64s([align]))
                                  .finalize("tensor"))
        double = dtype == np.float64
        comp = cudnn._DATA["float64" if double else "float32"]
        self.conv = (_Desc(_CONVOLUTION)
                     .set(_CONV_COMP_TYPE, _T_DATA_TYPE, (ctypes.c_int * 1)(comp))
                     .set(_CONV_MODE, _T_CONV_MODE, (ctypes.c_int * 1)(cudnn._CROSS_CORRELATION))
                     .set(_CONV_SPATIAL_DIMS, _T_INT64, _int64s([len(s)]))
                     .set(_CONV_DILATIONS, _T_INT64, _int64s(d))
                     .set(_CONV_STRIDES, _T_INT64, _int64s(s))
                     .set(_CONV_PRE_PADDINGS, _T_INT64, _int64s(pre))
                     .set(_CONV_POST_PADDINGS, _T_INT64, _int64s(post))
                     .finalize("convolution"))
        kind, alpha, beta, conv, roles = _OPERATIONS[op]
        scalar = (ctypes.c_double * 1) if double else (ctypes.c_float * 1)
        scalar_type = _T_DOUBLE if double else _T_FLOAT
        self.op = _Desc(kind).set(alpha, scalar_type, scalar(1.0)).set(beta, scalar_type, scalar(0.0))
        self.op.set_descriptors(conv, [self.conv])
        for role, attr in roles.items():
            self.op.set_descriptors(attr, [self.tensors[role]])
        self.op.finalize(op)
        self.handle = handle
        self.graph = (_Desc(_OPERATIONGRAPH)
                      .set(_GRAPH_HANDLE, _T_HANDLE, (ctypes.c_void_p * 1)(handle.value))
                      .set_descriptors(_GRAPH_OPS, [self.op])
                      .finalize("operation graph"))
        self.dtype = dtype

    def configs(self, deterministic):
        """[(identity string, engine config)] the heuristics name, filtered, best first."""
        out, seen = [], set()
        for mode in (_HEUR_A, _HEUR_FALLBACK):
            try:
                heur = (_Desc(_ENGINEHEUR).set_descriptors(_HEUR_GRAPH, [self.graph])
                        .set(_HEUR_MODE, _T_HEUR_MODE, (ctypes.c_int * 1)(mode)).finalize("heuristics"))
                count = ctypes.c_int64(0)
                cudnn._check(cudnn._lib.cudnnBackendGetAttribute(heur.ptr, _HEUR_RESULTS, _T_DESCRIPTOR, 0,
                                                                 ctypes.byref(count), None), "heuristics count")
                cfgs = heur.get_descriptors(_HEUR_RESULTS, _ENGINECFG, count.value) if count.value else []
            except RuntimeError:
                continue
            for cfg in cfgs:
                try:
                    ident, notes = self._describe(cfg)
                except RuntimeError:
                    continue
                if ident in seen or not self._acceptable(notes, deterministic):
                    continue
                seen.add(ident)
                out.append((ident, cfg))
        return out

    def _describe(self, cfg):
        engine = cfg.get_descriptors(_CFG_ENGINE, _ENGINE, 1)[0]
        index = engine.get(_ENGINE_INDEX, _T_INT64, ctypes.c_int64, 1)[0]
        notes = engine.get(_ENGINE_NUMERICAL_NOTE, _T_NUMERICAL_NOTE, ctypes.c_int, 16)
        knobs = []
        for knob in cfg.get_descriptors(_CFG_KNOB_CHOICES, _KNOB_CHOICE, 32):
            knobs.append((knob.get(_KNOB_TYPE, _T_KNOB_TYPE, ctypes.c_int, 1)[0],
                          knob.get(_KNOB_VALUE, _T_INT64, ctypes.c_int64, 1)[0]))
        ident = f"{index}" + "".join(f",{t}={v}" for t, v in sorted(knobs))
        return ident, set(notes)

    def _acceptable(self, notes, deterministic):
        if deterministic and _NOTE_NONDETERMINISTIC in notes:
            return False
        if self.dtype == np.float16:
            return _NOTE_REDUCED_PRECISION not in notes
        if self.tf32:       # float32 on TF32 tensor cores, nothing narrower
            return not notes & {_NOTE_DOWN_CONVERT, _NOTE_REDUCED_PRECISION}
        return not notes & {_NOTE_TENSOR_CORE, _NOTE_DOWN_CONVERT}

    def plan(self, cfg):
        """(execution plan, workspace bytes), or None where cuDNN cannot build it."""
        try:
            plan = (_Desc(_EXECUTION_PLAN)
                    .set(_PLAN_HANDLE, _T_HANDLE, (ctypes.c_void_p * 1)(self.handle.value))
                    .set_descriptors(_PLAN_CONFIG, [cfg]).finalize("execution plan"))
            ws = plan.get(_PLAN_WORKSPACE, _T_INT64, ctypes.c_int64, 1)[0]
        except RuntimeError:
            return None
        return plan, int(ws)


def _variant_pack(ptrs, ws_ptr):
    """The per-call descriptor that binds data pointers (x, w, y order) to the unique ids."""
    return (_Desc(_VARIANT_PACK)
            .set(_PACK_UIDS, _T_INT64, _int64s([_UIDS["x"], _UIDS["w"], _UIDS["y"]]))
            .set(_PACK_POINTERS, _T_VOID_PTR, (ctypes.c_void_p * 3)(*ptrs))
            .set(_PACK_WORKSPACE, _T_VOID_PTR, (ctypes.c_void_p * 1)(ws_ptr))
            .finalize("variant pack"))


def _execute(handle, plan, pack):
    return cudnn._lib.cudnnBackendExecute(handle, plan.ptr, pack.ptr)


class CudnnGraph(cudnn.CudnnAlgorithm):
    """cuDNN's engines through the graph API."""

    name = "cudnn_graph"
    padding = staticmethod(graph_padding)

    def __init__(self):
        #: (device, op, g, dtype, align, deterministic, limit) -> (plan, workspace bytes, packs)
        self._chosen = {}

    def run(self, engine, op, a, b, g):
        import cupy as cp
        out, arrays = cudnn.output_and_roles(cp, op, a, b, g)      # x, w, y
        self._launch(engine, cp, op, g, a.dtype, arrays)
        return out

    def _launch(self, engine, cp, op, g, dtype, arrays, temps=()):
        """Run ``op`` of ``g`` on ``arrays`` (x, w, y order), choosing the engine on the
        first call; the caller's temporary arrays ``temps`` count against the limit."""
        limit = engine.workspace_limit - sum(t.nbytes for t in temps)
        if limit < 0:
            raise NotApplicable(f"{self.name}'s operands alone exceed the workspace limit")
        ptrs = tuple(arr.data.ptr for arr in arrays)
        handle = cudnn.cudnn_handle(cp)
        align = _alignment(*ptrs)
        key = (cp.cuda.runtime.getDevice(), op, g, dtype.char, align, engine.deterministic, limit)
        chosen = self._chosen.get(key)
        if chosen is None:
            chosen = self._choose(engine, cp, handle, op, g, dtype, align, ptrs, limit)
            if len(self._chosen) > 512:
                self._chosen.clear()
            self._chosen[key] = chosen
        plan, ws_bytes, packs = chosen
        ws = None
        if ws_bytes:
            ws = cp.empty(ws_bytes, dtype=np.uint8)
        if ws is not None or temps:
            engine._note(*temps, *([ws] if ws is not None else []))
        ws_ptr = ws.data.ptr if ws is not None else None
        # A variant pack serves one plan only: cuDNN gave wrong results when a pack
        # built for (and run with) one plan was run with another plan.
        pack = packs.get(ptrs + (ws_ptr,))
        if pack is None:
            if len(packs) > 16:
                packs.clear()
            pack = packs[ptrs + (ws_ptr,)] = _variant_pack(ptrs, ws_ptr)
        cudnn._check(_execute(handle, plan, pack), "cudnnBackendExecute")

    def _choose(self, engine, cp, handle, op, g, dtype, align, ptrs, limit):
        graph = _Graph(handle, op, g, dtype, align, tf32=self.fp32_math == "tf32x3")
        configs = graph.configs(engine.deterministic)
        tuner, context = engine._tuner_context()
        disk_key = f"{self.name}:a{align}:" + engine._call_key(op, g, dtype)
        remembered = tuner.lookup(context, disk_key) if tuner is not None else None
        if remembered is not None:           # an earlier run's choice keeps the bits stable
            for ident, cfg in configs:
                if ident == remembered:
                    built = graph.plan(cfg)
                    if built is not None and built[1] <= limit:
                        return self._keep(graph, built)
        plans = []
        for ident, cfg in configs:
            built = graph.plan(cfg)
            if built is not None and built[1] <= limit:
                plans.append((ident, built))
            if len(plans) >= MAX_TRIED:
                break
        if not plans:
            raise NotApplicable(f"cuDNN's graph API has no {'deterministic ' if engine.deterministic else ''}"
                                f"engine for {op} within the workspace limit")
        ws = cp.empty(max(ws for _, (_, ws) in plans) or 1, dtype=np.uint8)
        times, runs = {}, {}
        from .gpu import cuda_timer          # (gpu imports this module)

        def fastest_of_3(plan, pack):        # each sample from an idle device, cold L2: as the autotuner's
            return cuda_timer(lambda: _execute(handle, plan, pack), 3, warmup=False)

        for ident, (plan, _) in plans:
            pack = _variant_pack(ptrs, ws.data.ptr)
            if _execute(handle, plan, pack) != cudnn._SUCCESS:      # warm-up; some fail only here
                continue
            runs[ident] = plan, pack
            times[ident] = fastest_of_3(plan, pack)
        # as the autotuner does: close calls timed again, each keeping its fastest (a
        # busy device only adds time; the plan decides rows: t2d_dcgan_k4s2's forward
        # took 0.37-0.41 ms in three runs on an H200 and 0.55 in one)
        close = [i for i in times if times[i] <= min(times.values(), default=0) * (1 + autotune.CLOSE_CALL)]
        for _ in range(autotune.RETIME_ROUNDS if len(close) > 1 else 0):
            for ident in close:
                times[ident] = min(times[ident], fastest_of_3(*runs[ident]))
        del ws, runs
        if not times:
            raise NotApplicable(f"no engine of cuDNN's graph API ran {op}")
        best = min(times, key=times.get)
        if tuner is not None:
            tuner.record(context, disk_key, best, times)
        return self._keep(graph, dict(plans)[best])

    @staticmethod
    def _keep(graph, built):
        plan, ws = built
        plan.keep.append(graph)   # the descriptors the plan was built from live as long
        return plan, ws, {}


def stacked_geometry(op, g):
    """The geometry of ``op`` once the summed channels are stacked three times (tf32x3):
    x's for the forward, y's for the input gradient."""
    if op == "forward":
        return replace(g, x_channels=3 * g.x_channels)
    return replace(g, y_channels=3 * g.y_channels)


class CudnnGraphTF32x3(CudnnGraph):
    """cuDNN's TF32 tensor-core engines at float32 accuracy ("3xTF32", see gpu_blas).

    The forward and the input gradient sum over one operand's channels and the
    weight's matching axis.  Both operands are split into TF32 parts and stacked three
    times along that axis, as ``[hi, lo, hi]`` and ``[hi, hi, lo]``: one TF32 convolution
    over three times the channels then sums ``hi*hi + lo*hi + hi*lo`` in float32, the
    two cross terms that one TF32 product drops.  cuDNN runs such convolutions on an
    H200 far above its float32 rate; the split costs one pass over each operand.  The
    batch is cut into chunks whose stacked copies fit half the workspace limit.  One
    group only, and sums of at most ``TF32X3_MAX_K`` products per output, as the other
    tf32x3 algorithms (the weight gradient sums over the whole batch: not taken).
    """

    name = "cudnn_tf32x3"
    fp32_math = "tf32x3"

    @staticmethod
    def gemm_k(op, g):
        """Products per output (``gpu_blas.conv_sum_length``)."""
        from . import gpu_blas
        return gpu_blas.conv_sum_length(op, g)

    def supports(self, op, g, dtype):
        if op == "backward_weight" or g.groups != 1 or np.dtype(dtype) != np.float32:
            return False
        from . import gpu_blas
        if not gpu_blas.tf32x3_takes(dtype, gpu_blas.conv_sum_length(op, g)):
            return False
        return super().supports(op, stacked_geometry(op, g), dtype)

    def run(self, engine, op, a, b, g):
        import cupy as cp
        from . import gpu_blas
        # forward: a = x (N, Cx, ...), b = w (Cy, Cx, ...); input gradient: a = gy (N, Cy, ...)
        per_sample = 3 * a.nbytes // g.batch
        for share in (2, 1):   # samples per chunk: half the limit left to cuDNN where one fits
            chunk = min(g.batch, (engine.workspace_limit // share - 3 * b.nbytes) // per_sample)
            if chunk >= 1:
                break
        else:
            raise NotApplicable(f"{self.name}'s stacked operands exceed the workspace limit")
        w3 = gpu_blas.stack_parts(b, 1 if op == "forward" else 0, "hhl")
        out = cp.empty(g.y_shape if op == "forward" else g.x_shape, dtype=a.dtype)
        for n0 in range(0, g.batch, chunk):
            n1 = min(n0 + chunk, g.batch)
            a3 = gpu_blas.stack_parts(a[n0:n1], 1, "hlh")          # (nb, 3C, ...)
            arrays = (a3, w3, out[n0:n1]) if op == "forward" else (out[n0:n1], w3, a3)
            self._launch(engine, cp, op, stacked_geometry(op, g.with_batch(n1 - n0)), a.dtype, arrays,
                         temps=(a3, w3))
            del a3
        return out
