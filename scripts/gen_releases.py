"""Regenerate src/lmscope/releases/releases.json from SAELens' pretrained_saes.yaml.

Run with a Python that has sae_lens (the optional ``bench`` extra, e.g. ``.venv-bench``):

    .venv-bench/bin/python scripts/gen_releases.py

Every Gemma Scope release SAELens lists is copied with its HF repo, model and the exact folder
paths it names (SAELens ids that differ from the path, e.g. ``…/canonical``, are kept as aliases).
Releases SAELens does not list are added by hand in ``EXTRA`` with the source of each layout fact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sae_lens
import yaml

OUT = Path(__file__).resolve().parents[1] / "src/lmscope/releases/releases.json"

# Not in SAELens 6.54: Gemma Scope 2 cross-layer transcoders and crosscoders. Folder names and
# the per-layer file layout (params_layer_{i}.safetensors, stacked along a new leading axis) come
# from the Gemma Scope 2 tutorial code quoted in public repositories (load_clt / get_clt:
# f"clt/width_{width}_l0_{l0}{'_affine' if affine else ''}/params_layer_{layer}.safetensors" for
# google/gemma-scope-2-1b-pt; circuit-tracer's tests use clt/width_262k_l0_medium_affine for
# 270m-pt) and a shape-inspection script (clt/width_262k_l0_{medium,big}[_affine] and
# crosscoder/layer_7_13_17_22_width_262k_l0_medium for google/gemma-scope-2-1b-pt; a 524k CLT is
# listed there by size). Widths and L0s beyond those are not claimed.
EXTRA = []
for size, n_layers in (("270m", 18), ("1b", 26)):
    for variant in ("pt", "it"):
        model = f"google/gemma-3-{size}" + (
            "" if (size, variant) == ("270m", "pt") else f"-{variant}"
        )
        EXTRA.append(
            {
                "name": f"gemma-scope-2-{size}-{variant}-clt",
                "family": "gemmascope2-clt",
                "repo": f"google/gemma-scope-2-{size}-{variant}",
                "model": model,
                "saelens": None,
                "layers": list(range(n_layers)),
                "folders": [
                    f"clt/width_{w}_l0_{l0}{a}"
                    for w in ("262k", "524k")
                    for l0 in ("medium", "big")
                    for a in ("", "_affine")
                ],
            }
        )
for variant in ("pt", "it"):
    EXTRA.append(
        {
            "name": f"gemma-scope-2-1b-{variant}-crosscoder",
            "family": "gemmascope2-crosscoder",
            "repo": f"google/gemma-scope-2-1b-{variant}",
            "model": f"google/gemma-3-1b-{variant}",
            "saelens": None,
            "layers": [7, 13, 17, 22],
            "folders": ["crosscoder/layer_7_13_17_22_width_262k_l0_medium"],
        }
    )


def family(release: str, conversion: str) -> str:
    if conversion == "gemma_3":
        return "gemmascope2"
    if conversion == "gemma_2_transcoder":
        return "gemmascope-transcoder"
    return "gemmascope"


def natural(p: str) -> list[object]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]


def group(paths: list[str]) -> dict[str, list[str]]:
    """{"resid_post": ["layer_12_width_16k_l0_big", ...]}: paths grouped by their first folder."""
    out: dict[str, list[str]] = {}
    for p in paths:
        head, _, rest = p.partition("/")
        out.setdefault(head, []).append(rest)
    return out


def main() -> None:
    src = Path(sae_lens.__file__).parent / "pretrained_saes.yaml"
    d = yaml.safe_load(src.read_text())
    releases = []
    for name, info in sorted(d.items()):
        if not name.startswith("gemma-scope"):
            continue
        # SAELens ids equal the paths except in the *-canonical releases, where the id says
        # `canonical` in place of `average_l0_N`; the path is what the repo holds.
        folders = sorted({s["path"] for s in info["saes"]}, key=natural)
        releases.append(
            {
                "name": name,
                "family": family(name, info.get("conversion_func", "")),
                "repo": info["repo_id"],
                "model": info["model"],
                "saelens": name,
                "folders": group(folders),
            }
        )
    releases += [{**r, "folders": group(r["folders"])} for r in EXTRA]
    doc = {
        "format": "lmscope.releases",
        "version": 1,
        "source": f"SAELens {sae_lens.__version__} pretrained_saes.yaml (Gemma Scope entries) + "
        "hand-added Gemma Scope 2 CLT/crosscoder entries (scripts/gen_releases.py)",
        "releases": releases,
    }
    OUT.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(f"wrote {len(releases)} releases to {OUT}")


if __name__ == "__main__":
    main()
