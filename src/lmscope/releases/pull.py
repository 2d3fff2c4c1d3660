"""`lmscope pull`: make a suite out of a published release.

Files come from the Hugging Face Hub through `huggingface_hub.snapshot_download` (only the chosen
folders; interrupted downloads resume; `HF_HUB_OFFLINE=1` or `offline=True` reads the local cache
only), from an HF cache folder (`cache_dir`), or from a local copy of the repo (`source`). Each
folder is read by `lmscope.sae.formats.import_sae`, checked against the model's sites (the site the
files declare, and its width), and written as a native SAE folder whose config records where it
came from (`training.source`). The result is an ordinary suite: eval, interpret, serve, attribute.

Cross-layer transcoders and crosscoders (`clt/…`, `crosscoder/…`: one params_layer_i file per
layer) are read by `lmscope.sae.multilayer.load_multilayer`, checked the same way at every layer
they span (the files declare how many layers; a crosscoder's folder name lists which), and written
as native multi-layer folders, listed in the manifest's `multilayer` list (docs/formats.md).

>>> pull("gemma-scope-2-270m-pt-res-all", "runs/gs2", layers=[3], widths=["16k"], l0s=["small"])
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmscope.errors import ConfigError, SAEError
from lmscope.releases.registry import Item, Release, release
from lmscope.suite import Suite

if TYPE_CHECKING:
    from lmscope.sae.multilayer import MultiLayerSAE

Progress = Callable[[str], None]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(
    rel: Release,
    items: list[Item],
    *,
    source: str | Path | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    offline: bool | None = None,
) -> tuple[Path, str | None]:
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
        path = snapshot_download(
            rel.repo,
            allow_patterns=patterns,
            cache_dir=cache_dir,
            revision=revision,
            local_files_only=offline,
        )
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
        raise SAEError(
            f"{rel.repo}/{it.folder} holds {sae.cfg.d_sae} latents; its config says {width}"
        )
    if it.affine != sae.cfg.skip:
        raise SAEError(
            f"{rel.repo}/{it.folder}: affine skip {'missing' if it.affine else 'unexpected'}"
        )
    return sae


def load_multi_item(rel: Release, it: Item, root: Path) -> MultiLayerSAE:
    """The CLT / crosscoder of one published folder, its layers and skip checked against the
    registry, and its config.json's hook points (where it lists them) against its sites."""
    from lmscope.sae.formats import HF_HOOKS, _site_from_hook
    from lmscope.sae.multilayer import load_multilayer

    folder = root / it.folder
    if not folder.is_dir():
        raise ConfigError(f"{rel.repo}/{it.folder} is missing from {root}; was it downloaded?")
    kind = it.folder.split("/", 1)[0].removesuffix("_all")
    sae = load_multilayer(folder, kind=kind, layers=it.layers if kind == "crosscoder" else ())
    what = f"{rel.repo}/{it.folder}"
    if sae.n_layers != len(it.layers):
        raise SAEError(
            f"{what} holds {sae.n_layers} layers; the registry expects {len(it.layers)} ({_span(it.layers)})"
        )
    if it.affine != (sae.skip is not None):
        raise SAEError(f"{what}: affine skip {'missing' if it.affine else 'unexpected'}")
    published = sae.published_config or {}
    for key, want in (("hf_hook_point_in", sae.sites), ("hf_hook_point_out", sae.out_sites)):
        hooks = published.get(key)
        if isinstance(hooks, list):  # one hook per layer: the sites the files declare
            declared = [_site_from_hook(h, HF_HOOKS) for h in hooks]
            if declared != want:
                raise SAEError(
                    f"{what} declares {key} at {', '.join(declared)}; expected {', '.join(want)}"
                )
    l0 = published.get("l0")
    sae.training = {**sae.training, "l0": float(l0) if isinstance(l0, int | float) else None}
    return sae


def _span(layers: tuple[int, ...]) -> str:
    contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
    return (
        f"{layers[0]}-{layers[-1]}"
        if contiguous and len(layers) > 2
        else "_".join(map(str, layers))
    )


