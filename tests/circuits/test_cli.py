"""`lmscope attribute` in graph mode on a tiny suite of transcoders: the printed scores, the JSON."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmscope.circuits import attribute, load_graph, prune, scores
from lmscope.cli import main
from lmscope.model import tiny_model
from lmscope.sae import load_sae, save_sae
from lmscope.suite import record_training
from tests.circuits.conftest import PROMPT, random_transcoders


@pytest.fixture(scope="module")
def tc_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tc") / "suite"
    tcs = random_transcoders(tiny_model("gemma3"))
    folders = [save_sae(tc, out / f"L{i}.mlp_in-to-L{i}.mlp_out-24") for i, tc in enumerate(tcs)]
    record_training(out, folders, model="tiny-gemma3", seq_len=32)
    return out


def test_attribute_writes_a_pruned_graph_with_its_scores(
    tc_suite: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "g.json"
    rc = main(
        [
            "attribute",
            "--suite",
            str(tc_suite),
            PROMPT,
            "--out",
            str(out),
            "--node-threshold",
            "0.7",
            "--batch-size",
            "16",
        ]
    )
    assert rc == 0
    doc = load_graph(out)
    loaded = tiny_model("gemma3")
    tcs = [load_sae(tc_suite / f"L{i}.mlp_in-to-L{i}.mlp_out-24") for i in range(4)]
    graph = attribute(loaded, PROMPT, tcs)
    kept = prune(graph, 0.7, 0.98)
    replacement, completeness = scores(graph)
    assert doc["scores"]["replacement"] == pytest.approx(replacement, rel=1e-4)
    assert doc["scores"]["completeness"] == pytest.approx(completeness, rel=1e-4)
    assert len(doc["nodes"]) == int(kept.node_mask.sum())
    assert len(doc["edges"]) == int(kept.edge_mask.sum())
    ids = {n["id"] for n in doc["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in doc["edges"])
    kinds = {n["kind"] for n in doc["nodes"]}
    assert {"feature", "token", "logit"} <= kinds
    # an edge's weight is the adjacency entry it names
    f = next(e for e in doc["edges"] if e["source"].startswith("F") and e["target"].startswith("F"))
    rows = graph.features.tolist()
    s = rows.index([int(x) for x in f["source"][1:].split(".")])  # F<layer>.<position>.<latent>
    t = rows.index([int(x) for x in f["target"][1:].split(".")])
    assert f["weight"] == pytest.approx(float(graph.adjacency[t, s]), rel=1e-4)
    printed = capsys.readouterr().out
    assert (
        f"replacement score {replacement:.4f}" in printed
        and f"wrote {len(doc['nodes'])} nodes" in printed
    )


def test_attribute_graph_mode_refuses_a_target_and_a_suite_without_transcoders(
    tc_suite: Path, tiny_suite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(
        ["attribute", "--suite", str(tc_suite), PROMPT, "--mode", "graph", "--target", " the"]
    )
    assert rc == 2 and "belong to --mode sae" in capsys.readouterr().err
    rc = main(["attribute", "--suite", str(tiny_suite), PROMPT])
    assert rc == 2 and "no mlp_in → mlp_out transcoders" in capsys.readouterr().err
    rc = main(["attribute", "--suite", str(tc_suite), PROMPT, "--saes", "L0.resid_post"])
    assert rc == 2 and "valid: L0.mlp_in-to-L0.mlp_out-24" in capsys.readouterr().err


def test_load_graph_refuses_other_files(tmp_path: Path) -> None:
    from lmscope.errors import CircuitError

    p = tmp_path / "x.json"
    p.write_text('{"format": "lmscope.attribution"}')
    with pytest.raises(CircuitError, match="not an lmscope graph"):
        load_graph(p)
