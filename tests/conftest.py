"""Shared fixtures for the KV, rendering and readout tests: the tiny random-init models and aligned pairs on them.

Everything here is light: tiny models (2 layers, hidden 64) built from configs, and a word-level tokenizer built
locally. Expensive objects (instances, aligned pairs, prefilled caches) are computed once per session and memoised.
"""
from __future__ import annotations

import functools

import pytest
import torch

from kvnotes.models import load_model
from scenarios import make_instances
from scenarios.render import align

TINY_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]


@pytest.fixture
def single_thread():
    """One torch thread for the duration of a test. The tiny models gain nothing from two threads, and with a
    heavy job on the other core, OpenMP's waiting makes a 10-token forward ~100x slower on two threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", params=TINY_MODELS)
def tiny(request):
    """A LoadedModel (.model, .tokenizer, .spec with "prepend_bos"), fp32, for each tiny architecture."""
    lm = load_model(request.param)
    assert lm.spec["name"] == request.param
    return lm


@functools.lru_cache(maxsize=None)
def instances(family: str, n_instances: int = 1, seed: int = 0) -> tuple:
    """Scenario instances, memoised (the generators are deterministic for a seed)."""
    return tuple(make_instances(family, n_instances=n_instances, seed=seed))


def align_for(lm, instance):
    """The instance rendered and token-aligned the way the probes do it for this model."""
    return align(instance, lm.tokenizer, lm.spec["prepend_bos"], lm.spec.get("plain_prompt"))


_PAIRS: dict = {}


def aligned_pair(lm, family: str, index: int = 0):
    """The aligned pair of instance `index` of a family ("diverse": order_cancel/000, a one-token field near the
    end of a ~130-token prompt; "family_a": account_role/000, a three-token field near the start of a ~830-token
    prompt, longer than tiny-gemma3's sliding window of 24)."""
    key = (lm.spec["name"], family, index)
    if key not in _PAIRS:
        _PAIRS[key] = align_for(lm, instances(family)[index])
    return _PAIRS[key]


@pytest.fixture(scope="session")
def all_instances():
    """all_instances(family, n_instances=1, seed=0) -> a fresh list of the family's instances (memoised)."""
    return lambda family, n_instances=1, seed=0: list(instances(family, n_instances, seed))


@pytest.fixture(scope="session", name="align_for")
def align_for_fixture():
    """The `align_for(lm, instance)` helper, as a fixture."""
    return align_for


@pytest.fixture(scope="session")
def get_pair():
    """The `aligned_pair(lm, family, index=0)` helper, as a fixture (test modules do not import conftest)."""
    return aligned_pair


@pytest.fixture(scope="session")
def diverse_pair(tiny):
    return aligned_pair(tiny, "diverse")


@pytest.fixture(scope="session")
def family_a_pair(tiny):
    return aligned_pair(tiny, "family_a")
