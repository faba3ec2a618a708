"""Denoising speed against the hardware's limits, on a LLaDA2-shaped random model.

    python benchmarks/decode_roofline.py [--prompts 4 --new 256 --block 32 --threads 1]
        [--llada2-code DIR --llada2-python PYTHON]   # also time LLaDA2's own generate
        [--profile]                                  # where one token-choice decode spends its time

The model: LLaDA2's layout (sigmoid router with expert bias, group-limited top-k, one shared
expert, a first dense layer, partial rotary, QK norm) at 6 layers, hidden 512, 64 experts
top-8 of width 256, vocabulary 8192: 143M parameters. Each prompt (--prompt random tokens)
is decoded alone (batch 1) at one token per step (steps = block, no threshold) with the exact
cache; every routing rule runs on the same weights (retrofit by config), in float32 and in
bfloat16 (`from_pretrained(..., dtype=torch.bfloat16)`; router scores are computed in float32).

For each run it prints tokens/s, denoising forwards (`fwd`), and per denoising forward (the
prefill and cache-extension forwards, a block each, amortised into it):
  bytes = the weights a forward must read: every parameter except the embedding table and the
          routed experts, plus the unique routed experts each MoE layer chose (dMoE's metric,
          from `router_stats`) times the bytes of one expert;
  FLOPs = counted by torch's FlopCounterMode on the same decode;
and the two limits measured in the same run on one thread: the streaming read bandwidth (a
read of --stream-mib, far larger than the caches) and the best large-matmul rate of the
dtype. `%BW` is (bytes / bandwidth) / (seconds per forward): the fraction of the
weight-streaming limit; `%roof` divides by the roofline max(bytes / bandwidth, FLOPs / peak)
instead, so it says how far the forward is from whichever limit binds.

With --llada2-code/--llada2-python, the checkpoint is converted to LLaDA2's layout and
benchmarks/llada2_generate.py runs LLaDA2's published `generate` on it under that Python
(its code needs Transformers 4.56-4.57) in float32 and bfloat16, against our token choice
(the same rule) on the same weights: speed, and the share of identical tokens.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffusion_moe.configuration.configuration_diffusion_moe import DiffusionMoeConfig
from diffusion_moe.conversion.llada2 import convert_diffusion_moe_to_llada2
from diffusion_moe.modeling.modeling_diffusion_moe import DiffusionMoeForMaskedLM

sys.path.insert(0, str(Path(__file__).parent))
from generation import best_matmul_rate, counted_flops  # noqa: E402  (the FLOP counter sees grouped GEMMs)

ROUTERS = {  # label -> config overrides on the saved token-choice model
    "token choice": {"router_type": "token_choice"},
    "dMoE block coreset": {"router_type": "block", "block_router_min_experts": 8},
    "LLaDA2.2 block pool": {"router_type": "block_pool", "expert_capacity": 12},  # 48/256 of the experts
}


def llada2_shaped_config(args) -> DiffusionMoeConfig:
    return DiffusionMoeConfig(
        vocab_size=args.vocab, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=256, num_shared_experts=1, first_k_dense_replace=1, router_score_function="sigmoid",
        n_group=8, topk_group=4, routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_theta=600000.0,
        attention_layout="block_causal", block_size=args.block, mask_token_id=args.vocab - 1,
        pad_token_id=0, eos_token_id=None,
    )


def save_random_model(folder: Path, args) -> None:
    torch.manual_seed(0)
    model = DiffusionMoeForMaskedLM(llada2_shaped_config(args))
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)  # about as confident as a trained model
        for layer in model.model.layers:
            if layer.is_moe:
                layer.mlp.gate.expert_bias.normal_(0, 0.05)
    model.save_pretrained(folder)


def seconds(fn, device) -> float:
    """Wall seconds of fn(), waiting for the device's queued work."""
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def stream_bandwidth(mib: int, device) -> float:
    """Bytes/s of the fastest of a few one-pass reads (sum; one-row GEMV) of a buffer far larger than the caches."""
    buffer = torch.randn(mib * 2**20 // 4, device=device).view(-1, 1024)
    row = torch.ones(1, 1024, device=device)
    best = min(seconds(read, device) for read in (lambda: buffer.sum(), lambda: row @ buffer.t()) * 3)
    return buffer.numel() * buffer.element_size() / best


def bytes_per_forward(model, stats) -> float:
    """Weights one denoising forward reads: all but the embedding table and routed experts, plus the unique experts."""
    routed = {id(p) for layer in model.model.layers if layer.is_moe
              for p in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj)}
    embedding = model.model.embed_tokens.weight
    fixed = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in routed and p is not embedding)
    moe_layers = sum(layer.is_moe for layer in model.model.layers)
    return fixed + moe_layers * stats["expert_bytes_per_forward"]


