"""EC-DLM's scaling factors equal a transcription of its published functions exactly."""

import numpy as np
import pytest
import torch

from diffusion_moe.modeling.ec_dlm_scaling import ec_scaling_factors, tc_scaling_factor
from ec_dlm_reference import compute_ec_scaling_factors, compute_tc_scaling_factor, expert_choice_softmax_batch_level


@pytest.mark.parametrize("experts, shared", [(4, 1), (8, 2), (12, 1)])
def test_expert_choice_factors_equal_ec_dlm(experts, shared):
    ours = ec_scaling_factors(experts, shared, num_samples=300)
    theirs = compute_ec_scaling_factors(experts, shared, num_samples=300)
    assert ours.dtype == torch.float32 and ours.shape == (experts + 1,)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("act", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("experts, top_k, shared", [(8, 2, 1), (16, 4, 2)])
def test_token_choice_factor_equals_ec_dlm(act, renorm, experts, top_k, shared):
    ours = tc_scaling_factor(experts, top_k, shared, act, renorm, num_samples=500)
    theirs = compute_tc_scaling_factor(experts, top_k, shared, act, renorm, num_samples=500)
    assert np.float32(ours) == np.float32(theirs) and abs(ours - theirs) <= 1e-12 * abs(theirs)


def test_factors_are_what_they_mean_and_leave_the_global_rng_alone():
    """k = E of a softmax is the whole distribution: its factor is the mean of sqrt(shared) /
    ||softmax||; a single chooser gets gates (1,), factor sqrt(shared); factors grow with k."""
    np.random.seed(7)
    before = np.random.rand()
    np.random.seed(7)
    factors = ec_scaling_factors(8, 4, num_samples=200)
    assert np.random.rand() == before  # the global NumPy stream is untouched
    assert factors[0] == 1.0 and factors[1] == pytest.approx(2.0)
    assert torch.all(factors[2:] > factors[1:-1])
    assert tc_scaling_factor(8, 1, 4, num_samples=100) == pytest.approx(2.0)


def ec_dlm_model(router_type, **overrides):
    from conftest import tiny_config
    from diffusion_moe import DiffusionMoeForMaskedLM

    config = tiny_config(router_type=router_type, num_shared_experts=1, routed_scaling_mode="ec_dlm", **overrides)
    return DiffusionMoeForMaskedLM(config).eval()


def dense_gates(decision, tokens: int, experts: int) -> torch.Tensor:
    """[tokens, E] gate of each (token, expert), from either decision layout."""
    if hasattr(decision, "expert_weights"):  # token layout
        return torch.zeros(tokens, experts).scatter_add_(1, decision.expert_index, decision.expert_weights)
    G, E, C = decision.gates.shape
    owner = torch.arange(E).view(1, E, 1).expand(G, E, C)
    return torch.zeros(tokens, experts).index_put_((decision.token_index.reshape(-1), owner.reshape(-1)),
                                                   decision.gates.reshape(-1), accumulate=True)


@pytest.mark.parametrize("router_type, renormalize", [("token_choice", True), ("token_choice", False),
                                                     ("expert_choice", True)])
def test_ec_dlm_mode_scales_each_tokens_gates_by_ec_dlms_factor(router_type, renormalize):
    """Every token's gates are the constant mode's times EC-DLM's factor: per chooser count
    for expert choice, the top-k constant for token choice (which depends on `norm_topk_prob`)."""
    from conftest import MASK_ID
    from diffusion_moe.modeling.routing import routing_inputs_for

    model = ec_dlm_model(router_type, norm_topk_prob=renormalize)
    plain = type(model)(type(model.config)(**{**model.config.to_dict(), "routed_scaling_mode": "constant"})).eval()
    plain.load_state_dict(model.state_dict())
    hidden = torch.randn(2, 8, model.config.hidden_size)
    E, k = model.config.num_experts, model.config.num_experts_per_tok

    def decide(m):
        routing = routing_inputs_for(m.config, torch.ones(2, 8, dtype=torch.bool), torch.arange(8).expand(2, 8))
        return m.model.layers[0].mlp.gate(hidden, routing)[1]

    scaled, unscaled = dense_gates(decide(model), 16, E), dense_gates(decide(plain), 16, E)
    if router_type == "token_choice":
        factors = torch.full((16, 1), tc_scaling_factor(E, k, 1, "softmax", renormalize))
    else:
        factors = ec_scaling_factors(E, 1)[(unscaled > 0).sum(-1)].unsqueeze(-1)
        assert len(set((unscaled > 0).sum(-1).tolist())) > 1  # tokens with different chooser counts
    torch.testing.assert_close(scaled, unscaled * factors)
    assert torch.isfinite(model(torch.randint(1, MASK_ID, (2, 8))).logits).all()


@pytest.mark.parametrize("overrides, field", [
    (dict(num_shared_experts=0), "routed_scaling_mode"),
    (dict(router_type="block", router_score_function="sigmoid"), "routed_scaling_mode"),
    (dict(routed_scaling_factor=2.5), "routed_scaling_factor"),
    (dict(router_type="expert_choice", router_score_function="sigmoid"), "routed_scaling_mode"),
])
def test_ec_dlm_mode_refuses_settings_it_is_not_defined_for(overrides, field):
    from conftest import tiny_config

    values = dict(router_type="token_choice", num_shared_experts=1, routed_scaling_mode="ec_dlm")
    values.update(overrides)
    with pytest.raises(ValueError, match=field):
        tiny_config(**values)


# --- batch-level expert choice (EC-DLM's --moe-batch-level-expert-choice) -----------------------


def batch_level_router(batch_level=True, **overrides):
    from conftest import tiny_config
    from diffusion_moe.modeling.routing import build_router

    config = tiny_config(router_type="expert_choice", batch_level_expert_choice=batch_level, **overrides)
    router = build_router(config)
    torch.nn.init.normal_(router.weight)
    return router


def decide(router, logits, padding=None, mask_ratio=None):
    from diffusion_moe.modeling.routing import routing_inputs_for

    B, L, _ = logits.shape
    padding = torch.ones(B, L, dtype=torch.bool) if padding is None else padding
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    return router.decide(logits, routing_inputs_for(router.config, padding, positions, mask_ratio))


@pytest.mark.parametrize("scaled", [False, True])
def test_batch_level_expert_choice_equals_ec_dlms(scaled):
    from diffusion_moe.modeling.ec_dlm_scaling import ec_scaling_factors

    overrides = dict(num_shared_experts=1, routed_scaling_mode="ec_dlm") if scaled else {}
    router = batch_level_router(**overrides)
    logits = torch.randn(3, 10, 8)
    decision = decide(router, logits)
    factors = ec_scaling_factors(8, 1) if scaled else None
    gates, chosen, per_token = expert_choice_softmax_batch_level(logits.view(30, 8), 2, factors)
    assert torch.equal(decision.chosen.view(30, 8), chosen)  # 30 * 2 // 8 = 7 tokens per expert, batch-wide
    assert chosen.sum(0).tolist() == [7] * 8 and decision.capacity.tolist() == [7, 7, 7]
    torch.testing.assert_close(dense_gates(decision, 30, 8), gates, rtol=1e-6, atol=1e-7)
    per_sequence = decide(batch_level_router(False, **overrides), logits)
    assert not torch.equal(per_sequence.chosen, decision.chosen)  # sequences now compete


def test_batch_level_expert_choice_skips_padding_and_takes_the_largest_scheduled_k():
    """Our extension: padding takes no capacity (EC-DLM's batches have none), so a padded batch
    routes its real tokens as EC-DLM routes the real tokens alone; under a capacity schedule
    EC-DLM's batch-level k is the largest of its samples' k."""
    router = batch_level_router(capacity_schedule="linear_reverse", capacity_min=1, capacity_max=3)
    logits = torch.randn(2, 12, 8)
    padding = torch.tensor([[0] * 4 + [1] * 8, [1] * 12]).bool()
    ratio = torch.tensor([1.0, 0.5])  # k = 1 and 2: the batch uses 2
    decision = decide(router, logits, padding, ratio)
    real = padding.bool()
    _, chosen, _ = expert_choice_softmax_batch_level(logits[real], 2)  # 20 real tokens * 2 // 8 = 5
    assert torch.equal(decision.chosen[real], chosen) and not decision.chosen[~real].any()


def test_batch_level_expert_choice_is_for_bidirectional_expert_choice():
    from conftest import tiny_config

    with pytest.raises(ValueError, match="batch_level_expert_choice"):
        tiny_config(router_type="expert_choice", batch_level_expert_choice=True, attention_layout="block_causal")
    assert "batch_level_expert_choice=True" in " ".join(tiny_config(batch_level_expert_choice=True).ignored_settings())
