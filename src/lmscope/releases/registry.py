"""The registry of published SAE suites (`releases.json`, shipped with the package).

One entry per release: its name (SAELens' release name where SAELens has one), the Hugging Face
repo, the model, the file family and the exact folders the repo holds, grouped by their first
folder. `scripts/gen_releases.py` regenerates the file from SAELens' `pretrained_saes.yaml`.

>>> [r.name for r in releases(model="gemma-3-270m")][:2]
>>> release("gemma-scope-2-270m-pt-res").items(layers=[12], widths=["16k"], l0s=["small"])
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from lmscope.errors import ConfigError

# SAELens' get_gemma_2_config_from_hf width_map; Gemma Scope 2 folders use the same labels
WIDTHS = {"4k": 4096, "16k": 16384, "32k": 32768, "65k": 65536, "131k": 131072,
          "262k": 262144, "524k": 524288, "1m": 1048576}  # fmt: skip
# the lmscope model name of a release's model, where it differs from the HF id
MODELS = {"google/gemma-3-270m": "gemma-3-270m"}
# Gemma Scope 1 folders carry no config: the repo's suffix names the site (SAELens
# get_gemma_2_config_from_hf: res → hook_resid_post, mlp → hook_mlp_out, att → attn.hook_z;
# get_gemma_2_transcoder_config_from_hf: ln2.hook_normalized → hook_mlp_out)
GS1_KINDS = {"res": ("resid_post", None), "mlp": ("mlp_out", None), "att": ("attn_z", None),
             "transcoders": ("mlp_in", "mlp_out")}  # fmt: skip
# Gemma Scope 2 folder groups → (site read, site written). attn_out SAEs read the *input* of
# o_proj (their config.json says hf_hook_point_in = "model.layers.L.self_attn.o_proj.input", d_in
# = heads × head_dim, e.g. 1024 for 1b; SAELens' tests quote it), i.e. lmscope's attn_z, although
# SAELens names the hook blocks.L.hook_attn_out. Transcoders: pre_feedforward_layernorm.output →
# post_feedforward_layernorm.output (same source), i.e. mlp_in → mlp_out.
GS2_KINDS = {"resid_post": ("resid_post", None), "mlp_out": ("mlp_out", None),
             "attn_out": ("attn_z", None), "transcoder": ("mlp_in", "mlp_out"),
             "clt": ("mlp_in", "mlp_out"), "crosscoder": ("resid_post", None)}  # fmt: skip
_GS1 = re.compile(r"layer_(\d+)/width_(\w+?)/average_l0_(\d+)")
_GS2 = re.compile(r"layer_(\d+)_width_(\w+?)_l0_(small|medium|big)(_affine)?(_seed_\d+)?")
_MULTI = re.compile(r"(?:layer_([\d_]+)_)?width_(\w+?)_l0_(small|medium|big)(_affine)?")


@dataclass(frozen=True)
class Item:
    """One published folder: what it reads and writes, at which width and L0."""

    folder: str  # path inside the repo, e.g. resid_post/layer_12_width_16k_l0_small
    layers: tuple[int, ...]  # one layer, or every layer of a CLT / crosscoder
    kind: str  # lmscope site kind read, e.g. resid_post, attn_z, mlp_in
    out_kind: str | None  # transcoders: the kind written (mlp_out)
    width: str  # label, e.g. 16k
    l0: str  # small / medium / big, or Gemma Scope 1's average L0 number
    affine: bool = False

    @property
    def d_sae(self) -> int:
        return WIDTHS[self.width]

    @property
    def multilayer(self) -> bool:
        return self.folder.startswith(("clt/", "crosscoder/"))


@dataclass(frozen=True)
class Release:
    name: str
    family: str  # gemmascope, gemmascope-transcoder, gemmascope2, gemmascope2-clt, -crosscoder
    repo: str
    model: str  # as SAELens names it (HF id for Gemma 3, TransformerLens name for Gemma 2)
    saelens: str | None
    folders: tuple[str, ...]
    layers: tuple[int, ...] = ()  # multi-layer releases: the layers they span

    @property
    def lmscope_model(self) -> str:
        """The name `lmscope.model.load_model` takes for this release's model."""
        m = self.model if "/" in self.model else f"google/{self.model}"
        return MODELS.get(m, m)

    def items(self, *, layers: list[int] | None = None, widths: list[str] | None = None,
              l0s: list[str] | None = None, affine: bool | None = None) -> list[Item]:  # fmt: skip
        """The release's folders, filtered (``affine``: only transcoders with / without the skip
        connection); an empty selection is a ConfigError naming the choices."""
        every = [it for it in map(self._item, self.folders) if it is not None]
        chosen = [it for it in every
                  if (layers is None or set(it.layers) & set(layers))
                  and (widths is None or it.width in widths)
                  and (l0s is None or it.l0 in l0s)
                  and (affine is None or it.affine == affine)]  # fmt: skip
        if not chosen:
            have: dict[str, list[str]] = {
                "layers": [str(la) for la in sorted({la for it in every for la in it.layers})],
                "widths": sorted({it.width for it in every}, key=lambda w: WIDTHS.get(w, 0)),
                "l0s": sorted({it.l0 for it in every}),
            }
            raise ConfigError(
                f"nothing in {self.name} matches layers={layers} widths={widths} l0={l0s}"
                + ("" if affine is None else f" affine={affine}")
                + "; it has "
                + "; ".join(f"{k}: {', '.join(v)}" for k, v in have.items())
            )
        return chosen

    def _item(self, folder: str) -> Item | None:
        head, _, rest = folder.partition("/")
        if self.family in ("gemmascope", "gemmascope-transcoder"):
            m = _GS1.fullmatch(folder)
            which = self.repo.rsplit("-", 1)[-1]
            if m is None or which not in GS1_KINDS:  # embedding SAEs: no lmscope site
                return None
            kind, out = GS1_KINDS[which]
            return Item(folder, (int(m[1]),), kind, out, m[2], m[3])
        group = head.removesuffix("_all")
        if group not in GS2_KINDS:
            return None
        kind, out = GS2_KINDS[group]
        if group in ("clt", "crosscoder"):
            mm = _MULTI.fullmatch(rest)
            if mm is None:
                return None
            spans = tuple(int(x) for x in mm[1].split("_")) if mm[1] else self.layers
            return Item(folder, spans, kind, out, mm[2], mm[3], bool(mm[4]))
        m2 = _GS2.fullmatch(rest)
        if m2 is None:
            return None
        return Item(folder, (int(m2[1]),), kind, out, m2[2], m2[3], bool(m2[4]))


