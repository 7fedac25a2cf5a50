"""Layers in the seed framework's style: ``Module`` and the convolution family."""
from .module import Module

__all__ = ["Module"]
