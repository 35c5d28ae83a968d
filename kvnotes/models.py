"""Model registry and loading: a model spec (`configs/model/<name>.yaml`, as composed by Hydra into `cfg.model`)
describes a model; this module turns the spec into weights and a tokenizer.

Real models come from PyPI packages that ship GGUF parts (never from a hub). The parts are concatenated with a
sha256 check, loaded once through transformers' GGUF loader (dequantised), and cached as safetensors in a cache
directory outside the repository, so later loads take seconds. Tiny random-init models are built from configs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import yaml

import kvnotes  # noqa: F401  (sets the offline environment before transformers is imported)

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CONFIG_DIR = REPO_ROOT / "configs" / "model"
DTYPES = ("float32", "bfloat16", "float16")


class UnknownModelError(ValueError):
    pass


class WeightsNotInstalledError(RuntimeError):
    pass


class WeightsCorruptError(RuntimeError):
    pass


class ModelCacheMissingError(RuntimeError):
    pass


def default_cache_dir() -> Path:
    return Path(os.environ.get("KVNOTES_CACHE", Path.home() / ".cache" / "kvnotes")).expanduser()


def available_models() -> list[str]:
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))


def model_spec(name: str) -> dict:
    """The registry entry for `name` as written in configs/model/<name>.yaml, as a plain dict. A run takes its spec
    from the composed config instead (`cfg.model`, with overrides and any search path); this is the by-name
    convenience for tests, benchmarks and the install command."""
    path = MODEL_CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        raise UnknownModelError(f"unknown model {name!r}; the registry (configs/model/) has: "
                                f"{', '.join(available_models())}. Add a configs/model/{name}.yaml to register one.")
    return yaml.safe_load(path.read_text())


def as_spec(model: str | Mapping) -> dict:
    """A model spec as a plain dict: a registry name is looked up in configs/model/, a mapping (`cfg.model`, a dict)
    is taken as it is."""
    if isinstance(model, str):
        return model_spec(model)
    if not isinstance(model, Mapping):
        from omegaconf import DictConfig, OmegaConf
        if not isinstance(model, DictConfig):
            raise TypeError(f"a model is a registry name or a spec mapping, not {type(model).__name__}")
        model = OmegaConf.to_container(model, resolve=True)
    spec = dict(model)
    missing = [k for k in ("name", "kind") if k not in spec]
    if missing:
        raise ValueError(f"model spec {spec.get('name', '?')!r} lacks {missing}; see configs/model/*.yaml")
    return spec


# ---------------------------------------------------------------- GGUF weight packages
def _part_indices(g: dict) -> list[int]:
    return list(range(1, int(g["n_parts"]) + 1))


def weight_packages(spec: dict) -> list[str]:
    """pip requirement strings for the model's weight packages (empty for tiny models)."""
    if spec["kind"] != "gguf":
        return []
    g = spec["gguf"]
    return [g["package"].format(i=i, i0=i - 1) for i in _part_indices(g)]


def _module_dir(module: str) -> Path | None:
    # find_spec, not importlib.resources: some weight packages import missing deps in their __init__ (models.md §8)
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def part_paths(spec: dict) -> list[Path]:
    """Paths of the installed GGUF parts, in concatenation order; raises with the install command if any is missing."""
    g = spec["gguf"]
    paths, missing = [], []
    for i in _part_indices(g):
        d = _module_dir(g["module"].format(i=i, i0=i - 1))
        p = d / g["part"].format(i=i, i0=i - 1) if d else None
        if p is None or not p.exists():
            missing.append(g["package"].format(i=i, i0=i - 1))
        else:
            paths.append(p)
    if missing:
        raise WeightsNotInstalledError(
            f"model {spec['name']!r} needs weight packages that are not installed ({len(missing)} missing: "
            f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}). Install them with:\n"
            f"  {install_command(spec)}\n(or: make weights MODEL={spec['name']})")
    return paths


def install_command(spec: dict) -> str:
    return f"{sys.executable} -m pip install --no-deps " + " ".join(weight_packages(spec))


def install_weights(name: str) -> None:
    """pip-install (with --no-deps) whatever weight packages of `name` are missing; a no-op when all are there."""
    spec = model_spec(name)
    if spec["kind"] != "gguf":
        print(f"[kvnotes] {name}: built from a config, no weights to install")
        return
    try:
        part_paths(spec)
        print(f"[kvnotes] {name}: weight packages already installed")
        return
    except WeightsNotInstalledError:
        pass
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *weight_packages(spec)], check=True)
    part_paths(spec)


