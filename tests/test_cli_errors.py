"""Issue 16, defect 9: inputs that used to end in a traceback (or a misleading message) are one
line naming the problem; a killed interpret's temp file does not outlive the next run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lmscope.cli import main
from lmscope.sae import SAEConfig, build_sae, save_sae


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmscope: error:") and "\n" not in err and "Traceback" not in err, err
    return err


def _sae(path: Path) -> Path:
    save_sae(build_sae(SAEConfig(d_in=4, d_sae=8, architecture="jumprelu", site="L0.resid_post")), path)  # fmt: skip
    return path


def test_train_store_or_out_naming_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    f = tmp_path / "f.txt"
    f.write_text("x")
    base = ["train", "--sites", "L0.resid_post", "--l0", "8"]
    assert main([*base, "--store", str(f), "--out", str(tmp_path / "o")]) == 2
    assert "not an activation store" in _err(capsys)
    assert main([*base, "--store", str(tmp_path), "--out", str(f)]) == 2
    assert "is a file" in _err(capsys)
    assert main([*base, "--lr", "-1", "--store", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "lr must be positive" in _err(capsys)
    assert f.read_text() == "x" and not (tmp_path / "o").exists()


def test_serve_port_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", str(tmp_path), "--port", "99999"]) == 2
    assert "--port must be in 0-65535" in _err(capsys)


@pytest.mark.parametrize(
    "files",
    [
        {"params.npz": b"not a zip"},
        {"cfg.json": b"{oops", "sae_weights.safetensors": b"x"},
        {"config.json": b"{}", "params.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00garbage"},
    ],
)
def test_import_of_garbage_files_is_one_line(
    files: dict[str, bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    assert main(["import", str(src), "--out", str(tmp_path / "out")]) == 2
    _err(capsys)
    assert not (tmp_path / "out").exists()


def test_eval_of_a_truncated_weights_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    sae = _sae(tmp_path / "sae")
    w = sae / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-20])
    assert main(["eval", str(sae), "--model", "tiny-gemma3", "--device", "cpu"]) == 2
    assert "weights.safetensors is unreadable" in _err(capsys)


def test_train_site_errors_describe_the_store_not_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from lmscope.activations.store import StoreWriter

    store = str(tmp_path / "store")
    with StoreWriter(store, sites={"L0.resid_post": 4, "L1.resid_post": 4}, model_name="m") as w:
        w.append({s: torch.randn(6, 4) for s in ("L0.resid_post", "L1.resid_post")},
                 torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool))  # fmt: skip
    argv = ["train", "--store", store, "--sites", "L5.resid_post", "--l0", "2", "--widths", "16"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = _err(capsys)
    assert f"the store at {store} holds layers 0-1" in err and "this model" not in err


def test_a_killed_interprets_temp_file_is_removed_by_the_next_writer(tmp_path: Path) -> None:
    from lmscope.interp.db import FeatureDBWriter

    stale = tmp_path / ".features.db.tmp-deadbeef"
    stale.write_bytes(b"half a database")
    other = tmp_path / ".other.tmp-12345678"
    other.write_bytes(b"not ours")
    writer = FeatureDBWriter(tmp_path / "features.db")
    assert not stale.exists() and other.exists()
    writer.conn.close()
    os.unlink(writer.tmp)
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == json.dumps([other.name])
