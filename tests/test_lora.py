"""LoRA: adapters on every projection (the routed experts inside the grouped matmul), a frozen base, checkpoints
that reference their base, and export (merged HF weights, a PEFT adapter) checked against transformers and peft."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.errors import CheckpointError, ConfigError
from k2jax.model.layers.lora import LoraConfig

from conftest import TINY_RUN


# ------------------------------------------------------------------------------------------------ experts
def _silu(x):
    return x / (1 + np.exp(-x))


def _numpy_expert_lora(x, idx, w, base, lo, s, ct):
    """float64 per-assignment loop: y = sum_k w·(SwiGLU with adapters), and the gradients of <y, ct> with respect
    to x and every adapter factor, by the chain rule written out."""
    wg, wu, wd = base
    ag, bg, au, bu, ad, bd = lo
    y = np.zeros_like(x)
    dx = np.zeros_like(x)
    grads = [np.zeros_like(a) for a in lo]
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e, r, xt, dy = idx[t, k], w[t, k], x[t], ct[t]
            g = xt @ wg[e] + s * (xt @ ag[e]) @ bg[e]
            u = xt @ wu[e] + s * (xt @ au[e]) @ bu[e]
            sig = 1 / (1 + np.exp(-g))
            hr = r * _silu(g) * u
            y[t] += hr @ wd[e] + s * (hr @ ad[e]) @ bd[e]
            dhr = dy @ wd[e].T + s * (dy @ bd[e].T) @ ad[e].T
            grads[4][e] += s * np.outer(hr, dy @ bd[e].T)
            grads[5][e] += s * np.outer(hr @ ad[e], dy)
            dh = r * dhr
            dg = dh * u * sig * (1 + g * (1 - sig))
            du = dh * _silu(g)
            grads[0][e] += s * np.outer(xt, dg @ bg[e].T)
            grads[1][e] += s * np.outer(xt @ ag[e], dg)
            grads[2][e] += s * np.outer(xt, du @ bu[e].T)
            grads[3][e] += s * np.outer(xt @ au[e], du)
            dx[t] += dg @ wg[e].T + s * (dg @ bg[e].T) @ ag[e].T + du @ wu[e].T + s * (du @ bu[e].T) @ au[e].T
    return y, dx, grads


@pytest.mark.parametrize("impl", ["blocks", "ragged", "gather", "loop"])
def test_routed_expert_lora_forward_and_gradients_match_float64_numpy(impl):
    """Each expert's A and B applied on the sorted row blocks (never a dense per-expert delta): the output and the
    gradients of x and of every expert's A and B equal a float64 NumPy loop to 1e-6 (relative)."""
    from k2jax.model.layers.grouped import ExpertLora, expert_ffn

    rng = np.random.default_rng(0)
    t, k, e, d, f, r, s = 40, 3, 6, 16, 12, 4, 0.5
    x = rng.normal(size=(t, d))
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    idx[:5] = idx[0]  # some experts see many rows (several blocks), one sees none
    idx[idx == e - 1] = 0
    w = rng.uniform(0.1, 1.0, size=(t, k))
    base = [rng.normal(size=sh) * 0.3 for sh in ((e, d, f), (e, d, f), (e, f, d))]
    lo = [rng.normal(size=sh) * 0.3 for sh in ((e, d, r), (e, r, f), (e, d, r), (e, r, f), (e, f, r), (e, r, d))]
    ct = rng.normal(size=(t, d))
    y_ref, dx_ref, g_ref = _numpy_expert_lora(x, idx, w, base, lo, s, ct)

    with jax.enable_x64(True):
        def f_out(x, lo):
            y = expert_ffn(jnp.asarray(x), jnp.asarray(idx), jnp.asarray(w), *map(jnp.asarray, base), impl=impl,
                           block_size=8, lora=ExpertLora(*lo), scale=s)
            return jnp.sum(y * ct), y

        (_, y), (dx, dlo) = jax.value_and_grad(f_out, argnums=(0, 1), has_aux=True)(
            jnp.asarray(x), tuple(map(jnp.asarray, lo)))
        y, dx, dlo = np.asarray(y), np.asarray(dx), [np.asarray(a) for a in dlo]
    assert y.dtype == np.float64

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    assert rel(y, y_ref) <= 1e-6, rel(y, y_ref)
    assert rel(dx, dx_ref) <= 1e-6, rel(dx, dx_ref)
    for name, a, b in zip(("A_gate", "B_gate", "A_up", "B_up", "A_down", "B_down"), dlo, g_ref):
        assert rel(a, b) <= 1e-6, (name, rel(a, b))
        used = np.unique(idx)  # every used expert's factors get a gradient from the implementation, not only in
        assert np.abs(a[used]).reshape(len(used), -1).max(axis=1).min() > 0, name  # the reference
    # positive control: the same comparison flags an adapter applied to the wrong expert
    swapped = [a[::-1].copy() for a in lo]
    y_bad = _numpy_expert_lora(x, idx, w, base, swapped, s, ct)[0]
    assert rel(y_bad, y_ref) > 1e-3


