"""`lmscope build`: harvest → train → eval → interpret → report as one resumable job.

A build config (TOML; presets in ``lmscope/presets/``) names everything::

    [model]      name, device, dtype
    [data]       corpus, seq_len, seed
    [harvest]    tokens (0: no store, training streams from the model), batch_size, dtype, shard_rows
    [train]      any TrainConfig field (lmscope.train.config)
    [[sae]]      SAE groups as in `lmscope train --config` ("layers = 'all'" means every layer)
    [eval]       tokens, recon_tokens (L0/FVU/dead over more tokens), batch_size
    [interpret]  tokens, batch_size, k, window

The suite folder holds ``build.json``: the config the build started with and the stages finished.
A rerun skips finished stages and resumes the one it was in (the harvest at its last committed
block, training at its last checkpoint, eval at the first SAE without an ``eval.json``); so a build
killed anywhere ends with the same suite as one never killed. A rerun with a different config is
refused, naming the first differing key.
"""

from __future__ import annotations

import copy
import time
import tomllib
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from lmscope.atomic import write_json_atomic
from lmscope.errors import ConfigError
from lmscope.suite import MANIFEST, Suite, record_training

STAGES = ("harvest", "train", "eval", "interpret", "report")
PRESETS = ("quick", "standard", "gemma-scope")
STATE = "build.json"
_TABLES = {
    "model": {"name", "device", "dtype"},
    "data": {"corpus", "seq_len", "seed"},
    "harvest": {"tokens", "batch_size", "dtype", "shard_rows"},
    "eval": {"tokens", "recon_tokens", "batch_size"},
    "interpret": {"tokens", "batch_size", "k", "window"},
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"name": "gemma-3-270m", "device": None, "dtype": "float32"},
    "data": {"corpus": "default", "seq_len": 128, "seed": 0},
    "harvest": {"tokens": 100_000, "batch_size": 8, "dtype": "float32", "shard_rows": 8192},
    "eval": {"tokens": 4096, "recon_tokens": 0, "batch_size": 8},
    "interpret": {"tokens": 50_000, "batch_size": 8, "k": 20, "window": 8},
}


@dataclass
class BuildConfig:
    """A parsed build config: the tables above with defaults filled in."""

    raw: dict[str, Any]

    def __getitem__(self, table: str) -> dict[str, Any]:
        return dict(self.raw.get(table, {}))


def read_config(config_or_preset: str) -> BuildConfig:
    """A preset name (quick, standard, gemma-scope) or a TOML file → a checked BuildConfig."""
    if config_or_preset in PRESETS:
        text = resources.files("lmscope.presets").joinpath(f"{config_or_preset}.toml").read_text()
        where = f"preset {config_or_preset!r}"
    else:
        p = Path(config_or_preset)
        if not p.is_file():
            raise ConfigError(f"{config_or_preset!r} is neither a preset ({', '.join(PRESETS)}) nor a TOML file")  # fmt: skip
        text, where = p.read_text(), str(p)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from e
    return parse_config(raw, where)


def parse_config(raw: dict[str, Any], where: str = "the build config") -> BuildConfig:
    unknown = sorted(set(raw) - set(_TABLES) - {"train", "sae"})
    if unknown:
        raise ConfigError(f"unknown tables {unknown} in {where}; valid: {', '.join([*_TABLES, 'train', 'sae'])}")  # fmt: skip
    out: dict[str, Any] = {}
    for table, keys in _TABLES.items():
        bad = sorted(set(raw.get(table, {})) - keys)
        if bad:
            raise ConfigError(f"unknown [{table}] keys {bad} in {where}; valid: {', '.join(sorted(keys))}")  # fmt: skip
        out[table] = {**_DEFAULTS[table], **raw.get(table, {})}
    if not raw.get("sae"):
        raise ConfigError(f"{where} has no [[sae]] groups: nothing to train")
    out["train"], out["sae"] = dict(raw.get("train", {})), copy.deepcopy(raw["sae"])
    from lmscope.train import TrainConfig

    TrainConfig.from_dict(out["train"])  # unknown keys fail now, not after the harvest
    _check_stages(out, where)
    return BuildConfig(out)


