"""grain pipeline: packing with segment ids, no leaks across documents, process sharding, resumable state."""

import json

import numpy as np
import pytest

from k2jax.data.pipeline import DataError, JsonlSource, make_dataset, open_source
from k2jax.train.loss import next_token_targets

DOCS = [f"document number {i} says " + " ".join(["word%d" % (i * 7 + j) for j in range(i % 13 + 1)])
        for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return str(path)


def _documents(batch, tok):
    """Per-row segments decoded back to text (complete documents end with EOS)."""
    out = []
    for row_tokens, row_seg, row_pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
        for s in sorted(set(row_seg.tolist()) - {0}):
            sel = row_seg == s
            assert row_pos[sel].tolist() == list(range(sel.sum()))  # positions restart per document
            assert np.all(np.diff(np.flatnonzero(sel)) == 1)  # a segment is contiguous
            out.append(row_tokens[sel].tolist())
    return out


def test_packed_batches_shapes_and_boundaries(corpus, small_tokenizer):
    ds = make_dataset(open_source(corpus), small_tokenizer.path, seq_len=64, batch_size=4, num_epochs=1)
    batches = list(ds)
    assert batches and all(b[k].shape == (4, 64) and b[k].dtype == np.int32 for b in batches for k in b)
    eos = small_tokenizer.eos_id
    pieces = [seg for b in batches for seg in _documents(b, small_tokenizer)]
    # a segment never spans two documents: EOS can only be its last token
    assert all(eos not in p[:-1] for p in pieces)
    # the rows, read in order, are the documents (each + EOS) in shuffled order; split ones continue in the next row
    stream = np.array([t for p in pieces for t in p])
    docs = [tuple(d) for d in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]]
    encoded = {tuple(small_tokenizer.encode(d, eos=True)) for d in DOCS}
    assert len(docs) >= len(DOCS) - 8 and len(set(docs)) == len(docs)  # one epoch: the tail is dropped
    assert set(docs) <= encoded
    for b in batches:
        mask = np.asarray(next_token_targets(b["tokens"], b["segment_ids"])[1])  # what the train step uses
        seg = b["segment_ids"]
        assert np.all(mask[:, :-1] == ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)))
        assert np.all(mask[:, -1] == 0)


def test_processes_see_disjoint_documents(corpus, small_tokenizer):
    seen = []
    for p in range(2):
        ds = make_dataset(open_source(corpus), small_tokenizer.path, seq_len=32, batch_size=2, num_epochs=1,
                          process_index=p, process_count=2, seed=3)
        stream = np.array([t for b in ds for s in _documents(b, small_tokenizer) for t in s])
        docs = np.split(stream, np.flatnonzero(stream == small_tokenizer.eos_id) + 1)[:-1]
        seen.append({small_tokenizer.decode(d[:-1]) for d in docs})
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= set(DOCS)


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_iterator_continues_with_the_same_batches(corpus, small_tokenizer, workers):
    def make():
        return make_dataset(open_source(corpus), small_tokenizer.path, seq_len=48, batch_size=2, seed=7,
                            worker_count=workers)

    it = iter(make())
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(10)]
    restored = iter(make())
    restored.set_state(json.loads(json.dumps(state, default=str)) if workers == 0 else state)
    for want in expected:
        got = next(restored)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_seeds_shuffle_differently(corpus, small_tokenizer):
    first = [next(iter(make_dataset(open_source(corpus), small_tokenizer.path, seq_len=32, batch_size=2, seed=s)))
             ["tokens"] for s in (0, 1)]
    assert not np.array_equal(*first)


def test_text_files_source(tmp_path, small_tokenizer):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(DOCS[i])
    ds = make_dataset(open_source(str(tmp_path)), small_tokenizer.path, seq_len=16, batch_size=1, num_epochs=1)
    assert sum(1 for _ in ds) >= 2


def test_missing_text_field_error_or_counted_skip(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a"}\n{"body": "b"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: record has no string field 'text'"):
        JsonlSource(str(path))
    src = JsonlSource(str(path), on_missing="skip")
    assert len(src) == 2 and src.skipped == [2] and src[1] == "c"
    assert len(JsonlSource(str(path), text_field="body", on_missing="skip")) == 1


def test_empty_and_missing_sources(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no documents"):
        open_source(str(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        open_source(str(tmp_path / "nothing*.jsonl"))


def test_array_record_source(tmp_path, small_tokenizer):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "docs.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for d in DOCS[:5]:
        writer.write(json.dumps({"text": d}).encode())
    writer.write(DOCS[5].encode())  # raw UTF-8 text records are read as they are
    writer.close()
    src = open_source(path)
    assert len(src) == 6 and src[0] == DOCS[0] and src[5] == DOCS[5]
    batch = next(iter(make_dataset(src, small_tokenizer.path, seq_len=16, batch_size=2)))
    assert batch["tokens"].shape == (2, 16)
