"""Peak host memory and throughput of k2jax-convert on a synthetic FP8 checkpoint in the official layout.

    python benchmarks/convert_memory.py [--gb 4.5 --dir /tmp/k2jax_convert_bench --workers 2]

Generates (once) an FP8 checkpoint of wide experts over several layers, several shards plus an index, then
runs the converter in a child process and reports its peak RSS (ru_maxrss) and source GB/s next to the size
of the largest source tensor and the speed of simply reading the same files.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import ml_dtypes
import numpy as np


def make_checkpoint(folder, gb):
    from k2jax.model.config import load_config, to_hf_config
    from k2jax.ckpt.safetensors import write_safetensors

    # K2's expert shapes (7168 x 2048); enough MoE layers to pass `gb` of FP8 expert weights
    per_layer = 16 * 3 * 7168 * 2048
    layers = max(2, int(np.ceil(gb * 1e9 / per_layer)) + 1)
    config = load_config("kimi_k2", vocab_size=32768, num_hidden_layers=layers, n_routed_experts=16,
                         num_experts_per_tok=2, intermediate_size=4096, bos_token_id=32512, eos_token_id=32513,
                         pad_token_id=32767)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    weight_map = {}

    def linear(out, inp):
        q = rng.standard_normal((out, inp), np.float32).astype(ml_dtypes.float8_e4m3fn)
        return q, rng.uniform(1e-3, 2e-3, (-(-out // 128), -(-inp // 128))).astype(np.float32)

    def emit(shard, tensors):
        fname = f"model-{shard}-of-{layers + 1}.safetensors"
        write_safetensors(os.path.join(folder, fname), tensors)
        weight_map.update({n: fname for n in tensors})

    c = config
    d = c.hidden_size
    top = {"model.embed_tokens.weight": rng.standard_normal((c.vocab_size, d), np.float32).astype(ml_dtypes.bfloat16),
           "lm_head.weight": rng.standard_normal((c.vocab_size, d), np.float32).astype(ml_dtypes.bfloat16),
           "model.norm.weight": np.ones(d, ml_dtypes.bfloat16)}
    emit(layers + 1, top)
    for layer in range(layers):
        t, p = {}, f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = np.ones(d, ml_dtypes.bfloat16)
        t[p + "post_attention_layernorm.weight"] = np.ones(d, ml_dtypes.bfloat16)
        t[p + "self_attn.q_a_layernorm.weight"] = np.ones(c.q_lora_rank, ml_dtypes.bfloat16)
        t[p + "self_attn.kv_a_layernorm.weight"] = np.ones(c.kv_lora_rank, ml_dtypes.bfloat16)
        shapes = {"self_attn.q_a_proj": (c.q_lora_rank, d),
                  "self_attn.q_b_proj": (c.num_attention_heads * c.qk_head_dim, c.q_lora_rank),
                  "self_attn.kv_a_proj_with_mqa": (c.kv_lora_rank + c.qk_rope_head_dim, d),
                  "self_attn.kv_b_proj": (c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank),
                  "self_attn.o_proj": (d, c.num_attention_heads * c.v_head_dim)}
        if layer == 0:
            shapes.update({"mlp.gate_proj": (c.intermediate_size, d), "mlp.up_proj": (c.intermediate_size, d),
                           "mlp.down_proj": (d, c.intermediate_size)})
        else:
            f = c.moe_intermediate_size
            for e in range(c.n_routed_experts):
                shapes.update({f"mlp.experts.{e}.gate_proj": (f, d), f"mlp.experts.{e}.up_proj": (f, d),
                               f"mlp.experts.{e}.down_proj": (d, f)})
            shapes.update({"mlp.shared_experts.gate_proj": (f, d), "mlp.shared_experts.up_proj": (f, d),
                           "mlp.shared_experts.down_proj": (d, f)})
            t[p + "mlp.gate.weight"] = (0.01 * rng.standard_normal((c.n_routed_experts, d), np.float32)).astype(
                ml_dtypes.bfloat16)
            t[p + "mlp.gate.e_score_correction_bias"] = np.zeros(c.n_routed_experts, np.float32)
        for name, shape in shapes.items():
            t[p + name + ".weight"], t[p + name + ".weight_scale_inv"] = linear(*shape)
        emit(layer + 1, t)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    hf = to_hf_config(config)
    hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf, f)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gb", type=float, default=4.5)
    p.add_argument("--dir", default="/tmp/k2jax_convert_bench")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    src, out = os.path.join(args.dir, "hf_fp8"), os.path.join(args.dir, "k2jax")
    if not os.path.exists(os.path.join(src, "config.json")):
        t0 = time.perf_counter()
        make_checkpoint(src, args.gb)
        print(f"generated {src} in {time.perf_counter() - t0:.0f}s")
    from k2jax.ckpt.safetensors import SafetensorsFolder

    folder = SafetensorsFolder(src)
    files = [os.path.join(src, f) for f in os.listdir(src) if f.endswith(".safetensors")]
    size = sum(os.path.getsize(f) for f in files)
    largest = max(int(np.prod(folder.info(n)[1])) * folder.info(n)[0].itemsize for n in folder.names())
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    read_rate = size / (time.perf_counter() - t0) / 1e9
    subprocess.run(["rm", "-rf", out])
    os.system("sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "k2jax.cli.convert", f"--hf_dir={src}", f"--output_dir={out}",
                        "--dtype=bfloat16", f"--workers={args.workers}", "--quiet"], capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode:
        sys.exit(r.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    probe = os.path.join(args.dir, "write_probe")  # the disk's own write speed: 2 GB written and fsync'ed
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    with open(probe, "wb") as f:
        for _ in range(32):
            f.write(block)
        os.fsync(f.fileno())
    write_rate = 32 * block.nbytes / (time.perf_counter() - t0) / 1e9
    os.remove(probe)
    print(f"source: {len(files)} shards, {len(folder.names())} tensors, {size / 1e9:.2f} GB; largest tensor "
          f"{largest / 1e6:.1f} MB")
    print(f"plain read of the files: {read_rate:.2f} GB/s")
    print(f"k2jax-convert (bf16, {args.workers} workers): {dt:.1f}s = {size / dt / 1e9:.2f} GB/s of source "
          f"({size / dt / 1e9 / read_rate:.0%} of plain read), peak RSS {peak / 2**30:.2f} GiB")
    print(f"written: {written / 1e9:.2f} GB at {written / dt / 1e9:.2f} GB/s; the disk's fsync'ed write speed "
          f"{write_rate:.2f} GB/s, so writing the output alone takes >= {written / 1e9 / write_rate:.1f}s "
          f"(source rate <= {size / 1e9 / (written / 1e9 / write_rate):.2f} GB/s = "
          f"{size / 1e9 / (written / 1e9 / write_rate) / read_rate:.0%} of plain read)")


if __name__ == "__main__":
    main()
