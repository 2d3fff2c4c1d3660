"""A suite: a folder of SAEs trained on one model, with a manifest every later stage reads and extends.

```
<suite>/
  manifest.json        # {"format": "lmscope.suite", "version": 1, "model", "model_dtype", "corpus",
                       #  "seq_len", "saes": [entry, ...], "canonical": {group: name}, "created", "updated"}
  <sae>/               # native SAE folders (config.json + weights.safetensors + train_log.jsonl)
  <sae>/eval.json      # evals (lmscope eval), one JSON per SAE
  features.db          # interpret (lmscope interpret)
  report/              # lmscope report
```

An entry is ``{"name", "site", "layer", "kind", "architecture", "d_in", "d_sae", "target_l0",
"training": {...}, "metrics": {...}}``: ``name`` is the SAE's folder, ``metrics`` is what eval
measured (empty until then). Cross-layer transcoders and crosscoders, which span several layers,
are listed apart under ``"multilayer"`` (``{"name", "multilayer": "clt" | "crosscoder", "layers",
"sites", "out_sites", "architecture", "d_in", "d_sae", "d_sae_total", "d_out", "skip", "training",
"metrics"}``), so that code reading one SAE per site never meets them; ``load_multilayer`` reads
one (``lmscope.sae.multilayer.MultiLayerSAE``).

The *canonical* SAE of each (site, width) group is the one whose mean L0 (eval's when known, else
training's) is closest to 100, as Gemma Scope picks them.

>>> suite = Suite.open("runs/quick/suite")
>>> sae = suite.load_sae(suite.resolve("L6.resid_post"))
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmscope.atomic import write_json_atomic
from lmscope.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from lmscope.model import LoadedModel
    from lmscope.sae import SAE
    from lmscope.sae.multilayer import MultiLayerSAE

FORMAT = "lmscope.suite"
VERSION = 1
MANIFEST = "manifest.json"
CANONICAL_L0 = 100.0
MULTI = "multilayer"  # the manifest's list of cross-layer transcoders and crosscoders


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _entry(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    site = cfg["site"]
    layer, kind = site.split(".", 1)
    training = cfg.get("training") or {}
    return {
        "name": folder.name,
        "site": site,
        "out_site": cfg.get("out_site"),
        "layer": int(layer.removeprefix("L")),
        "kind": kind,
        "architecture": cfg["architecture"],
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "target_l0": training.get("target_l0"),
        "training": training,
        "metrics": {},
    }


def _multi_entry(folder: Path) -> dict[str, Any]:
    cfg = json.loads((folder / "config.json").read_text())
    return {
        "name": folder.name,
        "multilayer": cfg["multilayer"],
        "layers": cfg["layers"],
        "sites": cfg["sites"],
        "out_sites": cfg["out_sites"],
        "architecture": cfg["architecture"],
        "d_in": cfg["d_in"],
        "d_sae": cfg["d_sae"],
        "d_sae_total": cfg["d_sae"] * cfg["n_layers"],
        "d_out": cfg["d_out"],
        "skip": cfg["skip"],
        "training": cfg.get("training") or {},
        "metrics": {},
    }


class Suite:
    """A suite folder and its manifest. Open with ``Suite.open``, make with ``Suite.create``."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    # -- making and opening -------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        model: str,
        corpus: str = "default",
        seq_len: int = 128,
        model_dtype: str = "float32",
    ) -> Suite:
        """Open the suite at ``path``, making the folder and manifest when new.

        An existing suite must be of the same model: a suite never mixes models.
        """
        p = Path(path)
        if (p / MANIFEST).is_file():
            suite = cls.open(p)
            if suite.model != model:
                raise ConfigError(f"{p} is a suite of {suite.model!r}, not {model!r}; use another --out")  # fmt: skip
            return suite
        p.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "version": VERSION, "model": model,
                    "model_dtype": model_dtype, "corpus": corpus, "seq_len": seq_len,
                    "saes": [], "canonical": {}, "created": _now(), "updated": _now()}  # fmt: skip
        suite = cls(p, manifest)
        suite.save()
        return suite

    @classmethod
    def open(cls, path: str | Path) -> Suite:
        """Read the suite at ``path``; a folder that is not a suite is a one-line error."""
        p = Path(path)
        f = p / MANIFEST
        if not f.is_file():
            what = (
                "does not exist" if not p.exists() else "is not an lmscope suite (no manifest.json)"
            )
            raise ConfigError(f"{p} {what}; make one with `lmscope train --out {p}` or `lmscope build`")  # fmt: skip
        try:
            manifest = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{f} is not valid JSON ({e}); the suite manifest is damaged") from e
        if manifest.get("format") != FORMAT:
            raise ConfigError(f"{f} is not an lmscope suite manifest (format {manifest.get('format')!r}; expected {FORMAT!r})")  # fmt: skip
        return cls(p, manifest)

    def save(self) -> None:
        self.manifest["updated"] = _now()
        write_json_atomic(self.path / MANIFEST, self.manifest)

    # -- what it holds ------------------------------------------------------------------------
    @property
    def model(self) -> str:
        return str(self.manifest["model"])

    @property
    def model_dtype(self) -> str:
        return str(self.manifest.get("model_dtype", "float32"))

    @property
    def corpus(self) -> str:
        return str(self.manifest.get("corpus", "default"))

    @property
    def seq_len(self) -> int:
        return int(self.manifest.get("seq_len", 128))

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Every SAE entry, sorted by (layer, kind, width, name)."""
        return sorted(self.manifest["saes"], key=lambda e: (e["layer"], e["kind"], e["d_sae"], e["name"]))  # fmt: skip

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    @property
    def sites(self) -> list[str]:
        """Distinct input sites with at least one SAE, in layer order."""
        return list(dict.fromkeys(e["site"] for e in self.entries))

    @property
    def multilayer_entries(self) -> list[dict[str, Any]]:
        """Every cross-layer transcoder / crosscoder entry, sorted by name."""
        return sorted(self.manifest.get(MULTI, []), key=lambda e: e["name"])

    @property
    def multilayer_names(self) -> list[str]:
        return [e["name"] for e in self.multilayer_entries]

    def entry(self, name: str) -> dict[str, Any]:
        """The entry of an SAE or of a multi-layer SAE, by name."""
        for e in [*self.manifest["saes"], *self.manifest.get(MULTI, [])]:
            if e["name"] == name:
                return dict(e)
        raise ConfigError(f"no SAE {name!r} in suite {self.path}; it has: {', '.join(self.names) or 'none'}")  # fmt: skip

    def resolve(self, key: str) -> str:
        """An SAE name, or a site (``L6.resid_post``) → that site's canonical SAE."""
        if any(e["name"] == key for e in [*self.manifest["saes"], *self.manifest.get(MULTI, [])]):
            return key
        on_site = [e for e in self.entries if e["site"] == key]
        if not on_site:
            raise ConfigError(f"{key!r} is neither an SAE nor a site of suite {self.path}; sites: {', '.join(self.sites) or 'none'}")  # fmt: skip
        canon = set(self.manifest.get("canonical", {}).values())
        for e in on_site:
            if e["name"] in canon:
                return str(e["name"])
        return str(on_site[0]["name"])

    def sae_path(self, name: str) -> Path:
        self.entry(name)  # validates
        return self.path / name

    def load_sae(self, name: str, *, device: str | torch.device | None = None) -> SAE:
        from lmscope.sae import load_sae

        return load_sae(self.sae_path(name), device=device)

    def load_multilayer(
        self, name: str, *, device: str | torch.device | None = None
    ) -> MultiLayerSAE:
        """A cross-layer transcoder or crosscoder of the suite, by name."""
        from lmscope.sae.multilayer import load_native

        if name not in self.multilayer_names:
            have = ", ".join(self.multilayer_names) or "none"
            raise ConfigError(f"no multi-layer SAE {name!r} in suite {self.path}; it has: {have}")
        return load_native(self.path / name, device=device)

    def load_model(self, *, device: str | None = None, dtype: str | None = None) -> LoadedModel:
        from lmscope.model import load_model

        return load_model(self.model, device=device, dtype=dtype or self.model_dtype)

    def require_saes(self) -> None:
        if not self.manifest["saes"] and not self.manifest.get(MULTI):
            raise ConfigError(f"suite {self.path} has no trained SAEs yet; run `lmscope train --out {self.path}` first")  # fmt: skip

    def require_site_saes(self, command: str) -> None:
        """As `require_saes`, and refuse a suite of only CLTs/crosscoders: `command` reads per-site
        SAEs and transcoders (the manifest's ``saes`` list)."""
        self.require_saes()
        if not self.manifest["saes"]:
            raise ConfigError(
                f"suite {self.path} holds only cross-layer transcoders or crosscoders, and "
                f"`lmscope {command}` reads per-site SAEs and transcoders; `lmscope eval` and "
                "`lmscope attribute --suite` work on it"
            )

    # -- growing it ---------------------------------------------------------------------------
    def register(self, folders: Iterable[str | Path]) -> list[str]:
        """Add (or refresh) the entries of SAE folders inside the suite; keeps existing metrics.
        Multi-layer folders (``lmscope.sae.multilayer.save_native``) go to the ``multilayer`` list."""
        from lmscope.sae.multilayer import is_multilayer

        names = []
        for folder in folders:
            f = Path(folder)
            if f.resolve().parent != self.path.resolve():
                raise ConfigError(f"{f} is not inside suite {self.path}")
            multi = is_multilayer(f)
            new = _multi_entry(f) if multi else _entry(f)
            listed = self.manifest.setdefault(MULTI, []) if multi else self.manifest["saes"]
            old = [e for e in listed if e["name"] == f.name]
            if old:
                new["metrics"] = old[0].get("metrics", {})
                listed.remove(old[0])
            listed.append(new)
            names.append(f.name)
        self._update_canonical()
        self.save()
        return names

    def set_metrics(self, name: str, metrics: dict[str, Any]) -> None:
        """Record eval metrics for one SAE in the manifest (and re-pick the canonical SAEs)."""
        for e in [*self.manifest["saes"], *self.manifest.get(MULTI, [])]:
            if e["name"] == name:
                e["metrics"] = metrics
                break
        else:
            self.entry(name)  # raises with the valid names
        self._update_canonical()
        self.save()

    def _update_canonical(self) -> None:
        groups: dict[str, list[dict[str, Any]]] = {}
        for e in self.manifest["saes"]:
            groups.setdefault(f"{e['site']}/w{e['d_sae']}", []).append(e)

        def l0(e: dict[str, Any]) -> float:
            v = e.get("metrics", {}).get("l0", e.get("training", {}).get("l0"))
            return abs(float(v) - CANONICAL_L0) if v is not None else float("inf")

        self.manifest["canonical"] = {
            g: min(es, key=lambda e: (l0(e), e["name"]))["name"] for g, es in sorted(groups.items())
        }

    def is_canonical(self, name: str) -> bool:
        return name in set(self.manifest.get("canonical", {}).values())

    # -- interpret's database (see lmscope.interp) -----------------------------------------------
    @property
    def features_db(self) -> Path:
        return self.path / "features.db"

    def feature(self, sae: str, index: int) -> Any:
        """One latent's interpretation record: ``suite.feature("L6.resid_post", 123)``."""
        from lmscope.interp.query import feature

        return feature(self, self.resolve(sae), index)


def record_training(
    out: str | Path,
    folders: Sequence[str | Path],
    *,
    model: str,
    corpus: str = "default",
    seq_len: int = 128,
    model_dtype: str = "float32",
) -> Suite:
    """Make (or extend) the suite manifest at ``out`` after ``train_suite`` wrote ``folders``."""
    suite = Suite.create(out, model=model, corpus=corpus, seq_len=seq_len, model_dtype=model_dtype)
    suite.register(folders)
    return suite
