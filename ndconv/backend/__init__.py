"""Array placement helpers: ``ndconv.backend.gpuarray`` mirrors the seed framework's module."""
from . import gpuarray

__all__ = ["gpuarray"]