def assemble_gguf(spec: dict, out_dir: Path) -> Path:
    """Concatenate the parts into one .gguf in `out_dir`, checking sha256; nothing half-written survives a failure."""
    g = spec["gguf"]
    out = Path(out_dir) / g["file"]
    out.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as w:
            for p in part_paths(spec):
                with open(p, "rb") as r:
                    while chunk := r.read(1 << 23):
                        w.write(chunk)
                        h.update(chunk)
        if h.hexdigest() != g["sha256"]:
            raise WeightsCorruptError(
                f"model {spec['name']!r}: the assembled {g['file']} has sha256 {h.hexdigest()}, expected {g['sha256']}: "
                f"the installed weight packages are corrupt or incomplete. Reinstall them with:\n"
                f"  {install_command(spec).replace('--no-deps', '--no-deps --force-reinstall')}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


# ---------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    model: object
    tokenizer: object
    spec: dict
    info: dict = field(default_factory=dict)   # goes into every record's "model" field


def _torch_dtype(name: str):
    import torch
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {name!r}")
    return getattr(torch, name)


def _hf_cache_dir(spec: dict, cache_dir: Path) -> Path:
    return Path(cache_dir) / "hf" / f"{spec['name']}-{spec['gguf']['sha256'][:12]}"


def _cache_command(spec: dict, cache_dir: Path) -> str:
    env = "" if Path(cache_dir) == default_cache_dir() else f"KVNOTES_CACHE={cache_dir} "
    return f"{env}{sys.executable} -m kvnotes.models cache {spec['name']}"


def prepare_cache(model: str | Mapping, cache_dir: str | Path | None = None) -> Path:
    """The converted (safetensors + tokenizer) cache of a GGUF model, built from its weight packages if missing."""
    spec = as_spec(model)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    hf_dir = _hf_cache_dir(spec, cache_dir)
    if not (hf_dir / "kvnotes_source.yaml").exists():
        part_paths(spec)  # fail at once, with the install command, before any slow work
        hf_dir = _build_hf_cache(spec, cache_dir)
    return hf_dir


def load_tokenizer(model: str | Mapping, cache_dir: str | Path | None = None):
    """The model's tokenizer without its weights (for re-analysing records): tiny models build theirs; a GGUF
    model's comes from its converted cache, and a missing cache is an error naming the command that builds it."""
    spec = as_spec(model)
    if spec["kind"] == "tiny":
        from kvnotes.tiny import build_tiny_tokenizer
        return build_tiny_tokenizer()
    if spec["kind"] == "ndif":
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(spec["hf_name"])
    if spec["kind"] != "gguf":
        raise ValueError(f"model {spec['name']!r}: unknown kind {spec['kind']!r} (expected gguf, tiny or ndif)")
    from transformers import AutoTokenizer
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    hf_dir = _hf_cache_dir(spec, cache_dir)
    if not (hf_dir / "kvnotes_source.yaml").exists():
        raise ModelCacheMissingError(
            f"model {spec['name']!r}: its tokenizer lives in the converted model cache {hf_dir}, which does not "
            f"exist. Build it (from the installed weight packages) with:\n  {_cache_command(spec, cache_dir)}\n"
            f"(the weight packages themselves: {install_command(spec)})")
    return AutoTokenizer.from_pretrained(str(hf_dir))


def _build_hf_cache(spec: dict, cache_dir: Path) -> Path:
    """GGUF -> dequantised fp32 safetensors, written to a temp dir and renamed into place when complete."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _hf_cache_dir(spec, cache_dir)
    work = Path(tempfile.mkdtemp(dir=Path(cache_dir), prefix=f".{spec['name']}-building-"))
    try:
        gguf = assemble_gguf(spec, work)
        print(f"[kvnotes] {spec['name']}: loading {gguf.name} through transformers' GGUF loader (first time only)")
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None  # the params are plain dequantised tensors; this lets save_pretrained run
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.architectures = [type(model).__name__]  # GGUF configs have architectures=None
        out = work / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "kvnotes_source.yaml").write_text(yaml.safe_dump(
            {"gguf_file": spec["gguf"]["file"], "sha256": spec["gguf"]["sha256"], "packages": weight_packages(spec)}))
        del model
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


_LOADED: dict = {}


def _remote_model(spec: dict):
    """(an nnsight `TransformersModel` of spec["hf_name"] with meta weights, its tokenizer) for kind "ndif": every
    forward runs on NDIF (`remote: true` in the spec; the circuit probes' `probe.backend=nnsight`). Needs the
    network (the config and tokenizer come from the Hugging Face Hub) and an NDIF API key; raises ValueError when
    HF_HUB_OFFLINE is set or the spec lacks hf_name / remote: true, naming the fix."""
    if not spec.get("hf_name") or spec.get("remote") is not True:
        raise ValueError(f"model {spec['name']!r} (kind ndif) needs hf_name (the NDIF-hosted repo id) and "
                         f"remote: true in configs/model/{spec['name']}.yaml")
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise ValueError(f"model {spec['name']!r} runs on NDIF: its config and tokenizer come from the Hugging Face "
                         f"Hub, and kvnotes is offline by default. Run with HF_HUB_OFFLINE=0, logged in to the Hub with a "
                         f"token that may read {spec['hf_name']} (gated repos need their licence accepted), and an "
                         f"NDIF API key: python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('...')\"")
    from nnsight import TransformersModel
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(spec["hf_name"])
    return TransformersModel(spec["hf_name"], task="text-generation", tokenizer=tok), tok


def load_model(model: str | Mapping, dtype: str | None = None, cache_dir: str | Path | None = None) -> LoadedModel:
    """Load a model in `dtype` (default: the spec's), memoised for the last (spec, dtype) asked for.

    `model` is the spec itself (run.py passes the composed `cfg.model`, so overrides such as model.prepend_bos=true
    and model configs on an added Hydra search path take effect) or, as a convenience for tests and benchmarks, a
    registry name (configs/model/<name>.yaml as written). `LoadedModel.spec` is the spec the model was loaded with."""
    spec = as_spec(model)
    name = spec["name"]
    dtype = dtype or spec.get("dtype", "float32")
    key = (json.dumps(spec, sort_keys=True, default=str), dtype, str(cache_dir))
    if key in _LOADED:
        return _LOADED[key]
    _LOADED.clear()  # hold one model at a time: multirun sweeps over models must not accumulate them in memory
    t0 = time.time()
    if spec["kind"] == "tiny":
        from kvnotes.tiny import build_tiny
        model, tok = build_tiny(spec["arch"], seed=int(spec.get("seed", 0)), dtype=_torch_dtype(dtype))
        source = {"source": "random init from config", "source_packages": [], "sha256": None}
    elif spec["kind"] == "gguf":
        from transformers import AutoModelForCausalLM, AutoTokenizer
        hf_dir = prepare_cache(spec, cache_dir)
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
        # load in the dtype (not .to(dtype)): keeps the RoPE inv_freq buffers in fp32 (models.md §2)
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=_torch_dtype(dtype))
        source = {"source": f"GGUF {spec['gguf']['file']} (dequantised), cached at {hf_dir}",
                  "source_packages": weight_packages(spec), "sha256": spec["gguf"]["sha256"]}
    elif spec["kind"] == "ndif":
        model, tok = _remote_model(spec)
        source = {"source": f"NDIF-hosted {spec['hf_name']} (weights remote; config and tokenizer from the Hub)",
                  "source_packages": [], "sha256": None}
    else:
        raise ValueError(f"model {name!r}: unknown kind {spec['kind']!r} (expected gguf, tiny or ndif)")
    if spec["kind"] != "ndif":
        model.eval()
    cfg = model.config
    info = {"name": name, "hf_name": spec.get("hf_name"), "kind": spec["kind"], **source, "dtype": dtype,
            "arch": type(model).__name__, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
            "n_kv_heads": cfg.num_key_value_heads, "d_model": cfg.hidden_size,
            "n_params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(cfg, "_attn_implementation", None),
            "load_s": round(time.time() - t0, 2)}
    loaded = LoadedModel(model, tok, spec, info)
    _LOADED[key] = loaded
    return loaded


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "install":
        install_weights(argv[1])
        return 0
    if len(argv) == 2 and argv[0] == "cache":
        spec = model_spec(argv[1])
        if spec["kind"] != "gguf":
            print(f"[kvnotes] {argv[1]}: built from a config, nothing to cache")
            return 0
        print(f"[kvnotes] {argv[1]}: converted cache at {prepare_cache(spec)}")
        return 0
    if len(argv) == 1 and argv[0] == "list":
        print("\n".join(available_models()))
        return 0
    print("usage: python -m kvnotes.models install <model> | cache <model> | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
