"""Compiled train-step temporaries against sequence length, blockwise attention (attn_chunk) against one score
matrix, on this host's CPU backend (compile only: nothing runs, so 16K tokens compile on a laptop).

    python benchmarks/long_context_memory.py [--preset tiny] [--chunk 1024] [--seqs 2048,4096,8192,16384]
"""

import argparse
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import k2jax  # noqa: E402
from k2jax.train.optim import OptimConfig  # noqa: E402
from k2jax.train.step import Trainer  # noqa: E402


def temporaries(preset: str, seq: int, chunk: int) -> tuple[float, float]:
    """(temporaries in MiB, compile seconds) of the train step on one device, one sequence of `seq` tokens."""
    config, run = k2jax.load_preset(preset, max_position_embeddings=max(seq, 4096), attn_chunk=chunk,
                                    remat_policy="full")
    trainer = Trainer(config, OptimConfig(), k2jax.make_mesh("", devices=jax.devices()[:1]), execution=run)
    batch = {"tokens": jax.ShapeDtypeStruct((1, seq), jnp.int32, sharding=trainer.batch_sharding)}
    t0 = time.perf_counter()
    compiled = trainer.lower(trainer.abstract_state(), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--seqs", default="2048,4096,8192,16384")
    args = ap.parse_args()
    print(f"{args.preset} preset with remat_policy=full (override), train step, batch 1; attn_chunk={args.chunk}, "
          "and 0 (one score matrix) up to 4K tokens")
    prev = None
    for seq in map(int, args.seqs.split(",")):
        mib, secs = temporaries(args.preset, seq, args.chunk)
        grow = f"  x{mib / prev:.2f}" if prev else ""
        line = f"  {seq:6d} tokens: blockwise {mib:9.1f} MiB{grow} (compiled in {secs:.0f} s)"
        if seq <= 4096:
            line += f"; one matrix {temporaries(args.preset, seq, 0)[0]:9.1f} MiB"
        print(line, flush=True)
        prev = mib


if __name__ == "__main__":
    main()
