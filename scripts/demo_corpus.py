"""The demo model's corpus: the Python documentation that ships with every CPython (PSF license).

Two sources, both read from the running interpreter: the reference-manual topics of `pydoc_data.topics`
(what `help("for")` shows) and the docstrings of the standard library's public modules, classes, functions
and methods, each headed by its qualified name and signature. Documents come in a fixed order (topics by
name, then modules by name, members by name), duplicates dropped, so one Python build always gives the same
corpus.

Run as a script to write it: `python -I scripts/demo_corpus.py OUT_DIR` writes train.jsonl and eval.jsonl.
Run it in a fresh, isolated interpreter (-I): modules imported beforehand (torch patches some of the
standard library) or environment variables would change what it reads.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

# Modules whose import has effects (opens a browser or a window, prints, starts a REPL helper, runs code in
# __main__), platform-only ones, and the test suite.
SKIP = frozenset(
    {
        "antigravity",
        "this",
        "idlelib",
        "tkinter",
        "turtle",
        "turtledemo",
        "test",
        "tests",
        "idle_test",
        "__main__",
        "__hello__",
        "__phello__",
        "readline",
        "rlcompleter",
        "ensurepip",
        "venv",
        "lib2to3",
        "pydoc_data",
        "msilib",
        "winreg",
        "winsound",
        "nt",
    }
)
MIN_DOC_CHARS = 40  # shorter docstrings ("Return self+value.") teach little
HELD_OUT_EVERY = 20  # every 20th document (5%) is held out
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs in signatures differ from run to run
_MAX_DEFAULT_CHARS = 40
_LOCAL_PLACES = tuple(
    place
    for place in {
        sys.executable,
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.getcwd(),
        os.path.expanduser("~"),
        tempfile.gettempdir(),
    }
    if len(place) > 1
)


def topic_documents() -> list[str]:
    """The reference manual's topics, by name."""
    import pydoc_data.topics

    return [pydoc_data.topics.topics[name].strip() for name in sorted(pydoc_data.topics.topics)]


def docstring_documents() -> list[str]:
    """Docstrings of the public standard library, each headed by its qualified name (and signature)."""
    documents = []
    with warnings.catch_warnings():  # reading some attributes warns of deprecations
        warnings.simplefilter("ignore")
        for module in _modules():
            documents += _module_documents(module)
    return documents


def _modules() -> Iterator[ModuleType]:
    for name in sorted(name for name in sys.stdlib_module_names if _public(name)):
        yield from _walk(name)


def _walk(name: str) -> Iterator[ModuleType]:
    """The module and, for a package, its public submodules, depth first by name."""
    module = _import(name)
    if module is None:
        return
    yield module
    # iter_modules lists a package's modules without importing them (walk_packages would import them all).
    for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda info: info.name):
        if _public(info.name):
            yield from _walk(f"{name}.{info.name}")


def _public(name: str) -> bool:
    return not name.startswith("_") and name not in SKIP


def _import(name: str) -> ModuleType | None:
    """The module, or None if it fails to import here; anything it prints is swallowed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - ImportError, OSError, SystemExit: a module this build lacks
            return None


def _module_documents(module: ModuleType) -> list[str]:
    documents = [_document(module.__name__, "", module)]
    for name, member in sorted(vars(module).items()):
        if name.startswith("_") or getattr(member, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (documented there)
        qualified = f"{module.__name__}.{name}"
        if inspect.isclass(member):
            documents.append(_document(f"class {qualified}", _signature(member), member))
            for method_name, method in sorted(vars(member).items()):
                if not method_name.startswith("_") and callable(method):
                    documents.append(_document(f"{qualified}.{method_name}", _signature(method), method))
        elif callable(member):
            documents.append(_document(qualified, _signature(member), member))
    return [doc for doc in documents if doc]


def _document(title: str, signature: str, obj: object) -> str:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    if not doc or len(doc.strip()) < MIN_DOC_CHARS:
        return ""
    return f"{title}{signature}\n\n{inspect.cleandoc(doc)}"


def _signature(obj: object) -> str:
    """The signature, with only literal defaults shown: others (an `os.environ` snapshot, a list of live
    handlers, a sentinel object) differ between machines and runs, and may hold private data."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return ""
    parameters = [
        p.replace(default=_ELIDED) if p.default is not p.empty and not _literal(p.default) else p
        for p in signature.parameters.values()
    ]
    return _ADDRESS.sub("", str(signature.replace(parameters=parameters)))


def _literal(value: object) -> bool:
    if isinstance(value, (tuple, frozenset)):
        return all(map(_literal, value)) and len(repr(value)) <= _MAX_DEFAULT_CHARS
    if isinstance(value, str) and any(place in value for place in _LOCAL_PLACES):
        return False  # a path on this machine, such as sys.executable
    return isinstance(value, (type(None), bool, int, float, complex, str, bytes)) and (
        len(repr(value)) <= _MAX_DEFAULT_CHARS
    )


class _Elided:
    def __repr__(self) -> str:
        return "..."


_ELIDED = _Elided()


def build_corpus() -> list[str]:
    """Every document, in the fixed order, each once."""
    return list(dict.fromkeys(topic_documents() + docstring_documents()))


def split(documents: list[str]) -> tuple[list[str], list[str]]:
    """(training, held-out): every HELD_OUT_EVERY-th document, evenly through the corpus, is held out."""
    held = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    train = [doc for i, doc in enumerate(documents) if i % HELD_OUT_EVERY != HELD_OUT_EVERY // 2]
    return train, held


def write_jsonl(path: Path, documents: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents), encoding="utf-8")


def main(out_dir: str) -> None:
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    train, held = split(build_corpus())
    write_jsonl(folder / "train.jsonl", train)
    write_jsonl(folder / "eval.jsonl", held)
    chars = sum(map(len, train)) + sum(map(len, held))
    print(f"{len(train)} training and {len(held)} held-out documents, {chars:,} characters, in {folder}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-build/corpus")
