"""Token choice and block routing against the published LLaDA2 / dMoE gate code, tie for tie.

The references (tests/llada2_reference.py) are line-by-line transcriptions of the
published `LLaDA2MoeGate` code. Router logits are drawn from a few distinct values, so
exact ties in scores, votes and group scores are common, as they are in small or
well-trained models; indices and weights must then be *identical*, not merely close.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from diffusion_moe.modeling.routing import build_router, routing_inputs_for
from llada2_reference import dmoe_gate, llada2_gate


def make_router(router_type, E, k, n_group, topk_group, min_experts=None, top_p=0.6):
    config = tiny_config(
        router_type=router_type, router_score_function="sigmoid", num_experts=E, num_experts_per_tok=k,
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, block_router_size=32,
        block_router_top_p=top_p, block_router_min_experts=min_experts or max(k, min(16, E)),
        attention_layout="block_causal", block_size=32,
    )
    return build_router(config)


def published(router):
    c = router.config
    return dict(num_experts=c.num_experts, num_experts_per_tok=c.num_experts_per_tok, n_group=c.n_group,
                topk_group=c.topk_group, routed_scaling_factor=c.routed_scaling_factor)


def ours(router, logits, padding=None):
    B, L, _ = logits.shape
    padding = torch.ones(B, L, dtype=torch.bool) if padding is None else padding
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    decision = router.decide(logits, routing_inputs_for(router.config, padding, positions))
    return decision.expert_index, decision.expert_weights


def reference(router, logits):
    if router.config.router_type == "block":
        c = router.config
        return dmoe_gate(logits, router.expert_bias, published(router), c.block_router_top_p,
                         c.block_router_min_experts, c.block_router_size)
    return llada2_gate(logits, router.expert_bias, published(router))


def assert_identical(router, logits):
    index, weights = ours(router, logits)
    ref_index, ref_weights = reference(router, logits)
    assert torch.equal(index, ref_index)
    assert torch.equal(weights, ref_weights)


def tied_logits(generator, shape, levels):
    """Logits from `levels` distinct values: many exact ties."""
    return torch.randint(0, levels, shape, generator=generator).float() * 0.75 - 1.0


@settings(max_examples=60, deadline=None)
@given(
    router_type=st.sampled_from(["token_choice", "block"]),
    layout=st.sampled_from([(16, 8), (16, 4), (32, 8), (32, 4)]),  # (E, n_group)
    batch=st.integers(1, 3),
    chunks=st.integers(1, 3),
    levels=st.integers(2, 5),
    top_p=st.sampled_from([0.3, 0.6, 0.9]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_routing_is_identical_to_the_published_gate_under_ties(router_type, layout, batch, chunks, levels, top_p,
                                                               seed, data):
    E, n_group = layout
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, min(8, topk_group * E // n_group)))
    min_experts = data.draw(st.integers(k, E))
    router = make_router(router_type, E, k, n_group, topk_group, min_experts, top_p)
    g = torch.Generator().manual_seed(seed)
    router.expert_bias.copy_(torch.randint(-1, 2, (E,), generator=g).float() * 0.25)
    assert_identical(router, tied_logits(g, (batch, 32 * chunks, E), levels))


def test_block_coreset_falls_back_to_topk_of_votes_when_too_few_experts_got_votes():
    # every token's top-4 is experts 0..3, so only 4 of 32 experts get votes; the coreset of
    # 16 is then topk(votes, 16): the 4 voted experts plus 12 zero-vote ones in topk's order
    router = make_router("block", E=32, k=4, n_group=8, topk_group=4, min_experts=16)
    logits = torch.zeros(2, 64, 32)
    logits[..., :4] = 3.0
    logits[1, 32:, 4:8] = 3.0  # a second chunk that votes for other experts
    votes = (logits > 0).float().view(2, 2, 32, 32).sum(2)
    assert ((votes > 0).sum(-1) < 16).all()
    assert_identical(router, logits)


def test_groups_with_fewer_than_two_allowed_experts_score_minus_infinity():
    # the coreset is {0, 2}: one allowed expert in each of groups 0 and 1, so every group
    # scores -inf (a finite sentinel would rank groups 0 and 1 first); the picked groups and
    # the chosen experts then follow topk's order among -inf, and the weights are the
    # unbiased scores even of experts outside the coreset
    router = make_router("block", E=16, k=2, n_group=8, topk_group=4, min_experts=2, top_p=0.9)
    logits = torch.full((1, 32, 16), -2.0)
    logits[..., 0] = logits[..., 2] = 2.0
    index, weights = ours(router, logits)
    assert_identical(router, logits)
    assert (weights > 0).all()


def test_block_routing_of_padded_sequences_equals_the_published_gate_on_the_sequence_alone():
    # our extensions (padding casts no votes, chunks aligned to each sequence's position 0)
    # keep the published maths for the real tokens
    router = make_router("block", E=16, k=2, n_group=4, topk_group=2, min_experts=4)
    g = torch.Generator().manual_seed(1)
    router.expert_bias.copy_(torch.randn(16, generator=g) * 0.1)
    alone = tied_logits(g, (1, 64, 16), 4)
    padded = torch.cat([tied_logits(g, (1, 10, 16), 4), alone], dim=1)
    padding = torch.cat([torch.zeros(1, 10, dtype=torch.bool), torch.ones(1, 64, dtype=torch.bool)], dim=1)
    index, weights = ours(router, padded, padding)
    ref_index, ref_weights = reference(router, alone)
    assert torch.equal(index[10:], ref_index) and torch.equal(weights[10:], ref_weights)
    assert (weights[:10] == 0).all()


@pytest.mark.parametrize("levels", [2, 3, 1000])
def test_token_choice_without_groups_matches_plain_topk_of_the_published_rule(levels):
    # n_group=1 keeps every group: LLaDA2's group step is then the identity
    router = make_router("token_choice", E=8, k=2, n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(levels)
    assert_identical(router, tied_logits(g, (2, 32, 8), levels))
