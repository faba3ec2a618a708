"""LLaDA2.2's block expert pool (`router_type="block_pool"`) against transcriptions of the
published gate (tests/llada2_2_reference.py: the hub gate as quoted by FluxServe and the
sglang review, and sglang PR #31768's oracle): exact indices and weights, ties included."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeForMaskedLM
from diffusion_moe.modeling.routing import BlockPoolRouter, build_router
from llada2_2_reference import block_topk_reference, hub_block_routing_reference
from test_published_gates import ours  # (expert_index, expert_weights) [B*L, k] of fp32 logits [B, L, E]

pytestmark = pytest.mark.usefixtures("single_thread")


def pool_router(E=16, k=2, capacity=6, block=8, **overrides):
    config = tiny_config(router_type="block_pool", router_score_function="sigmoid", num_experts=E,
                         num_experts_per_tok=k, expert_capacity=capacity, block_size=block, routed_scaling_factor=2.5,
                         attention_layout="block_causal", **overrides)
    router = build_router(config)
    assert isinstance(router, BlockPoolRouter)
    return router


def published(router):
    c = router.config
    return dict(block_size=c.block_size, expert_capacity=c.expert_capacity, top_k=c.num_experts_per_tok,
                routed_scaling_factor=c.routed_scaling_factor)


def tied_logits(generator, shape, levels):
    """Logits from `levels` values: many exact ties between experts and between tokens."""
    return torch.randint(0, levels, shape, generator=generator).float() * 0.75 - 1.0


@settings(max_examples=60, deadline=None)
@given(E=st.sampled_from([8, 16, 32]), blocks=st.integers(1, 3), batch=st.integers(1, 3),
       levels=st.sampled_from([2, 3, 5, 1000]), seed=st.integers(0, 2**16), data=st.data())
def test_the_pool_is_the_published_gate_under_ties(E, blocks, batch, levels, seed, data):
    k = data.draw(st.integers(1, min(E, 6)))
    capacity = data.draw(st.integers(k, E))
    router = pool_router(E=E, k=k, capacity=capacity, block=8)
    g = torch.Generator().manual_seed(seed)
    router.expert_bias.copy_(torch.randint(-1, 2, (E,), generator=g).float() * 0.25)
    logits = tied_logits(g, (batch, 8 * blocks, E), levels)
    index, weights = ours(router, logits)
    for b in range(batch):
        ref_index, ref_weights = hub_block_routing_reference(logits[b], router.expert_bias, **published(router))
        rows = slice(b * 8 * blocks, (b + 1) * 8 * blocks)
        assert torch.equal(index[rows], ref_index) and torch.equal(weights[rows], ref_weights)


@pytest.mark.parametrize("length", [5, 8, 21, 24])
def test_partial_blocks_follow_sglangs_oracle(length):
    """sglang's oracle treats a partial tail block's missing lanes as -inf; without exact ties
    its stable argsort and the hub's topk agree, so indices (in score order) and weights match."""
    router = pool_router(E=16, k=3, capacity=5, block=8)
    g = torch.Generator().manual_seed(length)
    router.expert_bias.copy_(torch.randn(16, generator=g) * 0.1)
    logits = torch.randn(1, length, 16, generator=g)
    index, weights = ours(router, logits)
    ref_index, ref_weights = block_topk_reference(logits[0], router.expert_bias, **published(router))
    assert torch.equal(index, ref_index) and torch.equal(weights, ref_weights)


def test_padding_nominates_nothing_and_blocks_start_at_each_sequences_first_token():
    """Our extensions: a left-padded row routes its real tokens as the sequence alone, whatever
    the padding's scores (which would win every admission if padding nominated)."""
    router = pool_router(E=16, k=2, capacity=4, block=8)
    g = torch.Generator().manual_seed(3)
    alone = torch.randn(1, 20, 16, generator=g)
    loud_padding = torch.full((1, 5, 16), 9.0)
    padded = torch.cat([loud_padding, alone], dim=1)
    padding = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones(1, 20, dtype=torch.bool)], dim=1)
    index, weights = ours(router, padded, padding)
    ref_index, ref_weights = block_topk_reference(alone[0], router.expert_bias, **published(router))
    assert torch.equal(index[5:], ref_index) and torch.equal(weights[5:], ref_weights)
    assert (weights[:5] == 0).all()