def _multi_folder_name(it: Item, sae: MultiLayerSAE) -> str:
    suffix = "-affine" if it.affine else ""
    kind = sae.sites[0].split(".", 1)[1]
    return f"{sae.kind}-L{_span(sae.layers)}.{kind}-w{sae.d_sae * sae.n_layers}-l0{it.l0}{suffix}"


def check_multi_sites(sae: MultiLayerSAE, sites: Any, what: str) -> None:
    """One-line SAEError unless the model has every layer's sites at the SAE's widths."""
    from lmscope.errors import SiteError

    for site, out in zip(sae.sites, sae.out_sites):
        try:
            d_in, d_out = sites.site_dim(site), sites.site_dim(out)
        except SiteError as e:
            raise SAEError(f"{what} reads {site}, which the model does not have: {e}") from e
        if (sae.d_in, sae.d_out) != (d_in, d_out):
            raise SAEError(
                f"{what} expects width {sae.d_in} at {site} and {sae.d_out} at {out} but the "
                f"model has {d_in} and {d_out}; is it the model the release was trained on?"
            )


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


def _source(rel: Release, it: Item, rev: str | None) -> dict[str, Any]:
    """Where a pulled folder came from (``training.source`` of what pull writes)."""
    return {
        "release": rel.name,
        "repo": rel.repo,
        "folder": it.folder,
        "revision": rev,
        "saelens_release": rel.saelens,
        "published_model": rel.model,
    }


def pull(
    name: str,
    out: str | Path,
    *,
    layers: list[int] | None = None,
    widths: list[str] | None = None,
    l0s: list[str] | None = None,
    affine: bool | None = None,
    model: str | None = None,
    source: str | Path | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
    offline: bool | None = None,
    progress: Progress | None = print,
) -> Suite:
    """Download the chosen folders of release ``name`` and write them as the suite ``out``.

    ``model`` overrides the release's model (a stand-in with the same site widths, e.g. for
    tests); every SAE is checked against it before anything is written.
    """
    from lmscope.model import SiteModel, load_model
    from lmscope.sae.formats import save_sae
    from lmscope.sae.multilayer import save_native

    rel = release(name)
    items = rel.items(layers=layers, widths=widths, l0s=l0s, affine=affine)
    model_name = model or rel.lmscope_model
    root, rev = fetch(
        rel, items, source=source, cache_dir=cache_dir, revision=revision, offline=offline
    )
    multis = [(it, load_multi_item(rel, it, root)) for it in items if it.multilayer]
    saes = [(it, load_item(rel, it, root)) for it in items if not it.multilayer]
    sites = SiteModel(load_model(model_name))
    for it, sae in saes:
        check_sites(sae, sites, f"{rel.repo}/{it.folder}")
    for it, multi in multis:
        check_multi_sites(multi, sites, f"{rel.repo}/{it.folder}")
    suite = Suite.create(out, model=model_name)
    folders = []
    for it, multi in multis:
        multi.model = model_name
        multi.training = {**multi.training, "source": _source(rel, it, rev)}
        path = save_native(multi, suite.path / _multi_folder_name(it, multi))
        folders.append(path)
        if progress:
            progress(f"{rel.repo}/{it.folder} → {path}")
    for it, sae in saes:
        l0 = sae.cfg.training.get("l0")
        if l0 is None and it.l0.isdigit():
            l0 = float(it.l0)  # Gemma Scope 1 names the average L0 in the folder
        src = _source(rel, it, rev)
        cfg = replace(
            sae.cfg, model=model_name, training={**sae.cfg.training, "l0": l0, "source": src}
        )
        sae.cfg = cfg
        path = save_sae(sae, suite.path / _folder_name(it, sae.cfg.d_sae))
        folders.append(path)
        if progress:
            progress(f"{rel.repo}/{it.folder} → {path}")
    suite.register(folders)
    return suite
