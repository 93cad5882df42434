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


PACK_BINS = 4  # open rows per stream when packing whole conversations (first fit)


def make_dataset(source, tokenizer_path: str, *, seq_len: int, batch_size: int, rows: range | None = None,
                 seed: int = 0, num_epochs: int | None = None, worker_count: int = 0, add_bos: bool = False,
                 drop_remainder: bool = True) -> grain.IterDataset:
    """Batches {"tokens", "segment_ids", "positions"} of [len(rows), seq_len] int32: rows `rows` of the global
    batch of `batch_size` rows (all of them by default).

    Every row of the global batch is its own stream: the documents, shuffled with `seed` (reshuffled each epoch),
    are dealt to the rows in turn (row r reads documents r, r + batch_size, ...), tokenised with EOS appended and
    packed into that row only, so a document split at the end of a row continues in the same row of the next batch.
    A batch is therefore the same whatever the number of processes that read it and however its rows are divided
    among them; processes read disjoint documents that together cover the corpus. Segment ids number the
    documents of a row from 1 (0 is padding) and positions restart at 0 for each document. A chat source
    (k2jax.data.chat.ChatSource) gives tokenised conversations with loss weights: they are packed whole (first fit,
    never split across rows) and the batches carry "weights" too. With `num_epochs` set, a row that runs out
    ends the iteration (`drop_remainder`) or is filled with padding rows until every row has run out.
    """
    rows = range(batch_size) if rows is None else rows
    if rows.step != 1 or not 0 <= rows.start < rows.stop <= batch_size:
        raise DataError(f"rows {rows} must be a non-empty contiguous part of the {batch_size} rows of the batch")
    docs = grain.MapDataset.source(source).shuffle(seed=seed).repeat(num_epochs)
    streams = []
    for r in rows:
        ds = docs[r::batch_size]
        if getattr(source, "weighted", False):  # conversations, tokenised with loss weights: whole ones per row
            ds = gex.FirstFitPackIterDataset(ds.to_iter_dataset(), length_struct={"tokens": seq_len,
                                                                                    "weights": seq_len},
                                             num_packing_bins=PACK_BINS, seed=seed, shuffle_bins=False)
        else:
            ds = ds.map(Tokenize(tokenizer_path, add_bos)).to_iter_dataset()
            ds = gex.ConcatThenSplitIterDataset(ds, length_struct={"tokens": seq_len})
        streams.append(ds.map(_rename))
    ds = RowBatchDataset(streams, rows, drop_remainder)
    if worker_count > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app use defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return ds


class RowBatchDataset(grain.IterDataset):
    """Stacks one row from each of its row streams into a batch."""

    def __init__(self, streams, rows: range, drop_remainder: bool):
        super().__init__(streams)
        self.rows, self.drop_remainder = rows, drop_remainder

    def __iter__(self):
        return _RowBatchIterator([iter(p) for p in self.parents], self.rows, self.drop_remainder)

    def __str__(self):
        return f"RowBatchDataset(rows={self.rows.start}..{self.rows.stop - 1})"


class _RowBatchIterator(grain.DatasetIterator):
    def __init__(self, parents, rows: range, drop_remainder: bool):
        super().__init__(parents)
        self.rows, self.drop_remainder = rows, drop_remainder
        self.done = [False] * len(parents)
        self.template = None

    def __next__(self):
        out = []
        for i, p in enumerate(self._parents):
            if not self.done[i]:
                try:
                    out.append(next(p))
                    continue
                except StopIteration:
                    self.done[i] = True
                    if self.drop_remainder:
                        raise
            out.append(None)
        if all(x is None for x in out):
            raise StopIteration
        self.template = next(x for x in out if x is not None)
        pad = {k: np.zeros_like(v) for k, v in self.template.items()}  # segment 0: no loss
        return {k: np.stack([(x if x is not None else pad)[k] for x in out]) for k in self.template}

    def get_state(self):
        """Each row's stream state under its global row index, so that rows can be dealt to other processes."""
        return {"rows": {str(r): p.get_state() for r, p in zip(self.rows, self._parents)},
                "done": {str(r): d for r, d in zip(self.rows, self.done)}}

    def set_state(self, state):
        missing = [r for r in self.rows if str(r) not in state["rows"]]
        if missing:
            raise DataError(f"the saved data position has no state for rows {missing[:4]}")
        for r, p in zip(self.rows, self._parents):
            p.set_state(_slices_as_tuples(state["rows"][str(r)]))
        self.done = [bool(state.get("done", {}).get(str(r), False)) for r in self.rows]


def _slices_as_tuples(state):
    """A state read back from JSON with its packing slices as tuples again: ConcatThenSplit tells "no remainder"
    by comparing its slices with the tuple (-1, -1), which a JSON list never equals."""
    if isinstance(state, dict):
        return {k: ({f: tuple(v) for f, v in x.items()} if k == "remainder_slices" and isinstance(x, dict)
                    else _slices_as_tuples(x)) for k, x in state.items()}
    return state


def rows_of_process(batch_size: int, mesh, rules) -> range:
    """The rows of the global batch that this process's devices hold (contiguous for every k2jax mesh)."""
    from k2jax.model.sharding import batch_divisor

    if batch_size % batch_divisor(mesh, rules):
        raise DataError(f"--batch={batch_size} must be divisible by the {batch_divisor(mesh, rules)} ways the mesh "
                        "splits the batch")
    sharding = rules.sharding(("batch", None), mesh)
    held = set()
    for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
        held.update(range(batch_size)[index[0]])
    lo, hi = min(held), max(held) + 1
    if len(held) != hi - lo:
        raise DataError(f"this process holds rows {sorted(held)[:8]}... of the batch, not a contiguous range; "
                        "order the mesh's devices by process")
    return range(lo, hi)


def position_for(saved: list, rows: range, note=print):
    """This process's data position from every process's saved {"rows": [lo, hi], "state": ...}: its own entry
    when a process of the saved run read the same rows, otherwise assembled row by row (a run resumed on a
    different number of hosts; possible when the states are per row, i.e. without --data_workers)."""
    if not saved or not all(isinstance(e, dict) and "rows" in e and "state" in e for e in saved):
        raise DataError("the checkpoint's data position was saved by an earlier version of k2jax, whose data order "
                        "differs; start a new workdir with --init_from=<that step>")
    for e in saved:
        if list(e["rows"]) == [rows.start, rows.stop]:
            return e["state"]
    merged, done = {}, {}
    for e in saved:
        if not isinstance(e["state"].get("rows"), dict):
            raise DataError(f"the checkpoint's data position was saved by processes reading rows "
                            f"{[e['rows'] for e in saved]}, this process reads {rows.start}..{rows.stop - 1}; with "
                            "--data_workers the position cannot be divided anew: resume on the same number of "
                            "hosts, or with the --data_workers=0 the run was saved with")
        merged.update(e["state"]["rows"])
        done.update(e["state"].get("done", {}))
    note(f"data: rows {rows.start}..{rows.stop - 1} resume from the positions of {len(saved)} saved process(es)")
    return {"rows": merged, "done": done}


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
