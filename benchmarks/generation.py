"""Generation speed and routing footprint on a small random block-causal MoE.

    python benchmarks/generation.py [--layers 4 --hidden 256 --experts 32 --top-k 4 --prompt 256 --new 256 --block 32]

One run prints one table, side by side:
  (a) a plain LLaDA-style loop that re-runs the whole sequence at every step,
  (b) our generate() without a cache, (c) with the exact prefix cache,
  (d) confidence threshold on vs off, (e) batch 1 vs batch 8,
  (f) unique routed experts per layer per denoising forward (dMoE's metric) for the four
      routing rules on the same weights: token choice (c), dMoE's block coreset, LLaDA2.2's
      block pool (--pool experts per block, default 48/256 of --experts) and expert choice,
  (g, h) static shapes (cache_implementation="static") eager and compiled with torch.compile
  (inductor; the compile itself is not timed), at batch 1 and batch B.
The model is random; its lm_head is scaled up (--sharpen) so that its predictions are about
as confident as a trained model's and the threshold rule has something to act on. Times are
CPU seconds of this process with --threads torch threads (default 1), which stay meaningful
when other jobs share the machine (--clock wall: wall-clock seconds instead); tokens/s =
generated tokens / seconds. Block routing uses the paper's top-p 0.6 with
block_router_min_experts = top-k.

The last line bounds what batching can give on this machine: the batch-B run's FLOPs
(counted by torch's FlopCounterMode) divided by the best matmul rate measured here is the
least time any implementation could take, so batch B / batch 1 cannot exceed
B * (batch-1 seconds) / (that time).
"""

import argparse
import math
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from diffusion_moe.configuration.configuration_diffusion_moe import DiffusionMoeConfig
from diffusion_moe.modeling.modeling_diffusion_moe import DiffusionMoeForMaskedLM


def build(args, router_type):
    torch.manual_seed(0)
    config = DiffusionMoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        num_experts=args.experts, num_experts_per_tok=args.top_k, moe_intermediate_size=args.hidden // 2,
        router_type=router_type, router_score_function="sigmoid", attention_layout="block_causal",
        block_size=args.block, mask_token_id=args.vocab - 1, eos_token_id=None, pad_token_id=0,
        **({"block_router_size": args.block, "block_router_min_experts": args.top_k} if router_type == "block" else {}),
        expert_capacity=args.pool if router_type == "block_pool" else None,
    )
    model = DiffusionMoeForMaskedLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(args.sharpen)
    return model


