"""Tokens/s of the grain pipeline alone (0, 1, 2 worker processes) next to tiktoken's raw encode speed.

    python benchmarks/data_pipeline.py [--seq 512 --batch 8 --batches 100]
"""

import argparse
import json
import time

from absl import flags


def measure_throughput(ds, num_batches: int = 20, warmup: int = 2) -> float:
    """Tokens per second (non-padding) that a grain dataset alone delivers."""
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    t0, tokens = time.perf_counter(), 0
    for _ in range(num_batches):
        tokens += int((next(it)["segment_ids"] != 0).sum())
    return tokens / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=100)
    args = p.parse_args()
    flags.FLAGS.mark_as_parsed()

    from k2jax.data.corpus import default_corpus, default_tokenizer
    from k2jax.data.pipeline import make_dataset, open_source
    from k2jax.text.tokenizer import load_tokenizer

    corpus, tok_path = default_corpus(), default_tokenizer()
    tok = load_tokenizer(tok_path)
    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    t0 = time.perf_counter()
    n = sum(len(tok.encoding.encode_ordinary(t)) for t in texts)
    raw = n / (time.perf_counter() - t0)
    print(f"corpus {corpus}: {len(texts)} documents, {n:,} tokens")
    print(f"tiktoken raw encode (1 thread): {raw:12,.0f} tokens/s")
    for workers in (0, 1, 2):
        ds = make_dataset(open_source(corpus), tok_path, seq_len=args.seq, batch_size=args.batch, worker_count=workers)
        tps = measure_throughput(ds, args.batches, warmup=5)
        print(f"pipeline, {workers} worker process(es): {tps:12,.0f} tokens/s ({tps / raw:.2f}x raw encode)")


if __name__ == "__main__":
    main()
