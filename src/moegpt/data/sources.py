"""Where documents come from: files, globs, folders, JSONL, and built-in corpora.

Built-in corpora need no download:

- ``stdlib:code``: every ``.py`` file of the running interpreter's standard library, minus
  test folders and installed packages (~12 MB on CPython 3.11); one document per file.
- ``stdlib:packages``: the same files, one document per top-level package (its modules in
  import order, each after a ``# path`` line): long documents for context extension.
- ``stdlib:text``: English prose from the same installation: the pydoc topic pages
  (``pydoc_data``, ~0.5 MB) and each module's docstrings (module, classes, functions; read with
  ``ast``, never imported); one document per topic or module.
- ``debian:wordnet`` (package ``wordnet-base``): WordNet 3.0 glosses, one document per synset
  group of a few hundred glosses; ``debian:python-doc`` (``python3.11-doc``): the reST sources
  of the Python documentation, one document per page; ``debian:gcide`` (``dict-gcide``): the
  Collaborative International Dictionary of English with its markup stripped, one document
  per entry. A missing package is reported with the ``apt-get install`` line that provides it.
"""

from __future__ import annotations

import ast
import glob
import gzip
import hashlib
import json
import re
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from moegpt.chat import check_messages
from moegpt.config import SourceConfig
from moegpt.data.instruct import Instruction, build_instructions, module_name, to_document
from moegpt.errors import UserError

TEST_FOLDERS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


# Part of every fingerprint: bump when the way documents are extracted changes, so shards
# made by the old extraction are rebuilt.
EXTRACTION_VERSION = "1"


class Corpus:
    """A source's files, a fingerprint that changes whenever they may have (from names, sizes
    and modification times, so checking costs no reading), and its documents, read on first
    use, each with a key naming where it came from (a file, a line, a topic)."""

    def __init__(
        self, files: list[Path], read: Callable[[], list[tuple[str, str]]], extra: str = ""
    ) -> None:
        self.files = files
        self.fingerprint = files_fingerprint(files, f"{EXTRACTION_VERSION}:{extra}")
        self._read = read
        self._entries: list[tuple[str, str]] | None = None

    def _loaded(self) -> list[tuple[str, str]]:
        if self._entries is None:
            self._entries = [(key, text) for key, text in self._read() if text.strip()]
        return self._entries

    @property
    def documents(self) -> list[str]:
        return [text for _, text in self._loaded()]

    @property
    def keys(self) -> list[str]:
        """Where each document comes from. Sources built from the same files share keys
        (stdlib:code and stdlib:text), which is how their held-out sets stay consistent."""
        return [key for key, _ in self._loaded()]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files() -> list[Path]:
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        if not TEST_FOLDERS.intersection(path.relative_to(root).parts[:-1]):
            files.append(path)
    return files


def files_fingerprint(files: list[Path], extra: str = "") -> str:
    digest = hashlib.sha256(extra.encode())
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def stdlib_key(path: Path, root: Path | None = None) -> str:
    """A standard-library file's key (its path under ``root``, the stdlib's by default):
    every source drawn from one file shares it, so the file is held out by all or none."""
    return f"stdlib/{path.relative_to(root or stdlib_root())}"


def stdlib_code() -> Corpus:
    files = stdlib_python_files()
    return Corpus(files, lambda: [(stdlib_key(p), _read_text(p)) for p in files], "stdlib:code")


def _module_level(statements: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: its body's, and those inside its
    ``if``/``try``/``with`` blocks, but not a function's or class's (deferred, often to break
    a cycle) nor an ``if TYPE_CHECKING:`` block's."""
    for node in statements:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                yield from _module_level(node.body)
            yield from _module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block)
            for handler in node.handlers:
                yield from _module_level(handler.body)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)