@torch.no_grad()
def naive_generate(model, ids, new_tokens, block_length, steps, mask_id):
    """LLaDA's reference loop, written plainly: the whole sequence is re-run at every step."""
    P = ids.shape[1]
    num_blocks = -(-(P + new_tokens) // block_length)
    x = torch.full((ids.shape[0], num_blocks * block_length), mask_id)
    x[:, :P] = ids
    quota = [block_length // steps + (1 if j < block_length % steps else 0) for j in range(steps)]
    forwards = 0
    for blk in range(P // block_length, num_blocks):
        s, e = blk * block_length, (blk + 1) * block_length
        for q in quota:
            masked = x[:, s:e] == mask_id
            if not masked.any():
                break
            logits = model(x).logits[:, s:e].float()
            forwards += 1
            logits[..., mask_id] = float("-inf")
            confidence, predicted = logits.softmax(-1).max(-1)
            confidence = confidence.masked_fill(~masked, float("-inf"))
            commit = torch.zeros_like(masked).scatter(-1, confidence.topk(q, dim=-1).indices, True) & masked
            x[:, s:e] = torch.where(commit, predicted, x[:, s:e])
    return x[:, : P + new_tokens], forwards


def timed(fn, clock=time.process_time):
    """(result, seconds); CPU seconds by default: steadier than wall time on a machine shared with other jobs."""
    start = clock()
    result = fn()
    return result, clock() - start


def counted_flops(fn) -> int:
    """FLOPs of fn(), counting what FlopCounterMode misses on CPU: grouped GEMMs and CPU flash attention."""
    extra = {
        torch.ops.aten._grouped_mm: lambda a, b, *args, out_shape, **kwargs: 2 * math.prod(out_shape) * a[-1],
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return counter.get_total_flops()


def best_matmul_rate(size=None, repeats=20, dtype=torch.float32, device="cpu") -> float:
    """FLOP/s of the fastest of a few large square matmuls: an upper bound for any kernel here."""
    size = size or (1024 if torch.device(device).type == "cpu" else 8192)
    synchronize = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        a @ b
        synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("layers", 4), ("hidden", 256), ("experts", 32), ("top-k", 4), ("vocab", 1024),
                          ("prompt", 256), ("new", 256), ("block", 32), ("steps", 8), ("batch", 8)]:
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--pool", type=int, default=None, help="block pool size (default: 48/256 of --experts)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--sharpen", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = parser.parse_args()
    if args.pool is None:
        args.pool = max(args.top_k, round(args.experts * 48 / 256))
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    model = build(args, "token_choice")
    mask_id = model.config.mask_token_id
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, args.vocab - 1, (args.batch, args.prompt), generator=gen)
    one = prompts[:1]
    settings = dict(max_new_tokens=args.new, block_length=args.block, steps=args.steps, return_dict_in_generate=True)
    model.generate(one, **{**settings, "max_new_tokens": args.block})  # warm-up

    print(f"model: {args.layers} layers, H={args.hidden}, {args.experts} experts top-{args.top_k}, vocab {args.vocab}; "
          f"prompt {args.prompt}, {args.new} new tokens, block {args.block}, {args.steps} steps/block; "
          f"torch threads {torch.get_num_threads()}, {args.clock} seconds")
    print(f"{'run':32s} {'batch':>5s} {'seconds':>8s} {'forwards':>8s} {'tokens/s':>9s} {'unique experts/layer':>21s}")
    rows = []

    def add(name, batch, seconds, forwards, unique=None):
        rows.append((name, batch, seconds, forwards, batch * args.new / seconds, unique))
        shown = f"{unique:.2f}" if unique is not None else "-"
        print(f"{name:32s} {batch:5d} {seconds:8.2f} {forwards:8d} {rows[-1][4]:9.1f} {shown:>21s}", flush=True)

    (naive, naive_forwards), t = timed(
        lambda: naive_generate(model, one, args.new, args.block, args.steps, mask_id), clock
    )
    add("(a) naive full re-run", 1, t, naive_forwards)
    out_b, t = timed(lambda: model.generate(one, **settings, use_cache=False), clock)
    add("(b) ours, no cache", 1, t, out_b.num_forward_passes)
    out_c, t = timed(lambda: model.generate(one, **settings), clock)
    add("(c) ours, exact cache", 1, t, out_c.num_forward_passes, unique=out_c.router_stats["unique_experts_per_layer"])
    out_d, t = timed(lambda: model.generate(one, **settings, threshold=args.threshold), clock)
    add(f"(d) cache + threshold {args.threshold}", 1, t, out_d.num_forward_passes)
    out_e, t = timed(lambda: model.generate(prompts, **settings), clock)
    add(f"(e) cache, batch {args.batch}", args.batch, t, out_e.num_forward_passes)
    rules = {"token choice": out_c.router_stats}
    for rule, label in (("block", "dMoE block coreset"), ("block_pool", f"LLaDA2.2 pool of {args.pool}"),
                        ("expert_choice", "expert choice")):
        other = build(args, rule)
        other.load_state_dict(model.state_dict())  # same weights, only the routing policy differs
        out_f, t = timed(lambda: other.generate(one, **settings), clock)
        add(f"(f) cache, {label}", 1, t, out_f.num_forward_passes, unique=out_f.router_stats["unique_experts_per_layer"])
        rules[label] = out_f.router_stats

    static = dict(settings, cache_implementation="static")
    for batch, ids in ((1, one), (args.batch, prompts)):
        out, t = timed(lambda: model.generate(ids, **static, disable_compile=True), clock)
        add(f"(g) static shapes, eager", batch, t, out.num_forward_passes)
        model.generate(ids, **static)  # compile (not timed)
        out_h, t = timed(lambda: model.generate(ids, **static), clock)
        add("(h) static shapes, torch.compile", batch, t, out_h.num_forward_passes)
        reference = out_c if batch == 1 else out_e
        print(f"{'':32s} compiled tokens == eager tokens: {torch.equal(out_h.sequences, reference.sequences)}")

    same = torch.equal(naive, out_b.sequences) and torch.equal(out_b.sequences, out_c.sequences)
    tps = {(row[0][:3], row[1]): row[4] for row in rows}
    print()
    print(f"outputs (a) == (b) == (c): {same}")
    print(f"cache speed-up vs naive (c)/(a):          {tps['(c)', 1] / tps['(a)', 1]:.2f}x  (target >= 3x)")
    print(f"cache speed-up vs uncached (c)/(b):       {tps['(c)', 1] / tps['(b)', 1]:.2f}x")
    print(f"threshold on/off tokens/s (d)/(c):        {tps['(d)', 1] / tps['(c)', 1]:.2f}x  "
          f"({out_d.num_forward_passes} vs {out_c.num_forward_passes} forwards)")
    print(f"batch {args.batch} / batch 1 tokens/s (e)/(c):      {tps['(e)', args.batch] / tps['(c)', 1]:.2f}x  (target >= 4x)")
    for batch, eager in ((1, "(c)"), (args.batch, "(e)")):
        print(f"compiled / eager exact cache, batch {batch}:   {tps['(h)', batch] / tps[eager, batch]:.2f}x  "
              f"(static eager {tps['(g)', batch] / tps[eager, batch]:.2f}x)")
    flops = counted_flops(lambda: model.generate(prompts, **settings))
    rate = best_matmul_rate()
    floor = flops / rate
    batch1_seconds = next(row[2] for row in rows if row[0].startswith("(c)"))
    print(f"  ceiling here: batch {args.batch} does {flops / 1e9:.0f} GFLOP, >= {floor:.2f} s at the best matmul rate "
          f"({rate / 1e9:.0f} GFLOP/s), so (e)/(c) <= {args.batch * batch1_seconds / floor:.2f}x on this machine")
    tc = rules["token choice"]
    print(f"unique experts per layer per denoising forward (of {args.experts}; block of {args.block} tokens):")
    for label, stats in rules.items():
        ratio = stats["unique_experts_per_layer"] / tc["unique_experts_per_layer"]
        target = "  (target <= 0.5)" if label == "dMoE block coreset" else ""
        print(f"  {label:28s} {stats['unique_experts_per_layer']:6.2f}  x{ratio:.3f} of token choice{target}; "
              f"expert bytes per forward {stats['expert_bytes_per_forward'] / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
