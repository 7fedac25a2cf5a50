"""``ndconv bench``: time ndconv against PyTorch on the benchmark suite.

For every case of the suite and each of the three operations (``fwd``,
``bwd_data``, ``bwd_weight``) the command

1. builds the same inputs for both libraries (NumPy, fixed seed),
2. runs each library once and checks that the results agree,
3. warms up, then alternates ndconv and PyTorch calls (A B A B ...) and keeps the
   median of each -- interleaving in one process exposes both to the same noise,
   which is what makes the *ratio* trustworthy on a shared, noisy machine,
4. reports ndconv's GFLOP/s against a ceiling measured in the same run (sgemm on
   the CPU; matmul rate or device-copy bandwidth on the GPU).

Also runnable as ``python -m ndconv.bench``.  Exit status: 0 when every row ran
and agreed, 1 when some case failed (results disagree or a call raised), 2 for a
bad command line or suite file.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cli import int_at_least, seconds_below
from .engine.cpu import cpu_model

OPS = ("fwd", "bwd_data", "bwd_weight")
KINDS = ("conv", "deconv")
DEVICES = ("cpu", "gpu")
DTYPES = ("float32", "float16")
DEFAULT_SUITE = Path(__file__).resolve().parent / "data" / "bench-suite.json"
DEFAULT_REPEAT = {"cpu": 7, "gpu": 20}
DEFAULT_WARMUP = {"cpu": 1, "gpu": 3}
#: seconds of pause, then an untimed call, before each timed call (see time_pair): on the
#: CPU both libraries' worker threads spin after a call and would slow the other's next one
DEFAULT_SETTLE = {"cpu": 0.25, "gpu": 0.0}
DEFAULT_WARMUP_TIME = {"cpu": 0.0, "gpu": 0.2}
# Relative max error (max |a - b| / max |b|) allowed between the two libraries.
# float32 sums of up to ~10^4 products stay well inside 1e-3 (TF32 is off on the
# GPU); float16 keeps ~3 decimal digits, and the two libraries may round partial
# sums differently.
TOLERANCE = {"float32": 1e-3, "float16": 2e-2}
SEED = 20261121

_REQUIRED = ("name", "kind", "N", "C_in", "C_out", "spatial", "kernel")
_OPTIONAL = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


class BenchError(ValueError):
    """A bad command line or suite file: reported as one line, exit status 2."""


# ------------------------------------------------------------------------ the suite

@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    N: int
    C_in: int
    C_out: int
    spatial: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    groups: int
    output_padding: tuple

    @property
    def nd(self):
        return len(self.spatial)

    @property
    def transposed(self):
        return self.kind == "deconv"

    @property
    def x_shape(self):
        """The input of the case's forward call (of the transposed conv for 'deconv')."""
        return (self.N, self.C_in) + self.spatial

    @property
    def w_shape(self):
        if self.transposed:   # PyTorch's transposed layout: (in, out/groups, *kernel)
            return (self.C_in, self.C_out // self.groups) + self.kernel
        return (self.C_out, self.C_in // self.groups) + self.kernel

    def geometry(self):
        """The ndconv geometry (checks every argument the same way ndconv's API does)."""
        from .geometry import conv_geometry, conv_transpose_geometry
        if self.transposed:
            geom, _ = conv_transpose_geometry(self.x_shape, self.w_shape, None, self.stride, self.padding,
                                              self.output_padding, self.groups, self.dilation)
        else:
            geom, _ = conv_geometry(self.x_shape, self.w_shape, None, self.stride, self.padding,
                                    self.dilation, self.groups)
        return geom

    @property
    def out_shape(self):
        g = self.geometry()
        return g.x_shape if self.transposed else g.y_shape

    def describe(self):
        dims = "x".join(map(str, self.spatial))
        k = "x".join(map(str, self.kernel))
        return (f"{self.kind} N={self.N} {self.C_in}->{self.C_out} {dims} k={k} s={_short(self.stride)} "
                f"p={_short(self.padding)} d={_short(self.dilation)} g={self.groups}")


def _short(t):
    return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _case_from_dict(raw, where):
    """Validate one suite entry; every error names the entry and the field."""
    if not isinstance(raw, dict):
        raise BenchError(f"{where}: each case must be a JSON object, got {type(raw).__name__}")
    if "name" in raw and isinstance(raw["name"], str):
        where = f"{where} ({raw['name']!r})"
    unknown = sorted(set(raw) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise BenchError(f"{where}: unknown field {unknown[0]!r} (known fields: "
                         f"{', '.join(_REQUIRED + tuple(_OPTIONAL))})")
    for field in _REQUIRED:
        if field not in raw:
            raise BenchError(f"{where}: missing field {field!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name or "," in name:
        raise BenchError(f"{where}: field 'name' must be a non-empty string without commas, got {name!r}")
    if raw["kind"] not in KINDS:
        raise BenchError(f"{where}: field 'kind' must be one of {KINDS}, got {raw['kind']!r}")
    for field in ("N", "C_in", "C_out", "groups"):
        v = raw.get(field, _OPTIONAL.get(field))
        if not _is_int(v) or v <= 0:
            raise BenchError(f"{where}: field {field!r} must be a positive integer, got {v!r}")
    spatial = raw["spatial"]
    if (not isinstance(spatial, list) or len(spatial) not in (1, 2, 3)
            or not all(_is_int(s) and s > 0 for s in spatial)):
        raise BenchError(f"{where}: field 'spatial' must be a list of 1 to 3 positive integers, "
                         f"got {spatial!r}")
    nd = len(spatial)
    tuples = {}
    for field, minimum in (("kernel", 1), ("stride", 1), ("padding", 0), ("dilation", 1),
                           ("output_padding", 0)):
        v = raw.get(field, _OPTIONAL.get(field))
        if _is_int(v):
            v = [v] * nd
        if not isinstance(v, list) or len(v) != nd or not all(_is_int(e) and e >= minimum for e in v):
            what = "positive" if minimum else "non-negative"
            raise BenchError(f"{where}: field {field!r} must be a {what} integer or a list of {nd} "
                             f"{what} integers (one per spatial dim), got {raw.get(field)!r}")
        tuples[field] = tuple(v)
    groups = raw.get("groups", 1)
    for field in ("C_in", "C_out"):
        if raw[field] % groups:
            raise BenchError(f"{where}: field {field!r}={raw[field]} is not divisible by groups={groups}")
    if raw["kind"] == "conv" and any(tuples["output_padding"]):
        raise BenchError(f"{where}: field 'output_padding' applies to kind 'deconv' only, "
                         f"got {raw['output_padding']!r}")
    case = Case(name, raw["kind"], raw["N"], raw["C_in"], raw["C_out"], tuple(spatial), tuples["kernel"],
                tuples["stride"], tuples["padding"], tuples["dilation"], groups, tuples["output_padding"])
    try:
        case.geometry()
    except (ValueError, TypeError) as e:
        raise BenchError(f"{where}: not a valid {case.kind}: {e}") from None
    return case


def load_suite(path):
    """Read and validate a suite file: ``{"cpu": [case, ...], "gpu": [case, ...]}``.

    Returns ``{device: [Case, ...]}`` for the device lists present.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise BenchError(f"cannot read suite file {str(path)!r}: {e.strerror or e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"suite file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BenchError(f"suite file {str(path)!r} must hold a JSON object with 'cpu' and/or 'gpu' "
                         f"lists, got a {type(raw).__name__}")
    if not any(d in raw for d in DEVICES):
        raise BenchError(f"suite file {str(path)!r} has neither a 'cpu' nor a 'gpu' list of cases")
    suite = {}
    for device in DEVICES:
        if device not in raw:
            continue
        entries = raw[device]
        if not isinstance(entries, list):
            raise BenchError(f"{path}: field {device!r} must be a list of cases, "
                             f"got {type(entries).__name__}")
        cases = [_case_from_dict(e, f"{path}: {device}[{i}]") for i, e in enumerate(entries)]
        names = [c.name for c in cases]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise BenchError(f"{path}: {device} case name {dup[0]!r} appears more than once")
        suite[device] = cases
    return suite


def select_cases(cases, names):
    """The cases named in ``names`` (a comma-separated string or a list), in suite order."""
    if names is None:
        return list(cases)
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    if not names:
        raise BenchError("--cases needs at least one case name")
    known = {c.name for c in cases}
    for n in names:
        if n not in known:
            raise BenchError(f"--cases: unknown case {n!r}; this suite has: {', '.join(c.name for c in cases)}")
    wanted = set(names)
    return [c for c in cases if c.name in wanted]


# ------------------------------------------------------------------------ timing

@dataclass
class PairTiming:
    """Seconds per call of two interleaved functions; medians and every sample.  ``host_a``
    / ``host_b``: seconds until each timed call returned, before ``sync`` (on a GPU, the
    host's share: launches and library overhead; close to the whole time, the call is
    bound by its host)."""
    median_a: float
    median_b: float
    times_a: list
    times_b: list
    host_a: list = None
    host_b: list = None


def time_pair(fn_a, fn_b, repeat, warmup=1, sync=None, clock=time.perf_counter, settle=0.0,
              sleep=time.sleep, warmup_s=0.0):
    """Time ``fn_a`` and ``fn_b`` alternately (A B A B ...), ``repeat`` times each.

    ``warmup`` untimed rounds of both come first, continued until ``warmup_s``
    seconds have passed (a GPU's clocks and caches reach their steady state after the
    previous case's calls: the first calls of a row measured up to 40% slower).  ``sync`` (e.g. a device
    synchronisation) runs before the clock starts and before it stops, so queued
    asynchronous work is neither charged to the next call nor left out.  With
    ``settle`` > 0 (seconds), every timed call comes after a pause of that length
    and one untimed call of the same function: on a CPU, a library's worker threads
    spin for up to ~0.2 s after its call (OpenBLAS, OpenMP), and would otherwise
    take cores from the other library's next call.  Returns a :class:`PairTiming`;
    the median shrugs off the odd interrupted run that a mean would absorb.
    """
    if not _is_int(repeat) or repeat < 1:
        raise ValueError(f"repeat must be a positive integer, got repeat={repeat!r}")
    if not _is_int(warmup) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got warmup={warmup!r}")
    if isinstance(settle, bool) or not isinstance(settle, (int, float)) or not 0 <= settle < 60:
        raise ValueError(f"settle must be a number of seconds in [0, 60), got settle={settle!r}")
    if isinstance(warmup_s, bool) or not isinstance(warmup_s, (int, float)) or not 0 <= warmup_s < 60:
        raise ValueError(f"warmup_s must be a number of seconds in [0, 60), got warmup_s={warmup_s!r}")
    sync = sync or (lambda: None)
    start = clock()
    rounds = 0
    while rounds < warmup or (warmup_s and clock() - start < warmup_s):
        fn_a()
        fn_b()
        sync()
        rounds += 1
    times_a, times_b, host_a, host_b = [], [], [], []

    def once(fn, out, host):
        if settle:
            sleep(settle)
            fn()
        sync()
        t0 = clock()
        fn()
        t1 = clock()
        sync()
        out.append(clock() - t0)
        host.append(t1 - t0)

    for _ in range(repeat):
        once(fn_a, times_a, host_a)
        once(fn_b, times_b, host_b)
    return PairTiming(statistics.median(times_a), statistics.median(times_b), times_a, times_b, host_a, host_b)


def geomean(values):
    """Geometric mean of positive numbers (None / non-finite entries are skipped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    if any(v <= 0 for v in vals):
        raise ValueError(f"geomean needs positive values, got {min(vals)}")
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def rel_error(a, b):
    """max |a - b| / max |b|, in float64 (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ndconv {a.shape} vs PyTorch {b.shape}")
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------------ devices

class Backend:
    """Arrays, synchronisation and ceilings of one device, for both libraries."""

    def __init__(self, device, dtype, threads=None, autotune=True):
        import torch
        self.torch = torch
        self.autotune = autotune   # ndconv's counterpart of cudnn.benchmark: measure, then choose
        self._engines = {}
        self.device = device
        self.dtype = dtype
        self.threads = threads
        self._saved_flags = None
        if device == "gpu":
            import cupy
            self.cupy = cupy
            self.torch_device = torch.device("cuda")
            self._saved_flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                                 torch.backends.cudnn.allow_tf32)
            torch.backends.cudnn.benchmark = True
            # TF32 would round the inputs to 10 mantissa bits: not fp32 arithmetic.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        else:
            self.cupy = None
            self.torch_device = torch.device("cpu")

    def tune(self, engine):
        """Set the engine's autotune flag for the run (restored by close)."""
        self._engines.setdefault(id(engine), (engine, engine.autotune))
        engine.autotune = self.autotune
        return engine

    def close(self):
        """Put PyTorch's global GPU flags and the engines' autotune flags back as they were."""
        for engine, flag in self._engines.values():
            engine.autotune = flag
        self._engines.clear()
        if self._saved_flags is not None:
            b = self.torch.backends
            b.cudnn.benchmark, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = self._saved_flags
            self._saved_flags = None

    def nd_array(self, a):
        return self.cupy.asarray(a) if self.cupy is not None else a

    def torch_tensor(self, a):
        return self.torch.from_numpy(a).to(self.torch_device)

    def sync(self):
        if self.cupy is not None:
            self.cupy.cuda.Device().synchronize()
            self.torch.cuda.synchronize()

    def to_host(self, a):
        if isinstance(a, self.torch.Tensor):
            return a.detach().cpu().numpy()
        if self.cupy is not None and isinstance(a, self.cupy.ndarray):
            return self.cupy.asnumpy(a)
        return np.asarray(a)

    def describe(self):
        if self.cupy is not None:
            props = self.cupy.cuda.runtime.getDeviceProperties(self.cupy.cuda.Device().id)
            name = props["name"]
            return name.decode() if isinstance(name, bytes) else str(name)
        return f"{cpu_model()}, {os.cpu_count()} logical cores, {self.threads} threads"

    def measure_ceilings(self):
        """``{"compute": Ceiling, "memory": Ceiling or None}``, measured now."""
        if self.cupy is None:
            return {"compute": Ceiling("sgemm", "GFLOP/s", [cpu_sgemm_gflops()]), "memory": None}
        cp = self.cupy
        label = "fp32 mm" if self.dtype == "float32" else "fp16 mm"
        return {"compute": Ceiling(label, "GFLOP/s", [gpu_matmul_gflops(cp, self.dtype)]),
                "memory": Ceiling("copy", "GB/s", [gpu_copy_gbs(cp)])}

    def resample_ceilings(self, ceilings):
        """CPU only: measure sgemm again between cases.

        A shared CPU's speed drifts during a run of minutes; sampling the ceiling
        throughout the run exposes it to the same drift as the rows it scales.  The
        GPU is steady, and its ceilings are measured once.
        """
        if self.cupy is None:
            ceilings["compute"].samples.append(cpu_sgemm_gflops(repeat=3))


@dataclass
class Ceiling:
    """A machine rate (median of the samples taken during the run)."""
    label: str
    unit: str
    samples: list

    @property
    def rate(self):
        return statistics.median(self.samples)

    def __str__(self):
        return f"{self.label} {self.rate:.1f} {self.unit}"



@contextlib.contextmanager
def cpu_threads(threads):
    """Give PyTorch, NumPy's BLAS and numba the same thread count; restore them afterwards.

    BLAS and numba are best effort: threadpoolctl when installed, else OpenBLAS's own
    setter; numba only when it is installed.
    """
    import torch
    saved_torch = torch.get_num_threads()
    torch.set_num_threads(threads)
    restore = []
    try:
        from threadpoolctl import threadpool_limits
        restore.append(threadpool_limits(threads).restore_original_limits)
    except ImportError:
        old = _openblas_threads()
        if old is not None and _openblas_threads(threads) is not None:
            restore.append(lambda: _openblas_threads(old))
    try:
        import numba
        old_numba = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        restore.append(lambda: numba.set_num_threads(old_numba))
    except ImportError:
        pass
    try:
        yield
    finally:
        for fn in reversed(restore):
            fn()
        torch.set_num_threads(saved_torch)   # last: threadpoolctl may also reset torch's OpenMP


def _openblas_threads(threads=None):
    """Read (or set, when ``threads`` is given) OpenBLAS's thread count in the loaded library.

    Returns the count read or set, ``None`` when no OpenBLAS is loaded.
    """
    import ctypes
    try:
        with open("/proc/self/maps") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and ".so" in line})
    except OSError:
        return None
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
        except OSError:
            continue
        for prefix in ("scipy_openblas", "openblas"):
            for suffix in ("64_", ""):
                getter = getattr(handle, f"{prefix}_get_num_threads{suffix}", None)
                setter = getattr(handle, f"{prefix}_set_num_threads{suffix}", None)
                if getter is None or setter is None:
                    continue
                if threads is None:
                    return int(getter())
                setter(ctypes.c_int(threads))
                return threads
    return None


def cpu_sgemm_gflops(n=2048, repeat=5):
    """Median rate of an n x n float32 ``np.matmul``: the CPU's practical ceiling."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    np.matmul(a, b, out=out)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def gpu_matmul_gflops(cp, dtype, n=8192, repeat=10):
    a = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dtype)
    b = cp.random.standard_normal((n, n), dtype=cp.float32).astype(dtype)
    out = cp.empty((n, n), dtype)
    times = []
    for i in range(repeat + 2):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        cp.matmul(a, b, out=out)
        cp.cuda.Device().synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2.0 * n ** 3 / statistics.median(times) / 1e9


def gpu_copy_gbs(cp, nbytes=1 << 30, repeat=10):
    """Device-to-device copy bandwidth, counting the read and the write."""
    a = cp.ones(nbytes // 4, cp.float32)
    b = cp.empty_like(a)
    times = []
    for i in range(repeat + 2):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        b[...] = a
        cp.cuda.Device().synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 2.0 * a.nbytes / statistics.median(times) / 1e9


def gpu_available():
    """``None`` when CuPy and a CUDA build of PyTorch see a GPU, else the reason why not."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no CUDA device"
    except Exception as e:  # ImportError, or CUDA runtime errors when no driver is present
        return f"CuPy is not usable ({type(e).__name__}: {e})"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available():
        return f"PyTorch {torch.__version__} has no CUDA device"
    return None


# ------------------------------------------------------------------------ one case

def make_inputs(case, dtype, seed=SEED):
    """NumPy input, weight and output-gradient of a case (same for both libraries)."""
    rng = np.random.default_rng([seed, sum(map(ord, case.name))])
    fan_in = (case.C_in // case.groups) * math.prod(case.kernel)
    x = rng.uniform(-1, 1, case.x_shape).astype(dtype)
    w = (rng.uniform(-1, 1, case.w_shape) / math.sqrt(fan_in)).astype(dtype)
    gy = rng.uniform(-1, 1, case.out_shape).astype(dtype)
    return x, w, gy


def ndconv_calls(case, x, w, gy):
    """ndconv's three operations on (device) arrays, as argument-free callables."""
    import ndconv
    s, p, d, g, op_ = case.stride, case.padding, case.dilation, case.groups, case.output_padding
    t = case.transposed
    if t:
        def fwd():
            return ndconv.conv_transpose_nd(x, w, None, s, p, op_, g, d)
    else:
        def fwd():
            return ndconv.conv_nd(x, w, None, s, p, d, g)

    def bwd_data():
        return ndconv.conv_backward(gy, x, w, s, p, d, g, transposed=t, output_padding=op_,
                                    needs=("input",))[0]

    def bwd_weight():
        return ndconv.conv_backward(gy, x, w, s, p, d, g, transposed=t, output_padding=op_,
                                    needs=("weight",))[1]
    return {"fwd": fwd, "bwd_data": bwd_data, "bwd_weight": bwd_weight}


def torch_calls(case, x, w, gy):
    """PyTorch's same three operations through the aten ops every layer ends in."""
    import torch
    aten = torch.ops.aten
    s, p, d = list(case.stride), list(case.padding), list(case.dilation)
    op_, g, t = list(case.output_padding), case.groups, case.transposed

    def fwd():
        return aten.convolution(x, w, None, s, p, d, t, op_, g)

    def bwd_data():
        return aten.convolution_backward(gy, x, w, None, s, p, d, t, op_, g, [True, False, False])[0]

    def bwd_weight():
        return aten.convolution_backward(gy, x, w, None, s, p, d, t, op_, g, [False, True, False])[1]
    return {"fwd": fwd, "bwd_data": bwd_data, "bwd_weight": bwd_weight}


def run_case(case, backend, repeat, warmup, ops=OPS, settle=0.0, warmup_s=0.0):
    """Check and time one case; returns one record per operation.

    Each timed record carries ``_ceiling`` ("compute" or "memory") and ``_work``
    (GFLOP or GB per call) for :func:`apply_ceilings` once the run has ended.
    """
    import ndconv
    dtype = backend.dtype
    flops = case.geometry().flops()
    base = {"case": case.name, "kind": case.kind, "device": backend.device, "dtype": dtype,
            "threads": backend.threads, "repeat": repeat, "flops": flops}
    try:
        x, w, gy = make_inputs(case, dtype)
        nd_args = [backend.nd_array(a) for a in (x, w, gy)]
        th_args = [backend.torch_tensor(a) for a in (x, w, gy)]
        engine = backend.tune(ndconv.get_engine(nd_args[0]))
    except Exception as e:  # e.g. out of device memory: a failed row, not a crash
        return [_failed(dict(base, op=op), "error", f"{type(e).__name__}: {e}") for op in ops]
    nd_fns = ndconv_calls(case, *nd_args)
    th_fns = torch_calls(case, *th_args)
    if backend.device == "gpu" and case.groups > 1:
        # Grouped and depthwise rows are memory bound there: rate = the bytes any
        # algorithm must move (read two operands, write the third) over the time.
        ceiling, work = "memory", (x.nbytes + w.nbytes + gy.nbytes) / 1e9
    else:
        ceiling, work = "compute", flops / 1e9
    records = []
    for op in ops:
        rec = dict(base, op=op)
        records.append(rec)
        try:
            if backend.autotune:
                nd_fns[op]()   # the first call of a shape tunes; its temporaries are not the op's
            if hasattr(engine, "peak_temp_bytes"):
                engine.peak_temp_bytes = 0
            backend.sync()
            last = getattr(engine, "last_algorithm", None)     # which algorithm ran
            if last is not None:
                last.clear()
            ours = nd_fns[op]()
            backend.sync()
            rec["algorithm"] = ",".join(sorted(set(last.values()))) if last else None
            rec["peak_temp_bytes"] = int(engine.peak_temp_bytes) if hasattr(engine, "peak_temp_bytes") else None
            ref = th_fns[op]()
            err = rel_error(backend.to_host(ours), backend.to_host(ref))
            del ours, ref
            rec["rel_err"] = err
            if not err <= TOLERANCE[dtype]:
                _failed(rec, "mismatch", f"ndconv and PyTorch disagree: relative max error {err:.3g} "
                                         f"> tolerance {TOLERANCE[dtype]:g}")
                continue
            timing = time_pair(nd_fns[op], th_fns[op], repeat, warmup, backend.sync, settle=settle,
                               warmup_s=warmup_s)
        except Exception as e:
            _failed(rec, "error", f"{type(e).__name__}: {e}")
            continue
        nd_s, th_s = timing.median_a, timing.median_b
        rec.update(ndconv_ms=nd_s * 1e3, torch_ms=th_s * 1e3, ratio=nd_s / th_s,
                   ndconv_samples_ms=[round(t * 1e3, 4) for t in timing.times_a],
                   torch_samples_ms=[round(t * 1e3, 4) for t in timing.times_b],
                   ndconv_host_ms=statistics.median(timing.host_a) * 1e3,
                   torch_host_ms=statistics.median(timing.host_b) * 1e3,
                   gflops=flops / nd_s / 1e9, torch_gflops=flops / th_s / 1e9,
                   status="ok", error=None, _ceiling=ceiling, _work=work)
    return records


def apply_ceilings(records, ceilings):
    """Fill ``ceiling``, ``ceiling_rate`` and ``ceiling_pct`` of the timed records."""
    for rec in records:
        kind, work = rec.pop("_ceiling", None), rec.pop("_work", None)
        if rec.get("status") != "ok" or kind is None:
            continue
        c = ceilings[kind]
        rec.update(ceiling=c.label, ceiling_rate=c.rate,
                   ceiling_pct=100.0 * work / (rec["ndconv_ms"] * 1e-3) / c.rate)
    return records


def _failed(rec, status, message):
    rec.setdefault("peak_temp_bytes", None)
    rec.setdefault("rel_err", None)
    rec.update(ndconv_ms=None, torch_ms=None, ratio=None, gflops=None, torch_gflops=None,
               ceiling=None, ceiling_rate=None, ceiling_pct=None, status=status, error=message)
    return rec


# ------------------------------------------------------------------------ reporting

def _fmt_ms(v):
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 10 else f"{v:.2f}" if v < 1000 else f"{v:.0f}"


def _fmt_bytes(v):
    if v is None:
        return "-"
    if v == 0:
        return "0"
    return f"{v / 2 ** 20:.1f} MiB"


def format_table(records):
    """Plain aligned text: one line per case and operation, then the geometric mean."""
    header = ("case", "op", "ndconv ms", "PyTorch ms", "ratio", "GFLOP/s", "% ceiling", "peak temp")
    rows = []
    for r in records:
        if r.get("status") == "ok":
            rows.append((r["case"], r["op"], _fmt_ms(r["ndconv_ms"]), _fmt_ms(r["torch_ms"]),
                         f"{r['ratio']:.2f}", f"{r['gflops']:.1f}",
                         f"{r['ceiling_pct']:.0f}% {r['ceiling']}", _fmt_bytes(r.get("peak_temp_bytes"))))
        else:
            rows.append((r["case"], r["op"], "-", "-", r.get("status", "error").upper(), "-", "-",
                         _fmt_bytes(r.get("peak_temp_bytes"))))
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    left = {0, 1}

    def line(row):
        return "  ".join(str(v).ljust(w) if i in left else str(v).rjust(w)
                         for i, (v, w) in enumerate(zip(row, widths))).rstrip()
    out = [line(header), line(tuple("-" * w for w in widths))]
    out += [line(r) for r in rows]
    ratios = [r["ratio"] for r in records if r.get("status") == "ok"]
    gm = geomean(ratios)
    out.append("")
    if gm is None:
        out.append("geometric mean ratio (ndconv / PyTorch): - (no row completed)")
    else:
        out.append(f"geometric mean ratio (ndconv / PyTorch) over {len(ratios)} rows: {gm:.3f}")
    bad = [r for r in records if r.get("status") != "ok"]
    for r in bad:
        out.append(f"FAILED {r['case']} {r['op']}: {r.get('error')}")
    return "\n".join(out)


def write_plot(records, path, title=""):
    """Bar chart of ndconv/PyTorch per case (one bar per op), log scale, line at 1."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys(r["case"] for r in records))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(cases) + 2), 4.5))
    width = 0.8 / len(OPS)
    colors = {"fwd": "#4c72b0", "bwd_data": "#dd8452", "bwd_weight": "#55a868"}
    by_key = {(r["case"], r["op"]): r for r in records}
    ratios = []
    for j, op in enumerate(OPS):
        xs, ys = [], []
        for i, c in enumerate(cases):
            r = by_key.get((c, op))
            if r is not None and r.get("status") == "ok":
                xs.append(i + (j - (len(OPS) - 1) / 2) * width)
                ys.append(r["ratio"])
        ratios += ys
        if xs:
            # bars grow from 1.0: up where ndconv is slower, down where it is faster
            ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=op, color=colors[op])
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=1)
    lo, hi = min(ratios + [1.0]) / 1.5, max(ratios + [1.0]) * 1.5
    ax.set_ylim(lo, hi)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 1 / 3, 0.5, 1, 1.25, 2, 3, 5, 10, 20, 50, 100)
             if lo <= t <= hi]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:.3g}x" for t in ticks])
    ax.minorticks_off()
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=45, ha="right")
    ax.set_ylabel("time ratio ndconv / PyTorch (lower is better)")
    ax.set_title(title)
    ax.legend(loc="best", fontsize="small")
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ndconv_revision():
    """ndconv's version plus the git commit it runs from, when it runs from a checkout."""
    from . import __version__
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return __version__
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no",
                                "--", "."], capture_output=True, text=True, timeout=5)
        mark = "-dirty" if dirty.stdout.strip() else ""
        return f"{__version__}+g{rev.stdout.strip()}{mark}"
    except (OSError, subprocess.SubprocessError):
        return __version__


# ------------------------------------------------------------------------ command line

def add_arguments(parser):
    parser.add_argument("--device", choices=DEVICES, default="cpu",
                        help="run the suite's cpu cases on NumPy or its gpu cases on CuPy (default: cpu)")
    parser.add_argument("--suite", metavar="PATH", default=None,
                        help=f"suite file (default: the packaged {DEFAULT_SUITE.name})")
    parser.add_argument("--cases", metavar="NAME,...", default=None,
                        help="only these cases, comma-separated (default: all of the device's cases)")
    parser.add_argument("--repeat", type=int_at_least(1), default=None, metavar="N",
                        help="timed calls of each library per row; the median is reported "
                             f"(default: {DEFAULT_REPEAT['cpu']} on cpu, {DEFAULT_REPEAT['gpu']} on gpu)")
    parser.add_argument("--warmup", type=int_at_least(0), default=None, metavar="N",
                        help="untimed rounds before timing, after the agreement check "
                             f"(default: {DEFAULT_WARMUP['cpu']} on cpu, {DEFAULT_WARMUP['gpu']} on gpu)")
    parser.add_argument("--settle", type=seconds_below(60), default=None, metavar="SECONDS",
                        help="before each timed call: a pause, then one untimed call of the same "
                             "library, so the other library's spinning worker threads are idle and "
                             f"this one's awake (default: {DEFAULT_SETTLE['cpu']} on cpu, "
                             f"{DEFAULT_SETTLE['gpu']} on gpu)")
    parser.add_argument("--warmup-time", type=seconds_below(60), default=None, metavar="SECONDS",
                        help="keep the untimed rounds going for at least this long "
                             f"(default: {DEFAULT_WARMUP_TIME['cpu']:g} on cpu, {DEFAULT_WARMUP_TIME['gpu']:g} on gpu)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="arrays of both libraries (default: float32)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="write a JSON list with one record per case and operation")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write a PNG bar chart of the ratios")
    parser.add_argument("--no-autotune", action="store_true",
                        help="use ndconv's untuned heuristic choice of algorithm (default: each shape's "
                             "first call times the candidates, as cudnn.benchmark does for PyTorch)")
    parser.add_argument("--threads", type=int_at_least(1), default=None, metavar="N",
                        help="CPU threads for PyTorch, NumPy's BLAS and numba (default: os.cpu_count())")
    parser.epilog = ("Every row is checked (ndconv and PyTorch must agree) before it is timed; ndconv "
                     "and PyTorch calls alternate and the median of each is reported. Exit status: 0 "
                     "when all rows ran and agreed, 1 when a row disagreed or raised, 2 for a bad "
                     "command line or suite file.")
    return parser


def _error(message):
    print(f"ndconv bench: error: {message}", file=sys.stderr)
    return 2


def run(args):
    device = args.device
    try:
        suite = load_suite(args.suite or DEFAULT_SUITE)
        if device not in suite:
            raise BenchError(f"suite file {str(args.suite or DEFAULT_SUITE)!r} has no {device!r} cases")
        cases = select_cases(suite[device], args.cases)
        _check_outputs(args)
    except BenchError as e:
        return _error(str(e))
    if device == "gpu":
        why = gpu_available()
        if why is not None:
            return _error(f"--device gpu needs CuPy and a CUDA GPU visible to PyTorch: {why}")
    try:
        import torch  # noqa: F401  (the reference every row is compared with)
    except ImportError:
        return _error("the benchmark compares with PyTorch, which is not installed "
                      "(pip install 'ndconv[bench]')")
    repeat = args.repeat or DEFAULT_REPEAT[device]
    warmup = DEFAULT_WARMUP[device] if args.warmup is None else args.warmup
    settle = DEFAULT_SETTLE[device] if args.settle is None else args.settle
    warmup_s = DEFAULT_WARMUP_TIME[device] if args.warmup_time is None else args.warmup_time
    threads = (args.threads or os.cpu_count()) if device == "cpu" else None
    with cpu_threads(threads) if threads else contextlib.nullcontext():
        return _bench(args, cases, repeat, warmup, threads, settle, warmup_s)


def _bench(args, cases, repeat, warmup, threads, settle=0.0, warmup_s=0.0):
    backend = Backend(args.device, args.dtype, threads, autotune=not args.no_autotune)
    try:
        return _bench_with(backend, args, cases, repeat, warmup, threads, settle, warmup_s)
    finally:
        backend.close()


def _bench_with(backend, args, cases, repeat, warmup, threads, settle=0.0, warmup_s=0.0):
    device = args.device
    versions = _versions(backend)
    print(f"ndconv bench: {device} ({backend.describe()}), {args.dtype}, {len(cases)} cases, "
          f"repeat {repeat}, warm-up {warmup} (at least {warmup_s:g} s), settle {settle:g} s", file=sys.stderr)
    load_before = _load()
    busy = _busy_warning(device, load_before)
    if busy:
        print(busy, file=sys.stderr)
    ceilings = backend.measure_ceilings()

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * len(OPS), file=sys.stderr, unit="row", dynamic_ncols=True)
    except ImportError:
        bar = None
    records = []
    for case in cases:
        if bar is not None:
            bar.set_postfix_str(case.name)
        for rec in run_case(case, backend, repeat, warmup, settle=settle, warmup_s=warmup_s):
            rec.update(versions)
            records.append(rec)
            if rec["status"] != "ok":
                msg = f"FAILED {rec['case']} {rec['op']}: {rec['error']}"
                (bar.write(msg, file=sys.stderr) if bar is not None else print(msg, file=sys.stderr))
            if bar is not None:
                bar.update(1)
        if backend.cupy is not None:
            backend.cupy.get_default_memory_pool().free_all_blocks()
            backend.torch.cuda.empty_cache()
        backend.resample_ceilings(ceilings)
    if bar is not None:
        bar.close()
    apply_ceilings(records, ceilings)
    ceiling_text = ", ".join(str(c) for c in ceilings.values() if c is not None)

    print(f"# ndconv bench --device {device} --dtype {args.dtype} --repeat {repeat}"
          + (f" --threads {threads}" if threads else "") + f" --settle {settle:g}"
          + (f" --warmup-time {warmup_s:g}" if warmup_s else ""))
    print(f"# machine: {backend.describe()}")
    if busy:
        print(f"# {busy}")
    if device == "cpu" and load_before is not None:
        # a load that rises during the run means something else competed with it
        print(f"# load average: {load_before:.2f} before the run, {_load():.2f} after "
              f"({os.cpu_count()} cores)")
    print(f"# versions: ndconv {versions['ndconv_version']}, numpy {versions['numpy_version']}, "
          f"torch {versions['torch_version']}"
          + (f", cupy {versions['cupy_version']}, CUDA {versions['cuda_version']}, "
             f"cuDNN {versions['cudnn_version']}" if "cupy_version" in versions else ""))
    print(f"# ceilings measured in this run: {ceiling_text}"
          + (" (median of samples before and after every case)" if device == "cpu" else ""))
    print()
    print(format_table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1) + "\n")
    if args.plot:
        gm = geomean(r["ratio"] for r in records if r["status"] == "ok")
        title = f"ndconv / PyTorch, {device} {args.dtype}" + (f", geomean {gm:.2f}" if gm else "")
        write_plot(records, args.plot, title)
    return 1 if any(r["status"] != "ok" for r in records) else 0


