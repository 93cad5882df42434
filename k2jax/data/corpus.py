"""The embedded default corpus: documentation text of the Python standard library, built on first use."""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig

DEFAULT_MIN_BYTES = 8_000_000


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__", "dist-packages"))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                docs.append(doc)
    return "\n\n".join(docs)


def iter_documents(min_bytes: int = DEFAULT_MIN_BYTES):
    """Documents (str): pydoc's topic pages, every stdlib module's docstrings, then module sources, until
    at least `min_bytes` of UTF-8 text. Deterministic for a given Python installation."""
    total = 0
    try:
        from pydoc_data.topics import topics
    except ImportError:
        topics = {}
    files = _stdlib_files()
    sources = {}
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                sources[path] = f.read()
        except (OSError, UnicodeDecodeError):
            continue

    def gen():
        for key in sorted(topics):
            yield topics[key]
        for path in files:
            if path in sources:
                yield _docstrings(sources[path])
        for path in files:
            if path in sources:
                yield sources[path]

    for doc in gen():
        doc = doc.strip()
        if not doc:
            continue
        yield doc
        total += len(doc.encode("utf-8"))
        if total >= min_bytes:
            return


def default_corpus(cache_dir: str | None = None, min_bytes: int = DEFAULT_MIN_BYTES) -> str:
    """Path of the default corpus JSONL ({"text": ...} per line), built once into `cache_dir`."""
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "k2jax")
    os.makedirs(cache_dir, exist_ok=True)
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_{min_bytes}"
    path = os.path.join(cache_dir, f"stdlib_corpus_{tag}.jsonl")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for doc in iter_documents(min_bytes):
                f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    return path


def heldout_text(num_bytes: int = 65_536, min_bytes: int = DEFAULT_MIN_BYTES) -> str:
    """About `num_bytes` of the documents that follow the default corpus (the run never trains on them)."""
    seen, kept, out = 0, 0, []
    for doc in iter_documents(min_bytes + 4 * num_bytes):
        before, seen = seen, seen + len(doc.encode("utf-8"))
        if before >= min_bytes and kept < num_bytes:  # default_corpus stops at the document that reaches min_bytes
            out.append(doc)
            kept += len(doc.encode("utf-8"))
    text = "\n\n".join(out)
    return text.encode("utf-8")[:num_bytes].decode("utf-8", errors="ignore")


def default_tokenizer(cache_dir: str | None = None, num_ranks: int = 3840) -> str:
    """Path of a K2-format tokenizer with `num_ranks` BPE ranks trained on the default corpus (built once)."""
    from k2jax.text.bpe import train_tokenizer_file

    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "k2jax")
    corpus = default_corpus(cache_dir)
    path = os.path.join(cache_dir, f"{os.path.basename(corpus)[:-6]}_bpe{num_ranks}.tiktoken.model")
    if not os.path.exists(path):
        with open(corpus, encoding="utf-8") as f:
            text = "\n".join(json.loads(line)["text"] for line in f)
        train_tokenizer_file(text, path, num_ranks)
    return path
