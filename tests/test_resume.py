"""k2jax-train as users run it: kill -9 and resume (the compiled step from the persistent compilation cache),
SIGTERM, and two processes x 4 devices against one of 8."""

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
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the runs' own default cache (WORKDIR/compile_cache) is tested here
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


def _train_json(workdir, step):
    """The `train` item of a checkpoint: step and every process's data position."""
    return json.load(open(os.path.join(workdir, str(step), "train", "metadata")))


def test_two_cli_processes_train_as_one_eight_device_process(run_args, tmp_path):
    """`k2jax-train --coordinator_address=... --num_processes=2 --process_id=i`, 2 processes x 4 devices: the losses
    of one 8-device process; each process reads its own rows of the batch (rows 0-3 and 4-7, at the positions the
    one process reached for those rows); one checkpoint written
    once; a resume by one 8-device process continuing with the same losses (a resume by the two processes:
    tests/test_pod.py's simulated pod)."""
    import shutil

    import portpicker

    from pydoc_data.topics import topics

    corpus = [topics[k][:150] for k in sorted(topics)[:30]]  # short: six steps read it through
    data = tmp_path / "short.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    args = [a for a in run_args if not a.startswith(("--batch=", "--data="))] + [
        "--batch=8", f"--data={data}", f"--compilation_cache_dir={tmp_path}/cc"]

    def run(workdir, steps, processes):
        port = portpicker.pick_unused_port()
        dist = [[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
                for i in range(processes)] if processes > 1 else [[]]
        procs = [subprocess.Popen([sys.executable, "-m", "k2jax.cli.train", f"--workdir={workdir}", f"--steps={steps}",
                                   *args, *d], env=_env(8 // processes), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for d in dist]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        for p, out in zip(procs, outs):
            assert p.returncode == 0, out[-4000:]
        return outs[0]

    run(tmp_path / "one", 6, 1)
    out = run(tmp_path / "two", 3, 2)
    assert "2 process(es)" in out, out
    shutil.copytree(tmp_path / "two", tmp_path / "two_then_one")
    out = run(tmp_path / "two_then_one", 6, 1)
    assert f"resumed from {tmp_path / 'two_then_one' / '3'} at step 3" in out, out
    assert "rows 0..7 resume from the positions of 2 saved process(es)" in out, out

    one, two, mixed = (_losses(tmp_path / w) for w in ("one", "two", "two_then_one"))
    assert sorted(one) == sorted(mixed) == list(range(1, 7)) and sorted(two) == [1, 2, 3]
    assert two == pytest.approx({s: one[s] for s in two}, abs=2e-5) and mixed == pytest.approx(one, abs=2e-5)
    assert max(one.values()) - min(one.values()) > 1e-2  # positive control: the steps' losses differ by far more
    # one checkpoint per saved step, written once (by process 0): one metrics line per step
    assert sorted(d for d in os.listdir(tmp_path / "two") if d.isdigit()) == ["3"]
    assert sorted(d for d in os.listdir(tmp_path / "two_then_one") if d.isdigit()) == ["3", "6"]
    assert len(open(tmp_path / "two" / "metrics.jsonl").read().splitlines()) == 3
    # the data: each process its own rows, at the positions the one process reached for them
    saved_two = _train_json(tmp_path / "two", 3)["data_by_process"]
    (saved_one,) = _train_json(tmp_path / "one", 3)["data_by_process"]
    assert [e["rows"] for e in saved_two] == [[0, 4], [4, 8]] and saved_one["rows"] == [0, 8]
    by_row = {r: st for e in saved_two for r, st in e["state"]["rows"].items()}
    assert by_row == saved_one["state"]["rows"]
    assert len({st["parent_state"]["next_index"] for st in by_row.values()}) > 1  # the rows are at different places


