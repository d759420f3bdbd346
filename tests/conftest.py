"""Shared fixtures. Test helpers (``tiny_models``, ``sampler_cases``) are imported as top-level
modules: pytest puts this folder on ``sys.path`` (rootdir-relative, no ``__init__.py``)."""
import pytest

from tiny_models import single_thread


@pytest.fixture
def one_thread():
    """torch on one thread: tiny ops gain nothing from more, and on a small shared CPU a second
    OpenMP thread mostly spin-waits (tests ran ~3x slower with 2 threads on the 2-core CI box)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def pair():
    """(base, adapter, tokenizer): the tiny random GPT-2 pair of ``tiny_models`` (seed 0)."""
    from tiny_models import make_tiny_pair
    return make_tiny_pair(seed=0)
