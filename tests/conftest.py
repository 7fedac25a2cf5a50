"""Shared test configuration.

* ``tests/`` is put on ``sys.path`` so test modules can ``import reference``
  whether or not ``tests`` is a package.
* Hypothesis profiles: ``ci`` (the default: reproducible, no deadline, since CI
  machines are slow and noisy) and ``dev`` (random, for local bug hunting:
  ``HYPOTHESIS_PROFILE=dev``).
* Optional dependencies: mark a test ``@pytest.mark.requires_torch`` (or
  ``requires("h5py")``) and it is skipped when the module is missing; the
  session fixture ``torch`` returns the module or skips.
* ``small_workspace``: sets the CPU engine's workspace limit to 4 KiB for one test
  and restores it afterwards (forces chunking along batch and the first dim).
"""
from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", deadline=None, derandomize=True, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    settings.register_profile(
        "dev", deadline=None, derandomize=False, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is a test extra; modules that need it importorskip it
    pass


def have(module):
    """True when ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def requires(*modules):
    """A skip marker for tests that need optional modules."""
    missing = [m for m in modules if not have(m)]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_torch: skipped when PyTorch is not installed")


def pytest_collection_modifyitems(config, items):
    if have("torch"):
        return
    skip = pytest.mark.skip(reason="needs torch")
    for item in items:
        if "requires_torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture
def small_workspace():
    """Shrink the CPU engine's workspace limit to 4 KiB for the test, then restore it."""
    import ndconv
    engine = ndconv.get_engine(np.empty(0))
    old = engine.workspace_limit
    engine.workspace_limit = 4096
    try:
        yield engine
    finally:
        engine.workspace_limit = old


@pytest.fixture(autouse=True, scope="session")
def _private_autotune_cache(tmp_path_factory):
    """Keep the engines' autotune cache file out of the user's cache directory."""
    old = os.environ.get("NDCONV_CACHE_DIR")
    os.environ["NDCONV_CACHE_DIR"] = str(tmp_path_factory.mktemp("ndconv-cache"))
    yield
    if old is None:
        os.environ.pop("NDCONV_CACHE_DIR", None)
    else:
        os.environ["NDCONV_CACHE_DIR"] = old
