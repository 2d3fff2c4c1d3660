"""The query API over an interpreted tiny suite: records, lists, search, counts and their errors."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from interp_support import Interpreted

from lmscope.interp import FeatureIndexError, InterpError
from lmscope.interp.query import counts, feature, features, has_db, search
from lmscope.suite import Suite


def test_suite_feature_resolves_a_site_to_its_sae(interpreted: Interpreted) -> None:
    suite = interpreted.suite
    rec = suite.feature("L1.resid_post", 7)
    assert rec.sae == suite.resolve("L1.resid_post") and rec.index == 7
    assert rec.site == "L1.resid_post" and has_db(suite)
    assert rec == feature(suite, rec.sae, 7)


def test_a_bad_index_names_the_valid_range(interpreted: Interpreted) -> None:
    with pytest.raises(FeatureIndexError, match="valid: 0-63") as e:
        interpreted.suite.feature("L0.resid_post", 64)
    assert isinstance(e.value, IndexError)
    with pytest.raises(FeatureIndexError, match="valid: 0-63"):
        interpreted.suite.feature("L0.resid_post", -1)


def test_features_pages_are_sorted_by_the_order_asked(interpreted: Interpreted) -> None:
    suite, name = interpreted.suite, interpreted.suite.names[0]
    by_density = features(suite, name, order="density", limit=64)
    assert [s.density for s in by_density] == sorted((s.density for s in by_density), reverse=True)
    assert sorted(s.index for s in by_density) == list(range(64))
    by_max = features(suite, name, order="max_act", limit=64)
    assert [s.max_act for s in by_max] == sorted((s.max_act for s in by_max), reverse=True)
    page = features(suite, name, order="index", offset=10, limit=5)
    assert [s.index for s in page] == [10, 11, 12, 13, 14]
    rec = feature(suite, name, 12)
    assert page[2].top_tokens[0] in {x.tokens[x.center] for x in rec.top}
    assert page[2].logits_up == [t for t, _ in rec.logits_up[:5]]
    with pytest.raises(InterpError, match="index, density, max_act"):
        features(suite, name, order="alphabetical")


def test_search_finds_latents_by_the_tokens_they_fire_on_and_raise(
    interpreted: Interpreted,
) -> None:
    suite, name = interpreted.suite, interpreted.suite.names[1]
    rec = feature(suite, name, 5)
    token = rec.top[0].tokens[rec.top[0].center]
    found = search(suite, token.upper() + " ", sae=name, limit=64)  # case and spaces are ignored
    assert (name, 5) in [(s.sae, s.index) for s in found]
    for s in found:
        fired_on = {
            x.tokens[x.center].strip().casefold() for x in feature(suite, s.sae, s.index).top
        }
        assert token.strip().casefold() in fired_on
    up = rec.logits_up[0][0]
    by_logits = search(suite, up, by="logits", limit=200)
    assert (name, 5) in [(s.sae, s.index) for s in by_logits]
    assert search(suite, "no-such-token-anywhere") == []
    with pytest.raises(InterpError, match="activating, logits"):
        search(suite, token, by="meaning")


def test_counts_agree_with_the_records(interpreted: Interpreted) -> None:
    suite, name = interpreted.suite, interpreted.suite.names[0]
    recs = [feature(suite, name, j) for j in range(64)]
    c = counts(suite, name)
    assert c["n"] == 64 and c["tokens"] == interpreted.cfg.tokens
    assert c["dead"] == sum(r.n_fire == 0 for r in recs)
    assert c["dense"] == sum(r.density > 0.1 for r in recs)


def test_queries_from_many_threads_give_the_serial_answers(interpreted: Interpreted) -> None:
    suite, name = interpreted.suite, interpreted.suite.names[0]
    serial = [feature(suite, name, j) for j in range(32)]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda j: feature(suite, name, j), range(32))) == serial


def test_a_suite_without_a_database_or_with_another_suites_is_refused(interpreted: Interpreted, tmp_path: Path) -> None:  # fmt: skip
    other = tmp_path / "other"
    shutil.copytree(interpreted.suite.path, other)
    suite = Suite.open(other)
    suite.features_db.unlink()
    assert not has_db(suite)
    with pytest.raises(InterpError, match="lmscope interpret"):
        suite.feature("L0.resid_post", 0)
    shutil.copy(interpreted.suite.features_db, suite.features_db)
    suite.manifest["created"] = "2000-01-01T00:00:00+00:00"  # another suite of the same model
    suite.save()
    with pytest.raises(InterpError, match="another suite"):
        suite.feature("L0.resid_post", 0)
    suite.features_db.write_bytes(b"not a database at all" * 100)
    with pytest.raises(InterpError, match="not a feature database"):
        counts(suite, "L0.resid_post")
