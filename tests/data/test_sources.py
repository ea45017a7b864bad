"""Reading sources: files, folders, globs, JSONL, built-in corpora and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moegpt.config import SourceConfig
from moegpt.data import sources
from moegpt.data.sources import gcide_entries, load_corpus, module_docstrings, wordnet_glosses
from moegpt.errors import UserError


def test_folders_globs_and_jsonl(corpus: Path) -> None:
    folder = load_corpus(SourceConfig(name="a", path=str(corpus / "a")), 0)
    assert len(folder.documents) == 23 and len(folder.files) == 23
    glob = load_corpus(SourceConfig(name="a", path=str(corpus / "a" / "00*.txt")), 0)
    assert len(glob.documents) == 10
    jsonl = load_corpus(SourceConfig(name="b", path=str(corpus / "b.jsonl")), 1)
    assert jsonl.documents[3].startswith("[b-3]")


def test_fingerprint_changes_with_the_files(corpus: Path) -> None:
    source = SourceConfig(name="a", path=str(corpus / "a"))
    before = load_corpus(source, 0).fingerprint
    assert load_corpus(source, 0).fingerprint == before
    (corpus / "a" / "000.txt").write_text("changed, and longer than before")
    assert load_corpus(source, 0).fingerprint != before


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data.sources\[2\].path: '.*nothing\*' matches no files"):
        load_corpus(SourceConfig(name="x", path=str(tmp_path / "nothing*")), 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2: not valid JSON"):
        _ = load_corpus(SourceConfig(name="x", path=str(bad)), 0).documents
    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: no string field 'text'"):
        _ = load_corpus(SourceConfig(name="x", path=str(bad)), 0).documents
    with pytest.raises(UserError, match="unknown built-in corpus 'stdlib:docs'"):
        load_corpus(SourceConfig(name="x", path="stdlib:docs"), 0)


def test_missing_debian_package_names_the_apt_line(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "WORDNET_DIR", tmp_path / "wordnet")
    with pytest.raises(UserError, match="sudo apt-get install wordnet-base$"):
        load_corpus(SourceConfig(name="w", path="debian:wordnet"), 0)
    monkeypatch.setattr(sources, "GCIDE_DICT", tmp_path / "gcide.dict.dz")
    with pytest.raises(UserError, match="sudo apt-get install dict-gcide$"):
        load_corpus(SourceConfig(name="g", path="debian:gcide"), 0)


def test_hidden_folders_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "src" / ".git").mkdir(parents=True)
    (tmp_path / "src" / ".git" / "HEAD").write_text("ref: refs/heads/main")
    (tmp_path / "src" / "a.txt").write_text("a document")
    corpus = load_corpus(SourceConfig(name="x", path=str(tmp_path / "src")), 0)
    assert corpus.documents == ["a document"]


def test_code_and_its_docstrings_share_keys() -> None:
    code = load_corpus(SourceConfig(name="c", path="stdlib:code"), 0)
    text = load_corpus(SourceConfig(name="t", path="stdlib:text"), 1)
    shared = set(code.keys) & set(text.keys)
    assert len(shared) > 300 and all(k.startswith("stdlib/") for k in shared)


def test_stdlib_code_skips_test_folders() -> None:
    files = sources.stdlib_python_files()
    assert len(files) > 300
    assert not any({"test", "tests", "site-packages"} & set(p.parts) for p in files)
    assert any(p.name == "json" or p.parent.name == "json" for p in files)


def test_docstrings_are_read_without_importing() -> None:
    code = (
        '"""Module doc here."""\nclass A:\n    """Class A does things."""\n    def f(self):\n'
        '        """Return the thing it returns."""\nraise SystemExit("never run")\n'
    )
    assert module_docstrings(code) == (
        "Module doc here.\n\nClass A does things.\n\nReturn the thing it returns."
    )
    assert module_docstrings("def (broken") == ""


def test_wordnet_and_gcide_parsers() -> None:
    lines = [
        "  1 This software and database is being provided to you, the LICENSEE",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived to exist  ",
        "00001930 03 n 01 physical_entity 0 007 @ 00001740 n 0000 | "
        "an entity that has physical existence  ",
    ]
    assert wordnet_glosses(lines) == [
        "entity: that which is perceived to exist\n"
        "physical entity: an entity that has physical existence"
    ]
    entry = (
        'Spearwood \\Spear"wood`\\, n. (Bot.)\n   An Australian tree ({Acacia}),\n'
        "   used for spears.\n   [1913 Webster]\n"
    )
    data = b"header" + entry.encode()
    # dictd numbers are base64 digits: offset 6 = "G", length = len(entry)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    length = alphabet[len(entry) // 64] + alphabet[len(entry) % 64]
    index = ["00-database-url\tA\tB", f"Spearwood\tG\t{length}", f"spearwood\tG\t{length}"]
    assert gcide_entries(data, index) == [
        (6, "Spearwood , n. (Bot.) An Australian tree (Acacia), used for spears.")
    ]
