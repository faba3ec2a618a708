"""Peak memory of `diffusion-moe convert llada2` on a synthetic multi-GB sharded checkpoint.

The converter streams tensors shard by shard and fuses one layer's experts at a time, so
its peak resident memory should track the largest shard, not the model. This writes a
synthetic LLaDA2 checkpoint (bf16, several shards; a layer's experts straddle shard
boundaries), converts it in a fresh process and reports that process's peak RSS (VmHWM)
against the largest shard. RSS counts the pages of the memory-mapped input shard too.

    python benchmarks/convert_memory.py --experts 128 --layers 8 --shard-mb 600
    python benchmarks/convert_memory.py --mini --layers 4 --shard-mb 2000   # real LLaDA2.0-mini layers
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffusion_moe.conversion.llada2 import llada2_tensor_shapes

_CHILD = """
import json, sys, threading, time
from diffusion_moe.cli import main

def status_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

peak_anon = 0
def sample():  # RssAnon has no high-water mark: poll it
    global peak_anon
    while True:
        peak_anon = max(peak_anon, status_kb("RssAnon"))
        time.sleep(0.01)

baseline, baseline_anon = status_kb("VmHWM"), status_kb("RssAnon")
threading.Thread(target=sample, daemon=True).start()
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "baseline_kb": baseline, "peak_kb": status_kb("VmHWM"),
                  "baseline_anon_kb": baseline_anon, "peak_anon_kb": peak_anon}))
"""


def synthetic_config(num_experts: int, num_layers: int, mini: bool) -> dict:
    """A small LLaDA2-like config, or (`mini`) LLaDA2.0-mini's exact sizes with fewer layers."""
    config = {
        "model_type": "llada2_moe", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": num_layers, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
        "use_bias": False, "use_qkv_bias": False, "rms_norm_eps": 1e-6, "rope_theta": 600000,
        "partial_rotary_factor": 0.5, "num_experts": num_experts, "num_shared_experts": 1,
        "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
        "moe_intermediate_size": 512, "first_k_dense_replace": 1, "pad_token_id": 156,
    }
    if mini:
        config.update(vocab_size=157184, hidden_size=2048, intermediate_size=5120, num_attention_heads=16,
                      num_key_value_heads=4, num_experts=256)
    return config


def write_synthetic_checkpoint(folder: Path, config: dict, shard_bytes: int) -> list[int]:
    """Write shards of about `shard_bytes` one at a time (never the whole model in memory)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    shards, current, size = [], {}, 0
    for key, shape in llada2_tensor_shapes(config).items():
        dtype = torch.float32 if key.endswith("expert_bias") else torch.bfloat16
        current[key] = torch.full(shape, 0.01, dtype=dtype)
        size += current[key].numel() * current[key].element_size()
        if size >= shard_bytes:
            shards.append(current)
            save_file(current, folder / f"part-{len(shards)}.safetensors", metadata={"format": "pt"})
            current, size = {}, 0
            shards[-1] = {k: None for k in shards[-1]}  # keep the names, free the tensors
    if current:
        save_file(current, folder / f"part-{len(shards) + 1}.safetensors", metadata={"format": "pt"})
        shards.append(dict.fromkeys(current))
    weight_map, sizes = {}, []
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i + 1}.safetensors").rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
        sizes.append((folder / final).stat().st_size)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=600, help="input and output shard size")
    parser.add_argument("--mini", action="store_true", help="LLaDA2.0-mini's layer sizes (256 experts, hidden 2048)")
    parser.add_argument("--workdir", default=None, help="where to write (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        src, dst = Path(tmp) / "llada2", Path(tmp) / "converted"
        start = time.perf_counter()
        config = synthetic_config(args.experts, args.layers, args.mini)
        sizes = write_synthetic_checkpoint(src, config, args.shard_mb * 10**6)
        print(f"synthetic checkpoint: {sum(sizes) / 2**30:.2f} GiB in {len(sizes)} shards, "
              f"largest {max(sizes) / 2**20:.0f} MiB (written in {time.perf_counter() - start:.0f}s)")
        argv = ["convert", "llada2", str(src), str(dst), "--max-shard-size", f"{args.shard_mb}MB",
                "--mask-token-id", "157", "--eos-token-id", "156"]
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-c", _CHILD, *argv], capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        result = json.loads(run.stdout.strip().splitlines()[-1])
        assert result["rc"] == 0, run.stderr
        out_sizes = [p.stat().st_size for p in dst.glob("*.safetensors")]
        peak, base = result["peak_kb"] * 1024, result["baseline_kb"] * 1024
        largest = max(sizes)
        print(f"converted in {seconds:.0f}s to {len(out_sizes)} shards (largest {max(out_sizes) / 2**20:.0f} MiB)")
        print(f"peak RSS {peak / 2**20:.0f} MiB (after imports {base / 2**20:.0f} MiB; "
              f"conversion adds {(peak - base) / 2**20:.0f} MiB)")
        anon = (result["peak_anon_kb"] - result["baseline_anon_kb"]) * 1024
        print(f"of which anonymous (not file-backed, cannot be paged out) {anon / 2**20:.0f} MiB; the rest "
              "is pages of the memory-mapped shards")
        print(f"model size / largest shard: {sum(sizes) / largest:.1f}; "
              f"peak RSS / largest shard: {peak / largest:.2f}; "
              f"(peak - baseline) / largest shard: {(peak - base) / largest:.2f}; "
              f"anonymous increase / largest shard: {anon / largest:.2f}")


if __name__ == "__main__":
    main()
