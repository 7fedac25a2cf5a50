"""ndconv: N-dimensional convolution and transposed convolution on NumPy and CuPy."""
from .functional import (conv1d, conv2d, conv3d, conv_backward, conv_nd, conv_transpose1d,
                         conv_transpose2d, conv_transpose3d, conv_transpose_nd)
from .geometry import ConvGeometry, conv_geometry, conv_transpose_geometry
from .engine import get_engine

__version__ = "0.1.0"


def set_workspace_limit(nbytes, device="cpu"):
    """Bound the temporaries of one call (default 256 MiB on the CPU, 1 GiB on the GPU)."""
    import numpy as np
    if not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"workspace limit must be a positive int of bytes, got nbytes={nbytes!r}")
    if device == "cpu":
        get_engine(np.empty(0)).workspace_limit = nbytes
    elif device == "gpu":
        import cupy
        get_engine(cupy.empty(0)).workspace_limit = nbytes
    else:
        raise ValueError(f"device must be 'cpu' or 'gpu', got device={device!r}")

# Module API (issue 3): the seed framework's layers, containers and arrays.
from .backend import gpuarray
from .variable import Variable
from .modules import Module
from .containers import Sequential
from .modules import (Conv1D, Conv2D, Conv3D, ConvND, Deconv1D, Deconv2D, Deconv3D,  # noqa: E402
                      DeconvND)
from .tools.explain import explain

# Training pieces (issue 7): activations, cost, optimizers.
from .activations import ReLU, Sigmoid, Tanh
from .cost import MSE
from .optimizers import SGD, Adam
