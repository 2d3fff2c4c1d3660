"""`lmscope pull`: make a suite out of a published release.

Files come from the Hugging Face Hub through `huggingface_hub.snapshot_download` (only the chosen
folders; interrupted downloads resume; `HF_HUB_OFFLINE=1` or `offline=True` reads the local cache
only), from an HF cache folder (`cache_dir`), or from a local copy of the repo (`source`). Each
folder is read by `lmscope.sae.formats.import_sae`, checked against the model's sites (the site the
files declare, and its width), and written as a native SAE folder whose config records where it
came from (`training.source`). The result is an ordinary suite: eval, interpret, serve, attribute.

>>> pull("gemma-scope-2-270m-pt-res-all", "runs/gs2", layers=[3], widths=["16k"], l0s=["small"])
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lmscope.errors import ConfigError, SAEError
from lmscope.releases.registry import Item, Release, release
from lmscope.suite import Suite

Progress = Callable[[str], None]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(rel: Release, items: list[Item], *, source: str | Path | None = None,
          cache_dir: str | Path | None = None, revision: str | None = None,
          offline: bool | None = None) -> tuple[Path, str | None]:  # fmt: skip
    """The local repo root holding ``items`` and its revision (None for a plain local folder)."""
    if source is not None:
        root = Path(source)
        if not root.is_dir():
            raise ConfigError(f"--source {root} is not a folder (expected a copy of {rel.repo})")
        return root, None
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise ConfigError("pulling from the Hub needs huggingface_hub (pip install)") from e
    offline = _offline() if offline is None else offline
    patterns = [f"{it.folder}/*" for it in items]
    try:
        path = snapshot_download(rel.repo, allow_patterns=patterns, cache_dir=cache_dir,
                                 revision=revision, local_files_only=offline)  # fmt: skip
    except Exception as e:  # offline without a cache, gated repo, no network: one line
        where = "the local Hugging Face cache" if offline else "the Hugging Face Hub"
        raise ConfigError(
            f"could not get {rel.repo} from {where} ({type(e).__name__}); check the name, your "
            "connection or token, or pass --source DIR (a local copy) / --cache-dir DIR"
        ) from e
    root = Path(path)
    rev = root.name if root.parent.name == "snapshots" else revision
    return root, rev


def _folder_name(it: Item, d_sae: int) -> str:
    suffix = "-affine" if it.affine else ""
    return f"L{it.layers[0]}.{it.kind}-w{d_sae}-l0{it.l0}{suffix}"


def _declared_width(folder: Path) -> int | None:
    """The ``width`` a Gemma Scope 2 config.json declares (the label in the name is nominal)."""
    import json

    cfg = folder / "config.json"
    if not cfg.is_file() or (folder / "weights.safetensors").is_file():
        return None
    width = json.loads(cfg.read_text()).get("width")
    return int(width) if width is not None else None


def load_item(rel: Release, it: Item, root: Path) -> Any:
    """The folded lmscope SAE of one published folder, with its declared sites checked."""
    from lmscope.sae.formats import detect_format, import_sae

    folder = root / it.folder
    if not folder.is_dir():
        raise ConfigError(f"{rel.repo}/{it.folder} is missing from {root}; was it downloaded?")
    layer = it.layers[0]
    site = f"L{layer}.{it.kind}"
    out_site = f"L{layer}.{it.out_kind}" if it.out_kind else None
    hints = {"site": site, "out_site": out_site, "model": rel.lmscope_model}
    sae = import_sae(folder, hints=hints)
    fmt = detect_format(folder)
    declared = (sae.cfg.site, sae.cfg.out_site if sae.cfg.is_transcoder else None)
    if fmt == "gemmascope2" and declared != (site, out_site):
        raise SAEError(
            f"{rel.repo}/{it.folder} declares sites {declared[0]}"
            + (f" → {declared[1]}" if declared[1] else "")
            + f"; the registry expects {site}"
            + (f" → {out_site}" if out_site else "")
        )
    width = _declared_width(folder)
    if width is not None and sae.cfg.d_sae != width:
        raise SAEError(f"{rel.repo}/{it.folder} holds {sae.cfg.d_sae} latents; its config says {width}")  # fmt: skip
    if it.affine != sae.cfg.skip:
        raise SAEError(f"{rel.repo}/{it.folder}: affine skip {'missing' if it.affine else 'unexpected'}")  # fmt: skip
    return sae


def check_sites(sae: Any, sites: Any, what: str) -> None:
    """One-line SAEError unless the model has the SAE's sites at the SAE's widths."""
    from lmscope.errors import SiteError

    cfg = sae.cfg
    try:
        d_in = sites.site_dim(cfg.site)
        d_out = sites.site_dim(cfg.out_site) if cfg.is_transcoder else d_in
    except SiteError as e:
        raise SAEError(f"{what} reads {cfg.site}, which the model does not have: {e}") from e
    if (cfg.d_in, cfg.out_dim) != (d_in, d_out):
        raise SAEError(
            f"{what} expects width {cfg.d_in} at {cfg.site}"
            + (f" and {cfg.out_dim} at {cfg.out_site}" if cfg.is_transcoder else "")
            + f" but the model has {d_in}"
            + (f" and {d_out}" if cfg.is_transcoder else "")
            + "; is it the model the release was trained on?"
        )


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0-3,7"`` → [0, 1, 2, 3, 7]; None → every layer."""
    if not spec:
        return None
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if m is None:
            raise ConfigError(f"cannot parse layers {spec!r}; expected e.g. 0-3,7")
        a, b = int(m[1]), int(m[2] or m[1])
        out += range(a, b + 1)
    return out


