"""Containers: ``Sequential`` (and the ``Container`` base it shares behaviour with).

A container's parameters are its children's, named by dotted paths
(``"depthwise.W"``); ``getVar``/``setVar``/``save``/``load`` use those names.
"""
from __future__ import annotations

from .modules.module import Module

__all__ = ["Container", "Sequential"]


class Container(Module):
    """A module made of named child modules; parameters are reached by dotted names."""

    def __init__(self, name=None):
        super().__init__(name)
        self.modules = {}             # name -> module, in insertion order for plain containers

    # ------------------------------------------------------------ children
    def children(self):
        """``[(name, module), ...]`` in execution order."""
        return list(self.modules.items())

    def _child(self, name):
        for n, m in self.children():
            if n == name:
                return m
        raise KeyError(f"{self._what()} has no module named {name!r}; it has "
                       f"{[n for n, _ in self.children()]}")

    # ------------------------------------------------------------ parameters (dotted)
    @property
    def vars(self):
        return self.namedVars()

    def namedVars(self, prefix=""):
        out = {}
        for n, m in self.children():
            out.update(m.namedVars(prefix + n + "."))
        return out

    def paramSpecs(self):
        out = {}
        for n, m in self.children():
            for k, v in m.paramSpecs().items():
                out[n + "." + k] = v
        return out

    def _split(self, name):
        if not isinstance(name, str) or "." not in name:
            raise KeyError(f"{self._what()}: parameters of a container are named 'module.param' "
                           f"(e.g. 'conv.W'), got {name!r}")
        head, rest = name.split(".", 1)
        return self._child(head), rest

    def getVar(self, name):
        mod, rest = self._split(name)
        return mod.getVar(rest)

    def setVar(self, name, var):
        mod, rest = self._split(name)
        mod.setVar(rest, var)

    def trainableVars(self):
        return {k: v for k, v in self.namedVars().items() if v.grad is not None}

    def zeroGradParams(self):
        for _, m in self.children():
            m.zeroGradParams()

    def updateParams(self, learnRate):
        for _, m in self.children():
            m.updateParams(learnRate)

    def accGradParams(self, grad, scale=1.0, momentum=0.0):
        raise NotImplementedError("containers accumulate parameter gradients through backward()")

    # ------------------------------------------------------------ modes
    def trainMode(self):
        self.train = True
        for _, m in self.children():
            m.trainMode()
        return self

    def evalMode(self):
        self.train = False
        for _, m in self.children():
            m.evalMode()
        return self

    def calcMode(self, T):
        for _, m in self.children():
            m.calcMode(T)
        super().calcMode(T)
        return self

    def moveTo(self, device):
        for _, m in self.children():
            m.moveTo(device)
        self.reset()
        return self

    def reset(self):
        for _, m in self.children():
            m.reset()
        super().reset()

    # data dtype and device are checked by the children themselves
    def checkDataType(self, dtype):
        pass

    def _checkDevice(self, a, what):
        pass


class Sequential(Container):
    """Modules applied one after the other.

    ``append`` names a module without a name ``"0"``, ``"1"``, ... (its position
    when added; the next free number if that is taken).  ``seq["name"]`` and
    ``seq[i]`` return a module, ``seq[a:b]`` a new Sequential sharing the same
    module objects.
    """

    def __init__(self, name=None):
        super().__init__(name)
        self._order = []              # modules in execution order

    def children(self):
        return [(m.name, m) for m in self._order]

    # ------------------------------------------------------------ list-like API
    def _adopt(self, mod):
        if not isinstance(mod, Module):
            raise TypeError(f"Sequential holds Modules, got {type(mod).__name__}")
        if any(m is mod for m in self._order):
            raise ValueError(f"{mod!r} is already in this Sequential")
        if mod.name is None:
            i = len(self._order)
            while str(i) in self.modules:
                i += 1
            mod.name = str(i)
        elif mod.name in self.modules:
            raise ValueError(f"Sequential already holds a module named {mod.name!r}")
        self.modules[mod.name] = mod

    def append(self, mod):
        self._adopt(mod)
        self._order.append(mod)
        self._invalidate()
        return self

    def extend(self, mods):
        for m in list(mods):
            self.append(m)
        return self

    def insert(self, index, mod):
        self._adopt(mod)
        self._order.insert(index, mod)
        self._invalidate()
        return self

    def pop(self, index=-1):
        if not self._order:
            raise IndexError("pop from an empty Sequential")
        mod = self._order.pop(index)
        del self.modules[mod.name]
        self._invalidate()
        return mod

    def __len__(self):
        return len(self._order)

    def __iter__(self):
        return iter(list(self._order))

    def __contains__(self, item):
        if isinstance(item, str):
            return item in self.modules
        return any(m is item for m in self._order)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._child(key)
        if isinstance(key, slice):
            out = Sequential()
            for m in self._order[key]:
                out._order.append(m)
                out.modules[m.name] = m
            return out
        if isinstance(key, int) and not isinstance(key, bool):
            try:
                return self._order[key]
            except IndexError:
                raise IndexError(f"Sequential index {key} out of range for {len(self)} modules") from None
        raise TypeError(f"Sequential indices are str names, ints or slices, got {type(key).__name__}")

    def _invalidate(self):
        self.data = self.grad = self.inData = None

    # ------------------------------------------------------------ life cycle
    def checkDataShape(self, shape):
        for m in self._order:
            m.checkDataShape(shape)
            shape = m.dataShapeFrom(shape)

    def dataShapeFrom(self, shape):
        for m in self._order:
            shape = m.dataShapeFrom(shape)
        return tuple(shape)

    def gradShapeFrom(self, shape):
        for m in reversed(self._order):
            shape = m.gradShapeFrom(shape)
        return tuple(shape)

    def checkGradShape(self, shape):
        if self._order:
            self._order[-1].checkGradShape(shape)

    def updateData(self, data):
        for m in self._order:
            data = m(data)
        self.data = data

    def backward(self, grad, updParamGrads=True, updGrad=True, scale=1.0, momentum=0.0):
        if self.inData is None:
            raise RuntimeError(f"{self._what()}: backward called before forward")
        self.checkGradShape(tuple(grad.shape))
        for i in range(len(self._order) - 1, -1, -1):
            m = self._order[i]
            # The first module's input gradient is only needed when the caller asks for it.
            grad = m.backward(grad, updParamGrads=updParamGrads, updGrad=updGrad or i > 0,
                              scale=scale, momentum=momentum)
        self.grad = grad if updGrad else None
        return self.grad

    def optimizeForShape(self, shape):
        shape = tuple(shape)
        for m in self._order:
            m.optimizeForShape(shape)
            shape = m.dataShapeFrom(shape)

    def __repr__(self):
        inner = ", ".join(f"{n}: {m!r}" for n, m in self.children())
        return f"{self._what()}({inner})"