# ------------------------------------------------------------------------------------------------ trainer
def _trainer(config, mesh, lora, base_quant="", **optim):
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import Trainer

    o = OptimConfig(optimizer="adamw", learning_rate=1e-2, warmup_steps=1, total_steps=100, **optim)
    return Trainer(config, o, mesh, execution=TINY_RUN, lora=lora, base_quant=base_quant)


def _batch(config, trainer, seed=0, b=8, t=32):
    tokens = np.random.default_rng(seed).integers(0, config.vocab_size, (b, t)).astype(np.int32)
    return {"tokens": jax.device_put(tokens, trainer.batch_sharding)}


@pytest.fixture(scope="module")
def base_state(tiny_config):
    from k2jax.model.init import init_model

    return init_model(tiny_config, k2jax.make_mesh("", devices=jax.devices()[:1]), execution=TINY_RUN, seed=3)


def test_adapters_start_at_the_base_and_only_they_train(tiny_config, base_state):
    """Logits equal the base model's exactly at initialisation; after steps every base weight (router biases too)
    is bit-identical; the optimizer state holds exactly two float32 moments per adapter parameter."""
    graphdef, base = base_state
    mesh = k2jax.make_mesh("", devices=jax.devices()[:1])
    trainer = _trainer(tiny_config, mesh, LoraConfig(rank=4, alpha=8, dropout=0.1))
    state = trainer.init_state(model_state=base)
    tokens = np.random.default_rng(1).integers(0, tiny_config.vocab_size, (2, 32)).astype(np.int32)
    base_logits = nnx.merge(graphdef, base)(tokens)
    lora_model = nnx.merge(trainer.graphdef, state.params, state.bias, trainer.base)
    np.testing.assert_array_equal(np.asarray(lora_model(tokens)), np.asarray(base_logits))
    before = jax.tree.map(np.asarray, trainer.base)
    batch = _batch(tiny_config, trainer)
    losses = []
    for _ in range(4):
        state, m = trainer.step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    after = jax.tree.map(np.asarray, trainer.base)
    for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after)):
        assert np.array_equal(a.get_value(), b.get_value()), path
    assert not any(isinstance(v, nnx.Param) and "lora" not in "/".join(map(str, p))
                   for p, v in nnx.to_flat_state(state.params))
    # adapters moved (B left zero), and the model now differs from its base
    assert all(np.abs(np.asarray(v.get_value())).max() > 0 for p, v in nnx.to_flat_state(state.params))
    n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
    arrays = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    scalars = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert sum(x.nbytes for x in arrays) == n_adapter * 2 * 4  # AdamW: mu and nu, float32
    assert all(x.dtype == jnp.int32 for x in scalars)  # step counters only (one per optimizer group)
    full = _trainer(tiny_config, mesh, None)  # positive control: full fine-tuning's state is far larger
    full_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(full.abstract_state().opt_state))
    assert full_bytes > 5 * sum(x.nbytes for x in arrays)


