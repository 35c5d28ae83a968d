"""Every file under configs/ composes, by glob (a new model, scenario, probe, experiment or launcher yaml is tested
without editing this file), and each group's files say what the code expects: model specs that load_model can read,
scenarios the generator accepts, probe yamls that match their probe's CONTRACT, experiments whose every cell passes
the probe x scenario check, launchers that resolve to installed Hydra plugins."""
import inspect
import itertools
import string
import types

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

import run as run_module
import scenarios
from kvnotes.models import DTYPES, REPO_ROOT, model_spec
from probes.base import ProbeConfigError, ProbeContractError, ProbeSpec, load_probe

CONFIG_DIR = REPO_ROOT / "configs"
GROUPS = ("model", "scenario", "probe", "experiment", "hydra/launcher")


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def compose_with(*overrides, hydra_config: bool = False):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_config)


def conf_of(cfg) -> dict:
    conf = OmegaConf.to_container(cfg, resolve=True)
    conf.pop("hydra", None)
    return conf


def test_every_config_file_belongs_to_a_tested_group():
    for path in CONFIG_DIR.rglob("*.yaml"):
        group = str(path.parent.relative_to(CONFIG_DIR))
        assert group in (".", *GROUPS), f"{path}: a config group this file does not test"
    for group in GROUPS:
        assert names(group), f"configs/{group}/ is empty"


def test_the_default_config_composes_and_passes_the_checks():
    conf = conf_of(compose_with())
    run_module.check_probe(load_probe(conf["probe"]["name"]), conf)
    assert conf["overwrite"] is False and conf["reanalyse"] is False


@pytest.mark.parametrize("name", names("model"))
def test_model_config(name):
    spec = conf_of(compose_with(f"model={name}"))["model"]
    assert spec == model_spec(name)            # the by-name reading (tests, benchmarks) agrees with the composition
    assert spec["name"] == name and spec["kind"] in ("gguf", "tiny", "ndif") and spec["dtype"] in DTYPES
    assert isinstance(spec["prepend_bos"], bool)
    layout = spec["plain_prompt"]
    assert layout is None or {"system", "user", "generation"} <= set(layout)
    if spec["kind"] == "gguf":
        g = spec["gguf"]
        assert len(g["sha256"]) == 64 and int(g["n_parts"]) >= 1
        assert set(string.hexdigits) >= set(g["sha256"])
        for key in ("package", "module", "part"):
            g[key].format(i=1, i0=0)                 # the part templates take the part index
    elif spec["kind"] == "ndif":                     # weights on NDIF: a hosted repo id, every forward remote
        assert "/" in spec["hf_name"] and spec["remote"] is True
    else:
        assert spec["arch"] in ("llama", "qwen2", "gemma3") and isinstance(spec["seed"], int)


@pytest.mark.parametrize("name", names("scenario"))
def test_scenario_config(name):
    scen = conf_of(compose_with(f"scenario={name}"))["scenario"]
    assert scen["name"] == name and scen["family"] in scenarios.FAMILIES
    insts = scenarios.make_instances(scen["family"], n_instances=1, seed=0, **scen["params"])
    assert insts and any(i.kind == "gated" for i in insts)


@pytest.mark.parametrize("name", names("probe"))
def test_probe_config_matches_its_contract(name):
    options = conf_of(compose_with(f"probe={name}"))["probe"]
    probe = load_probe(name)
    spec = probe.spec
    assert options["name"] == spec.name == name
    # the yaml documents every option the probe has, and sets nothing else
    assert set(options) - {"name"} == set(spec.options), f"configs/probe/{name}.yaml vs probes/{name}.py CONTRACT"
    assert spec.resolve_options(options) == options
    params = inspect.signature(probe.measure).parameters
    for key in spec.measure_options:
        assert key in params, f"{name}: measure() does not take its declared option {key!r}"
    if "check_decode_instances" in spec.options:      # run.py then passes check_decode to measure()
        assert "check_decode" in params
    if spec.second_pass:
        second = inspect.signature(probe.measure_second).parameters
        assert all(k in second for k in spec.measure_options)
    assert spec.reanalysable == (probe.raw_from_row is not None)
    assert spec.reanalysable or spec.not_reanalysable
    assert spec.paper_refs and all(isinstance(r, str) for r in spec.paper_refs)


