"""k2jax-train as users run it: kill -9 and resume (the compiled step from the persistent compilation cache),
SIGTERM, and two processes x 4 devices."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(__file__)


@pytest.fixture(scope="module")
def run_args(small_tokenizer, tmp_path_factory):
    from pydoc_data.topics import topics

    data = tmp_path_factory.mktemp("resume_data") / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    return ["--config=tiny", "--set=num_hidden_layers=2", f"--data={data}", f"--tokenizer={small_tokenizer.path}",
            "--batch=4", "--seq=32", "--save_every=3", "--log_every=1", "--sample_tokens=0", "--opt=total_steps=9",
            "--warmup=2"]


def _env(devices=1):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _train(args, workdir, steps, **kw):
    return subprocess.Popen([sys.executable, "-m", "k2jax.cli.train", f"--workdir={workdir}", f"--steps={steps}",
                             *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _losses(workdir):
    out = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            out[r["step"]] = r["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return out


def _wait_for_checkpoint(workdir, step, proc, timeout=300):
    marker = os.path.join(workdir, str(step), "_CHECKPOINT_METADATA")
    t0 = time.time()
    while not os.path.exists(marker):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


def test_killed_run_resumes_with_identical_losses_and_sigterm_saves(run_args, tmp_path):
    straight = _train(run_args, tmp_path / "a", 9)
    killed = _train(run_args, tmp_path / "b", 1000)
    _wait_for_checkpoint(tmp_path / "b", 3, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert straight.wait(timeout=600) == 0, straight.stdout.read()
    cache = tmp_path / "b" / "compile_cache"  # the default persistent compilation cache, written by the killed run
    assert any(name.startswith("jit_step_fn-") for name in os.listdir(cache)), os.listdir(cache)
    resumed = _train(run_args + ["--sample_tokens=8"], tmp_path / "b", 9)  # and sample at the end, as the quick start
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "sample from" in out
    assert f"train step loaded from the compilation cache {cache}" in out, out
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == list(range(1, 10))
    _check_tensorboard_events(tmp_path / "a", a)
    for step in range(4, 10):
        assert b[step] == a[step], (step, a, b)  # bit-exact continuation

    term = _train(run_args + [f"--compilation_cache_dir={cache}"], tmp_path / "c", 1000)  # a fresh run, same step
    _wait_for_checkpoint(tmp_path / "c", 3, term)
    term.send_signal(signal.SIGTERM)
    out = term.communicate(timeout=300)[0]
    assert term.returncode == 0, out
    assert f"train step loaded from the compilation cache {cache}" in out, out
    assert not os.path.exists(tmp_path / "c" / "compile_cache")
    saved = [line for line in out.splitlines() if line.startswith("SIGTERM: saved step")]
    assert saved, out
    step = int(re.search(r"saved step (\d+)", saved[0]).group(1))
    assert os.path.exists(os.path.join(tmp_path / "c", str(step), "_CHECKPOINT_METADATA"))


def _check_tensorboard_events(workdir, losses):
    """The TensorBoard event file holds the losses of metrics.jsonl (float32), every record's CRC intact; a
    flipped byte is caught (positive control of the reader)."""
    from k2jax.testing.events import read_events

    (name,) = [f for f in os.listdir(workdir) if f.startswith("events.out.tfevents.")]
    path = os.path.join(workdir, name)
    scalars = {(step, tag): value for step, tag, value in read_events(path)}
    for step, loss in losses.items():
        assert scalars[(step, "loss")] == pytest.approx(loss, rel=1e-6), step
    # TensorBoard's own reader sees the same scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(path)
    acc.Reload()
    assert {e.step: e.value for e in acc.Scalars("loss")} == pytest.approx(losses, rel=1e-6)
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_s"} <= set(acc.Tags()["scalars"])
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF
    with open(path + ".bad", "wb") as f:
        f.write(data)
    with pytest.raises(ValueError, match="CRC"):
        read_events(path + ".bad")


def test_two_processes_match_one_process(tmp_path):
    import portpicker

    port = portpicker.pick_unused_port()
    worker = os.path.join(HERE, "multiprocess_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(tmp_path / "multi.json"), f"127.0.0.1:{port}", str(i), "2"],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run([sys.executable, worker, str(tmp_path / "single.json")], env=_env(8), capture_output=True,
                            text=True, timeout=600)
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, out
    assert single.returncode == 0, single.stderr
    multi, one = (json.load(open(tmp_path / f)) for f in ("multi.json", "single.json"))
    assert multi["processes"] == 2 and multi["devices"] == 8 and one["processes"] == 1 and one["devices"] == 8
    assert multi["losses"] == pytest.approx(one["losses"], abs=1e-5)
