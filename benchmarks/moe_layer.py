"""Forward+backward throughput of one MoE layer on CPU, every router side by side.

Compares this library's token choice (dropless and capacity 1.25), expert choice and block
routing with (a) Transformers' own Qwen3-MoE sparse block at identical sizes, using its
fastest experts implementation that fits in memory, and (b) a dense SwiGLU MLP doing the
same active FLOPs (intermediate = k * moe_intermediate_size): the practical limit.

    python benchmarks/moe_layer.py [--tokens-per-seq 512 --batch 8 --repeats 5]
"""

import argparse
import statistics
import time

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from diffusion_moe import DiffusionMoeConfig
from diffusion_moe.modeling.modeling_diffusion_moe import DiffusionMoeMLP, DiffusionMoeSparseMoeBlock
from diffusion_moe.modeling.experts import EXPERT_CHOICE_STATIC
from diffusion_moe.modeling.routing import routing_inputs_for


def step_seconds(layer_call, params, x):
    for p in params:
        p.grad = None
    start = time.perf_counter()
    layer_call(x).float().pow(2).mean().backward()
    return time.perf_counter() - start


def interleaved_rates(layers: dict, x, repeats: int) -> dict:
    """Tokens/s per layer, timing the layers round-robin so a change in machine load hits
    every layer alike; the first round is warm-up, then the median of `repeats` rounds."""
    times = {name: [] for name in layers}
    for round_ in range(repeats + 1):
        for name, (call, params) in layers.items():
            seconds = step_seconds(call, params, x)
            if round_:
                times[name].append(seconds)
    return {name: x.shape[0] * x.shape[1] / statistics.median(t) for name, t in times.items()}


def init_(module, std=0.02):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens-per-seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    H, E, k, I = args.hidden, args.experts, args.top_k, args.intermediate
    x = torch.randn(args.batch, args.tokens_per_seq, H, requires_grad=True)
    padding = torch.ones(args.batch, args.tokens_per_seq, dtype=torch.bool)
    positions = torch.arange(args.tokens_per_seq).expand(args.batch, -1)

    def ours(**overrides):
        config = DiffusionMoeConfig(
            hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I,
            num_attention_heads=8, num_key_value_heads=8, **overrides,
        )
        # what the model picks by default: expert choice's static-shape dispatch, Transformers' grouped_mm else
        config._experts_implementation = EXPERT_CHOICE_STATIC if config.router_type == "expert_choice" else "grouped_mm"
        block = init_(DiffusionMoeSparseMoeBlock(config))
        return (lambda h: block(h, routing_inputs_for(config, padding, positions))), list(block.parameters())

    rows = {}
    rows["TC dropless"] = ours(router_type="token_choice")
    rows["TC capacity 1.25"] = ours(router_type="token_choice", capacity_factor=1.25)
    rows["EC"] = ours(router_type="expert_choice")
    rows["block (dMoE)"] = ours(router_type="block", router_score_function="sigmoid")

    for implementation in ("grouped_mm", "eager"):  # batched_mm copies weights per token: out of memory here
        qwen_config = Qwen3MoeConfig(
            hidden_size=H, num_experts=E, num_experts_per_tok=k, moe_intermediate_size=I, norm_topk_prob=True
        )
        qwen_config._experts_implementation = implementation
        qwen = init_(Qwen3MoeSparseMoeBlock(qwen_config))
        rows[f"Qwen3-MoE block ({implementation})"] = (qwen, list(qwen.parameters()))
    dense_name = f"dense SwiGLU, I={k * I}"
    dense_config = DiffusionMoeConfig(hidden_size=H, intermediate_size=k * I, num_attention_heads=8, num_key_value_heads=8)
    dense = init_(DiffusionMoeMLP(dense_config))
    rows[dense_name] = (dense, list(dense.parameters()))

    results = interleaved_rates(rows, x, args.repeats)
    qwen_name = max((n for n in results if n.startswith("Qwen3")), key=results.get)  # its best implementation
    best_qwen = (qwen_name, results[qwen_name])
    dense_rate = results[dense_name]

    print(f"One MoE layer, forward+backward, CPU threads={torch.get_num_threads()}: "
          f"H={H} E={E} k={k} I={I}, {args.batch} x {args.tokens_per_seq} tokens")
    print(f"| layer | tokens/s | vs TC dropless | vs Qwen3-MoE | vs dense |")
    print("|---|---:|---:|---:|---:|")
    for name, rate in results.items():
        print(f"| {name} | {rate:,.0f} | {rate / results['TC dropless']:.2f}x | "
              f"{rate / best_qwen[1]:.2f}x | {rate / dense_rate:.0%} |")
    print()
    print(f"EC / TC dropless = {results['EC'] / results['TC dropless']:.2f}x (target >= 1.3x)")
    print(f"TC dropless / {best_qwen[0]} = {results['TC dropless'] / best_qwen[1]:.2f}x (target >= 1.0x)")
    print(f"EC / dense-equivalent = {results['EC'] / dense_rate:.0%} (target >= 60%)")


if __name__ == "__main__":
    main()
