"""One process of the multi-process training test: trains 3 steps on a fixed synthetic global batch.

    python multiprocess_worker.py OUT_JSON [COORDINATOR PROCESS_ID NUM_PROCESSES]
"""

import json
import sys

import jax

if len(sys.argv) > 2:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(sys.argv[2], num_processes=int(sys.argv[4]), process_id=int(sys.argv[3]))

import numpy as np  # noqa: E402

import k2jax  # noqa: E402
from k2jax.data.pipeline import global_batch  # noqa: E402
from k2jax.train.optim import OptimConfig  # noqa: E402
from k2jax.train.step import Trainer  # noqa: E402


def main():
    config, run = k2jax.load_preset("tiny", num_hidden_layers=2)
    mesh = k2jax.make_mesh("data=2,expert=2,tensor=2")
    trainer = Trainer(config, OptimConfig(learning_rate=3e-3, warmup_steps=1, total_steps=10), mesh, execution=run)
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    n, pid = jax.process_count(), jax.process_index()
    losses = []
    for _ in range(3):
        tokens = rng.integers(0, 512, (8, 32)).astype(np.int32)
        full = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
                "positions": np.tile(np.arange(32, dtype=np.int32), (8, 1))}
        local = {k: v[pid * 8 // n:(pid + 1) * 8 // n] for k, v in full.items()}  # this process's rows
        state, metrics = trainer.step(state, global_batch(local, mesh, trainer.rules))
        losses.append(float(metrics["loss"]))
    if pid == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"losses": losses, "processes": n, "devices": jax.device_count()}, f)


if __name__ == "__main__":
    main()
