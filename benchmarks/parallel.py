"""Memory and step time per rank under Transformers' distributed engine, on CPU (gloo).

Loads one checkpoint as one process and as two ranks with FSDP2 (`fsdp_size=2`), expert
parallelism over FSDP (`ep_size=2, fsdp_size=2`) and tensor parallelism (`tp_size=2`), then
times training steps (forward, backward, SGD) on the same global batch. Prints per rank: the
bytes of parameters it holds (local shards), of which routed experts, its peak resident memory,
and the step time; then each layout's ratios to one process. Expert bytes per rank should fall
as 1/ep_size (and 1/fsdp_size under FSDP2, which shards every parameter).

    python benchmarks/parallel.py [--router expert_choice --steps 5 --batch 8 --length 128]

Every rank runs one thread (OMP_NUM_THREADS=1), one process also: on this 2-core machine two
ranks are two cores, so "throughput" compares one core with two. Run it alone on the machine.
"""

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

LAYOUTS = {
    "one process": None,
    "FSDP2 x2": dict(fsdp_size=2),
    "EP2 x FSDP2": dict(ep_size=2, fsdp_size=2),
    "TP2": dict(tp_size=2),
}


def local_bytes(tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def run_rank(args):
    """One rank (or the one process): load, time `steps` training steps, write the numbers."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    from diffusion_moe import DiffusionMoeForMaskedLM

    layout = LAYOUTS[args.layout]
    extra = {} if layout is None else {"distributed_config": DistributedConfig(**layout)}
    model = DiffusionMoeForMaskedLM.from_pretrained(args.checkpoint, router_type=args.router, **extra).train()
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shares_batch = layout is not None and "tp_size" in layout  # TP ranks see the same rows
    rows = args.batch if shares_batch else args.batch // world
    generator = torch.Generator().manual_seed(rank if not shares_batch else 0)
    ids = torch.randint(1, model.config.vocab_size - 1, (rows, args.length), generator=generator)
    masked = torch.rand(rows, args.length, generator=generator) < 0.5
    batch = dict(input_ids=ids.masked_fill(masked, model.config.mask_token_id), labels=ids.masked_fill(~masked, -100))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    seconds = []
    for _ in range(args.steps + 1):  # the first step warms up
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if dist.is_initialized():
            dist.barrier()
        seconds.append(time.perf_counter() - start)
    params = dict(model.named_parameters())
    result = dict(
        parameter_bytes=sum(local_bytes(p) for p in params.values()),
        expert_bytes=sum(local_bytes(p) for n, p in params.items() if ".mlp.experts." in n),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        step_seconds=statistics.median(seconds[1:]),
        tokens_per_step=args.batch * args.length,
    )
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(result, f)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--router", default="token_choice",
                        choices=["token_choice", "expert_choice", "block", "block_pool"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--layout", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return run_rank(args)

    from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM

    config = DiffusionMoeConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
        num_shared_experts=1, mask_token_id=4095, pad_token_id=0, max_position_embeddings=args.length,
        router_score_function="sigmoid", expert_capacity=8, block_router_size=32, block_size=32,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        DiffusionMoeForMaskedLM(config).save_pretrained(f"{folder}/ckpt")
        rows = {}
        for name, layout in LAYOUTS.items():
            out = f"{folder}/{len(rows)}"
            worker = [__file__, "--rank-worker", "--layout", name, "--checkpoint", f"{folder}/ckpt", "--out", out,
                      "--router", args.router, "--steps", str(args.steps), "--batch", str(args.batch),
                      "--length", str(args.length)]
            launcher = [sys.executable] if layout is None else [
                sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
            done = subprocess.run(launcher + worker, env=env, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
            ranks = 1 if layout is None else 2
            rows[name] = [json.load(open(f"{out}.rank{r}.json")) for r in range(ranks)]

    mib = 2**20
    one = rows["one process"][0]
    print(f"router {args.router}; global batch {args.batch} x {args.length} tokens; "
          f"{one['parameter_bytes'] / mib:.1f} MiB of parameters, {one['expert_bytes'] / mib:.1f} MiB routed experts")
    print(f"{'layout':<14}{'params/rank MiB':>17}{'experts/rank MiB':>18}{'peak RSS/rank MiB':>19}"
          f"{'step s':>9}{'experts vs one':>16}{'tokens/s vs one':>17}")
    for name, ranks in rows.items():
        rank0 = ranks[0]
        step = max(r["step_seconds"] for r in ranks)
        print(f"{name:<14}{rank0['parameter_bytes'] / mib:>17.1f}{rank0['expert_bytes'] / mib:>18.1f}"
              f"{max(r['peak_rss_bytes'] for r in ranks) / mib:>19.0f}{step:>9.3f}"
              f"{rank0['expert_bytes'] / one['expert_bytes']:>15.2f}x{one['step_seconds'] / step:>16.2f}x")


if __name__ == "__main__":
    main()
