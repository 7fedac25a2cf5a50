"""Layers in the seed framework's style: ``Module`` and the convolution family."""
from .module import Module
from .conv import Conv1D, Conv2D, Conv3D, ConvND, Deconv1D, Deconv2D, Deconv3D, DeconvND

__all__ = ["Module", "ConvND", "Conv1D", "Conv2D", "Conv3D", "DeconvND", "Deconv1D", "Deconv2D", "Deconv3D"]