def _check_stages(c: dict[str, Any], where: str) -> None:
    """Build every stage's config now, so that a bad value fails before any stage runs (an
    ``[interpret] k = -4`` used to fail after harvest, train and eval)."""
    from lmscope.activations.harvest import HarvestConfig
    from lmscope.errors import LmscopeError
    from lmscope.evals.evaluate import EvalConfig
    from lmscope.interp.features import StatsConfig
    from lmscope.train import expand_group

    h, d, m, e, i = (c[t] for t in ("harvest", "data", "model", "eval", "interpret"))
    try:
        if m["dtype"] not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"[model] dtype must be float32, bfloat16 or float16, got {m['dtype']!r}")  # fmt: skip
        if h["tokens"] != 0:  # 0: no store, training streams
            HarvestConfig(model=m["name"], corpus=d["corpus"], tokens=h["tokens"],
                          seq_len=d["seq_len"], batch_size=h["batch_size"], seed=d["seed"],
                          dtype=h["dtype"], shard_rows=h["shard_rows"])  # fmt: skip
        EvalConfig(tokens=e["tokens"], recon_tokens=e["recon_tokens"], batch_size=e["batch_size"],
                   seq_len=d["seq_len"], seed=d["seed"])  # fmt: skip
        StatsConfig(k=i["k"], window=i["window"])
        for key in ("tokens", "batch_size"):
            if not isinstance(i[key], int) or isinstance(i[key], bool) or i[key] < 1:
                raise ConfigError(f"[interpret] {key} must be a positive integer, got {i[key]!r}")
        for group in c["sae"]:  # "all" layers are only known with the model: check layer 0 now
            expand_group({**group, "layers": 0} if group.get("layers") == "all" else group)
    except LmscopeError as err:
        raise ConfigError(f"{where}: {err}") from None


def sae_specs(cfg: BuildConfig, n_layers: int) -> list[Any]:
    """The suite's SAESpecs, with ``layers = "all"`` expanded to the model's depth."""
    from lmscope.train import expand_group
    from lmscope.train.config import check_unique

    specs = []
    for group in cfg.raw["sae"]:
        g = dict(group)
        if g.get("layers") == "all":
            g["layers"] = f"0-{n_layers - 1}"
        g.setdefault("model", cfg["model"]["name"])
        specs.extend(expand_group(g))
    check_unique(specs)
    for spec in specs:
        for site in spec.sites:
            if int(site[1:].split(".")[0]) >= n_layers:
                raise ConfigError(f"[[sae]] site {site} is out of range: the model has layers 0-{n_layers - 1}")  # fmt: skip
    return specs


class _State:
    """``build.json``: the config and the finished stages, rewritten atomically after each."""

    def __init__(self, out: Path, cfg: BuildConfig):
        self.path = out / STATE
        if self.path.is_file():
            import json

            st = json.loads(self.path.read_text())
            if st["config"] != cfg.raw:
                key = _first_difference(st["config"], cfg.raw)
                raise ConfigError(f"{out} was built with a different config ({key} differs); use another --out or the same config")  # fmt: skip
            self.state = st
        else:
            if (out / MANIFEST).is_file():
                raise ConfigError(f"{out} is a suite not made by `lmscope build`; use another --out")  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            self.state = {"config": cfg.raw, "done": [], "seconds": {}, "stage": None}
            self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def done(self, stage: str) -> bool:
        return stage in self.state["done"]

    def start(self, stage: str) -> None:
        self.state["stage"] = stage
        self.save()

    def finish(self, stage: str, seconds: float) -> None:
        self.state["done"].append(stage)
        self.state["seconds"][stage] = seconds  # a killed attempt never finishes, so never adds
        self.state["stage"] = None
        self.save()


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{path}.{k}" if path else k)
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return path or "the config"


def build(config: str | BuildConfig, out: str | Path, *, progress: bool = True) -> Suite:
    """Run (or resume) every stage of a build into the suite folder ``out``; return the suite."""
    from lmscope.activations.harvest import release_freed_memory
    from lmscope.outputs import claim_dir

    cfg = read_config(config) if isinstance(config, str) else config
    root = claim_dir(out, owned=lambda p: (p / STATE).is_file(), command="build", can_force=False)
    model = _Model(cfg)
    if not (root / STATE).is_file():  # a new build: the model and its layers must exist first
        _ = model.specs
    state = _State(root, cfg)
    t_start = time.perf_counter()
    todo = [s for s in STAGES if not state.done(s)]
    if not todo:
        _say(progress, f"build at {root} is complete; nothing to do")
        return Suite.open(root)
    for i, stage in enumerate(STAGES, 1):
        if state.done(stage):
            continue
        elapsed = time.perf_counter() - t_start
        _say(progress, f"[{i}/{len(STAGES)}] {stage} (build running {elapsed / 60:.1f} min)")
        state.start(stage)
        t0 = time.perf_counter()
        _STAGE_FNS[stage](cfg, root, model, progress)
        release_freed_memory()  # what a stage freed is not the next stage's resident memory
        state.finish(stage, time.perf_counter() - t0)
    total = sum(state.state["seconds"].values())
    _say(progress, f"build complete: {root} ({total / 60:.1f} min of stage time); browse it with `lmscope serve {root}`")  # fmt: skip
    return Suite.open(root)


