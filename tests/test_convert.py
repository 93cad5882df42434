"""k2jax-convert: bf16 and FP8 (official block-scaled layout) imports, round trip, resume, errors."""

import json
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import k2jax
from k2jax.ckpt.convert import export_hf, import_hf
from k2jax.ckpt.safetensors import CheckpointError, SafetensorsFolder, write_safetensors
from k2jax.testing.reference import build_hf_model, dequant_reference, hf_logits, write_fp8_release

# hidden 160 and expert width 96: every FP8 block grid has partial edge blocks
ODD = dict(hidden_size=160, moe_intermediate_size=96, intermediate_size=200)


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "k2jax.cli.convert", *args], capture_output=True, text=True, env=env)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory, tiny_config):
    """(folder, torch model holding the dequantised weights): an FP8 checkpoint in 3 shards plus an index."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from k2jax.model.config import to_hf_config

    base = tmp_path_factory.mktemp("fp8_src")
    config = tiny_config.replace(**ODD)
    build_hf_model(config, str(base), seed=4)
    out = tmp_path_factory.mktemp("fp8")
    dequant = write_fp8_release(str(base), str(out))
    torch_model = DeepseekV3ForCausalLM(DeepseekV3Config(**to_hf_config(config))).float().eval()
    from k2jax.testing.reference import load_official_names

    load_official_names(torch_model, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in dequant.items()})
    return str(out), torch_model


def test_fp8_import_matches_dequantised_reference(fp8_checkpoint, tmp_path, tokens_2x64):
    folder, torch_model = fp8_checkpoint
    r = _cli(f"--hf_dir={folder}", f"--output_dir={tmp_path / 'out'}", "--dtype=float32", "--workers=3", "--verify",
             "--quiet")
    assert r.returncode == 0, r.stderr
    model = k2jax.load(str(tmp_path / "out"), dtype="float32")
    assert np.abs(np.asarray(model.logits(tokens_2x64)) - hf_logits(torch_model, tokens_2x64)).max() <= 1e-4


def test_strips_of_large_tensors_give_the_same_checkpoint(fp8_checkpoint, tmp_path):
    """Units over chunk_bytes are read, dequantised and written in strips of source rows: same arrays."""
    from k2jax.ckpt import convert
    from k2jax.ckpt.hf import tensor_maps

    folder, _ = fp8_checkpoint
    whole = k2jax.load(import_hf(folder, str(tmp_path / "whole"), dtype="float32", quiet=True))
    stripped = import_hf(folder, str(tmp_path / "strips"), dtype="float32", quiet=True, verify=True,
                         chunk_bytes=20_000)
    src = SafetensorsFolder(folder)
    fp8 = {m.path: src.info(m.hf_names()[0])[0] == np.dtype(ml_dtypes.float8_e4m3fn)
           for m in tensor_maps(whole.config, k2jax.model.init.abstract_model(whole.config)[1])}
    splits = {m.path: convert._split(m, 4, fp8[m.path], 20_000)
              for m in tensor_maps(whole.config, k2jax.model.init.abstract_model(whole.config)[1])}
    assert splits[("lm_head",)] and splits[("embed",)] and any(s and fp8[p] for p, s in splits.items()), splits
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(whole.state), nnx.to_flat_state(k2jax.load(stripped).state)):
        assert pa == pb and np.array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value())), pa


def test_bf16_round_trip_is_bit_exact_and_loads_in_transformers(hf_tiny, tmp_path, tokens_2x64):
    import torch
    from transformers import DeepseekV3ForCausalLM

    src = tmp_path / "bf16"
    DeepseekV3ForCausalLM.from_pretrained(hf_tiny[0], dtype=torch.bfloat16).save_pretrained(src)
    import_hf(str(src), str(tmp_path / "ck"), dtype="bfloat16", quiet=True)
    r = _cli("--to_hf", f"--checkpoint_dir={tmp_path / 'ck'}", f"--output_dir={tmp_path / 'back'}", "--quiet")
    assert r.returncode == 0, r.stderr
    a, b = SafetensorsFolder(str(src)), SafetensorsFolder(str(tmp_path / "back"))
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert a.get(n).dtype == b.get(n).dtype and np.array_equal(a.get(n), b.get(n)), n
    reloaded = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back")).float().eval()
    original = DeepseekV3ForCausalLM.from_pretrained(str(src)).float().eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens_2x64), hf_logits(original, tokens_2x64))
    model = k2jax.load(str(tmp_path / "ck"), dtype="float32")
    assert np.abs(np.asarray(model.logits(tokens_2x64)) - hf_logits(original, tokens_2x64)).max() <= 1e-4


def test_token_ids_a_folder_leaves_unset_stay_unset_and_ids_outside_the_vocabulary_are_refused(tiny_config, tmp_path):
    """A folder saved by transformers' DeepseekV3Config defaults (no pad id) with a vocabulary smaller than K2's
    special-token range: the exported config.json has the source's token ids, no K2 pad id, and transformers
    loads it (it refused an out-of-vocabulary pad id: the positive control); an id outside the vocabulary in a
    source config.json is refused at load, naming the field."""
    import json

    import torch
    from transformers import DeepseekV3ForCausalLM

    from k2jax.errors import ConfigError

    small = tiny_config.replace(vocab_size=777, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    src = tmp_path / "src"
    build_hf_model(small, str(src))
    raw = json.load(open(src / "config.json"))
    ids = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    assert ids["pad_token_id"] is None  # what transformers writes by default
    export_hf(import_hf(str(src), str(tmp_path / "ck"), dtype="float32", quiet=True), str(tmp_path / "back"),
              quiet=True)
    back = json.load(open(tmp_path / "back" / "config.json"))
    assert {k: back.get(k) for k in ids} == ids, back
    DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    bad = dict(back, pad_token_id=163839)  # K2's pad id, which the earlier export wrote whatever the vocabulary
    json.dump(bad, open(tmp_path / "back" / "config.json", "w"))
    with pytest.raises(Exception, match="(?i)padding_idx"):
        DeepseekV3ForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32)
    with pytest.raises(ConfigError, match="config field 'pad_token_id': 163839 is not an id of the vocabulary .config field 'vocab_size': 777."):
        k2jax.load_hf(str(tmp_path / "back"))


def test_fp8_export_requantises_in_the_official_layout(hf_tiny, tmp_path):
    import_hf(hf_tiny[0], str(tmp_path / "ck"), dtype="float32", quiet=True)
    from k2jax.ckpt.convert import export_hf

    export_hf(str(tmp_path / "ck"), str(tmp_path / "fp8"), fp8=True, quiet=True)
    out, ref = SafetensorsFolder(str(tmp_path / "fp8")), SafetensorsFolder(hf_tiny[0])
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    q, s = out.get(name), out.get(name + "_scale_inv")
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and s.dtype == np.float32
    assert s.shape == (-(-q.shape[0] // 128), -(-q.shape[1] // 128))
    np.testing.assert_allclose(dequant_reference(q, s), ref.get(name), rtol=0.07, atol=1e-6)
    assert json.load(open(tmp_path / "fp8" / "config.json"))["quantization_config"]["weight_block_size"] == [128, 128]


def test_fp8_export_reimported_through_the_cli_keeps_every_tensor_within_its_bound(hf_tiny, tmp_path):
    """A bf16 checkpoint exported with `k2jax-convert --to_hf --fp8` and imported again with `k2jax-convert`:
    every linear layer (Muon's matrices, experts included) is e4m3 with 128x128 scales in the export and comes back
    within fp8's rounding (2^-4 relative, plus one subnormal step at the largest block scale); the embedding,
    lm_head and norms stay bfloat16 and the router and its bias float32, bit for bit."""
    from k2jax.ckpt.orbax import resolve_step_dir
    from k2jax.ckpt.orbax import leaf_reader
    from k2jax.model.params import spec_of

    ck, fp8, back = (str(tmp_path / n) for n in ("ck", "fp8", "back"))
    import_hf(hf_tiny[0], ck, dtype="bfloat16", quiet=True)
    for args in (("--to_hf", f"--checkpoint_dir={ck}", f"--output_dir={fp8}", "--fp8", "--quiet"),
                 (f"--hf_dir={fp8}", f"--output_dir={back}", "--dtype=bfloat16", "--quiet")):
        r = _cli(*args)
        assert r.returncode == 0, r.stderr[-3000:]
    out = SafetensorsFolder(fp8)
    kinds = {}
    for name in out.names():
        if name.endswith("_scale_inv"):
            continue
        kinds.setdefault(str(out.info(name)[0]), []).append(name)
    assert all("norm" in n or "embed" in n or "lm_head" in n for n in kinds["bfloat16"])
    assert all(n.endswith(("mlp.gate.weight", "e_score_correction_bias")) for n in kinds["float32"])
    assert any(".experts." in n for n in kinds["float8_e4m3fn"]) and any("o_proj" in n for n in kinds["float8_e4m3fn"])
    a, b = (leaf_reader(os.path.join(resolve_step_dir(d), "model")) for d in (ck, back))
    from k2jax.model.init import abstract_model

    _, abstract = abstract_model(k2jax.load_config("tiny"))
    checked = 0
    for path, _ in nnx.to_flat_state(abstract):
        path = tuple(str(p) for p in path)
        w, got = (np.asarray(r(path, ()), np.float64) for r in (a, b))
        spec = spec_of(path)
        if spec.group == "muon" and not spec.float32:
            sub = 2.0 ** -9 * np.abs(w).max() / 448  # one subnormal step of e4m3 at the largest block scale
            assert (np.abs(got - w) <= 2.0 ** -4 * np.abs(w) + sub).all(), path
            assert not np.array_equal(got, w), path  # positive control: these did go through fp8
        else:
            np.testing.assert_array_equal(got, w, err_msg=str(path))
        checked += 1
    assert checked == len(list(nnx.to_flat_state(abstract)))


def test_interrupted_conversion_resumes_to_an_identical_checkpoint(hf_tiny, tmp_path, monkeypatch):
    from k2jax.ckpt import hf as hf_mod

    import_hf(hf_tiny[0], str(tmp_path / "straight"), dtype="bfloat16", quiet=True)
    calls = {"n": 0}
    original = hf_mod.HFSource.unit

    def interrupted(self, m, name, dtype):
        calls["n"] += 1
        if calls["n"] > 60:
            raise KeyboardInterrupt  # Ctrl-C part way
        return original(self, m, name, dtype)

    monkeypatch.setattr(hf_mod.HFSource, "unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_hf(hf_tiny[0], str(tmp_path / "resumed"), dtype="bfloat16", workers=1, quiet=True)
    with pytest.raises(CheckpointError, match=r"no complete k2jax checkpoint \(unfinished: 0.partial\)"):
        k2jax.load(str(tmp_path / "resumed"))
    monkeypatch.setattr(hf_mod.HFSource, "unit", original)
    done_before = len(os.listdir(tmp_path / "resumed" / "0.partial" / "done"))
    assert 50 <= done_before <= 60
    counting = {"n": 0}

    def count(self, m, name, dtype):
        counting["n"] += 1
        return original(self, m, name, dtype)

    monkeypatch.setattr(hf_mod.HFSource, "unit", count)
    import_hf(hf_tiny[0], str(tmp_path / "resumed"), dtype="bfloat16", workers=2, quiet=True)
    total = len(SafetensorsFolder(hf_tiny[0]).names())
    assert counting["n"] == total - done_before  # finished tensors were skipped
    a, b = k2jax.load(str(tmp_path / "straight")), k2jax.load(str(tmp_path / "resumed"))
    for (pa, va), (pb, vb) in zip(nnx.to_flat_state(a.state), nnx.to_flat_state(b.state)):
        assert pa == pb and np.array_equal(np.asarray(va.get_value()), np.asarray(vb.get_value()))


def test_converted_checkpoint_on_eight_devices(hf_tiny, tmp_path, tokens_2x64):
    import_hf(hf_tiny[0], str(tmp_path / "ck"), dtype="float32", quiet=True)
    one = np.asarray(k2jax.load(str(tmp_path / "ck")).logits(tokens_2x64))
    eight = k2jax.load(str(tmp_path / "ck"), mesh="fsdp=2,expert=2,tensor=2")
    np.testing.assert_allclose(np.asarray(eight.logits(tokens_2x64)), one, atol=1e-5, rtol=0)


def _edited(hf_dir, dst, edit_tensors=None, edit_index=None):
    import shutil

    shutil.copytree(hf_dir, dst)
    folder = SafetensorsFolder(str(dst))
    tensors = {n: np.array(folder.get(n)) for n in folder.names()}
    if edit_tensors:
        edit_tensors(tensors)
    os.remove(dst / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"model-1-of-2.safetensors": names[:half], "model-2-of-2.safetensors": names[half:]}
    for f, ns in parts.items():
        write_safetensors(str(dst / f), {n: tensors[n] for n in ns})
    index = {"weight_map": {n: f for f, ns in parts.items() for n in ns}}
    if edit_index:
        edit_index(index, dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("case, message", [
    ("missing_shard", r"names shard files that are missing: model-2-of-2.safetensors"),
    ("missing_tensor", r"tensor model.layers.3.self_attn.o_proj.weight is missing \(expected shape \[128, 128\]\)"),
    ("wrong_shape", r"tensor model.layers.0.mlp.up_proj.weight has shape \[384, 127\], expected \[384, 128\]"),
    ("unknown", r"unknown tensor names not in this architecture: model.extra.a, model.extra.b"),
    ("config", r"config field 'model_type'"),
])
def test_bad_sources_fail_before_writing(hf_tiny, tmp_path, case, message):
    src = tmp_path / "src"

    def tensors(t):
        if case == "missing_tensor":
            t.pop("model.layers.3.self_attn.o_proj.weight")
        elif case == "wrong_shape":
            t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:, :127]
        elif case == "unknown":
            t["model.extra.a"] = t["model.extra.b"] = np.zeros(2, np.float32)

    def index(ix, dst):
        if case == "missing_shard":
            os.remove(dst / "model-2-of-2.safetensors")
        if case == "config":
            cfg = json.load(open(dst / "config.json"))
            cfg["model_type"] = "llama"
            (dst / "config.json").write_text(json.dumps(cfg))

    _edited(hf_tiny[0], src, tensors, index)
    with pytest.raises((CheckpointError, k2jax.ConfigError), match=message):
        import_hf(str(src), str(tmp_path / "out"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_checkpoints_of_the_earlier_layout_still_load(tmp_path, hf_tiny, tokens_2x64):
    """A checkpoint whose config item is the earlier flat dict (architecture and execution fields together)
    loads into the same model, its parameters in the dtype it names; the current layout stores the
    architecture and the saved dtype apart."""
    import dataclasses
    import json

    from k2jax.ckpt import orbax as ckpt

    model = k2jax.load_hf(hf_tiny[0])
    with ckpt.manager(str(tmp_path), async_save=False) as mgr:
        mgr.save(0, args=ckpt.save_args(model.state, model.config, "float32"))
    cfg_dir = tmp_path / "0" / "config"
    name = "metadata"  # the file Orbax's JSON handler writes
    assert json.loads((cfg_dir / name).read_text()) == {"architecture": dataclasses.asdict(model.config),
                                                        "param_dtype": "float32"}
    earlier = {**dataclasses.asdict(model.config), "param_dtype": "float32", "dtype": "float32", "scan_layers": True,
               "remat_policy": "none", "moe_impl": "auto", "moe_block_size": 0, "moe_capacity_factor": 0.0,
               "moe_block_unroll": 1, "attn_chunk": 0}
    (cfg_dir / name).write_text(json.dumps(earlier))
    old = k2jax.load(str(tmp_path))
    assert old.config == model.config and (old.execution.param_dtype, old.execution.dtype) == ("float32", "float32")
    np.testing.assert_array_equal(np.asarray(old.logits(tokens_2x64)), np.asarray(model.logits(tokens_2x64)))


def test_folders_saved_by_transformers_load_and_mtp_tensors_are_dropped(hf_tiny, tmp_path, tokens_2x64, capfd):
    """transformers' DeepseekV3Config declares one MTP layer by default and save_pretrained writes none of its
    tensors: such a folder loads as it is. With MTP tensors present (DeepSeek-V3's release) they are dropped with a
    one-line notice naming how many, and the model is unchanged."""
    import shutil

    from k2jax.ckpt.safetensors import SafetensorsFolder, write_safetensors

    folder = tmp_path / "saved"
    shutil.copytree(hf_tiny[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1
    (folder / "config.json").write_text(json.dumps(cfg))
    want = np.asarray(k2jax.load_hf(hf_tiny[0]).logits(tokens_2x64[:1, :16]))
    capfd.readouterr()
    got = np.asarray(k2jax.load_hf(str(folder)).logits(tokens_2x64[:1, :16]))
    np.testing.assert_array_equal(got, want)
    assert "multi-token-prediction" not in capfd.readouterr().err  # nothing to drop, nothing said

    layer = cfg["num_hidden_layers"]
    mtp = {f"model.layers.{layer}.eh_proj.weight": np.ones((4, 8), np.float32),
           f"model.layers.{layer}.enorm.weight": np.ones((8,), np.float32)}
    write_safetensors(str(folder / "mtp.safetensors"), mtp)
    names = SafetensorsFolder(str(folder)).names()
    index = {"metadata": {}, "weight_map": {**{n: "model.safetensors" for n in names},
                                            **{n: "mtp.safetensors" for n in mtp}}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    got = np.asarray(k2jax.load_hf(str(folder)).logits(tokens_2x64[:1, :16]))
    np.testing.assert_array_equal(got, want)
    err = capfd.readouterr().err
    assert f"dropped 2 multi-token-prediction tensors (model.layers.{layer}.*)" in err, err
    cfg["num_nextn_predict_layers"] = 0  # a tensor of a layer the config does not declare is still refused
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(k2jax.CheckpointError, match=f"unknown tensor names.*model.layers.{layer}.eh_proj"):
        k2jax.load_hf(str(folder))


def test_a_converted_step_restores_through_orbaxs_own_manager_and_other_releases_are_refused(hf_tiny, tmp_path,
                                                                                              monkeypatch):
    """The step k2jax-convert writes (Orbax's metadata written by hand, to stream) restores through the installed
    orbax-checkpoint's public CheckpointManager, model and config items alike, to the source's tensors; an
    orbax-checkpoint release whose layout was not checked is refused before anything is written."""
    import orbax.checkpoint as ocp

    from k2jax.ckpt import convert
    from k2jax.ckpt.hf import tensor_maps, units

    out = tmp_path / "ck"
    step_dir = import_hf(hf_tiny[0], str(out), dtype="float32", quiet=True)
    with ocp.CheckpointManager(str(out), options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
        assert mgr.all_steps() == [int(os.path.basename(step_dir))]
        got = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(model=ocp.args.StandardRestore(),
                                                                    config=ocp.args.JsonRestore()))
    assert got.config["architecture"]["vocab_size"] == k2jax.load_config("tiny").vocab_size
    src = SafetensorsFolder(hf_tiny[0])
    _, abstract = k2jax.abstract_model(k2jax.load_config("tiny"))
    checked = 0
    for m in tensor_maps(k2jax.load_config("tiny"), abstract):
        leaf = got.model
        for key in m.path:
            leaf = leaf[key]
        for idx, name in units(m):  # every source tensor, where the converter put it
            np.testing.assert_array_equal(np.asarray(leaf)[idx], m.to_unit(np.asarray(src.get(name), np.float32)))
            checked += 1
    assert checked > 10
    convert.check_orbax_layout()  # the installed release passes
    monkeypatch.setattr(ocp, "__version__", "0.13.0")
    with pytest.raises(CheckpointError, match="orbax-checkpoint 0.13.0 is installed"):
        import_hf(hf_tiny[0], str(tmp_path / "refused"), dtype="float32", quiet=True)
    assert not os.path.exists(tmp_path / "refused")
