"""Shared fixtures for the KV, rendering and readout tests: the tiny random-init models and aligned pairs on them.

Everything here is light: tiny models (2 layers, hidden 64) built from configs, and a word-level tokenizer built
locally. Expensive objects (instances, aligned pairs, prefilled caches) are computed once per session and memoised.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

from kvnotes import kv
from kvnotes.models import REPO_ROOT, load_model
from scenarios import make_instances
from scenarios.render import align

TINY_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]


def assert_write_minus_commit(agg: dict, commit: dict, n_layers: int, anchors) -> None:
    """A decodability record's write - commit per anchor is its write depth minus the mean commit depth, or None with
    a note saying it is undefined (no write layer, or no arm commits)."""
    for anchor in anchors:
        w, wmc = agg["write_depth"][anchor], agg["write_minus_commit"][anchor]
        if w["layer"] is not None and commit["n_committed"]:
            assert wmc["depth"] == pytest.approx(w["layer"] / n_layers - commit["depth"]["mean"])
        else:
            assert wmc["depth"] is None and "undefined" in wmc["note"]


def run_py(*overrides: str, hydra_dir, multirun: bool = False, timeout: int = 900):
    """`python run.py [-m] <overrides>` from the repository root in a subprocess, offline and on one thread, with
    Hydra's output under `hydra_dir`; asserts it exits 0 (showing the end of stderr) and returns the finished
    process. The end-to-end tests' one way of running the command line as a user would."""
    cmd = [sys.executable, "run.py", *(["-m"] if multirun else []), *overrides,
           f"hydra.{'sweep' if multirun else 'run'}.dir={hydra_dir}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


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


# ---------------------------------------------------------------- prefilled aligned pairs (shared by the KV tests)
def snapshot(cache):
    return (kv.cache_length(cache), [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])


class Case:
    """An aligned old/new pair on one model, with its caches computed lazily (and once)."""

    def __init__(self, lm, name: str, get_pair):
        self.lm, self.name, self.model = lm, name, lm.model
        pair = get_pair(lm, "family_a" if name == "family_a" else "diverse")
        self.old, self.new = pair.old_ids, pair.new_ids
        self.a, self.b = pair.span
        if name == "short":
            self.old, self.new = self.old[:self.b + 8], self.new[:self.b + 8]
        self.L = len(self.old)
        self.d = self.L - 1                       # decision position; caches hold [0, d)
        self.last = int(self.old[-1])
        assert int(self.new[-1]) == self.last
        assert torch.equal(self.old[:self.a], self.new[:self.a]) and torch.equal(self.old[self.b:], self.new[self.b:])

    @functools.cached_property
    def pre(self):
        """Prefix cache [0, a), snapshotted at once so later continuations can be checked not to touch it."""
        cache = kv.prefill(self.model, self.old[:self.a])
        self.pre_snapshot = snapshot(cache)
        return cache

    @functools.cached_property
    def stale(self):
        return kv.prefill(self.model, self.old[self.a:self.d], past=self.pre)

    @functools.cached_property
    def oracle(self):
        return kv.prefill(self.model, self.new[self.a:self.d], past=self.pre)

    @functools.cached_property
    def full_old(self):
        return kv.full_forward_last_logits(self.model, self.old)

    @functools.cached_property
    def full_new(self):
        return kv.full_forward_last_logits(self.model, self.new)

    @functools.cached_property
    def decoded(self):
        """Decode logits of (stale, oracle), one cache at a time."""
        return (kv.decode(self.model, [self.stale], self.last)[0], kv.decode(self.model, [self.oracle], self.last)[0])

    @property
    def is_gemma(self) -> bool:
        return self.lm.spec["arch"] == "gemma3"


_CASES: dict = {}


@pytest.fixture
def case(get_pair):
    """case(lm, name) -> the memoised Case of that model."""
    def get(lm, name) -> Case:
        key = (lm.spec["name"], name)
        if key not in _CASES:
            _CASES[key] = Case(lm, name, get_pair)
        return _CASES[key]
    return get


@pytest.fixture(scope="session")
def tiny_by_name():
    """tiny_by_name(name) -> the LoadedModel of one tiny architecture (memoised by load_model's callers here)."""
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_model(name)
        return cache[name]
    return get


def config_domains(scenario: str = "diverse") -> list:
    """The domains a scenario config runs: its explicit list, or every domain file (null). Tests count with this
    instead of hard-coding how many domains there are."""
    import yaml
    from pathlib import Path
    from scenarios import diverse
    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "scenario" / f"{scenario}.yaml")
                            .read_text())["params"]
    return list(params.get("domains") or diverse.domains())


N_DIVERSE = len(config_domains("diverse"))   # gated pairs per instance index of `scenario=diverse`
