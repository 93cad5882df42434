"""Chat SFT data throughput: rendering + tokenisation + whole-conversation packing, next to the plain-text pipeline
on the same words, and the share of tokens that carry loss on a multi-turn set with tool calls.

    python benchmarks/sft_data.py [--conversations 2000 --seq 2048 --batch 8 --batches 50]

The conversations are built from the Python documentation's pydoc topics (no download): a system prompt, a tool
declaration in a third of them, two or three user turns, assistant answers of documentation text, and an
assistant tool call with its tool result where tools are declared. The text pipeline reads the same
conversations' text (every message's content joined) as documents.
"""

import argparse
import json
import os
import tempfile
import time


def conversations(n: int, seed: int = 0):
    """`n` multi-turn conversations of pydoc topics (see the module docstring)."""
    import numpy as np
    from pydoc_data.topics import topics

    rng = np.random.default_rng(seed)
    names = sorted(topics)
    tools = [{"type": "function", "function": {"name": "search_docs", "description": "Search the Python docs",
                                               "parameters": {"type": "object",
                                                              "properties": {"query": {"type": "string"}}}}}]
    out = []
    for i in range(n):
        picks = [names[j] for j in rng.choice(len(names), 3, replace=False)]
        msgs = [{"role": "system", "content": "You answer questions about Python precisely."}]
        record = {"messages": msgs}
        if i % 3 == 0:
            record["tools"] = tools
            msgs += [{"role": "user", "content": f"Find what the docs say about {picks[0]}."},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "functions.search_docs:0",
                      "type": "function", "function": {"name": "search_docs",
                                                       "arguments": json.dumps({"query": picks[0]})}}]},
                     {"role": "tool", "tool_call_id": "functions.search_docs:0", "name": "search_docs",
                      "content": topics[picks[0]][:1500]},
                     {"role": "assistant", "content": topics[picks[0]][:400]}]
        for topic in picks[1:]:
            msgs += [{"role": "user", "content": f"Explain {topic} with an example."},
                     {"role": "assistant", "content": topics[topic][: int(rng.integers(200, 1200))]}]
        out.append(record)
    return out


def pipeline_rate(ds, batches: int):
    """(non-padding tokens/s, loss-carrying share of the non-padding tokens, padding share of the rows) over
    `batches` batches after 2."""
    it = iter(ds)
    for _ in range(2):
        next(it)
    tokens = loss = slots = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
        tokens += int((b["segment_ids"] != 0).sum())
        slots += b["segment_ids"].size
        loss += int(b["weights"].sum()) if "weights" in b else 0
    return tokens / (time.perf_counter() - t0), loss / max(tokens, 1), 1 - tokens / slots


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args()

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    from k2jax.data.chat import ChatSource
    from k2jax.data.corpus import default_tokenizer
    from k2jax.data.pipeline import make_dataset, open_source

    tok = default_tokenizer()
    records = conversations(args.conversations)
    with tempfile.TemporaryDirectory() as d:
        chat_path, text_path = os.path.join(d, "chat.jsonl"), os.path.join(d, "text.jsonl")
        with open(chat_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        with open(text_path, "w") as f:
            f.writelines(json.dumps({"text": "\n".join(m["content"] for m in r["messages"])}) + "\n" for r in records)
        t0 = time.perf_counter()
        source = ChatSource(chat_path, tok, args.seq, on_long="truncate")
        open_s = time.perf_counter() - t0
        indexed = sum(len(source[i]["tokens"]) for i in range(min(len(source), 200)))
        chat_rate, share, chat_pad = pipeline_rate(make_dataset(source, tok, seq_len=args.seq, batch_size=args.batch),
                                         args.batches)
        text_rate, _, _ = pipeline_rate(make_dataset(open_source(text_path), tok, seq_len=args.seq,
                                                  batch_size=args.batch), args.batches)
    print(f"{len(records)} conversations, seq {args.seq}, batch {args.batch}, {args.batches} batches, "
          f"{os.cpu_count()} cores, no grain workers")
    print(f"opening (check + tokenise every record once): {open_s:.1f} s "
          f"({source.counts.summary('chat.jsonl')}); ~{indexed // min(len(source), 200)} tokens per conversation")
    print(f"chat pipeline (render + tokenise + first-fit packing): {chat_rate:,.0f} tokens/s, "
          f"{chat_pad:.1%} of the rows padding (whole conversations only)")
    print(f"text pipeline (tokenise + concat-and-split) on the same words: {text_rate:,.0f} tokens/s")
    print(f"tokens carrying loss (the assistant's): {share:.1%} of the non-padding tokens")


if __name__ == "__main__":
    main()