@pytest.mark.parametrize("probe_name", names("probe"))
def test_each_probe_on_each_scenario_runs_or_fails_at_once_with_the_fix(probe_name):
    probe = load_probe(probe_name)
    usable = []
    for scenario in names("scenario"):
        conf = conf_of(compose_with(f"probe={probe_name}", f"scenario={scenario}", "model=tiny-llama"))
        try:
            run_module.check_probe(probe, conf)
            usable.append(scenario)
        except ProbeConfigError as e:
            msg = str(e)
            assert f"probe {probe_name!r}" in msg and f"scenario {scenario!r}" in msg and "Fix:" in msg
            assert any(f"scenario={s}" in msg for s in names("scenario"))   # names a scenario that works
    assert usable, f"no scenario config can run probe {probe_name!r}"


def _cells(params: dict) -> list[list[str]]:
    """The cells of a basic-sweeper sweep: the product of each key's comma-separated values."""
    axes = [[f"{k}={v.strip()}" for v in str(vals).split(",")] for k, vals in params.items()]
    return [list(c) for c in itertools.product(*axes)]


@pytest.mark.parametrize("name", names("experiment"))
def test_experiment_composes_and_every_cell_passes_the_checks(name):
    text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
    assert "# @package _global_" in text.splitlines()[0]
    cfg = compose_with(f"experiment={name}", "model=tiny-llama", hydra_config=True)
    assert cfg.hydra.runtime.choices.experiment == name
    params = OmegaConf.to_container(cfg.hydra.sweeper.params) if cfg.hydra.sweeper.get("params") else {}
    for cell in _cells(params) if params else [[]]:
        conf = conf_of(compose_with(f"experiment={name}", "model=tiny-llama", *cell))
        run_module.check_probe(load_probe(conf["probe"]["name"]), conf)
    # the command line wins over the preset
    assert compose_with(f"experiment={name}", "n_instances=2").n_instances == 2


@pytest.mark.parametrize("name", names("hydra/launcher"))
def test_launcher_preset_resolves_to_an_installed_plugin(name):
    cfg = compose_with(f"hydra/launcher={name}", hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__.endswith("Launcher")
    OmegaConf.to_container(launcher, resolve=False)


def test_the_slurm_preset_gives_each_cell_its_cpus_as_torch_threads():
    launcher = compose_with("hydra/launcher=slurm", hydra_config=True).hydra.launcher
    assert launcher.cpus_per_task >= 1 and launcher.timeout_min > 0
    assert f"export OMP_NUM_THREADS={launcher.cpus_per_task}" in list(launcher.setup)
    override = compose_with("hydra/launcher=slurm", "hydra.launcher.partition=cpu",
                            "hydra.launcher.cpus_per_task=8", hydra_config=True).hydra.launcher
    assert override.partition == "cpu" and "export OMP_NUM_THREADS=8" in list(override.setup)


def test_a_probe_module_that_breaks_its_contract_is_named(monkeypatch):
    fake = types.ModuleType("probes.fake")
    fake.CONTRACT = ProbeSpec(name="fake", paper_refs=("x",), options={"batch_size": 1}, second_pass=True,
                              not_reanalysable="nothing kept")
    fake.measure = fake.analyse = lambda *a, **k: None
    monkeypatch.setitem(__import__("sys").modules, "probes.fake", fake)
    with pytest.raises(ProbeContractError, match=r"probes/fake.py: .*promises plan_second\(\)"):
        load_probe("fake")
    fake.CONTRACT = ProbeSpec(name="fake", paper_refs=("x",), options={"batch_size": 1},
                              not_reanalysable="nothing kept")
    fake.raw_from_row = lambda row, record: row
    with pytest.raises(ProbeContractError, match=r"defines raw_from_row\(\) but its contract does not declare"):
        load_probe("fake")
    with pytest.raises(ProbeContractError, match="not_reanalysable"):
        ProbeSpec(name="fake", paper_refs=("x",), options={"batch_size": 1})
    with pytest.raises(ProbeContractError, match="measure_options"):
        ProbeSpec(name="fake", paper_refs=("x",), options={}, not_reanalysable="x")