def imported_modules(source: str, name: str, is_package: bool) -> set[str]:
    """The dotted names module ``name`` imports when it is imported (module level), relative
    imports resolved, each ``from X import y`` also as ``X.y`` (it may be a submodule). A
    package ``X`` that contains ``name`` is not counted: its ``__init__`` usually imports
    ``name`` itself. A file that does not parse imports nothing."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return set()
    package = name.split(".") if is_package else name.split(".")[:-1]
    found: set[str] = set()
    for node in _module_level(tree.body):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        if node.level:
            kept = len(package) - (node.level - 1)
            if kept <= 0:
                continue
            base = ".".join([*package[:kept], *([node.module] if node.module else [])])
        else:
            base = node.module or ""
        found.add(base)
        found.update(f"{base}.{alias.name}" for alias in node.names)
    return {module for module in found if not name.startswith(module + ".")}


def import_order(sources: dict[str, str], packages: set[str]) -> list[str]:
    """Module names of one package ordered so that each comes after the modules of the same
    package it imports (a cycle is cut where it closes), ties in name order: definitions
    before their uses, as repository-level code corpora order their files."""
    deps = {
        name: sorted(imported_modules(text, name, name in packages) & sources.keys() - {name})
        for name, text in sources.items()
    }
    order: list[str] = []
    seen: set[str] = set()  # placed, or on the path being placed (where a cycle is cut)

    def place(name: str) -> None:  # iterative depth-first search: packages nest deeply
        stack = [(name, iter(deps[name]))]
        seen.add(name)
        while stack:
            current, pending = stack[-1]
            following = next((d for d in pending if d not in seen), None)
            if following is None:
                stack.pop()
                order.append(current)
            else:
                seen.add(following)
                stack.append((following, iter(deps[following])))

    for name in sorted(sources):
        if name not in seen:
            place(name)
    return order


# Packages of data tables rather than modules that use each other (codecs' mapping tables,
# pydoc's topic texts): stdlib:packages keeps their files one a document, as stdlib:code does.
TABLE_PACKAGES = frozenset({"encodings", "pydoc_data"})


def stdlib_packages() -> Corpus:
    """One document per top-level package of the standard library: its files (tests left
    out) in import order, each after a ``# path`` line; a top-level module on its own, and
    each file of :data:`TABLE_PACKAGES`, is a document as in stdlib:code. Long documents
    whose parts refer to each other across tens of thousands of tokens: the data a context
    extension learns to use its length from."""
    files = stdlib_python_files()

    def read() -> list[tuple[str, str]]:
        root = stdlib_root()
        groups: dict[str, list[Path]] = {}
        for path in files:
            top = path.relative_to(root).parts[0]
            groups.setdefault(top, []).append(path)
        documents = []
        for top, members in sorted(groups.items()):
            alone = len(members) == 1 and members[0].parent == root  # a module, not a package
            if alone or top in TABLE_PACKAGES:
                documents += [(stdlib_key(path), _read_text(path)) for path in members]
                continue
            by_name = {module_name(p.relative_to(root)): p for p in members}
            texts = {name: _read_text(p) for name, p in by_name.items()}
            packages = {
                module_name(p.relative_to(root)) for p in members if p.name == "__init__.py"
            }
            parts = [
                f"# {by_name[name].relative_to(root).as_posix()}\n{texts[name]}"
                for name in import_order(texts, packages)
            ]
            documents.append((f"stdlib/{top}/", "\n\n".join(parts)))
        return documents

    return Corpus(files, read, "stdlib:packages")


def module_docstrings(source: str) -> str:
    """A module's docstrings (module, then classes and functions in order), or ''."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    parts = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc.split()) >= 3:  # skip one-word placeholders
            parts.append(doc)
    return "\n\n".join(parts)


def stdlib_text() -> Corpus:
    from pydoc_data import topics as pydoc_topics

    files = stdlib_python_files()

    def read() -> list[tuple[str, str]]:
        topics = [(f"pydoc/{key}", pydoc_topics.topics[key]) for key in sorted(pydoc_topics.topics)]
        return topics + [(stdlib_key(p), module_docstrings(_read_text(p))) for p in files]

    return Corpus([Path(pydoc_topics.__file__), *files], read, "stdlib:text")


def _require(path: Path, package: str) -> None:
    if not path.exists():
        raise UserError(
            f"{path}: not found; the source needs the Debian package {package}: "
            f"sudo apt-get install {package}"
        )


WORDNET_DIR = Path("/usr/share/wordnet")
PYTHON_DOC_DIR = Path(
    f"/usr/share/doc/python{sys.version_info.major}.{sys.version_info.minor}/html/_sources"
)
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")


def wordnet_glosses(lines: list[str], group: int = 200) -> list[str]:
    """Glosses from WordNet ``data.*`` lines ('offset ... | gloss'), ``group`` per document."""
    glosses = []
    for line in lines:
        if line.startswith("  ") or "|" not in line:
            continue  # the licence header is indented
        words = line.split(" ")
        lemma = words[4].replace("_", " ") if len(words) > 4 else ""
        glosses.append(f"{lemma}: {line.split('|', 1)[1].strip()}")
    return ["\n".join(glosses[i : i + group]) for i in range(0, len(glosses), group)]


def debian_wordnet() -> Corpus:
    _require(WORDNET_DIR, "wordnet-base")
    files = [WORDNET_DIR / f"data.{pos}" for pos in ("noun", "verb", "adj", "adv")]
    for path in files:
        _require(path, "wordnet-base")
    return Corpus(
        files,
        lambda: [
            (f"wordnet/{p.name}/{i}", doc)
            for p in files
            for i, doc in enumerate(wordnet_glosses(_read_text(p).splitlines()))
        ],
        "debian:wordnet",
    )


def debian_python_doc() -> Corpus:
    package = f"python{sys.version_info.major}.{sys.version_info.minor}-doc"
    _require(PYTHON_DOC_DIR, package)
    files = sorted(PYTHON_DOC_DIR.rglob("*.rst.txt"))
    return Corpus(
        files,
        lambda: [(f"python-doc/{p.relative_to(PYTHON_DOC_DIR)}", _read_text(p)) for p in files],
        "debian:python-doc",
    )