def _check_outputs(args):
    """Fail before minutes of timing, not after, when an output cannot be written."""
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path is None:
            continue
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            raise BenchError(f"{opt}: directory {str(parent)!r} does not exist (for {path!r})")
        if Path(path).is_dir():
            raise BenchError(f"{opt}: {path!r} is a directory, expected a file name")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib (pip install 'ndconv[bench]')") from None


def _load():
    """The 1-minute load average, or None where the OS has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _busy_warning(device, load):
    """A warning when other processes already load the CPU (timings then mislead)."""
    if device != "cpu" or load is None:
        return None
    cores = os.cpu_count() or 1
    if load > 0.5 * cores + 0.5:
        return (f"warning: load average {load:.1f} on {cores} cores before the run: other processes "
                f"compete for the CPU, so times are noisy and thread pools that spin (OpenMP) "
                f"may suffer more than others")
    return None


def _versions(backend):
    out = {"ndconv_version": ndconv_revision(), "numpy_version": np.__version__,
           "torch_version": backend.torch.__version__}
    if backend.cupy is not None:
        out["cupy_version"] = backend.cupy.__version__
        out["cuda_version"] = backend.torch.version.cuda
        out["cudnn_version"] = backend.torch.backends.cudnn.version()
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ndconv.bench",
                                     description="time ndconv against PyTorch on the benchmark suite")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
