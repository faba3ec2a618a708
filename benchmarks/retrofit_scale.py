"""Does a token-choice -> expert-choice retrofit keep the model's output scale?

A LLaDA2-style model routes with sigmoid scores, renormalised over its top-k and x 2.5.
Before this library's expert-choice gate followed the config's weight rule, expert choice
used a softmax over the choosing experts (no scaling), so a retrofit shrank the routed
output about 2.5x before fine-tuning started. This prints, on a LLaDA2-shaped random model
with trained-like router weights (logit spread `--router-std`), side by side in one run:

* the routed-output norm ratio expert choice / token choice, per MoE layer, on identical
  inputs (each MoE block fed the token-choice model's hidden states);
* the KL(token choice || expert choice) of the whole model's logits, nats per token.

"before" runs expert choice with the old gate (a softmax over the choosing experts'
logits, scale 1: the config `router_score_function="softmax", routed_scaling_factor=1`),
"after" the retrofitted config as is. Target: ratio within 0.8-1.25.

The gate fixes the scale; what remains is expert choice's uneven experts-per-token: with
independent experts a token's routed output grows like 1/sqrt(experts that chose it), so
the ratio also depends on how alike the experts' outputs are. Random experts are
independent and trained ones are not, so rows sweep the experts' similarity.

    python benchmarks/retrofit_scale.py [--experts 64 --top-k 8 --layers 4 --similarity 0 0.5 0.9]
"""

import argparse
import logging

import torch

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.modeling.routing import routing_inputs_for


def llada2_shaped(args, **overrides) -> DiffusionMoeConfig:
    """LLaDA2.0-mini's routing (sigmoid, groups 8/4, x2.5, one shared expert, first layer dense), smaller."""
    values = dict(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=2, num_experts=args.experts, num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.intermediate, num_shared_experts=1, first_k_dense_replace=1,
        router_score_function="sigmoid", n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_layout="block_causal", block_size=32, mask_token_id=1023, partial_rotary_factor=0.5,
    )
    values.update(overrides)
    return DiffusionMoeConfig(**values)


def routed_norms(model, blocks_inputs, positions):
    """Mean per-token norm of each MoE block's routed output (shared expert excluded) on the given inputs."""
    norms = []
    for layer, hidden in zip((l for l in model.model.layers if l.is_moe), blocks_inputs):
        padding = torch.ones(hidden.shape[:2], dtype=torch.bool)
        context = routing_inputs_for(model.config, padding, positions)
        _, decision = layer.mlp.gate(hidden, context)
        norms.append(decision.dispatch(layer.mlp.experts, hidden).norm(dim=-1).mean().item())
    return norms


def correlated_experts_(model, similarity: float, std: float):
    """Expert weights = sqrt(similarity) * one shared expert + sqrt(1 - similarity) * their own:
    0 makes the experts' outputs independent, 1 identical. Trained experts sit in between."""
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.is_moe:
                for w in (layer.mlp.experts.gate_up_proj, layer.mlp.experts.down_proj):
                    shared = torch.randn_like(w[:1]) * std
                    w.copy_(similarity**0.5 * shared + (1 - similarity) ** 0.5 * torch.randn_like(w) * std)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--router-std", type=float, default=2.0, help="std of the router logits (trained-like spread)")
    parser.add_argument("--expert-std", type=float, default=0.1, help="expert weight std (routed output ~ residual)")
    parser.add_argument("--similarity", type=float, nargs="+", default=[0.0, 0.5, 0.9])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    args = parser.parse_args()
    logging.getLogger("diffusion_moe").setLevel(logging.ERROR)  # the retrofit's "ignored settings" notices
    ids = torch.randint(2, 1000, (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    ids[torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < args.mask_ratio] = 1023
    positions = torch.arange(args.length).expand(args.batch, -1)
    print(f"LLaDA2-shaped: {args.layers} layers ({args.layers - 1} MoE), {args.experts} experts top-{args.top_k}, "
          f"sigmoid x2.5, groups 8/4; router logit std {args.router_std}; {args.batch}x{args.length} tokens, "
          f"mask ratio {args.mask_ratio}. Ratio: routed-output norm expert choice / token choice, mean over "
          "MoE layers; KL(token choice || expert choice) of the logits, nats/token.")
    print(f"{'expert similarity':>17s}  {'gate':7s} {'norm ratio':>10s} {'KL':>8s}  target 0.8-1.25")
    for similarity in args.similarity:
        torch.manual_seed(0)
        token_choice = DiffusionMoeForMaskedLM(llada2_shaped(args)).eval()
        correlated_experts_(token_choice, similarity, args.expert_std)
        with torch.no_grad():  # trained routers have spread-out logits
            for layer in token_choice.model.layers:
                if layer.is_moe:
                    layer.mlp.gate.weight.normal_(0.0, args.router_std / args.hidden**0.5)
                    layer.mlp.gate.expert_bias.normal_(0.0, 0.05)
        inputs = []
        hooks = [l.mlp.register_forward_hook(lambda m, a, o: inputs.append(a[0]))
                 for l in token_choice.model.layers if l.is_moe]
        with torch.no_grad():
            reference = token_choice(ids).logits.log_softmax(-1)
        for h in hooks:
            h.remove()
        tc_norms = routed_norms(token_choice, inputs, positions)
        # "before": the old gate, a softmax over the choosing experts' logits with scale 1
        for name, overrides in (("before", dict(router_score_function="softmax", routed_scaling_factor=1.0)),
                                ("after", {})):
            model = DiffusionMoeForMaskedLM(llada2_shaped(args, router_type="expert_choice", **overrides)).eval()
            model.load_state_dict(token_choice.state_dict())
            with torch.no_grad():
                ratios = [ec / tc for ec, tc in zip(routed_norms(model, inputs, positions), tc_norms)]
                logp = model(ids).logits.log_softmax(-1)
            kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
            mean = sum(ratios) / len(ratios)
            verdict = "met" if 0.8 <= mean <= 1.25 else "missed"
            print(f"{similarity:17.1f}  {name:7s} {mean:10.2f} {kl:8.4f}  {verdict}")


if __name__ == "__main__":
    main()
