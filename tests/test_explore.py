"""What a notebook user leans on: the model's repr, `model.routing` (against transformers' routers and attention),
the parameter and device tables, labelled figures, and progress bars that only a terminal or a notebook sees."""

import os
import pty
import subprocess
import sys

import numpy as np
import pytest

import k2jax


def test_model_repr_summarises_architecture_size_dtype_and_mesh(tiny_config):
    from conftest import TINY_RUN

    from k2jax.model.init import param_count

    total, active = param_count(tiny_config)
    model = k2jax.random_model(tiny_config, mesh="data=2,expert=2,tensor=2", execution=TINY_RUN)
    text = repr(model)
    c = tiny_config
    assert text.startswith(f"k2jax.Model: {c.num_hidden_layers} layers ({c.num_dense_layers} dense + "
                           f"{c.num_moe_layers} MoE), hidden {c.hidden_size}, {c.num_attention_heads} MLA heads")
    assert f"{c.n_routed_experts} routed experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared" in text
    assert f"{total / 1e6:.3g}M parameters ({active / 1e6:.3g}M active per token)" in text, text
    assert "float32 weights computing in float32; mesh data=2,expert=2,tensor=2 (8 devices)" in text
    from k2jax.explore import device_table, param_table

    table = param_table(model, match="mlp.wg")
    (row,) = table.rows
    assert row["split over"] == "(None, 'expert', None, 'tensor')" and row["per-device shape"] == (
        c.num_moe_layers, c.n_routed_experts // 2, c.hidden_size, c.moe_intermediate_size // 2)
    devices = device_table(model)
    assert len(devices) == 8 and {r["experts (routed)"] for r in devices.rows} == {
        f"0-{c.n_routed_experts // 2 - 1}", f"{c.n_routed_experts // 2}-{c.n_routed_experts - 1}"}
    assert "<table>" in table._repr_html_() and "moe_layers.mlp.wg" in repr(table)


def _hf_routing(torch_model, tokens):
    """transformers' routers' (indices, weights) per MoE layer, and each layer's largest pre-softmax attention
    score per head (eager attention, read at its softmax)."""
    import torch

    picks, scores = [], []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, out: picks.append((out[2], out[1])))
             for layer in torch_model.model.layers if hasattr(layer.mlp, "gate")]
    softmax = torch.nn.functional.softmax

    def spy(x, *a, **k):
        if x.ndim == 4:  # [b, heads, q, k] attention scores, masked entries at the dtype's minimum
            scores.append(x.amax(dim=(0, 2, 3)).detach().numpy())
        return softmax(x, *a, **k)

    impl = torch_model.config._attn_implementation
    torch_model.config._attn_implementation = "eager"
    torch.nn.functional.softmax = spy
    try:
        with torch.no_grad():
            torch_model(torch.as_tensor(tokens))
    finally:
        torch.nn.functional.softmax = softmax
        torch_model.config._attn_implementation = impl
        for h in hooks:
            h.remove()
    return picks, np.stack(scores)


@pytest.mark.parametrize("reference, mesh", [("hf_tiny", None), ("hf_grouped", "data=2,expert=2,tensor=2")])
def test_routing_matches_transformers_routers(reference, mesh, request, tokens_2x64):
    folder, torch_model = request.getfixturevalue(reference)
    model = k2jax.load_hf(folder, mesh=mesh)
    r = model.routing(tokens_2x64)
    picks, hf_max = _hf_routing(torch_model, tokens_2x64)
    c = model.config
    b, t = tokens_2x64.shape
    assert r.moe_layers == list(range(c.num_dense_layers, c.num_hidden_layers))
    assert r.experts.shape == r.weights.shape == (c.num_moe_layers, b, t, c.num_experts_per_tok)
    for i, (idx, w) in enumerate(picks):
        idx, w = idx.numpy().reshape(b, t, -1), w.numpy().reshape(b, t, -1)
        order = np.argsort(idx, -1)
        ours = np.argsort(r.experts[i], -1)
        np.testing.assert_array_equal(np.take_along_axis(r.experts[i], ours, -1), np.take_along_axis(idx, order, -1))
        np.testing.assert_allclose(np.take_along_axis(r.weights[i], ours, -1), np.take_along_axis(w, order, -1),
                                   atol=1e-5)
        np.testing.assert_array_equal(r.load[i], np.bincount(idx.ravel(), minlength=c.n_routed_experts))
    assert r.max_logit.shape == (c.num_hidden_layers, c.num_attention_heads)
    np.testing.assert_allclose(r.max_logit, hf_max, rtol=1e-4, atol=1e-5)
    assert "MoE layers" in repr(r)
    # padding (segment 0) is left out of the loads, not of the choices
    seg = np.ones_like(tokens_2x64)
    seg[:, t // 2:] = 0
    padded = model.routing(tokens_2x64, segment_ids=seg)
    assert padded.load.sum() == c.num_moe_layers * b * (t // 2) * c.num_experts_per_tok


def test_save_figure_refuses_an_unlabelled_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from k2jax.explore import save_figure

    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    ax.set(title="t", xlabel="x")
    with pytest.raises(ValueError, match="no y label"):
        save_figure(fig, str(tmp_path / "a.png"))
    ax.set_ylabel("y")
    assert open(save_figure(fig, str(tmp_path / "a.png")), "rb").read().startswith(b"\x89PNG")


PROGRESS_SCRIPT = """
import sys, time
import k2jax
from k2jax.ckpt.convert import import_hf
from k2jax.progress import busy
step = import_hf(sys.argv[1], sys.argv[2], dtype="float32")
with busy("compiling"):
    time.sleep(1.2)
k2jax.load(step).generate([[1, 2, 3]], max_new_tokens=64)
print("done")
"""


def _run(args, env, terminal: bool):
    """(stdout, stderr) of a command whose stderr is a pseudo-terminal (terminal=True) or a pipe."""
    if not terminal:
        r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout, r.stderr
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120-column terminal
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the other end closed
            break
        if not data:
            break
        chunks.append(data)
    out = p.communicate(timeout=300)[0]
    os.close(master)
    assert p.returncode == 0, b"".join(chunks).decode(errors="replace")
    return out, b"".join(chunks).decode(errors="replace")


def test_progress_bars_show_on_a_terminal_and_stay_silent_in_logs(hf_tiny, tmp_path):
    """Conversion, a compile and a 64-token generation draw bars on a terminal; with stderr going to a pipe (CI,
    a log file) nothing of them is written; K2JAX_PROGRESS=0 silences a terminal too."""
    env = {k: v for k, v in os.environ.items() if k != "K2JAX_PROGRESS"}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    args = [sys.executable, "-c", PROGRESS_SCRIPT, hf_tiny[0]]
    out, err = _run(args + [str(tmp_path / "tty")], env, terminal=True)
    assert out.strip() == "done"
    for shown in ("tensors", "GB/s", "compiling: 00:0", "generating", "tok/s"):
        assert shown in err, (shown, err[-2000:])
    out, err = _run(args + [str(tmp_path / "pipe")], env, terminal=False)
    assert out.strip() == "done" and not any(s in err for s in ("tensors", "compiling", "generating", "\r")), err
    out, err = _run(args + [str(tmp_path / "off")], {**env, "K2JAX_PROGRESS": "0"}, terminal=True)
    assert out.strip() == "done" and not any(s in err for s in ("tensors", "compiling", "generating")), err