class _Model:
    """The build's model and SAE specs, loaded on first use: a resumed build whose remaining
    stages need no model (the report) never loads it."""

    def __init__(self, cfg: BuildConfig) -> None:
        self._cfg = cfg

    @cached_property
    def loaded(self) -> Any:
        from lmscope.model import load_model

        m = self._cfg["model"]
        return load_model(m["name"], device=m["device"], dtype=m["dtype"])

    @cached_property
    def specs(self) -> list[Any]:
        from lmscope.model import SiteModel

        return sae_specs(self._cfg, SiteModel(self.loaded).n_layers)

    def release(self) -> None:
        """Free the model while a stage that does not need it runs (it loads again on next use):
        training from the store holds its shuffle buffer and every SAE's optimiser instead."""
        import gc

        _ = self.specs  # kept: they need the model to compute
        self.__dict__.pop("loaded", None)
        gc.collect()


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"lmscope build: {msg}", flush=True)


def _harvest(cfg: BuildConfig, root: Path, model: _Model, progress: bool) -> None:
    from lmscope.activations.harvest import HarvestConfig, harvest

    h, d, m = cfg["harvest"], cfg["data"], cfg["model"]
    if h["tokens"] == 0:
        _say(progress, "no store ([harvest] tokens = 0): training streams from the model")
        return
    sites = ",".join(sorted({site for s in model.specs for site in s.sites}))
    hc = HarvestConfig(model=m["name"], sites=sites, corpus=d["corpus"], tokens=h["tokens"],
                       seq_len=d["seq_len"], batch_size=h["batch_size"], split="train",
                       seed=d["seed"], dtype=h["dtype"], model_dtype=m["dtype"],
                       shard_rows=h["shard_rows"])  # fmt: skip
    harvest(hc, str(root / "store"), resume=True, loaded=model.loaded, progress=progress)


def _train(cfg: BuildConfig, root: Path, model: _Model, progress: bool) -> None:
    from dataclasses import replace

    from lmscope.activations.store import ActivationStore
    from lmscope.activations.stream import stream_batches
    from lmscope.train import TrainConfig, store_data, train_suite

    tc = replace(TrainConfig.from_dict(cfg["train"]), progress=progress)
    specs = model.specs
    sites = sorted({site for s in specs for site in s.sites})
    d, m = cfg["data"], cfg["model"]
    if cfg["harvest"]["tokens"] == 0:
        data = stream_batches(model.loaded, sites, tc.batch_size, corpus=d["corpus"],
                              seq_len=d["seq_len"], seed=tc.seed)  # fmt: skip
    else:
        data = store_data(ActivationStore(str(root / "store")), sites, tc.batch_size, seed=tc.seed)
        model.release()  # the quick build's peak memory (issue 16): ~1 GB less while training
    folders = train_suite(specs, data, tc, root, resume=True)
    if tc.kl_tokens > 0:  # the KL phase: each SAE spliced into the model (lmscope.train.finetune)
        from lmscope.train.finetune import finetune_suite

        finetune_suite(model.loaded, folders, tc, corpus=d["corpus"], seq_len=d["seq_len"],
                       resume=True)  # fmt: skip
    record_training(root, folders, model=m["name"], corpus=d["corpus"], seq_len=d["seq_len"],
                    model_dtype=m["dtype"])  # fmt: skip


def _eval(cfg: BuildConfig, root: Path, model: _Model, progress: bool) -> None:
    from lmscope.evals.evaluate import EvalConfig
    from lmscope.evals.results import EVAL_FILE, evaluate_suite

    suite = Suite.open(root)
    e = cfg["eval"]
    ec = EvalConfig(tokens=e["tokens"], recon_tokens=e["recon_tokens"], batch_size=e["batch_size"],
                    seed=cfg["data"]["seed"], progress=progress)  # fmt: skip
    # every eval.json is written once the shared pass ends; a rerun evaluates the SAEs without one
    todo = [n for n in suite.names if not (root / n / EVAL_FILE).is_file()]
    if todo:
        evaluate_suite(suite, ec, names=todo, loaded=model.loaded)


def _interpret(cfg: BuildConfig, root: Path, model: _Model, progress: bool) -> None:
    from lmscope.interp.features import StatsConfig
    from lmscope.interp.pipeline import InterpretConfig, interpret

    i = cfg["interpret"]
    ic = InterpretConfig(tokens=i["tokens"], batch_size=i["batch_size"], seed=cfg["data"]["seed"],
                         stats=StatsConfig(k=i["k"], window=i["window"]))  # fmt: skip
    suite = Suite.open(root)
    interpret(suite, ic, loaded=model.loaded, progress=progress)
    # every built scope has labels: the built-in explainer and the simulator's scores
    from lmscope.interp.explain.run import explain

    report = explain(suite, progress=progress)
    _say(progress, f"explain: {report.summary()}")


def _report(cfg: BuildConfig, root: Path, model: _Model, progress: bool) -> None:
    from lmscope.evals.report import write_report

    write_report(Suite.open(root))


_STAGE_FNS = {"harvest": _harvest, "train": _train, "eval": _eval, "interpret": _interpret,
              "report": _report}  # fmt: skip
