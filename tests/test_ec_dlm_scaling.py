"""EC-DLM's scaling factors equal a transcription of its published functions exactly."""

import numpy as np
import pytest
import torch

from diffusion_moe.modeling.ec_dlm_scaling import ec_scaling_factors, tc_scaling_factor
from ec_dlm_reference import compute_ec_scaling_factors, compute_tc_scaling_factor


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


@pytest.mark.parametrize("router_type", ["token_choice", "expert_choice"])
def test_ec_dlm_mode_scales_each_tokens_gates_by_ec_dlms_factor(router_type):
    """Every token's gates are the constant mode's times EC-DLM's factor: per chooser count
    for expert choice, the top-k constant for token choice."""
    from conftest import MASK_ID
    from diffusion_moe.modeling.routing import routing_inputs_for

    model = ec_dlm_model(router_type)
    plain = type(model)(type(model.config)(**{**model.config.to_dict(), "routed_scaling_mode": "constant"})).eval()
    plain.load_state_dict(model.state_dict())
    hidden = torch.randn(2, 8, model.config.hidden_size)
    E, k = model.config.num_experts, model.config.num_experts_per_tok

    def decide(m):
        routing = routing_inputs_for(m.config, torch.ones(2, 8, dtype=torch.bool), torch.arange(8).expand(2, 8))
        return m.model.layers[0].mlp.gate(hidden, routing)[1]

    scaled, unscaled = dense_gates(decide(model), 16, E), dense_gates(decide(plain), 16, E)
    if router_type == "token_choice":
        factors = torch.full((16, 1), tc_scaling_factor(E, k, 1, "softmax", True))
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