def pull(name: str, out: str | Path, *, layers: list[int] | None = None,
         widths: list[str] | None = None, l0s: list[str] | None = None,
         affine: bool | None = None, model: str | None = None, source: str | Path | None = None,
         cache_dir: str | Path | None = None, revision: str | None = None,
         offline: bool | None = None, progress: Progress | None = print) -> Suite:  # fmt: skip
    """Download the chosen folders of release ``name`` and write them as the suite ``out``.

    ``model`` overrides the release's model (a stand-in with the same site widths, e.g. for
    tests); every SAE is checked against it before anything is written.
    """
    from lmscope.model import SiteModel, load_model
    from lmscope.sae.formats import save_sae

    rel = release(name)
    items = rel.items(layers=layers, widths=widths, l0s=l0s, affine=affine)
    multi = [it.folder for it in items if it.multilayer]
    if multi:
        raise ConfigError(
            f"{name} holds cross-layer transcoders / crosscoders ({multi[0]}), which a suite cannot "
            "hold yet (one SAE per site); read them with lmscope.sae.multilayer.load_multilayer"
        )
    model_name = model or rel.lmscope_model
    root, rev = fetch(rel, items, source=source, cache_dir=cache_dir, revision=revision,
                      offline=offline)  # fmt: skip
    saes = [(it, load_item(rel, it, root)) for it in items]
    sites = SiteModel(load_model(model_name))
    for it, sae in saes:
        check_sites(sae, sites, f"{rel.repo}/{it.folder}")
    suite = Suite.create(out, model=model_name)
    folders = []
    for it, sae in saes:
        l0 = sae.cfg.training.get("l0")
        if l0 is None and it.l0.isdigit():
            l0 = float(it.l0)  # Gemma Scope 1 names the average L0 in the folder
        src = {"release": rel.name, "repo": rel.repo, "folder": it.folder, "revision": rev,
               "saelens_release": rel.saelens, "published_model": rel.model}  # fmt: skip
        cfg = replace(sae.cfg, model=model_name, training={**sae.cfg.training, "l0": l0, "source": src})  # fmt: skip
        sae.cfg = cfg
        path = save_sae(sae, suite.path / _folder_name(it, sae.cfg.d_sae))
        folders.append(path)
        if progress:
            progress(f"{rel.repo}/{it.folder} → {path}")
    suite.register(folders)
    return suite
