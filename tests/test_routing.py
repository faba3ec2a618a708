import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from diffusion_moe.modeling.capacity_schedules import scheduled_experts
from diffusion_moe.modeling.routing import block_coreset, build_router, routing_inputs_for, score
from diffusion_moe.modeling.routing_groups import GroupedView, chunk_runs


def make_router(**overrides):
    router = build_router(tiny_config(**overrides))
    torch.nn.init.normal_(router.weight, std=1.0)
    return router


def left_padded(lengths, L):
    return torch.arange(L).unsqueeze(0) >= (L - torch.tensor(lengths)).unsqueeze(1)


def route(router, padding, mask_ratio=None, hidden=None):
    B, L = padding.shape
    hidden = torch.randn(B, L, router.config.hidden_size) if hidden is None else hidden
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    _, decision = router(hidden, routing_inputs_for(router.config, padding, positions, mask_ratio))
    return decision, decision.stats()


def test_expert_choice_each_expert_takes_exactly_its_capacity_and_never_padding():
    router = make_router(router_type="expert_choice", num_experts_per_tok=3)
    lengths = [20, 13, 5, 1]
    padding = left_padded(lengths, 20)
    decision, stats = route(router, padding)
    for b, length in enumerate(lengths):
        expected = max(length * 3 // 8, 1)
        assert stats.tokens_per_expert[b].tolist() == [expected] * 8
        assert decision.capacity[b].item() == expected
    assert not stats.expert_mask[~padding].any()
    assert (stats.experts_per_token[~padding] == 0).all()


def test_expert_choice_gates_are_a_softmax_over_the_choosing_experts():
    router = make_router(router_type="expert_choice")
    padding = left_padded([12, 7], 12)
    decision, stats = route(router, padding)
    B, E, C = decision.gates.shape  # one capacity group per sequence; token_index is a flat row id
    rows = decision.token_index.transpose(1, 2) % 12
    per_token = torch.zeros(B, 12, E).scatter_add_(1, rows, decision.gates.transpose(1, 2))
    chosen = stats.expert_mask
    expected = decision.router_logits.masked_fill(~chosen, float("-inf")).softmax(-1).nan_to_num(0.0)
    torch.testing.assert_close(per_token, expected)
    sums = per_token.sum(-1)
    torch.testing.assert_close(sums[chosen.any(-1)], torch.ones(int(chosen.any(-1).sum())))
    assert (sums[~chosen.any(-1)] == 0).all()


@pytest.mark.parametrize("norm", [True, False])
def test_expert_choice_gates_follow_the_token_choice_weight_rule(norm):
    # sigmoid scores, renormalised over the choosing experts when norm_topk_prob, x 2.5: a
    # retrofit of a LLaDA2-style token-choice model keeps its routed output scale
    router = make_router(router_type="expert_choice", router_score_function="sigmoid", routed_scaling_factor=2.5,
                         norm_topk_prob=norm)
    padding = left_padded([12, 7], 12)
    decision, stats = route(router, padding)
    B, E, C = decision.gates.shape
    rows = decision.token_index.transpose(1, 2) % 12
    per_token = torch.zeros(B, 12, E).scatter_add_(1, rows, decision.gates.transpose(1, 2))
    chosen = stats.expert_mask
    sig = decision.router_logits.sigmoid() * chosen
    expected = 2.5 * (sig / (sig.sum(-1, keepdim=True) + 1e-20) if norm else sig)
    torch.testing.assert_close(per_token, expected)
    if norm:
        sums = per_token.sum(-1)[chosen.any(-1)]
        torch.testing.assert_close(sums, torch.full_like(sums, 2.5))


def test_token_choice_dropless_gives_every_real_token_k_experts_with_weights_summing_to_scale():
    router = make_router(num_experts_per_tok=3, routed_scaling_factor=2.5, router_score_function="sigmoid")
    padding = left_padded([16, 9], 16)
    decision, stats = route(router, padding)
    assert (stats.experts_per_token[padding] == 3).all()
    assert (stats.experts_per_token[~padding] == 0).all()
    weights = decision.expert_weights.view(2, 16, 3)
    torch.testing.assert_close(weights.sum(-1)[padding], torch.full((int(padding.sum()),), 2.5))
    assert stats.tokens_per_expert.sum().item() == 3 * 25


def test_token_choice_weights_use_unbiased_scores_and_bias_only_steers_selection():
    router = make_router(num_experts_per_tok=1, norm_topk_prob=False, router_score_function="sigmoid")
    router.expert_bias[5] = 100.0
    padding = torch.ones(1, 10, dtype=torch.bool)
    hidden = torch.randn(1, 10, 32)
    decision, _ = route(router, padding, hidden=hidden)
    assert (decision.expert_index == 5).all()
    expected = torch.sigmoid(hidden @ router.weight.t())[0, :, 5]
    torch.testing.assert_close(decision.expert_weights[:, 0], expected)


def test_capacity_factor_caps_each_expert_and_keeps_the_highest_weights():
    router = make_router(num_experts_per_tok=2, capacity_factor=0.5)
    padding = left_padded([32, 20], 32)
    decision, stats = route(router, padding)
    capacity = [math.ceil(32 * 2 / 8 * 0.5), math.ceil(20 * 2 / 8 * 0.5)]
    assert decision.capacity.tolist() == capacity
    assert (stats.tokens_per_expert <= torch.tensor(capacity).unsqueeze(1)).all()
    assert 0 < stats.dropped_fraction < 1
    # proposed weights (before dropping) of kept assignments beat those of dropped ones, per expert
    scores = score(decision.router_logits, "softmax")
    proposed = scores.topk(2, dim=-1)
    weights = proposed.values / proposed.values.sum(-1, keepdim=True)
    for b in range(2):
        for e in range(8):
            picked = (proposed.indices[b] == e) & padding[b].unsqueeze(-1)
            w = weights[b][picked]
            kept = stats.expert_mask[b, :, e][picked.any(-1)]
            if kept.any() and (~kept).any():
                assert w[kept].min() >= w[~kept].max()


def test_group_limited_selection_stays_inside_the_best_groups():
    router = make_router(num_experts_per_tok=2, n_group=4, topk_group=1, router_score_function="sigmoid")
    padding = torch.ones(3, 10, dtype=torch.bool)
    decision, _ = route(router, padding)
    scores = score(decision.router_logits, "sigmoid")
    best_group = scores.view(3, 10, 4, 2).sum(-1).argmax(-1)  # sum of a group's two best = whole group here
    groups = decision.expert_index.view(3, 10, 2) // 2
    assert (groups == best_group.unsqueeze(-1)).all()


def test_block_routing_keeps_every_token_inside_its_chunk_coreset():
    router = make_router(router_type="block", router_score_function="sigmoid", block_router_size=4,
                         block_router_min_experts=3, block_router_top_p=0.3)
    padding = left_padded([16, 11], 16)
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    decision, stats = route(router, padding)
    scores = score(decision.router_logits, "sigmoid")
    allowed = block_coreset(scores + router.expert_bias, padding, GroupedView(chunk_runs(positions, 4)), router.config)
    assert not (stats.expert_mask & ~allowed).any()
    for b in range(2):
        for chunk in positions[b][padding[b]].div(4, rounding_mode="floor").unique():
            tokens = padding[b] & (positions[b] // 4 == chunk)
            coreset = allowed[b, tokens]
            assert (coreset == coreset[0]).all()  # one coreset per aligned chunk
            assert coreset[0].sum() >= 3
            assert stats.expert_mask[b, tokens].any(0).sum() <= coreset[0].sum()


def test_block_coreset_follows_the_cumulative_vote_rule():
    config = tiny_config(router_type="block", num_experts=4, num_experts_per_tok=1, block_router_size=4,
                         block_router_min_experts=1, block_router_top_p=0.6)
    # four tokens vote (top-1) for experts 0, 0, 1, 2 with scores .9, .9, .8, .4 -> votes .9*2, .8, .4
    scores = torch.tensor([[[.9, .1, .1, .1], [.9, .1, .1, .1], [.1, .8, .1, .1], [.1, .1, .4, .1]]])
    padding = torch.ones(1, 4, dtype=torch.bool)
    positions = torch.arange(4).unsqueeze(0)
    allowed = block_coreset(scores, padding, GroupedView(chunk_runs(positions, 4)), config)
    # normalised votes .6, .267, .133: expert 0 reaches p=0.6 exactly, so the next one (1) is kept too
    assert allowed[0, 0].tolist() == [True, True, False, False]
    config.block_router_min_experts = 3
    allowed = block_coreset(scores, padding, GroupedView(chunk_runs(positions, 4)), config)
    assert allowed[0, 0].tolist() == [True, True, True, False]


def test_block_causal_expert_choice_selects_within_each_attention_block():
    router = make_router(router_type="expert_choice", attention_layout="block_causal", block_size=4,
                         num_experts_per_tok=4)
    padding = left_padded([10, 4], 10)  # sequence 0: blocks of 4, 4, 2 real tokens
    decision, stats = route(router, padding)
    block = ((padding.long().cumsum(-1) - 1).clamp(min=0) // 4)
    for b, sizes in enumerate([[4, 4, 2], [4]]):
        for j, size in enumerate(sizes):
            tokens = padding[b] & (block[b] == j)
            assert stats.expert_mask[b, tokens].sum(0).tolist() == [max(size * 4 // 8, 1)] * 8
    assert decision.capacity.tolist() == [2 + 2 + 1, 2]


def test_chunk_runs_split_the_two_stream_input_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    assert chunk_runs(positions, 4).tolist() == [[0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]]
    assert chunk_runs(torch.tensor([[0, 0, 0, 1, 2]]), 2).tolist() == [[0, 0, 0, 0, 1]]  # left padding


def reference_k(schedule, r, k_min, k_max, sigma=0.22):
    f = {
        "linear": r,
        "linear_reverse": 1 - r,
        "cosine": (1 - math.cos(math.pi * r)) / 2,
        "cosine_reverse": (1 + math.cos(math.pi * r)) / 2,
        "bell": min(max(1 - 4 * (r - 0.5) ** 2, 0), 1),
    }
    a = math.exp(-1 / (8 * sigma**2))
    g = min(max((math.exp(-((r - 0.5) ** 2) / (2 * sigma**2)) - a) / (1 - a), 0), 1)
    f["bell_gaussian"], f["bell_gaussian_reverse"] = g, 1 - g
    return min(max(round(k_min + (k_max - k_min) * f[schedule]), k_min), k_max)  # round(): half to even


@pytest.mark.parametrize(
    "schedule", ["linear", "linear_reverse", "cosine", "cosine_reverse", "bell", "bell_gaussian", "bell_gaussian_reverse"]
)
def test_capacity_schedules_match_their_formula(schedule):
    config = tiny_config(num_experts=32, num_experts_per_tok=4, router_type="expert_choice",
                         capacity_schedule=schedule, capacity_min=2, capacity_max=7)
    ratios = [0.0, 0.25, 0.5, 0.75, 1.0]
    k = scheduled_experts(config, torch.tensor(ratios))
    assert k.tolist() == [reference_k(schedule, r, 2, 7) for r in ratios]


def test_constant_schedule_and_linear_reverse_end_points():
    padding = torch.ones(3, 4, dtype=torch.bool)
    inputs = routing_inputs_for(tiny_config(router_type="expert_choice"), padding, torch.arange(4).expand(3, 4))
    assert inputs.experts_per_group.tolist() == [2, 2, 2] and inputs.experts_per_token is None
    config = tiny_config(router_type="expert_choice", capacity_schedule="linear_reverse", capacity_min=1,
                         capacity_max=3)
    # fully masked input gets the least compute, clean input the most; 0.5 -> 2 (round half to even)
    assert scheduled_experts(config, torch.tensor([1.0, 0.5, 0.0])).tolist() == [1, 2, 3]


def test_schedule_without_mask_ratio_is_a_clear_error():
    config = tiny_config(router_type="expert_choice", capacity_schedule="linear")
    with pytest.raises(ValueError, match="mask_ratio"):
        routing_inputs_for(config, torch.ones(2, 4, dtype=torch.bool), torch.arange(4).expand(2, 4))


def test_expert_choice_capacity_follows_the_schedule_per_sequence():
    router = make_router(router_type="expert_choice", capacity_schedule="linear_reverse", capacity_min=1,
                         capacity_max=4, num_experts_per_tok=2)
    padding = torch.ones(2, 16, dtype=torch.bool)
    decision, stats = route(router, padding, mask_ratio=torch.tensor([1.0, 0.0]))
    assert decision.capacity.tolist() == [16 * 1 // 8, 16 * 4 // 8]
    assert stats.tokens_per_expert[0].tolist() == [2] * 8 and stats.tokens_per_expert[1].tolist() == [8] * 8


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 24),
    experts=st.sampled_from([2, 4, 8]),
    data=st.data(),
)
def test_routing_invariants_hold_for_random_shapes(batch, length, experts, data):
    k = data.draw(st.integers(1, experts))
    lengths = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    padding = left_padded(lengths, length)
    base = dict(num_experts=experts, num_experts_per_tok=k, block_router_min_experts=k)
    # expert choice: perfectly balanced, padding never chosen
    _, stats = route(make_router(router_type="expert_choice", **base), padding)
    for b, n in enumerate(lengths):
        expected = min(max(n * k // experts, 1), n)
        assert stats.tokens_per_expert[b].tolist() == [expected] * experts
    assert not stats.expert_mask[~padding].any()
    # token choice: exactly k per real token; with a capacity factor no expert exceeds capacity
    _, stats = route(make_router(**base), padding)
    assert (stats.experts_per_token == padding * k).all()
    decision, stats = route(make_router(capacity_factor=1.0, **base), padding)
    assert (stats.tokens_per_expert <= decision.capacity.unsqueeze(1)).all()
    # block: at most k experts per token, all inside a coreset of at least the minimum size
    decision, stats = route(make_router(router_type="block", router_score_function="sigmoid", **base), padding)
    assert (stats.experts_per_token <= k).all()
    assert not stats.expert_mask[~padding].any()