def settings(args, new=None) -> dict:
    return dict(max_new_tokens=new or args.new, block_length=args.block, steps=args.block, return_dict_in_generate=True)


def decode(model, prompts, args):
    """Each prompt alone; (new tokens [N, new], seconds, forwards, router_stats averaged over the prompts)."""
    model.generate(prompts[:1], **settings(args, args.block))  # warm-up
    sequences, total, forwards, unique = [], 0.0, 0, []
    for prompt in prompts:
        outputs = []
        total += seconds(lambda: outputs.append(model.generate(prompt[None], **settings(args))), args.device)
        sequences.append(outputs[0].sequences[0, prompt.numel():].cpu())
        forwards += outputs[0].num_forward_passes
        unique.append(outputs[0].router_stats)
    stats = dict(unique[0], unique_experts_per_layer=sum(s["unique_experts_per_layer"] for s in unique) / len(unique))
    stats["expert_bytes_per_forward"] = stats["unique_experts_per_layer"] * stats["bytes_per_expert"]
    return torch.stack(sequences), total, forwards, stats


def flops_per_forward(model, ids, args, new=None) -> float:
    """FLOPs of one decode of `ids` over its forwards (prefill, denoising and cache extensions: a block each)."""
    outputs = []
    flops = counted_flops(lambda: outputs.append(model.generate(ids, **settings(args, new))))
    return flops / outputs[0].num_forward_passes


def run_llada2(args, folder: Path, prompts, mask_id, dtype):
    converted = folder.parent / "llada2"
    if not converted.exists():
        convert_diffusion_moe_to_llada2(folder, converted)
    spec, result = folder.parent / "prompts.json", folder.parent / "llada2_result.json"
    spec.write_text(json.dumps({"prompts": prompts.tolist(), "mask_id": mask_id}))  # lists: on the host
    subprocess.run([args.llada2_python, str(Path(__file__).parent / "llada2_generate.py"), "--code", args.llada2_code,
                    "--checkpoint", str(converted), "--prompts", str(spec), "--out", str(result),
                    "--new", str(args.new), "--block", str(args.block), "--threads", str(args.threads),
                    "--dtype", str(dtype)[6:], "--device", args.device], check=True)
    return json.loads(result.read_text())


