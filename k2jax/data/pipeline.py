"""grain input pipeline: documents -> K2 tokens (+EOS) -> packed fixed-length sequences -> per-process batches."""

from __future__ import annotations

import json
from typing import Sequence

import grain
import grain.experimental as gex
import numpy as np

from k2jax import storage
from k2jax.errors import DataError


class JsonlSource(grain.sources.RandomAccessDataSource):
    """Random access to the `text_field` of JSONL records (line offsets indexed once).

    Records without the field are an error naming the line, or (`on_missing='skip'`) skipped and counted in
    `skipped`; never silently dropped.
    """

    def __init__(self, path: str, text_field: str = "text", on_missing: str = "error"):
        if on_missing not in ("error", "skip"):
            raise DataError(f"on_missing must be 'error' or 'skip', got {on_missing!r}")
        if not storage.isfile(path):
            raise DataError(f"data file not found: {path}")
        self.name, self.path, self.text_field = path, storage.local_copy(path), text_field
        self.offsets, self.skipped = [], []
        with open(self.path, "rb") as f:
            offset = 0
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    text = record.get(text_field) if isinstance(record, dict) else None
                    if isinstance(text, str):
                        self.offsets.append(offset)
                    elif on_missing == "skip":
                        self.skipped.append(lineno)
                    else:
                        raise DataError(f"{path}:{lineno}: record has no string field {text_field!r} "
                                        "(use on_missing='skip' to skip and count such records)")
                offset += len(line)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            return json.loads(f.readline())[self.text_field]

    def __repr__(self):
        return f"JsonlSource({self.path!r}, {self.text_field!r})"


class TextFilesSource(grain.sources.RandomAccessDataSource):
    """Plain UTF-8 text files, one document per file."""

    def __init__(self, paths: Sequence[str]):
        for p in paths:
            if not storage.isfile(p):
                raise DataError(f"data file not found: {p}")
        self.paths = [storage.local_copy(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with open(self.paths[i], encoding="utf-8", errors="replace") as f:
            return f.read()

    def __repr__(self):
        return f"TextFilesSource({len(self.paths)} files)"


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """ArrayRecord files whose records are JSON objects with `text_field`, or raw UTF-8 text."""

    def __init__(self, paths: Sequence[str], text_field: str = "text"):
        self.inner = grain.sources.ArrayRecordDataSource([storage.local_copy(p) for p in paths])
        self.text_field = text_field

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        raw = self.inner[i]
        try:
            record = json.loads(raw)
            if isinstance(record, dict) and isinstance(record.get(self.text_field), str):
                return record[self.text_field]
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
        return raw.decode("utf-8", errors="replace")

    def __repr__(self):
        return f"ArrayRecordSource({len(self)} records)"


def open_source(spec: str | Sequence[str], text_field: str = "text", on_missing: str = "error"):
    """A source from a path or glob (local or gs://): *.jsonl, *.txt (or a folder of them), *.array_record*.
    Remote files are copied to a local cache once (storage.local_copy), then read like local ones."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths = []
    for s in specs:
        if storage.isdir(s):
            paths += storage.glob(storage.join(s, "*.txt")) + storage.glob(storage.join(s, "*.jsonl"))
        else:
            matched = storage.glob(s)
            if not matched:
                raise DataError(f"data source {s!r} matches no file")
            paths += matched
    if not paths:
        raise DataError(f"data source {spec!r} holds no .jsonl, .txt or .array_record files")
    kinds = {("jsonl" if p.endswith(".jsonl") else "array_record" if ".array_record" in p else "text") for p in paths}
    if len(kinds) > 1:
        raise DataError(f"data source {spec!r} mixes file kinds {sorted(kinds)}; use one kind per source")
    kind = kinds.pop()
    if kind == "jsonl":
        sources = [JsonlSource(p, text_field, on_missing) for p in paths]
        source = sources[0] if len(sources) == 1 else _Concat(sources)
    elif kind == "array_record":
        source = ArrayRecordSource(paths, text_field)
    else:
        source = TextFilesSource(paths)
    if len(source) == 0:
        raise DataError(f"data source {spec!r} has no documents")
    return source


class _Concat(grain.sources.RandomAccessDataSource):
    def __init__(self, sources):
        self.sources = sources
        self.starts = np.cumsum([0] + [len(s) for s in sources])
        self.skipped = [x for s in sources for x in getattr(s, "skipped", [])]

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.sources[k][i - int(self.starts[k])]


class Tokenize(grain.transforms.Map):
    """text -> {"tokens": int32 ids + EOS}; the tokenizer is loaded lazily in each worker process."""

    def __init__(self, tokenizer_path: str, add_bos: bool = False):
        self.tokenizer_path, self.add_bos, self._tok = tokenizer_path, add_bos, None

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path, "add_bos": self.add_bos, "_tok": None}

    def map(self, text):
        if self._tok is None:
            from k2jax.text.tokenizer import load_tokenizer

            self._tok = load_tokenizer(self.tokenizer_path)
        return {"tokens": np.asarray(self._tok.encode(text, bos=self.add_bos, eos=True), np.int32)}


def make_dataset(source, tokenizer_path: str, *, seq_len: int, batch_size: int, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, num_epochs: int | None = None,
                 worker_count: int = 0, add_bos: bool = False, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches {"tokens", "segment_ids", "positions"} of [batch_size, seq_len] int32 for this process.

    Documents are sharded by process (disjoint), shuffled with `seed` (reshuffled each epoch), tokenised
    with EOS appended (in `worker_count` grain worker processes), and packed: segment ids number the
    documents of a row from 1 (0 is padding) and positions restart at 0 for each document. A chat source
    (k2jax.data.chat.ChatSource) gives tokenised conversations with loss weights: they are packed whole
    (first fit, never split across rows) and the batches carry "weights" too.
    """
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index {process_index} must lie in [0, process_count={process_count})")
    if len(source) < process_count:
        raise DataError(f"{source!r} has {len(source)} documents, fewer than the {process_count} processes")
    ds = grain.MapDataset.source(source)[process_index::process_count].shuffle(seed=seed).repeat(num_epochs)
    if getattr(source, "weighted", False):  # conversations, tokenised with loss weights: whole ones per row
        ds = gex.FirstFitPackIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len, "weights": seq_len},
                                         num_packing_bins=batch_size, seed=seed, shuffle_bins=False)
    else:
        ds = ds.map(Tokenize(tokenizer_path, add_bos)).to_iter_dataset()
        ds = gex.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
    ds = ds.map(_rename).batch(batch_size, drop_remainder=drop_remainder)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


def _rename(x):
    out = {"tokens": x["tokens"], "segment_ids": x["tokens_segment_ids"], "positions": x["tokens_positions"]}
    if "weights" in x:
        out["weights"] = x["weights"]
    return out


def global_batch(local_batch, mesh, rules):
    """Per-process numpy batch -> global jax arrays sharded over the mesh's batch axes."""
    import jax

    sharding = rules.sharding(("batch", None), mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