_GCIDE_TAG = re.compile(r"\[(?:[^\]]*(?:Webster|WordNet|PJC|Century|Wyclif|Chaucer)[^\]]*)\]")
_GCIDE_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_BASE64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def _dictd_number(text: str) -> int:
    value = 0
    for ch in text:
        value = value * 64 + _BASE64.index(ch)
    return value


def strip_gcide_markup(entry: str) -> str:
    """Drop source tags ([1913 Webster]), pronunciations (\\Word\\) and cross-reference braces."""
    text = _GCIDE_TAG.sub("", entry)
    text = _GCIDE_PRONUNCIATION.sub("", text)
    text = text.replace("{", "").replace("}", "")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


def gcide_entries(data: bytes, index_lines: list[str]) -> list[tuple[int, str]]:
    """(offset, entry) of a dictd database, each entry once, in file order, markup stripped."""
    spans = set()
    for line in index_lines:
        fields = line.split("\t")
        if len(fields) == 3 and not fields[0].startswith("00-database"):
            spans.add((_dictd_number(fields[1]), _dictd_number(fields[2])))
    return [
        (start, strip_gcide_markup(data[start : start + length].decode("utf-8", errors="replace")))
        for start, length in sorted(spans)
    ]


def debian_gcide() -> Corpus:
    index = GCIDE_DICT.with_name("gcide.index")
    _require(GCIDE_DICT, "dict-gcide")
    _require(index, "dict-gcide")

    def read() -> list[tuple[str, str]]:
        with gzip.open(GCIDE_DICT, "rb") as f:  # dictzip is gzip-compatible
            entries = gcide_entries(f.read(), _read_text(index).splitlines())
        return [(f"gcide/{offset}", text) for offset, text in entries]

    return Corpus([GCIDE_DICT, index], read, "debian:gcide")


def stdlib_instructions() -> list[Instruction]:
    """The instruction set of the local standard library (see :mod:`moegpt.data.instruct`)."""
    root = stdlib_root()
    modules = [
        (stdlib_key(p), module_name(p.relative_to(root)), _read_text(p))
        for p in stdlib_python_files()
    ]
    return build_instructions(modules)


def stdlib_instruct() -> Corpus:
    """Conversations about the standard library's functions (a ``kind = "chat"`` source)."""

    def read() -> list[tuple[str, str]]:
        return [(i.key, to_document(i)) for i in stdlib_instructions()]

    return Corpus(stdlib_python_files(), read, "stdlib:instruct")


BUILTINS: dict[str, Callable[[], Corpus]] = {
    "stdlib:code": stdlib_code,
    "stdlib:packages": stdlib_packages,
    "stdlib:text": stdlib_text,
    "stdlib:instruct": stdlib_instruct,
    "debian:wordnet": debian_wordnet,
    "debian:python-doc": debian_python_doc,
    "debian:gcide": debian_gcide,
}


def _expand(pattern: str, where: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    elif any(ch in pattern for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise UserError(f"{where}: {pattern!r} matches no files")
    return files


def _jsonl_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line's place (``path:line``) and parsed JSON value."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None


def _jsonl_documents(path: Path, field: str, where: str) -> Iterator[tuple[str, str]]:
    for place, record in _jsonl_records(path):
        text = record.get(field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{place}: no string field {field!r} ({where}.text_field)")
        yield place, text


def _jsonl_conversations(path: Path) -> Iterator[tuple[str, str]]:
    """``{"messages": [{"role", "content"}, ...]}`` lines (OpenAI fine-tuning's, TRL's and
    torchtune's format), each checked; a document is the messages as canonical JSON."""
    for place, record in _jsonl_records(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        check_messages(messages, f"{place}: messages")
        turns = [{"role": m["role"], "content": m["content"]} for m in messages]
        yield place, json.dumps(turns, ensure_ascii=False)


def load_corpus(source: SourceConfig, index: int) -> Corpus:
    """All documents of a source; a missing file or package is a one-line error."""
    where = f"data.sources[{index}].path"
    if source.path in BUILTINS:
        return BUILTINS[source.path]()
    if (
        ":" in source.path
        and not Path(source.path).exists()
        and source.path.split(":")[0] in ("stdlib", "debian")
    ):
        raise UserError(f"{where}: unknown built-in corpus {source.path!r} ({', '.join(BUILTINS)})")
    files = _expand(source.path, where)

    def read() -> list[tuple[str, str]]:
        documents: list[tuple[str, str]] = []
        for path in files:
            jsonl = source.format == "jsonl" or (
                source.format == "auto" and path.suffix == ".jsonl"
            )
            if source.kind == "chat":
                documents += _jsonl_conversations(path)
            elif jsonl:
                documents += _jsonl_documents(path, source.text_field, f"data.sources[{index}]")
            else:
                documents.append((str(path), _read_text(path)))
        return documents

    return Corpus(files, read, f"{source.format}:{source.text_field}")
