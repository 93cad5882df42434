"""Prefill of long prompts on this CPU: k2jax vs HF transformers (sdpa attention), the same weights, side by side.

    python benchmarks/long_prefill.py [--config small --lengths 2048,8192,32768]

For each prompt length, each engine runs in its own process (so that its peak RSS is its own): it loads the
model and warms up (k2jax: one untimed prefill at the same length, whose first call compiles), notes its RSS,
prefills one prompt, and reports the prefill's tokens/s and the peak RSS during it above the RSS before it (a
thread samples it every 2 ms), next to the size of the cache it made. k2jax runs as a user gets it: `model.sampler()`, whose default writes prompts longer than
PREFILL_CHUNK tokens that many at a time; transformers runs `model(ids, use_cache=True)` under torch.no_grad().
The config's max_position_embeddings is raised to twice the longest length where needed, with YaRN's factor
to match (printed as overrides). A run that fails (out of memory) is reported with its last error line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a CPU benchmark: no accelerator probing (libtpu's messages)


def _trim() -> None:
    """Hands freed heap pages back to the OS (glibc), so that RSS before the timed call is what is in use."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class PeakRss:
    """The highest RSS (MiB) seen while the block runs, sampled every 2 ms by a thread."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def one(engine: str, folder: str, length: int) -> dict:
    """Prefill one prompt of `length` tokens with `engine` on the HF folder's weights; figures as a dict."""
    import jax

    import k2jax
    from k2jax.inference.sampler import PREFILL_CHUNK

    rng = np.random.default_rng(0)
    if engine == "k2jax":
        model = k2jax.load_hf(folder)
        config = model.config
        prompt = rng.integers(0, config.vocab_size, length).tolist()
        sampler = model.sampler()
        max_len = sampler.check_request([prompt], 1)
        jax.block_until_ready(sampler.prefill([prompt], max_len)[:2])  # compiles
        _trim()
        base = _rss_mib()
        with PeakRss() as rss:
            t0 = time.perf_counter()
            logits, cache, _ = sampler.prefill([prompt], max_len)
            jax.block_until_ready((logits, cache))
            secs = time.perf_counter() - t0
        cache_mib = sum(x.nbytes for x in jax.tree.leaves(cache)) / 2**20
        detail = f"prefill_chunk {PREFILL_CHUNK}"
    else:
        import torch
        from transformers import AutoModelForCausalLM

        torch_model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", torch_dtype=torch.float32)
        torch_model.eval()
        vocab = torch_model.config.vocab_size
        ids = torch.tensor([rng.integers(0, vocab, length).tolist()])
        with torch.no_grad():
            torch_model(ids[:, :64], use_cache=True)  # warm-up
            _trim()
            base = _rss_mib()
            with PeakRss() as rss:
                t0 = time.perf_counter()
                out = torch_model(ids, use_cache=True)
                secs = time.perf_counter() - t0
        cache = out.past_key_values
        tensors = []
        for layer in getattr(cache, "layers", []):
            tensors += [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None]
        if not tensors and hasattr(cache, "key_cache"):
            tensors = list(cache.key_cache) + list(cache.value_cache)
        cache_mib = sum(t.numel() * t.element_size() for t in tensors) / 2**20
        detail = f"attn {torch_model.config._attn_implementation}, {torch.get_num_threads()} threads"
    return {"engine": engine, "length": length, "seconds": secs, "tokens_per_s": length / secs,
            "peak_above_model_mib": rss.peak - base, "cache_mib": cache_mib, "detail": detail}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="small")
    p.add_argument("--lengths", default="2048,8192,32768")
    p.add_argument("--one", nargs=3, metavar=("ENGINE", "FOLDER", "LENGTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], args.one[1], int(args.one[2]))))
        return

    import jax
    import torch

    import k2jax
    from k2jax.testing.reference import build_hf_model
    from machine import describe, peak_gemm_rate, read_rate

    lengths = [int(x) for x in args.lengths.split(",")]
    config = k2jax.load_config(args.config)
    overrides = ""
    if config.max_position_embeddings <= max(lengths):  # room for the longest prompt, YaRN's factor to match
        longest = 2 * max(lengths)
        config = config.replace(max_position_embeddings=longest,
                                rope_factor=longest / config.rope_original_max_position_embeddings)
        overrides = f"; overrides: max_position_embeddings={longest}, rope_factor={config.rope_factor:g}"
    total, active = k2jax.param_count(config)
    print(f"config {args.config}: {total / 1e6:.1f}M parameters ({active / 1e6:.1f}M active){overrides}; batch 1, "
          f"float32")
    print(describe(jax, torch))
    print(f"this host: peak float32 GEMM {peak_gemm_rate() / 1e9:.0f} GFLOP/s, streaming read {read_rate() / 1e9:.1f} GB/s")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        build_hf_model(config, d, seed=0)
        env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "K2JAX_PROGRESS": "0"}
        for length in lengths:
            for engine in ("k2jax", "transformers"):
                r = subprocess.run([sys.executable, __file__, "--one", engine, d, str(length)], capture_output=True,
                                   text=True, env=env)
                if r.returncode:
                    last = [line for line in r.stderr.strip().splitlines() if line.strip()][-1:] or ["?"]
                    print(f"{length:>7} tokens  {engine:<12} failed: {last[0][:300]}", flush=True)
                    continue
                row = json.loads(r.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{length:>7} tokens  {engine:<12} {row['tokens_per_s']:9,.0f} tokens/s  {row['seconds']:8.2f} s  "
                      f"peak RSS above the model {row['peak_above_model_mib']:8,.0f} MiB  cache {row['cache_mib']:7,.1f} "
                      f"MiB  ({row['detail']})", flush=True)
    by = {(r["engine"], r["length"]): r for r in rows}
    for length in lengths:
        a, b = by.get(("k2jax", length)), by.get(("transformers", length))
        if a and b:
            print(f"{length:>7} tokens: k2jax / transformers = {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                  f"{a['peak_above_model_mib'] / max(b['peak_above_model_mib'], 1):.2f}x peak memory above the model")


if __name__ == "__main__":
    main()
