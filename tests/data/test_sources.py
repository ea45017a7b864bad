"""Reading sources: files, folders, globs, JSONL, built-in corpora and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moegpt.config import SourceConfig
from moegpt.data import sources
from moegpt.data.sources import (
    gcide_entries,
    import_order,
    imported_modules,
    load_corpus,
    module_docstrings,
    wordnet_glosses,
)
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


def test_imports_resolve_relative_levels() -> None:
    source = (
        "import os, pkg.a\nfrom . import b\nfrom .c import thing\nfrom ..up import x\n"
        "from pkg.d import e\n"
    )
    found = imported_modules(source, "pkg.sub.mod", is_package=False)
    assert {"os", "pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.c.thing"} <= found
    assert {"pkg.up", "pkg.up.x", "pkg.d", "pkg.d.e"} <= found
    # the packages that hold the module are not its imports (their __init__ imports it)
    assert not {"pkg", "pkg.sub"} & found
    # in a package's __init__, "." is the package itself
    assert "pkg.sub.b" in imported_modules("from .b import f", "pkg.sub", is_package=True)
    assert imported_modules("from .... import deep", "pkg.mod", is_package=False) == set()
    assert imported_modules("def (broken", "pkg", is_package=True) == set()


def test_import_order_puts_definitions_first() -> None:
    modules = {
        "p": "from .api import run\n",
        "p.api": "from p import core\nfrom .util import helper\n",
        "p.core": "import p.util\n",
        "p.util": "import os\n",
        "p.cycle_a": "from . import cycle_b\n",
        "p.cycle_b": "from . import cycle_a\n",
    }
    order = import_order(modules, packages={"p"})
    # worked by hand: p needs api, which needs core (needs util) and util; the cycle is cut
    # where it closes (b's import of a), in name order
    assert order == ["p.util", "p.core", "p.api", "p", "p.cycle_b", "p.cycle_a"]
    # imports a module does not run when imported (in a function, for type checkers only)
    # are not dependencies: counted, they would put b before a and d before c
    deferred = {
        "p.a": "def f():\n    from . import b\n",
        "p.b": "from . import a\n",
        "p.c": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n",
        "p.d": "try:\n    from . import c\nexcept ImportError:\n    pass\n",
    }
    assert import_order(deferred, packages=set()) == ["p.a", "p.b", "p.c", "p.d"]


def test_stdlib_packages_hold_every_code_file_once() -> None:
    code = load_corpus(SourceConfig(name="c", path="stdlib:code"), 0)
    packages = load_corpus(SourceConfig(name="p", path="stdlib:packages"), 0)
    # every file of stdlib:code is in exactly one document, after its own path line
    by_key = dict(zip(packages.keys, packages.documents, strict=True))
    for key, text in zip(code.keys, code.documents, strict=True):
        relative = key.removeprefix("stdlib/")
        top = relative.split("/")[0]
        if "/" not in relative or top in sources.TABLE_PACKAGES:  # a document of its own
            assert by_key[key] == text
            continue
        assert by_key[f"stdlib/{top}/"].count(f"# {relative}\n{text}") == 1
    json_files = [
        line for line in by_key["stdlib/json/"].splitlines() if line.startswith("# json/")
    ]
    assert json_files.index("# json/scanner.py") < json_files.index("# json/decoder.py")
    assert json_files.index("# json/decoder.py") < json_files.index("# json/__init__.py")
    assert max(len(t) for t in packages.documents) > 200_000  # long documents, the point


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