@pytest.mark.parametrize("quant", ["", "int8"])
def test_lora_step_on_an_8_device_mesh_matches_one_device(tiny_config, base_state, quant):
    """The same LoRA steps with the experts split over `expert` and their hidden dim over `tensor` (the base as
    it is, or int8: each shard dequantises its own part): losses to 1e-5 of one device; and at the same adapters
    (after those steps, B no longer zero) every adapter's gradient to 1e-5 of its largest entry."""
    _, base = base_state
    lora = LoraConfig(rank=4)
    losses, trainers, at = {}, {}, None
    for spec, devices in (("", jax.devices()[:1]), ("data=2,expert=2,tensor=2", jax.devices())):
        trainer = trainers[spec] = _trainer(tiny_config, k2jax.make_mesh(spec, devices=devices), lora, quant)
        state = trainer.init_state(model_state=jax.device_get(base))
        batch = _batch(tiny_config, trainer, seed=2)
        losses[spec] = []
        for _ in range(2):
            state, m = trainer.step(state, batch)
            losses[spec].append(float(m["loss"]))
        at = jax.device_get(state.params) if at is None else at
    np.testing.assert_allclose(losses["data=2,expert=2,tensor=2"], losses[""], rtol=0, atol=1e-5)
    grads = {}
    for spec, trainer in trainers.items():
        with jax.set_mesh(trainer.mesh):
            params = jax.device_put(at, trainer.param_shardings)
            _, g, _ = jax.jit(trainer._grads)(params, nnx.State({}), _batch(tiny_config, trainer, seed=2),
                                              trainer.base)
        grads[spec] = jax.device_get(g)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads[""]), nnx.to_flat_state(grads["data=2,expert=2,tensor=2"])):
        a, b = np.asarray(a.get_value()), np.asarray(b.get_value())
        assert np.abs(a).max() > 0, path
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max(), err_msg=str(path))


def test_lora_config_errors_name_the_flag():
    with pytest.raises(ConfigError, match="--lora_targets: unknown target 'mlp'"):
        LoraConfig(rank=4, targets=("attn", "mlp"))
    with pytest.raises(ConfigError, match="--lora_rank"):
        LoraConfig(rank=0)
    with pytest.raises(ConfigError, match="--lora_dropout"):
        LoraConfig(rank=2, dropout=1.0)
    from k2jax.train.loop import RunConfig

    with pytest.raises(ConfigError, match="--lora_rank needs --init_from"):
        RunConfig(workdir="w", lora=LoraConfig(rank=2))
    from k2jax.train.optim import OptimConfig
    from k2jax.train.step import Trainer

    with pytest.raises(ConfigError, match="AdamW"):
        Trainer(k2jax.load_config("tiny"), OptimConfig(), k2jax.make_mesh("", devices=jax.devices()[:1]),
                execution=TINY_RUN, lora=LoraConfig(rank=2))


# ------------------------------------------------------------------------------------------------ runs
def _cli(*args, stdin=None):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run([sys.executable, "-m", f"k2jax.cli.{args[0]}", *args[1:]], capture_output=True, text=True,
                          env=env, input=stdin, timeout=600)


def _train_args(work, base, steps, *extra, cache):
    """A LoRA run's flags; `cache`: a compilation cache the module's runs share (a run with the flags of an
    earlier one loads its compiled step instead of compiling it again)."""
    return ("train", f"--init_from={base}", f"--workdir={work}", f"--steps={steps}", "--batch=4", "--seq=64",
            "--save_every=2", "--log_every=1", "--sample_tokens=0", "--lr=1e-2", "--warmup=1", "--lora_rank=4",
            "--keep=5", f"--compilation_cache_dir={cache}", *extra)


