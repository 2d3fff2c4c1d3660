"""Corpus sources: file formats agree, folders are ordered, the default corpus is real, errors are clear."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmscope.data import corpus as corpus_mod
from lmscope.data import corpus_fingerprint, iter_documents, split_rest_sections
from lmscope.errors import CorpusError


def write_formats(root: Path, docs: list[str]) -> dict[str, Path]:
    (root / "txt").mkdir()
    for i, doc in enumerate(docs):  # zero-padded so sorted names keep the document order
        (root / "txt" / f"{i:03d}.txt").write_text(doc + "\n", encoding="utf-8")
    (root / "docs.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8"
    )
    pq.write_table(pa.table({"text": docs}), root / "docs.parquet", row_group_size=7)
    return {"txt": root / "txt", "jsonl": root / "docs.jsonl", "parquet": root / "docs.parquet"}


def test_every_file_format_gives_the_same_documents(tmp_path, docs):
    for path in write_formats(tmp_path, docs).values():
        assert list(iter_documents(path)) == docs, path


def test_txt_separator_splits_a_file_at_matching_lines(tmp_path):
    (tmp_path / "a.txt").write_text("one\nstill one\n\n\ntwo\n   \nthree\n", encoding="utf-8")
    assert list(iter_documents(tmp_path / "a.txt", txt_separator="")) == [
        "one\nstill one",
        "two",
        "three",
    ]
    assert list(iter_documents(tmp_path / "a.txt")) == ["one\nstill one\n\n\ntwo\n   \nthree"]


def test_folders_are_read_recursively_in_sorted_order_skipping_other_files(tmp_path):
    (tmp_path / "b" / "c").mkdir(parents=True)
    (tmp_path / "b" / "c" / "z.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.jsonl").write_text('{"text": "first"}\n', encoding="utf-8")
    (tmp_path / "c.txt").write_text("third", encoding="utf-8")
    (tmp_path / "README.md").write_text("not a corpus file", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["first", "second", "third"]


def test_jsonl_and_parquet_text_field_is_configurable(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n\n{"body": "y"}\n', encoding="utf-8")
    pq.write_table(pa.table({"body": ["p", None, "q"]}), tmp_path / "b.parquet")
    assert list(iter_documents(tmp_path, text_field="body")) == ["x", "y", "p", "q"]
    with pytest.raises(CorpusError, match="no string field 'text'; fields: body"):
        list(iter_documents(tmp_path / "a.jsonl"))
    with pytest.raises(CorpusError, match="no column 'text'; columns: body"):
        list(iter_documents(tmp_path / "b.parquet"))


def test_missing_unknown_and_empty_corpora_raise_corpus_errors_naming_the_choices(tmp_path):
    with pytest.raises(CorpusError, match="does not exist; pass 'default'"):
        iter_documents(tmp_path / "nope")
    (tmp_path / "a.csv").write_text("text\nhello\n", encoding="utf-8")
    with pytest.raises(
        CorpusError, match=r"unknown corpus format '.csv'.*valid: .txt, .jsonl, .parquet"
    ):
        iter_documents(tmp_path / "a.csv")
    with pytest.raises(CorpusError, match="holds no .txt/.jsonl/.parquet files"):
        iter_documents(tmp_path)
    (tmp_path / "empty.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CorpusError, match="holds no documents"):
        iter_documents(tmp_path / "empty.txt")
    (tmp_path / "bad.jsonl").write_text("{oops\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl:1 is not valid JSON"):
        iter_documents(tmp_path / "bad.jsonl")


def test_hf_sources_explain_a_missing_datasets_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(CorpusError, match="pip install datasets"):
        iter_documents("hf:wikitext:wikitext-2-raw-v1:train")
    with pytest.raises(CorpusError, match=r"expected hf:<dataset>\[:<config>\]\[:<split>\]"):
        iter_documents("hf:a:b:c:d")


def test_default_corpus_holds_fortunes_and_python_docs():
    docs = list(iter_documents("default"))
    assert len(docs) > 15_000 and sum(map(len, docs)) > 10_000_000
    assert "A tall, dark stranger will have more fun than you." in docs
    json_intro = next(
        d for d in docs if d.startswith(":mod:`json` --- JSON encoder and decoder\n====")
    )
    assert "`JSON (JavaScript Object Notation) <https://json.org>`_" in json_intro
    assert any(d.startswith("Basic Usage\n-----------\n\n.. function:: dump(") for d in docs)
    assert not any("\x08" in d for d in docs)


def test_default_corpus_skips_indexes_links_and_offensive_fortunes_and_undoes_overstrike(
    tmp_path, monkeypatch
):
    fortunes, pydoc = tmp_path / "fortunes", tmp_path / "rst"
    (fortunes / "off").mkdir(parents=True)
    (pydoc / "lib").mkdir(parents=True)
    (fortunes / "b").write_text("bold _\bw_\bo_\br_\bd\n%\n%\nlast\n", encoding="utf-8")
    (fortunes / "a").write_text("first\n%\n", encoding="utf-8")
    (fortunes / "a.dat").write_bytes(b"\x00\x01")
    (fortunes / "a.u8").symlink_to(fortunes / "a")
    (fortunes / "off" / "rude").write_text("offensive\n", encoding="utf-8")
    (pydoc / "lib" / "m.rst.txt").write_text("Title\n=====\n\nintro\n", encoding="utf-8")
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", fortunes)
    monkeypatch.setattr(corpus_mod, "PYDOC_DIR", pydoc)
    assert list(iter_documents()) == ["first", "bold word", "last", "Title\n=====\n\nintro"]


def test_missing_debian_packages_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_mod, "FORTUNES_DIR", tmp_path / "missing")
    with pytest.raises(CorpusError, match="apt-get install fortunes python3-doc"):
        iter_documents("default")


def test_rest_pages_split_at_title_and_top_level_sections_only():
    page = (
        ".. _label:\n\n*****\nTitle\n*****\n\nintro\n\nFirst\n=====\n\ntext\n\nSub\n---\n\nmore\n\n"
        "----------\n\nSecond\n======\n\n  indented\n  ========\nend"
    )
    pieces = split_rest_sections(page)
    assert "\n".join(pieces) == page
    assert [p.strip().split("\n")[0] for p in pieces] == [".. _label:", "*****", "First", "Second"]


def test_fingerprint_is_stable_and_tracks_files_and_options(tmp_path, docs):
    path = write_formats(tmp_path, docs)["jsonl"]
    fp = corpus_fingerprint(path)
    assert fp == corpus_fingerprint(path) != corpus_fingerprint(path, text_field="body")
    assert corpus_fingerprint("default") == corpus_fingerprint("default") != fp
    path.write_text('{"text": "changed"}\n', encoding="utf-8")
    assert corpus_fingerprint(path) != fp
    assert corpus_fingerprint("hf:a") != corpus_fingerprint("hf:b")


def test_hf_sources_stream_the_named_dataset_config_and_split(monkeypatch):
    calls = []

    def load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        if name == "offline/none":
            raise ConnectionError("hub unreachable")
        return [{"text": "a", "id": 1}, {"text": "", "id": 2}, {"text": "b", "id": 3}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(iter_documents("hf:org/ds:cfg:test")) == ["a", "b"]
    assert list(iter_documents("hf:org/ds")) == ["a", "b"]
    assert calls == [("org/ds", "cfg", "test", True), ("org/ds", None, "train", True)]
    with pytest.raises(CorpusError, match="no column 'body'; columns: text, id"):
        iter_documents("hf:org/ds", text_field="body")
    with pytest.raises(CorpusError, match="could not stream 'hf:offline/none'.*hub unreachable"):
        iter_documents("hf:offline/none")
