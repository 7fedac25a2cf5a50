"""Algorithm registry: how an engine with several ways of computing one primitive picks one.

An algorithm names itself, says which calls it can do (``supports(op, geometry,
dtype)``), whether its results are bitwise reproducible, and runs a primitive.
The registry keeps them in priority order: the first one that supports a call is
the engine's default choice for it.  Nothing here imports an array library, so the
registry can be inspected (and tested) where no GPU exists.
"""
from __future__ import annotations

OPS = ("forward", "backward_input", "backward_weight")
#: the dtypes every engine computes in (float16 accumulates in float32)
FLOATS = ("float16", "float32", "float64")


def check_op(op, allow_all=False):
    if allow_all and op is None:
        return OPS
    if op not in OPS:
        extra = " or None (all)" if allow_all else ""
        raise ValueError(f"op must be one of {OPS}{extra}, got op={op!r}")
    return (op,)


def cached(cache, key, build, limit=4096):
    """``cache[key]``, built by ``build()`` on first use; the cache is emptied once it
    holds more than ``limit`` entries (plans and compiled kernels per geometry: a
    program sees few geometries, a long-running test many)."""
    found = cache.get(key)
    if found is None:
        if len(cache) > limit:
            cache.clear()
        found = cache[key] = build()
    return found


class NotApplicable(Exception):
    """Raised by ``Algorithm.run`` when it finds out only at run time that it cannot do a
    call (e.g. a library has no kernel for it within the workspace limit); the engine
    then falls back to its next candidate, unless the algorithm was forced."""


class Algorithm:
    """One way of computing the engine primitives.  Subclasses override the hooks."""

    name = "?"
    #: True when the same inputs give bitwise-identical results on every run.
    deterministic = True
    #: "tf32x3" when float32 products run on TF32 tensor cores at float32 accuracy
    #: (see ndconv.engine.gpu_blas); engines set to "ieee" leave such algorithms out.
    fp32_math = "ieee"

    def supports(self, op, g, dtype):  # pragma: no cover - interface
        raise NotImplementedError

    def preferred(self, op, g, dtype):
        """True when, untuned, this algorithm should beat the ones registered before it."""
        return False

    def run(self, engine, op, a, b, g):  # pragma: no cover - interface
        """``op`` on contiguous arrays ``a, b`` (as the engine primitive takes them)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<algorithm {self.name}>"


class Registry:
    """Algorithms by name, in priority order (first registered = tried first)."""

    def __init__(self):
        self._algorithms = {}

    def register(self, algorithm):
        if algorithm.name in self._algorithms:
            raise ValueError(f"an algorithm named {algorithm.name!r} is already registered")
        self._algorithms[algorithm.name] = algorithm
        return algorithm

    def names(self):
        return tuple(self._algorithms)

    def __iter__(self):
        return iter(self._algorithms.values())

    def __contains__(self, name):
        return name in self._algorithms

    def get(self, name):
        try:
            return self._algorithms[name]
        except (KeyError, TypeError):
            raise ValueError(f"algorithm must be one of {self.names()}, got algorithm={name!r}") from None

    def candidates(self, op, g, dtype, deterministic=True, fp32_math="tf32x3"):
        """Algorithms that can do this call, in priority order (``fp32_math="ieee"``: none
        that computes float32 on TF32 tensor cores)."""
        return [a for a in self._algorithms.values()
                if (a.deterministic or not deterministic) and (fp32_math != "ieee" or a.fp32_math == "ieee")
                and a.supports(op, g, dtype)]