def test_every_token_stays_in_its_blocks_pool_and_a_pool_depends_on_its_block_only():
    router = pool_router(E=16, k=3, capacity=5, block=4)
    logits = torch.randn(2, 12, 16)
    index, _ = ours(router, logits)
    index = index.view(2, 3, 4, 3)  # [B, blocks, tokens, k]
    for b in range(2):
        for block in range(3):
            used = index[b, block].unique()
            assert len(used) <= 5  # inside one pool of 5 experts
    changed = logits.clone()
    changed[:, 8:] = torch.randn(2, 4, 16) * 5  # a later block
    later, _ = ours(router, changed)
    assert torch.equal(later.view(2, 12, 3)[:, :8], index.view(2, 12, 3)[:, :8])


def test_a_pool_of_every_expert_is_plain_top_k_and_groups_are_not_used():
    """expert_capacity = num_experts admits everyone: plain biased top-k. n_group / topk_group
    stay in LLaDA2.2's config but the pool takes no group-limited step."""
    grouped = pool_router(E=16, k=2, capacity=16, n_group=8, topk_group=1)
    plain = pool_router(E=16, k=2, capacity=16)
    logits = torch.randn(2, 16, 16)
    index, weights = ours(grouped, logits)
    assert torch.equal(index, ours(plain, logits)[0])
    scores = logits.sigmoid().view(-1, 16)
    assert torch.equal(index, scores.topk(2, dim=-1).indices)
    chosen = scores.gather(-1, index)
    torch.testing.assert_close(weights, chosen / (chosen.sum(-1, keepdim=True) + 1e-20) * 2.5, rtol=0, atol=0)


def test_the_bias_steers_admission_and_selection_but_not_the_weights():
    router = pool_router(E=8, k=1, capacity=2, block=4)
    logits = torch.zeros(1, 4, 8)
    logits[0, :, 0] = 1.0  # expert 0 scores best everywhere
    router.expert_bias[5] = 1.0  # the bias puts expert 5 first
    index, weights = ours(router, logits)
    assert index.flatten().tolist() == [5] * 4
    assert torch.equal(weights.flatten(), torch.full((4,), 0.5 * 2.5))  # sigmoid(0), k = 1: no renormalisation


def test_expert_capacity_is_required_and_checked_by_name():
    with pytest.raises(ValueError, match="expert_capacity"):
        tiny_config(router_type="block_pool", expert_capacity=None)
    with pytest.raises(ValueError, match="expert_capacity"):
        tiny_config(router_type="block_pool", expert_capacity=1)  # fewer than k = 2
    with pytest.raises(ValueError, match="expert_capacity"):
        tiny_config(router_type="block_pool", expert_capacity=9)  # more than the 8 experts
    with pytest.raises(ValueError, match="expert_capacity"):  # under a schedule k reaches capacity_max
        tiny_config(router_type="block_pool", expert_capacity=3, capacity_schedule="linear", capacity_max=4)
    assert "expert_capacity=4" in " ".join(tiny_config(expert_capacity=4).ignored_settings())


def test_a_token_choice_checkpoint_loads_bit_for_bit_as_a_block_pool(tmp_path):
    """Same parameter names for every rule: a retrofit by config is a load."""
    model = DiffusionMoeForMaskedLM(tiny_config(router_score_function="sigmoid")).eval()
    model.save_pretrained(tmp_path)
    pooled = DiffusionMoeForMaskedLM.from_pretrained(tmp_path, router_type="block_pool", expert_capacity=8).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), pooled.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(1, MASK_ID, (2, 8))
    # a pool of every expert is token choice without groups: same logits
    torch.testing.assert_close(pooled(ids).logits, model(ids).logits, rtol=0, atol=0)
