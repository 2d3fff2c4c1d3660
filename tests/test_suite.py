"""The suite manifest: registering SAEs, canonical choice, resolving names and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmscope.errors import ConfigError
from lmscope.suite import Suite


def test_tiny_suite_lists_every_trained_sae_with_its_site_and_model(tiny_suite: Path) -> None:
    suite = Suite.open(tiny_suite)
    assert suite.model == "tiny-gemma3"
    assert [e["site"] for e in suite.entries] == ["L0.resid_post", "L1.resid_post"]
    for e in suite.entries:
        sae = suite.load_sae(e["name"])
        assert sae.cfg.site == e["site"] and sae.cfg.d_sae == e["d_sae"] == 64
        assert sae.cfg.model == "tiny-gemma3"
    assert set(suite.manifest["canonical"].values()) == set(suite.names)


def test_canonical_is_the_sae_with_l0_closest_to_100(tiny_suite: Path, tmp_path: Path) -> None:
    root = tmp_path / "s"
    shutil.copytree(tiny_suite, root)
    suite = Suite.open(root)
    a = suite.names[0]
    b = "copy"
    shutil.copytree(root / a, root / b)
    suite.register([root / b])
    suite.set_metrics(a, {"l0": 40.0})
    suite.set_metrics(b, {"l0": 130.0})
    assert suite.resolve(suite.entry(a)["site"]) == b  # |130-100| < |40-100|
    suite.set_metrics(a, {"l0": 90.0})
    assert Suite.open(root).resolve(suite.entry(a)["site"]) == a  # saved, re-picked


def test_resolve_accepts_names_and_sites_and_names_valid_choices(tiny_suite: Path) -> None:
    suite = Suite.open(tiny_suite)
    assert suite.resolve(suite.names[1]) == suite.names[1]
    with pytest.raises(ConfigError, match="sites: L0.resid_post, L1.resid_post"):
        suite.resolve("L9.mlp_out")


def test_a_folder_that_is_not_a_suite_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not an lmscope suite"):
        Suite.open(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        Suite.open(tmp_path / "nope")
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "lmscope.activations"}))
    with pytest.raises(ConfigError, match="not an lmscope suite manifest"):
        Suite.open(tmp_path)


def test_a_suite_never_mixes_models(tiny_suite: Path) -> None:
    with pytest.raises(ConfigError, match="suite of 'tiny-gemma3'"):
        Suite.create(tiny_suite, model="tiny-llama")
