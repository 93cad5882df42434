"""k2jax-forward: build a model abstract-first on a mesh and time its forward pass on random tokens."""

from __future__ import annotations

import sys
import time

import jax
import numpy as np
from absl import flags

import k2jax
from k2jax.cli.common import config_from_flags, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "tiny", "Preset name, preset file (configs/tiny.py) or HF config.json.")
flags.DEFINE_string("mesh", "", "Mesh spec such as data=2,expert=4 (default: all devices on data).")
flags.DEFINE_multi_string("set", [], "Config override key=value (repeatable).")
flags.DEFINE_integer("batch", 8, "Sequences per forward pass.")
flags.DEFINE_integer("seq", 128, "Tokens per sequence.")
flags.DEFINE_integer("repeats", 3, "Timed forward passes.")
flags.DEFINE_integer("seed", 0, "Initialisation seed.")


def forward_report(config, mesh_spec: str, batch: int, seq: int, repeats: int, seed: int, execution=None) -> dict:
    """Initialises a random model and measures its forward pass; returns the figures printed by the CLI."""
    total, active = k2jax.param_count(config)
    model = k2jax.random_model(config, mesh=k2jax.make_mesh(mesh_spec), seed=seed, execution=execution)
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (batch, seq)).astype(np.int32)
    t0 = time.perf_counter()
    logits = np.asarray(model.logits(tokens))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(model.logits(tokens))
    step_s = (time.perf_counter() - t0) / repeats
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1).mean()
    return dict(total_params=total, active_params=active, mesh=dict(model.mesh.shape), compile_s=compile_s,
                step_s=step_s, tokens_per_s=batch * seq / step_s, nll=float(nll), uniform_nll=float(np.log(config.vocab_size)))


def main(argv):
    del argv
    config, execution = config_from_flags(FLAGS.config, FLAGS.set)
    r = forward_report(config, FLAGS.mesh, FLAGS.batch, FLAGS.seq, FLAGS.repeats, FLAGS.seed, execution)
    print(f"model: {r['total_params']:,} parameters ({r['active_params']:,} active per token)")
    print(f"mesh: {r['mesh']} on {jax.device_count()} {jax.default_backend()} device(s)")
    print(f"forward [{FLAGS.batch} x {FLAGS.seq}]: first call (compile) {r['compile_s']:.2f}s, "
          f"then {r['step_s'] * 1e3:.1f} ms/step = {r['tokens_per_s']:,.0f} tokens/s")
    print(f"next-token loss on random tokens: {r['nll']:.3f} (uniform: {r['uniform_nll']:.3f})")
    return 0


def run():
    run_main(main, host_malloc=True)


if __name__ == "__main__":
    sys.exit(run())