@pytest.fixture(scope="module")
def lora_runs(hf_tiny, tmp_path_factory):
    """Two LoRA runs from the tiny HF reference through the CLI: all targets (4 steps straight), and the targets
    PEFT can hold on transformers' DeepseekV3 (attention and the routed experts; 2 steps over an int8 base)."""
    root = tmp_path_factory.mktemp("lora")
    runs = {"all": str(root / "all"), "peft": str(root / "peft"), "cache": str(root / "compile_cache")}
    r = _cli(*_train_args(runs["all"], hf_tiny[0], 4, "--lora_dropout=0.1", "--lora_alpha=8", cache=runs["cache"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "LoRA rank 4 (alpha 8" in r.stdout and "adapter parameters trained" in r.stdout
    r = _cli(*_train_args(runs["peft"], hf_tiny[0], 2, "--lora_targets=attn,experts", "--base_dtype=int8",
                          cache=runs["cache"]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "which stays frozen, held as int8" in r.stdout
    return runs


def test_lora_resume_is_exact_and_a_changed_or_missing_base_is_refused(lora_runs, hf_tiny, tmp_path):
    """Two steps, then a resume for two more, give the adapters (dropout on) of the run that went straight to
    step 4, bit for bit; a base that moved, changed or was never the run's base is named and refused."""
    import shutil

    from k2jax.ckpt.orbax import resolve_step_dir

    split, cache = str(tmp_path / "split"), lora_runs["cache"]
    for steps in (2, 4):
        r = _cli(*_train_args(split, hf_tiny[0], steps, "--lora_dropout=0.1", "--lora_alpha=8", cache=cache))
        assert r.returncode == 0, r.stderr[-3000:]
    # the resumed run has the straight run's flags (--steps sets the schedule): its step comes from the cache
    assert "loaded from the compilation cache" in r.stdout, r.stdout[-2000:]
    assert "resumed from" in r.stdout and "as recorded" in r.stdout
    straight, resumed = (k2jax.load(d) for d in (lora_runs["all"], split))
    for (p, a), (_, b) in zip(nnx.to_flat_state(straight.state), nnx.to_flat_state(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))
    step_dir = resolve_step_dir(split)
    # the base moved: refused, naming it, until it is passed again
    moved = str(tmp_path / "moved_base")
    shutil.copytree(hf_tiny[0], moved)
    rec = json.load(open(os.path.join(step_dir, "config", "metadata")))["lora"]["base"]
    assert rec["path"] == hf_tiny[0] and len(rec["hash"]) == 64
    # a different base (the same shapes in other dtypes): the hash differs
    other = str(tmp_path / "bf16_base")
    from k2jax.ckpt.convert import export_hf, import_hf

    export_hf(import_hf(hf_tiny[0], str(tmp_path / "k2_bf16"), dtype="bfloat16", quiet=True), other, quiet=True)
    r = _cli(*_train_args(split, other, 6, "--lora_dropout=0.1", "--lora_alpha=8", cache=cache))
    assert r.returncode != 0 and f"the base {other} (--init_from={other}) has changed" in r.stderr, r.stderr[-2000:]
    with pytest.raises(CheckpointError, match="its base .*nowhere.* is missing"):
        k2jax.load(split, base=str(tmp_path / "nowhere"))
    k2jax.load(split, base=moved)  # the same base elsewhere loads
    r = _cli(*_train_args(split, hf_tiny[0], 6, "--lora_rank=8", cache=cache))
    assert r.returncode != 0 and "trained with LoRA rank=4, this run asks for 8 (--lora_rank)" in r.stderr


def test_merged_export_loads_in_transformers_with_the_lora_logits(lora_runs, tmp_path):
    """The run's unmerged and merged models agree; `k2jax-convert --to_hf --merge_lora` writes weights that
    transformers loads and that give the LoRA model's logits to 1e-4 (float32)."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    from k2jax.ckpt.orbax import resolve_step_dir
    from k2jax.testing.reference import hf_logits

    unmerged = k2jax.load(lora_runs["all"], dtype="float32")
    merged = k2jax.load(lora_runs["all"], dtype="float32", merge=True)
    assert unmerged.lora is not None and merged.lora is None
    tokens = np.random.default_rng(5).integers(0, unmerged.config.vocab_size, (2, 48)).astype(np.int32)
    ref = np.asarray(unmerged.logits(tokens))
    np.testing.assert_allclose(np.asarray(merged.logits(tokens)), ref, rtol=0, atol=1e-4)
    out = str(tmp_path / "merged_hf")
    r = _cli("convert", "--to_hf", f"--checkpoint_dir={lora_runs['all']}", f"--output_dir={out}", "--merge_lora",
             "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    model = DeepseekV3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    got = hf_logits(model, tokens)
    step_dir = resolve_step_dir(lora_runs["all"])
    base_path = json.load(open(os.path.join(step_dir, "config", "metadata")))["lora"]["base"]["path"]
    base_model = DeepseekV3ForCausalLM.from_pretrained(base_path, torch_dtype=torch.float32).eval()
    assert np.abs(hf_logits(base_model, tokens) - ref).max() > 1e-2  # the adapters changed the model
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    r = _cli("convert", "--to_hf", f"--checkpoint_dir={lora_runs['all']}", f"--output_dir={tmp_path / 'x'}")
    assert r.returncode != 0 and "--merge_lora" in r.stderr and "--adapter_only" in r.stderr
    fp8 = str(tmp_path / "merged_fp8")  # merged, then re-quantised as the release is: k2jax reads it back
    r = _cli("convert", "--to_hf", f"--checkpoint_dir={lora_runs['all']}", f"--output_dir={fp8}", "--merge_lora",
             "--fp8", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    scales = [n for n in json.load(open(os.path.join(fp8, "model.safetensors.index.json")))["weight_map"]
              if n.endswith("_scale_inv")]
    assert any(".mlp.experts." in n for n in scales) and any("q_b_proj" in n for n in scales)
    got8 = np.asarray(k2jax.load_hf(fp8).logits(tokens))
    assert np.sqrt(np.mean((got8 - ref) ** 2)) < 0.1 * np.std(ref)  # fp8's ~2^-4 relative rounding, not a new model


def test_peft_adapter_loads_onto_the_base_with_the_lora_logits(lora_runs, hf_tiny, tmp_path):
    """`--adapter_only` writes a PEFT folder: PeftModel.from_pretrained on the base (attention adapters as LoRA
    modules, each routed expert's fused by PEFT onto transformers' stacked experts) gives the k2jax LoRA model's
    logits to 1e-4; a run that adapted the dense MLP or the shared expert is refused, naming why."""
    import torch
    from peft import PeftModel
    from transformers import DeepseekV3ForCausalLM

    from k2jax.testing.reference import hf_logits

    out = str(tmp_path / "peft")
    r = _cli("convert", "--to_hf", f"--checkpoint_dir={lora_runs['peft']}", f"--output_dir={out}", "--adapter_only")
    assert r.returncode == 0, r.stderr[-3000:]
    base = DeepseekV3ForCausalLM.from_pretrained(hf_tiny[0], torch_dtype=torch.float32).eval()
    tokens = np.random.default_rng(6).integers(0, base.config.vocab_size, (2, 48)).astype(np.int32)
    base_logits = hf_logits(base, tokens)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith("lora_A")}
    cfg = k2jax.load_config("tiny")
    assert sum(".self_attn." in n for n in wrapped) == 5 * cfg.num_hidden_layers
    assert sum(n.endswith("mlp.experts") for n in wrapped) == cfg.num_moe_layers  # the experts' adapters, fused
    ref = np.asarray(k2jax.load(lora_runs["peft"], dtype="float32").logits(tokens))
    got = hf_logits(peft_model, tokens)
    assert np.abs(base_logits - ref).max() > 1e-2  # positive control: the adapters matter
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)
    r = _cli("convert", "--to_hf", f"--checkpoint_dir={lora_runs['all']}", f"--output_dir={tmp_path / 'p2'}",
             "--adapter_only")
    assert r.returncode != 0 and "dense_mlp,shared" in r.stderr and "--merge_lora" in r.stderr, r.stderr


def test_unmerged_decode_equals_a_full_forward_and_generate_applies_the_adapters(lora_runs):
    """Decoding with unmerged adapters (kv_b's absorbed through its factors, each chosen expert's read in place):
    every step's logits equal a full forward's to 1e-4; `k2jax-generate --prompt_ids` unmerged and with --merge
    print Model.generate's tokens."""
    model = k2jax.load(lora_runs["all"], dtype="float32")
    prompts = [[5, 9, 200, 31, 7], [17, 4, 99]]
    sampler = model.sampler()
    logits, cache, lengths = sampler.prefill(prompts, sampler.check_request(prompts, 8))
    seqs, pos, got = [list(p) for p in prompts], jnp.asarray(lengths), []
    for _ in range(8):
        got.append(np.asarray(logits))
        tok = np.asarray(logits).argmax(-1).astype(np.int32)
        for i, s in enumerate(seqs):
            s.append(int(tok[i]))
        with jax.set_mesh(model.mesh):
            logits, cache = sampler.jit_decode_step(model.state, cache, jnp.asarray(tok), pos)
        pos = pos + 1
    for i, s in enumerate(seqs):
        want = np.asarray(model.logits(np.array([s[:-1]])))[0][len(prompts[i]) - 1:]
        np.testing.assert_allclose(np.stack([g[i] for g in got]), want, atol=1e-4, rtol=0)
    ids = "5,9,200,31,7;17,4,99"
    expect = "\n".join(",".join(map(str, o)) for o in model.generate(prompts, max_new_tokens=8))
    for extra in ((), ("--merge",)):
        r = _cli("generate", f"--checkpoint_dir={lora_runs['all']}", f"--prompt_ids={ids}", "--temperature=0",
                 "--max_new_tokens=8", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.strip().splitlines()[-2:] == expect.splitlines(), (extra, r.stdout)
    from k2jax.ckpt.lora import read_lora
    from k2jax.ckpt.orbax import resolve_step_dir

    base_path = read_lora(resolve_step_dir(lora_runs["all"]))[1]["path"]
    base_ids = k2jax.load_hf(base_path).generate(prompts, max_new_tokens=8)
    assert base_ids != model.generate(prompts, max_new_tokens=8)  # positive control: the adapters change the text
