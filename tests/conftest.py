"""Shared fixtures: 8 simulated CPU devices, tiny random HF reference checkpoints built once per session."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# one persistent compilation cache for every process the test session starts: both xdist workers (the controller
# makes it before they start, and they inherit the variables), the command-line runs the tests start and the
# notebooks' kernels (JAX reads JAX_COMPILATION_CACHE_DIR when it starts; a CLI without --compilation_cache_dir
# takes it): a program another process of the session compiled (the model's initialisation, the same train step in
# another test) is loaded instead. Tests of the CLIs' own default cache remove the variable from their commands.
_MADE = "K2JAX_TEST_XLA_CACHE" not in os.environ
if _MADE:
    os.environ["K2JAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="k2jax-test-xla-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["K2JAX_TEST_XLA_CACHE"]

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["K2JAX_TEST_XLA_CACHE"])


from k2jax.model.config import load_config, load_preset  # noqa: E402
from k2jax.testing.reference import GROUPED, build_hf_model  # noqa: E402

TINY_RUN = load_preset("tiny")[1]  # the tiny preset's execution settings (float32 parameters and compute)


@pytest.fixture
def libtpu_env(monkeypatch):
    """The variables that let this process load libtpu to compile for a TPU topology beside other processes that
    hold it (no metadata-server query, several loads allowed); restored after the test."""
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory, tiny_config):
    """(folder, torch model) of the tiny preset's shape (n_group = 1)."""
    folder = str(tmp_path_factory.mktemp("hf_tiny"))
    return folder, build_hf_model(tiny_config, folder)


@pytest.fixture(scope="session")
def hf_grouped(tmp_path_factory, tiny_config):
    """(folder, torch model) with group-limited routing (n_group 4, topk_group 2) and other YaRN factors."""
    folder = str(tmp_path_factory.mktemp("hf_grouped"))
    return folder, build_hf_model(tiny_config.replace(**GROUPED), folder, seed=1)


@pytest.fixture(scope="session")
def tokens_2x64(tiny_config):
    return np.random.default_rng(0).integers(0, tiny_config.vocab_size, (2, 64)).astype(np.int32)


@pytest.fixture(scope="session")
def small_tokenizer(tmp_path_factory):
    """A K2-format tokenizer (3840 BPE ranks + 256 specials = the tiny preset's 4096) trained on pydoc's topics."""
    from pydoc_data.topics import topics

    from k2jax.text.bpe import train_tokenizer_file
    from k2jax.text.tokenizer import load_tokenizer

    path = str(tmp_path_factory.mktemp("tok") / "tiktoken.model")
    train_tokenizer_file("\n".join(topics[k] for k in sorted(topics)), path, 3840)
    return load_tokenizer(path)


# the longest test files first: pytest.ini runs the files on two workers, and starting the long ones early keeps
# both busy to the end (a long file started last runs alone)
LONGEST_FIRST = ["test_lora.py", "test_pod.py", "test_notebooks.py", "test_resume.py", "test_train.py", "test_sft.py",
                 "test_tpu_kernels.py", "test_long_context.py",
                 "test_lora_quant.py", "test_parity.py", "test_decode.py", "test_aot.py", "test_moe.py", "test_convert.py", "test_explore.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


_TIMES = []  # the "seconds" properties tests record (times measured, printed, never asserted)


def pytest_runtest_logreport(report):
    if report.when == "call":
        _TIMES.extend(value for key, value in report.user_properties if key == "seconds")


def pytest_terminal_summary(terminalreporter):
    if _TIMES:
        terminalreporter.write_sep("-", "times measured by the tests (figures, not verdicts)")
        for line in sorted(_TIMES):
            terminalreporter.write_line(line)


def pytest_sessionfinish(session):
    if _MADE:  # the process that made it (the controller, or a run without xdist) removes it
        shutil.rmtree(os.environ["K2JAX_TEST_XLA_CACHE"], ignore_errors=True)
