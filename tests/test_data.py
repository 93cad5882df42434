"""grain pipeline: packing with segment ids, no leaks across documents, one stream per batch row (the same batches
for any number of processes), resumable state."""

import json

import numpy as np
import pytest

from k2jax.data.pipeline import DataError, JsonlSource, make_dataset, open_source, position_for
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


def _row_documents(batches, tok):
    """Per row of the batch, the documents it carried, read across the batches in order (a document split at the
    end of a row continues in the same row of the next batch)."""
    out = []
    for r in range(len(batches[0]["tokens"])):
        stream = np.array([t for b in batches for s in _documents({k: v[r:r + 1] for k, v in b.items()}, tok)
                           for t in s])
        out.append([tuple(d) for d in np.split(stream, np.flatnonzero(stream == tok.eos_id) + 1)[:-1]])
    return out


def test_packed_batches_shapes_and_boundaries(corpus, small_tokenizer):
    ds = make_dataset(open_source(corpus), small_tokenizer.path, seq_len=64, batch_size=4, num_epochs=1,
                      drop_remainder=False)
    batches = list(ds)
    assert batches and all(b[k].shape == (4, 64) and b[k].dtype == np.int32 for b in batches for k in b)
    eos = small_tokenizer.eos_id
    pieces = [seg for b in batches for seg in _documents(b, small_tokenizer)]
    # a segment never spans two documents: EOS can only be its last token
    assert all(eos not in p[:-1] for p in pieces)
    # each row, read across the batches, is a sequence of whole documents (+ EOS); over one epoch the rows hold
    # every document exactly once
    docs = [d for row in _row_documents(batches, small_tokenizer) for d in row]
    assert sorted(docs) == sorted(tuple(small_tokenizer.encode(d, eos=True)) for d in DOCS)
    for b in batches:
        mask = np.asarray(next_token_targets(b["tokens"], b["segment_ids"])[1])  # what the train step uses
        seg = b["segment_ids"]
        assert np.all(mask[:, :-1] == ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] != 0)))
        assert np.all(mask[:, -1] == 0)


def test_two_processes_read_the_rows_of_one_disjoint_and_covering(corpus, small_tokenizer):
    """Rows 0-1 and 2-3 read by two processes are rows 0-3 of one process, batch for batch; the processes' documents
    are disjoint and together the whole corpus. A process whose rows run out first pads (the loop then evens the
    batch counts across processes)."""
    def rows(r, seed=3):
        return list(make_dataset(open_source(corpus), small_tokenizer.path, seq_len=32, batch_size=4, rows=r,
                                 num_epochs=1, drop_remainder=False, seed=seed))

    one, parts = rows(range(4)), [rows(range(0, 2)), rows(range(2, 4))]
    assert max(len(p) for p in parts) == len(one)
    for i, b in enumerate(one):
        for k in b:
            got = np.concatenate([p[i][k] if i < len(p) else np.zeros_like(p[0][k]) for p in parts])
            np.testing.assert_array_equal(got, b[k], err_msg=f"batch {i} {k}")
    seen = [{d for row in _row_documents(p, small_tokenizer) for d in row} for p in parts]
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] == {tuple(small_tokenizer.encode(d, eos=True)) for d in DOCS}
    # positive control: another seed deals other documents to the same rows
    assert not np.array_equal(rows(range(0, 2), seed=4)[0]["tokens"], parts[0][0]["tokens"])


@pytest.mark.parametrize("workers", [0, 1])
def test_restored_iterator_continues_with_the_same_batches(corpus, small_tokenizer, workers):
    def make(rows=None):
        return make_dataset(open_source(corpus), small_tokenizer.path, seq_len=48, batch_size=2, seed=7,
                            worker_count=workers, rows=rows)

    it = iter(make())
    states, batches = [], []
    for _ in range(12):  # a position saved after every batch, restored through JSON as checkpoints hold it
        states.append(json.loads(json.dumps(it.get_state(), default=str)) if workers == 0 else it.get_state())
        batches.append(next(it))
    for at in range(0, 8) if workers == 0 else (3,):
        restored = iter(make())
        restored.set_state(states[at])
        for i, want in enumerate(batches[at:at + 4]):
            got = next(restored)
            assert all(np.array_equal(got[k], want[k]) for k in want), f"restored after batch {at}: batch {at + i}"
    state, expected = states[3], batches[3:]
    if workers == 0:  # a position saved by one process resumes on two, each taking its own rows
        saved = [{"rows": [0, 2], "state": json.loads(json.dumps(state))}]
        for r in (range(0, 1), range(1, 2)):
            part = iter(make(r))
            part.set_state(position_for(saved, r, note=lambda *_: None))
            for want in expected:
                np.testing.assert_array_equal(next(part)["tokens"], want["tokens"][r.start:r.stop])
        with pytest.raises(DataError, match="earlier version of k2jax"):
            position_for([{"parent_state": {}}], range(0, 2))
    else:  # a worker's state is not per row: refused when the rows differ, with the flag to change
        with pytest.raises(DataError, match="--data_workers"):
            position_for([{"rows": [0, 2], "state": state}], range(0, 1))


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