def profile_decode(model, prompt, args):
    from torch.profiler import profile
    with profile() as prof:
        model.generate(prompt[None], **settings(args, 2 * args.block))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("prompts", 4), ("prompt", 32), ("new", 256), ("block", 32), ("vocab", 8192),
                          ("threads", 1), ("stream-mib", 1024), ("batch", 8)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--sharpen", type=float, default=30.0)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--llada2-code", default=None)
    parser.add_argument("--llada2-python", default=None)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--device", default="cpu", help="e.g. cuda (the LLaDA2 comparison then runs there too)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
    bandwidth = stream_bandwidth(args.stream_mib, args.device)
    peaks = {dtype: best_matmul_rate(repeats=10, dtype=dtype, device=args.device) for dtype in dtypes}
    where = f"{args.threads} thread(s)" if args.device == "cpu" else args.device
    print(f"{where}: streaming read {bandwidth / 1e9:.1f} GB/s; best matmul "
          + ", ".join(f"{str(d)[6:]} {peak / 1e9:.0f} GFLOP/s" for d, peak in peaks.items()))
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab - 1, (args.prompts, args.prompt), generator=generator).to(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ours"
        save_random_model(folder, args)
        print(f"{args.prompts} prompts x {args.new} tokens, block {args.block}, one token per step, batch 1")
        print(f"{'run':34s} {'tok/s':>6s} {'fwd':>5s} {'ms/fwd':>7s} {'uniq':>5s} {'MB/fwd':>7s} "
              f"{'GFLOP/fwd':>9s} {'%BW':>5s} {'%roof':>5s}")
        results = {}
        for dtype in dtypes:
            for label, overrides in ROUTERS.items():
                model = DiffusionMoeForMaskedLM.from_pretrained(folder, dtype=dtype, **overrides).to(args.device).eval()
                tokens, seconds, forwards, stats = decode(model, prompts, args)
                flops = flops_per_forward(model, prompts[:1], args)
                per_forward = seconds / forwards
                read = bytes_per_forward(model, stats)
                roof = max(read / bandwidth, flops / peaks[dtype])
                results[label, dtype] = dict(tokens=tokens, seconds=seconds, read=read)
                print(f"{label + ', ' + str(dtype)[6:]:34s} {args.prompts * args.new / seconds:6.1f} {forwards:5d} "
                      f"{per_forward * 1e3:7.1f} {stats['unique_experts_per_layer']:5.1f} {read / 1e6:7.1f} "
                      f"{flops / 1e9:9.2f} {read / bandwidth / per_forward:5.0%} {roof / per_forward:5.0%}",
                      flush=True)
                if args.profile and label == "token choice":
                    profile_decode(model, prompts[0], args)

        fp32 = torch.float32
        tc, block, pool = (results[label, fp32] for label in ROUTERS)
        for label, other in (("dMoE block coreset", block), ("LLaDA2.2 block pool", pool)):
            print(f"{label} vs token choice, fp32: speed {tc['seconds'] / other['seconds']:.2f}x for "
                  f"{tc['read'] / other['read']:.2f}x fewer bytes per forward "
                  f"(ratio {tc['seconds'] / other['seconds'] / (tc['read'] / other['read']):.2f}; target >= 0.8)")
        if torch.bfloat16 in dtypes:
            for label in ROUTERS:
                a, b = results[label, fp32], results[label, torch.bfloat16]
                agree = (a["tokens"] == b["tokens"]).float().mean().item()
                print(f"{label}: bf16 / fp32 speed {a['seconds'] / b['seconds']:.2f}x (target >= 1.7), "
                      f"tokens agree {agree:.1%}")

        model = DiffusionMoeForMaskedLM.from_pretrained(folder).to(args.device).eval()
        for batch in (1, 2, 4, args.batch):
            flops = flops_per_forward(model, prompts[:1].expand(batch, -1).contiguous(), args, args.block)
            read = results["token choice", fp32]["read"]
            bound = "compute" if flops / peaks[fp32] > read / bandwidth else "bandwidth"
            print(f"batch {batch}: {flops / 1e9:.2f} GFLOP/forward takes "
                  f"{flops / peaks[fp32] * 1e3:.1f} ms at the fp32 peak, reading the weights "
                  f"{read / bandwidth * 1e3:.1f} ms: {bound}-bound")

        if args.llada2_code and args.llada2_python:
            for dtype in dtypes:
                reference = run_llada2(args, folder, prompts, args.vocab - 1, dtype)
                seconds = sum(r["seconds"] for r in reference)
                ours = results["token choice", dtype]
                agree = (torch.tensor([r["tokens"] for r in reference]) == ours["tokens"]).float().mean().item()
                unique = sum(r["unique_experts_per_layer"] for r in reference) / len(reference)
                print(f"LLaDA2's own generate, {str(dtype)[6:]}: {args.prompts * args.new / seconds:.1f} tok/s; ours "
                      f"(token choice) {seconds / ours['seconds']:.2f}x faster (target >= 2.5); tokens identical "
                      f"{agree:.1%}; its unique experts/layer {unique:.1f}")

if __name__ == "__main__":
    main()