@cache
def _load() -> dict[str, Release]:
    text = resources.files("lmscope.releases").joinpath("releases.json").read_text()
    doc: dict[str, Any] = json.loads(text)
    out = {}
    for r in doc["releases"]:
        folders = tuple(f"{head}/{rest}" for head, rests in r["folders"].items() for rest in rests)
        out[r["name"]] = Release(r["name"], r["family"], r["repo"], r["model"], r.get("saelens"),
                                 folders, tuple(r.get("layers", ())))  # fmt: skip
    return out


def releases(*, model: str | None = None) -> list[Release]:
    """Every registered release, or those of one model (HF id, SAELens or lmscope name)."""
    every = list(_load().values())
    if model is None:
        return every
    key = model.removeprefix("google/")
    return [r for r in every if key in (r.model.removeprefix("google/"), r.lmscope_model)]


def release(name: str) -> Release:
    """One release by name; an unknown name is a ConfigError listing close matches."""
    table = _load()
    if name in table:
        return table[name]
    near = [
        n for n in table if name.split("-")[0] in n and any(p in n for p in name.split("-")[1:])
    ]
    hint = ", ".join(sorted(near)[:8]) or ", ".join(sorted(table)[:8]) + ", …"
    raise ConfigError(f"unknown release {name!r}; `lmscope releases` lists them, e.g. {hint}")
