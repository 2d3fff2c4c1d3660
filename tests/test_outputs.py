"""No data loss: a command replaces or deletes only what it wrote (issue 16, defect 1)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lmscope.cli import main
from lmscope.errors import OutputError
from lmscope.outputs import claim_dir, claim_file, holds_only, nothing
from lmscope.sae import SAEConfig, build_sae, save_sae


def tree_hash(root: Path) -> str:
    """One digest of every path and file content under ``root``."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _sae_folder(path: Path, extra: bool = True) -> Path:
    cfg = SAEConfig(d_in=4, d_sae=8, architecture="jumprelu", site="L0.resid_post", model="m")
    save_sae(build_sae(cfg), path)
    if extra:  # what training and eval leave beside the weights
        (path / "train_log.jsonl").write_text('{"step": 1}\n')
        (path / "eval.json").write_text("{}\n")
    return path


def _one_line_error(capsys: pytest.CaptureFixture[str], *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscope: error:") and "\n" not in err, err
    assert all(w in err for w in words), err
    return err


def test_export_onto_a_suite_is_refused_and_the_suite_survives(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = tmp_path / "suite"
    sae = _sae_folder(suite / "L0.resid_post-jumprelu")
    (suite / "manifest.json").write_text('{"saes": []}\n')
    before = tree_hash(tmp_path)
    assert main(["export", str(sae), "--format", "saelens", "--out", str(suite)]) == 2
    _one_line_error(capsys, "manifest.json", "--force")
    assert tree_hash(tmp_path) == before


def test_export_onto_its_own_native_folder_keeps_its_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = _sae_folder(tmp_path / "sae")
    before = tree_hash(tmp_path)
    assert main(["export", str(sae), "--format", "native", "--out", str(sae)]) == 2
    _one_line_error(capsys, "eval.json")
    assert tree_hash(tmp_path) == before


def test_export_to_a_file_is_one_line_and_the_file_stays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sae = _sae_folder(tmp_path / "sae")
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    assert main(["export", str(sae), "--format", "saelens", "--out", str(target)]) == 2
    _one_line_error(capsys, "is a file")
    assert target.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "sae"]  # fmt: skip


def test_export_overwrites_its_own_earlier_export_and_force_replaces_anything(
    tmp_path: Path,
) -> None:
    sae = _sae_folder(tmp_path / "sae")
    out = tmp_path / "out"
    assert main(["export", str(sae), "--format", "saelens", "--out", str(out)]) == 0
    assert main(["export", str(sae), "--format", "gemmascope2", "--out", str(out)]) == 0
    assert (out / "params.safetensors").is_file() and not (out / "cfg.json").exists()
    (out / "README.md").write_text("someone's notes")
    assert main(["export", str(sae), "--format", "saelens", "--out", str(out)]) == 2
    assert main(["export", str(sae), "--format", "saelens", "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_import_onto_a_folder_holding_other_files_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "exported"
    assert main(["export", str(_sae_folder(tmp_path / "sae")), "--format", "saelens", "--out", str(src)]) == 0  # fmt: skip
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data.csv").write_text("1,2\n")
    assert main(["import", str(src), "--out", str(keep)]) == 2
    _one_line_error(capsys, "data.csv")
    assert (keep / "data.csv").read_text() == "1,2\n" and len(list(keep.iterdir())) == 1
    assert main(["import", str(src), "--out", str(tmp_path / "new")]) == 0


def test_claim_dir_accepts_new_empty_and_owned_folders(tmp_path: Path) -> None:
    owned = holds_only(["a.json"])
    assert claim_dir(tmp_path / "new", owned=owned, command="x") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    claim_dir(tmp_path / "empty", owned=nothing, command="x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "a.json").write_text("{}")
    (tmp_path / "mine" / ".a.json.tmp-1234abcd").write_text("")  # our own crash leftovers
    claim_dir(tmp_path / "mine", owned=owned, command="x")


def test_claim_dir_refusals_name_the_problem(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        claim_dir(tmp_path / "f", owned=nothing, command="x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        claim_dir(tmp_path / "f" / "sub", owned=nothing, command="x")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").mkdir()
    with pytest.raises(OutputError, match="--force"):
        claim_dir(tmp_path / "d", owned=holds_only(["b"]), command="x")  # a folder, not a file b
    with pytest.raises(OutputError) as e:
        claim_dir(tmp_path / "d", owned=nothing, command="x", force=True, can_force=False)
    assert "--force" not in str(e.value)
    claim_dir(tmp_path / "d", owned=nothing, command="x", force=True)


def test_claim_file(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="is a folder"):
        claim_file(tmp_path, owned=nothing, command="x")
    (tmp_path / "g.json").write_text("{}")
    with pytest.raises(OutputError, match="did not write"):
        claim_file(tmp_path / "g.json", owned=nothing, command="x")
    claim_file(tmp_path / "g.json", owned=lambda p: True, command="x")
    claim_file(tmp_path / "g.json", owned=nothing, command="x", force=True)
