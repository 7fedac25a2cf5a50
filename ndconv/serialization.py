"""Parameters of a module or container in HDF5 (h5py), keyed by dotted module names.

File layout: root attributes ``format = "ndconv-params"`` and ``version = 1``
(plus the saved module's class and name, informational); one dataset per
parameter under the group ``params``, named like ``getVar`` names them
(``"W"`` for a single layer, ``"depthwise.W"`` inside a Sequential).  Only
numeric arrays are stored: nothing is pickled, and loading never executes
anything from the file.

``save_params`` writes a temporary file in the target's directory and moves it
over the target with ``os.replace``, so a crash mid-save leaves the previous
file whole.  ``load_params`` reads and checks *everything* (names, shapes,
dtypes) before touching the module, so a mismatched file leaves it unchanged.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .backend import gpuarray
from .variable import Variable

__all__ = ["save_params", "load_params", "read_params", "ParamFileError", "FORMAT", "VERSION"]

FORMAT = "ndconv-params"
VERSION = 1


class ParamFileError(ValueError):
    """The file is not a readable ndconv parameter file, or does not fit the module."""


def _h5py():
    try:
        import h5py
    except ImportError as e:    # h5py is an optional extra
        raise ImportError("saving and loading parameters needs h5py: pip install 'ndconv[io]' "
                          "(or pip install h5py)") from e
    return h5py


def _fspath(path):
    try:
        return os.fspath(path)
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, got path={path!r}") from None


def save_params(module, path):
    """Write every parameter of ``module`` to ``path`` (atomically)."""
    h5py = _h5py()
    path = _fspath(path)
    named = module.namedVars()
    missing = sorted(set(module.paramSpecs()) - set(named))
    if missing:
        raise ValueError(f"cannot save {module!r}: parameters {missing} are not set (empty=True)")
    # Bring everything to the host first so a device error cannot leave a half-written file.
    arrays = {name: np.ascontiguousarray(gpuarray.to_host(var.data)) for name, var in named.items()}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["module_class"] = type(module).__name__
            f.attrs["module_name"] = module.name or ""
            group = f.create_group("params")
            for name, a in arrays.items():
                group.create_dataset(name, data=a)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)   # mkstemp makes 0600; a saved model reads like any file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_params(path):
    """``{name: numpy array}`` from a file written by :func:`save_params` (checked format)."""
    h5py = _h5py()
    path = _fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no parameter file at {path!r}")
    try:
        with h5py.File(path, "r") as f:
            fmt = f.attrs.get("format")
            if isinstance(fmt, bytes):
                fmt = fmt.decode()
            if fmt != FORMAT:
                raise ParamFileError(f"{path!r} is an HDF5 file but not an ndconv parameter file "
                                     f"(format attribute {fmt!r}, expected {FORMAT!r})")
            version = int(f.attrs.get("version", -1))
            if version != VERSION:
                raise ParamFileError(f"{path!r} has parameter file version {version}, this ndconv reads "
                                     f"version {VERSION}")
            if "params" not in f or not isinstance(f["params"], h5py.Group):
                raise ParamFileError(f"{path!r} has no 'params' group")
            out = {}
            for name, ds in f["params"].items():
                if not isinstance(ds, h5py.Dataset) or ds.dtype.kind != "f":
                    raise ParamFileError(f"{path!r}: entry {name!r} is not a float array")
                out[name] = ds[()]
            return out
    except ParamFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ParamFileError(f"cannot read {path!r} as an ndconv parameter file (corrupted or not "
                             f"HDF5): {e}") from e


def load_params(module, path):
    """Set ``module``'s parameters from ``path``; all checks happen before any change."""
    arrays = read_params(path)
    specs = module.paramSpecs()
    missing = sorted(set(specs) - set(arrays))
    extra = sorted(set(arrays) - set(specs))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing}")
        if extra:
            parts.append(f"not in the module: {extra}")
        raise ParamFileError(f"{path!r} does not match {module!r}: " + "; ".join(parts))
    for name, (shape, dtype) in specs.items():
        a = arrays[name]
        if tuple(a.shape) != tuple(shape):
            raise ParamFileError(f"{path!r}: parameter {name!r} has shape {tuple(a.shape)} in the file, "
                                 f"the module expects {tuple(shape)}")
        if dtype is not None and np.dtype(a.dtype) != np.dtype(dtype):
            raise ParamFileError(f"{path!r}: parameter {name!r} has dtype {a.dtype} in the file, the module "
                                 f"expects {np.dtype(dtype)} (use calcMode to change the module's dtype)")
    named = module.namedVars()
    # Build every new Variable first, on the device of the current parameters.
    new = {}
    for name in specs:
        old = named.get(name)
        on_gpu = old.on_gpu if old is not None else gpuarray.gpu_available()
        data = gpuarray.to_gpu(arrays[name]) if on_gpu else np.array(arrays[name])
        new[name] = Variable(data, withgrad=old is None or old.grad is not None)
    for name, var in new.items():
        old = named.get(name)
        if old is not None:
            # Keep the Variable objects (optimizers may hold them); replace values in place.
            old.data[...] = var.data
            if old.grad is not None:
                old.grad[...] = 0
        else:
            module.setVar(name, var)
