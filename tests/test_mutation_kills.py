"""Behaviour tests written against mutants that survived the rest of the suite (`make mutate`,
README "Tests"): each asserts numbers or an invariant that a plausible wrong implementation breaks."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from test_generation import MASK, left_pad, prompt, tiny_model
from test_routing import left_padded, make_router, route

from diffusion_moe import DiffusionMoeForMaskedLM
from diffusion_moe.generation import DiffusionGenerationConfig
from diffusion_moe.generation.block_runners import DualCacheRunner, FullRunner, PrefixCacheRunner
from diffusion_moe.generation.denoising import MaskFilling, predict
from diffusion_moe.modeling import diffusion_loss
from diffusion_moe.modeling.diffusion_loss import chunked_cross_entropy, diffusion_loss_weights
from diffusion_moe.modeling.experts import DiffusionMoeExperts
from diffusion_moe.modeling.routing import DiffusionMoeRouter
from diffusion_moe.modeling.routing_decisions import TokenRouting
from diffusion_moe.modeling.routing_inputs import RoutingInputs
from diffusion_moe.modeling.routing_groups import GroupedView

# --- remasking scores -------------------------------------------------------------------------

# Three block positions whose order differs under each rule: position 0 is the most confident
# (top-1 .60), position 1 has the largest top1 - top2 gap (.30), position 2 the lowest entropy.
PROBS = torch.tensor([[[0.60, 0.35, 0.03, 0.02], [0.50, 0.10, 0.20, 0.20], [0.55, 0.44, 0.005, 0.005]]])
HAND = {
    "low_confidence": [0.60, 0.50, 0.55],
    "margin": [0.25, 0.30, 0.11],
    "entropy": [math.exp(sum(p * math.log(p) for p in row)) for row in PROBS[0].tolist()],
}
FIRST = {"low_confidence": 0, "margin": 1, "entropy": 2}


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_remasking_scores_match_a_hand_computation(remasking):
    tokens, scores = predict(PROBS.log(), True, remasking)
    assert tokens.tolist() == [[0, 0, 0]]
    torch.testing.assert_close(scores, torch.tensor([HAND[remasking]]), rtol=1e-5, atol=1e-6)
    assert int(scores.argmax()) == FIRST[remasking]


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy"])
def test_each_remasking_rule_commits_its_own_best_position_first(remasking):
    config = DiffusionGenerationConfig(block_length=3, steps=3, mask_token_id=9)
    rule = MaskFilling(config, mask_token_id=9)
    block = torch.full((1, 3), 9)
    assert not rule.start_block(block, torch.ones(1, 3, dtype=torch.bool)).any()
    tokens, scores = predict(PROBS.log(), True, remasking)
    block, done = rule.update(block, tokens, scores)
    expected = [9, 9, 9]
    expected[FIRST[remasking]] = 0
    assert block.tolist() == [expected] and not done.any()


def test_random_remasking_scores_are_uniform_draws():
    torch.manual_seed(0)
    _, scores = predict(torch.zeros(2, 500, 4), True, "random")
    assert scores.shape == (2, 500) and ((scores >= 0) & (scores < 1)).all()
    assert abs(scores.mean().item() - 0.5) < 0.05 and scores.std().item() > 0.25  # not constant, not a score
    # LLaDA's `torch.rand((B, L))`: the same draws under the same seed, each row its own
    torch.manual_seed(0)
    assert torch.equal(scores, torch.rand(2, 500))


def test_sampled_tokens_follow_the_softmax():
    torch.manual_seed(0)
    scores = torch.tensor([[[0.0, math.log(3.0), -float("inf"), 0.0]]]).expand(1, 4000, 4)
    tokens, confidence = predict(scores, False, "low_confidence")
    counts = torch.bincount(tokens.flatten(), minlength=4).float() / tokens.numel()
    torch.testing.assert_close(counts, torch.tensor([0.2, 0.6, 0.0, 0.2]), atol=0.03, rtol=0)
    expected = torch.tensor([0.2, 0.6, 0.0, 0.2])[tokens]
    torch.testing.assert_close(confidence, expected)  # each sample's own probability


# --- approximate caches at later steps (steps > 1) ----------------------------------------------


def canvas(answer=12):
    ids, mask = left_pad([prompt(3, 1), prompt(7, 2)])  # left padding: positions differ per row
    B, P = ids.shape
    x = torch.cat([ids, torch.full((B, answer), MASK)], 1)
    real = torch.cat([mask.bool(), torch.ones(B, answer, dtype=torch.bool)], 1)
    return x, real, P


@pytest.mark.parametrize("runner_class", [PrefixCacheRunner, DualCacheRunner])
def test_approximate_cache_steps_equal_the_full_forward_while_the_canvas_is_unchanged(runner_class):
    # the cached keys/values are then exactly the current ones: a later step must reproduce the
    # block's full-forward logits (it would not with wrong positions, masks or key order)
    model = tiny_model(layout="bidirectional")
    x, real, P = canvas()
    s, e = P + 4, P + 8  # a middle block: a prefix and a suffix
    runner, full = runner_class(model, x, real, False), FullRunner(model, x, real, False)
    expected = full.block_logits(s, e)[0]
    for step in range(3):
        got = runner.block_logits(s, e)[0]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("runner_class", [PrefixCacheRunner, DualCacheRunner])
def test_one_layer_approximate_caches_are_exact_after_commits(runner_class):
    # with one layer the prefix's and suffix's keys/values depend on their own tokens only, so
    # after the block changes a cached step still equals the full forward of the new canvas
    model = tiny_model(layout="bidirectional", num_hidden_layers=1)
    x, real, P = canvas()
    s, e = P + 4, P + 8
    runner, full = runner_class(model, x, real, False), FullRunner(model, x, real, False)
    first = runner.block_logits(s, e)[0]
    x[:, s : s + 2] = torch.tensor([[5, 6], [7, 8]])  # commits (in place, as generate does)
    second = runner.block_logits(s, e)[0]
    torch.testing.assert_close(second, full.block_logits(s, e)[0], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(second, first, atol=1e-3)  # the step did see the commits
    # the next block starts afresh (a full forward) and its own later steps are exact again
    x[:, s:e] = 11
    for _ in range(2):
        torch.testing.assert_close(runner.block_logits(e, e + 4)[0], full.block_logits(e, e + 4)[0], rtol=1e-4,
                                   atol=1e-4)


def test_dual_cache_generate_with_several_steps_equals_full_for_one_layer():
    model = tiny_model(layout="bidirectional", num_hidden_layers=1)
    ids, mask = left_pad([prompt(3, 1), prompt(7, 2)])
    settings = dict(max_new_tokens=8, block_length=4, steps=4, eos_token_id=None)
    full = model.generate(ids, mask, **settings)
    for cache in ("prefix", "dual"):
        assert torch.equal(model.generate(ids, mask, **settings, approximate_cache=cache), full), cache


# --- router losses ------------------------------------------------------------------------------


def hand_inputs(padding):
    return RoutingInputs(padding_mask=padding, position_ids=torch.arange(padding.shape[1]).expand(padding.shape))


def hand_routing(probs, index, weights, padding):
    probs = torch.tensor(probs).unsqueeze(0)
    return TokenRouting(router_logits=probs.log(), inputs=hand_inputs(padding), capacity=None,
                        expert_index=torch.tensor(index), expert_weights=torch.tensor(weights), router_probs=probs)


def test_load_balancing_loss_matches_a_hand_computation_where_f_and_p_differ():
    # four tokens (the third is padding), E = 4, k = 2 with dropped (weight 0) assignments
    decision = hand_routing(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25], [0.4, 0.1, 0.1, 0.4]],
        [[0, 1], [1, 2], [3, 0], [2, 3]],
        [[0.8, 0.2], [0.7, 0.0], [0.5, 0.5], [0.6, 0.4]],
        torch.tensor([[True, True, False, True]]),
    )
    # assignments of real tokens: 0, 1 | 1 | 2, 3 -> f = [1, 2, 1, 1] / 5
    f = torch.tensor([1, 2, 1, 1]) / 5
    p = torch.tensor([0.7 + 0.1 + 0.4, 0.1 + 0.6 + 0.1, 0.1 + 0.2 + 0.1, 0.1 + 0.1 + 0.4]) / 3
    expected = 4 * (f * p).sum()
    assert expected.item() == pytest.approx(4 * (1.2 + 1.6 + 0.4 + 0.6) / 15)
    loss = decision.aux_loss()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() != pytest.approx(4 * (p * p).sum().item(), rel=1e-3)  # P_e in place of f_e
    assert loss.item() != pytest.approx(4 * (f * f).sum().item(), rel=1e-3)


def test_load_balancing_loss_normalises_sigmoid_scores_per_token():
    sigmoid = [[0.9, 0.3, 0.3, 0.5], [0.1, 0.1, 0.2, 0.1]]  # rows sum to 2.0 and 0.5
    decision = hand_routing(sigmoid, [[0], [2]], [[1.0], [1.0]], torch.ones(1, 2, dtype=torch.bool))
    loss = decision.aux_loss()
    p = (torch.tensor(sigmoid) / torch.tensor([[2.0], [0.5]])).mean(0)
    f = torch.tensor([0.5, 0.0, 0.5, 0.0])
    assert loss.item() == pytest.approx((4 * (f * p).sum()).item(), rel=1e-6)


def test_router_losses_of_a_single_real_token():
    # one real token, one assignment: nothing to average, so E * f . P = E * P[chosen] and z = lse^2
    decision = hand_routing([[0.25, 0.5, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]], [[1], [0]], [[1.0], [1.0]],
                            torch.tensor([[True, False]]))
    assert decision.aux_loss().item() == pytest.approx(4 * 0.5)
    lse = math.log(sum([0.25, 0.5, 0.125, 0.125]))  # logits = log(probs)
    assert decision.z_loss().item() == pytest.approx(lse**2, abs=1e-12)
    decision.router_logits = decision.router_logits + 1.0
    assert decision.z_loss().item() == pytest.approx((lse + 1.0) ** 2)


def test_z_loss_is_the_mean_squared_logsumexp_over_real_tokens():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, -1.0, 2.0]]])
    decision = TokenRouting(router_logits=logits, inputs=hand_inputs(torch.tensor([[True, False, True]])),
                            capacity=None, expert_index=torch.zeros(3, 1, dtype=torch.long),
                            expert_weights=torch.ones(3, 1), router_probs=logits.softmax(-1))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits[0].tolist()]
    assert decision.z_loss().item() == pytest.approx((lse[0] ** 2 + lse[2] ** 2) / 2, rel=1e-6)


def test_the_models_aux_loss_is_the_layer_mean_of_the_switch_loss_by_hand():
    from diffusion_moe import DiffusionMoeForMaskedLM

    model = DiffusionMoeForMaskedLM(tiny_config(router_aux_loss_coef=0.5, router_z_loss_coef=0.1)).train()
    seen = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, args, out: seen.append(out))
    ids = torch.randint(1, 63, (2, 8))
    padding = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    labels = torch.where(padding.bool(), ids, -100)
    out = model(ids.masked_fill(padding.bool(), 63), attention_mask=padding, labels=labels)
    real = padding.bool()
    aux, z = [], []
    for flat_logits, decision in seen:
        probs = flat_logits.view(2, 8, 8).softmax(-1)[real]  # [real tokens, E]
        index = decision.expert_index.view(2, 8, -1)[real]
        f = torch.bincount(index.flatten(), minlength=8).float() / index.numel()
        aux.append(8 * (f * probs.mean(0)).sum())
        z.append(flat_logits.view(2, 8, 8).logsumexp(-1)[real].square().mean())
    assert out.aux_loss.item() == pytest.approx(sum(aux).item() / len(aux), rel=1e-5)
    assert out.z_loss.item() == pytest.approx(sum(z).item() / len(z), rel=1e-5)
    expected = out.diffusion_loss + 0.5 * out.aux_loss + 0.1 * out.z_loss
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# --- expert choice under ties -------------------------------------------------------------------


def test_expert_choice_breaks_ties_alike_whatever_the_group_layout():
    # two identical tokens in the second attention block tie for every expert; the left-padded
    # copy lays that block out in a longer group row, which must not change who is chosen
    router = make_router(router_type="expert_choice", attention_layout="block_causal", block_size=4, block_router_size=4)
    hidden = torch.randn(1, 8, 32)
    hidden[0, 6] = hidden[0, 7]
    _, alone = route(router, torch.ones(1, 8, dtype=torch.bool), hidden=hidden)
    _, padded = route(router, left_padded([8], 12), hidden=torch.cat([torch.randn(1, 4, 32), hidden], 1))
    assert torch.equal(padded.expert_mask[:, 4:], alone.expert_mask)
    assert alone.expert_mask[0, 6].any() and not alone.expert_mask[0, 7].any()  # the earlier token wins


# --- the loss's weights and its chunked cross-entropy ----------------------------------------------

LABELS = torch.tensor([[-100, 5, 7, -100], [-100, -100, -100, 3]])
PADDING = torch.tensor([[True, True, True, True], [False, True, True, True]])  # real: 4 and 3; labelled: 2 and 1


@pytest.mark.parametrize(
    "weighting, kwargs, row0, row1",
    [
        ("elbo", {}, 1 / (2 / 4 * 7), 1 / (1 / 3 * 7)),  # realised ratios 1/2, 1/3; 7 real tokens
        ("elbo", {"noise_level": torch.tensor([0.25, 0.75])}, 1 / (0.25 * 7), 1 / (0.75 * 7)),
        ("elbo", {"num_items_in_batch": 10}, 1 / (2 / 4 * 10), 1 / (1 / 3 * 10)),
        ("none", {}, 1 / 3, 1 / 3),
        ("none", {"num_items_in_batch": 17}, 1 / 17, 1 / 17),
    ],
)
def test_diffusion_loss_weights_match_a_hand_computation(weighting, kwargs, row0, row1):
    weights = diffusion_loss_weights(LABELS, PADDING, weighting=weighting, dtype=torch.float64, **kwargs)
    expected = torch.tensor([[0, row0, row0, 0], [0, 0, 0, row1]], dtype=torch.float64)
    assert weights.dtype == torch.float64
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=0)


def test_diffusion_loss_weights_of_a_single_token():
    one = torch.tensor([[4]]), torch.tensor([[True]])
    assert diffusion_loss_weights(*one, weighting="none").tolist() == [[1.0]]
    assert diffusion_loss_weights(*one, weighting="elbo").tolist() == [[1.0]]  # t = 1, one real token
    nothing = torch.tensor([[-100, -100]]), torch.tensor([[False, False]])
    assert diffusion_loss_weights(*nothing, weighting="elbo").tolist() == [[0.0, 0.0]]


def chunk_case(dtype=torch.float32, hidden_grad=True, head_grad=True):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 10, bias=False).to(dtype).requires_grad_(head_grad)
    hidden = torch.randn(7, 8, dtype=dtype).requires_grad_(hidden_grad)
    return head, hidden, torch.randint(0, 10, (7,)), torch.rand(7, dtype=torch.float64)


def test_chunked_cross_entropy_runs_chunks_of_the_budgeted_rows():
    head, hidden, targets, weights = chunk_case()
    rows = []
    head.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    expected = (F.cross_entropy(head(hidden), targets, reduction="none") * weights.float()).sum()
    rows.clear()
    total = chunked_cross_entropy(hidden, head, targets, weights, vocab_size=10, chunk_bytes=3 * 4 * 10)
    assert rows == [0, 3, 3, 1]  # the empty call keeps the head in the graph, then 3 rows of fp32 logits a chunk
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, expected)
    rows.clear()
    chunked_cross_entropy(hidden, head, targets, weights, vocab_size=10, chunk_bytes=10)  # less than a row
    assert rows == [0] + [1] * 7


def test_chunked_cross_entropy_upcasts_a_low_precision_head():
    head, hidden, targets, weights = chunk_case(torch.bfloat16)
    total = chunked_cross_entropy(hidden, head, targets, weights, vocab_size=10, chunk_bytes=3 * 4 * 10)
    assert total.dtype == torch.float32
    expected = (F.cross_entropy(head(hidden).float(), targets, reduction="none") * weights.float()).sum()
    torch.testing.assert_close(total, expected)


@pytest.mark.parametrize("hidden_grad, head_grad", [(True, True), (True, False), (False, True)])
def test_chunked_cross_entropy_checkpoints_exactly_when_a_gradient_is_needed(hidden_grad, head_grad, monkeypatch):
    calls = []
    real_checkpoint = diffusion_loss.checkpoint

    def counting(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(diffusion_loss, "checkpoint", counting)
    head, hidden, targets, weights = chunk_case(hidden_grad=hidden_grad, head_grad=head_grad)
    total = chunked_cross_entropy(hidden, head, targets, weights, vocab_size=10, chunk_bytes=3 * 4 * 10)
    assert calls == [False] * 3  # one non-reentrant checkpoint per chunk
    total.backward()
    leaves = [t for t in (head.weight, hidden) if t.requires_grad]
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (F.cross_entropy(head(hidden), targets, reduction="none") * weights.float()).sum().backward()
    for got, t in zip(grads, leaves):
        torch.testing.assert_close(got, t.grad)  # the recomputed chunks give the full gradients
    calls.clear()
    with torch.no_grad():
        chunked_cross_entropy(hidden, head, targets, weights, vocab_size=10, chunk_bytes=3 * 4 * 10)
    head.requires_grad_(False)
    chunked_cross_entropy(hidden.detach(), head, targets, weights, vocab_size=10, chunk_bytes=3 * 4 * 10)
    assert calls == []  # nothing to differentiate: no checkpointing


# --- static shapes, eagerly ------------------------------------------------------------------------


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "block"])
def test_eager_static_shapes_give_the_dynamic_cache_tokens_and_stats(router):
    model = tiny_model(router=router, seed=3)
    ids, mask = left_pad([prompt(9, 2), prompt(13, 3)])  # a prefill of several blocks, padded rows
    settings = dict(max_new_tokens=10, block_length=4, steps=2, threshold=0.3, return_dict_in_generate=True)
    dynamic = model.generate(ids, mask, **settings)
    static = model.generate(ids, mask, **settings, cache_implementation="static", disable_compile=True)
    assert torch.equal(static.sequences, dynamic.sequences)
    assert static.num_forward_passes == dynamic.num_forward_passes
    assert static.router_stats["unique_experts_per_forward"] == dynamic.router_stats["unique_experts_per_forward"]


def test_new_static_cache_follows_the_model_dtype():
    from diffusion_moe.generation.block_runners import new_static_cache

    model = tiny_model().double()
    cache = new_static_cache(model, 2, 16)
    assert all(layer.keys.dtype == torch.float64 and layer.keys.shape == (2, 2, 16, 8) for layer in cache.layers)


def test_aligned_groups_without_a_chunk_are_whole_rows():
    view = GroupedView.aligned(2, 8, None, torch.device("cpu"))
    assert (view.groups_per_sequence, view.size, view.identity) == (1, 8, True)
    blocks = GroupedView.aligned(2, 8, 4, torch.device("cpu"))
    assert (blocks.groups_per_sequence, blocks.size) == (2, 4)
    x = torch.arange(16).view(2, 8)
    assert blocks.scatter(x, -1).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_the_static_runner_builds_one_mask_per_block_and_refuses_a_reused_cache():
    from diffusion_moe.generation.block_runners import StaticCacheRunner, static_block_step
    from diffusion_moe.generation.generation_utils import _block_causal_layout

    model = tiny_model(seed=3)
    ids, mask = left_pad([prompt(3, 2), prompt(2, 3)])  # shorter than a block: nothing to prefill
    x, real, _, _, _, blocks = _block_causal_layout(ids, mask.bool(), model.generation_config, 6)
    (s, e) = blocks[0]
    assert s == 0
    runner = StaticCacheRunner(model, x, real, False, static_block_step)
    with pytest.raises(ValueError, match=r"^`cache` cannot be reused with cache_implementation='static'\.$"):
        runner.prefill(s, reused=(None, 0))
    built = []
    real_mask = runner._block_mask
    runner._block_mask = lambda a, b: built.append((a, b)) or real_mask(a, b)
    with torch.no_grad():
        runner.prefill(s)
        first = runner.block_logits(s, e)[0]
        assert torch.equal(runner.block_logits(s, e)[0], first)  # a step rewrites its block's slots
    assert built == [(s, e)]  # once per block, not once per step


# --- routing groups and capacity schedules -----------------------------------------------------------


def test_grouped_view_lays_groups_out_as_rows_of_the_longest_group():
    group_ids = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    view = GroupedView(group_ids)
    assert (view.groups_per_sequence, view.size, view.identity) == (3, 3, False)
    assert view.slot.tolist() == [[0, 1, 0, 1, 2], [0, 0, 1, 0, 1]]
    assert view.sequence_of_group.tolist() == [0, 0, 0, 1, 1, 1]
    # row 0 has two groups, so its third row is all fill; unused slots of flat_index hold 0
    assert view.flat_index.tolist() == [[0, 1, 0], [2, 3, 4], [0, 0, 0], [5, 0, 0], [6, 7, 0], [8, 9, 0]]
    x = torch.arange(10).view(2, 5) + 1
    assert view.scatter(x, -1).tolist() == [[1, 2, -1], [3, 4, 5], [-1, -1, -1], [6, -1, -1], [7, 8, -1], [9, 10, -1]]
    assert torch.equal(view.gather(view.scatter(x, -1)), x)
    assert view.per_sequence_sum(torch.tensor([1, 2, 4, 8, 16, 32])).tolist() == [7, 56]
    one = GroupedView(torch.zeros(2, 5, dtype=torch.long))
    assert one.identity and one.scatter(x, -1) is x and one.gather(x) is x  # one group per sequence costs nothing


def test_schedules_clamp_out_of_range_ratios_before_the_schedule():
    # cosine is not monotone outside [0, 1]: (1 - cos(1.5 pi)) / 2 = 0.5 would give the middle k
    from diffusion_moe.modeling.capacity_schedules import scheduled_experts

    config = tiny_config(router_type="expert_choice", capacity_schedule="cosine", capacity_min=1, capacity_max=5)
    assert scheduled_experts(config, torch.tensor([-0.5, 0.0, 1.0, 1.5])).tolist() == [1, 1, 5, 5]


def test_the_bell_gaussian_schedule_function_is_its_formula():
    from diffusion_moe.modeling.capacity_schedules import SCHEDULE_FUNCTIONS

    sigma = 0.22
    a = math.exp(-1 / (8 * sigma**2))
    r = torch.tensor([0.0, 0.1, 0.25, 0.4, 0.5, 0.9, 1.0], dtype=torch.float64)
    expected = [(math.exp(-((v - 0.5) ** 2) / (2 * sigma**2)) - a) / (1 - a) for v in r.tolist()]
    got = SCHEDULE_FUNCTIONS["bell_gaussian"](r, sigma)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(SCHEDULE_FUNCTIONS["bell_gaussian_reverse"](r, sigma), 1 - got)


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_projects_only_the_positions_still_masked_onto_the_vocabulary(use_cache):
    """Each denoising forward projects exactly the block positions still masked in some
    sample (the union over the batch); prefill and cache appends project nothing."""
    model = tiny_model(seed=3)
    ids, mask = left_pad([prompt(9, 2), prompt(13, 3)])  # two prompt blocks to prefill, padded rows
    inputs, widths = [], []
    model.register_forward_pre_hook(lambda m, args, kwargs: inputs.append(kwargs["input_ids"].clone()),
                                   with_kwargs=True)
    model.lm_head.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    out = model.generate(ids, mask, max_new_tokens=10, block_length=4, steps=2, use_cache=use_cache,
                         eos_token_id=None, return_dict_in_generate=True)
    steps = [(w, x) for w, x in zip(widths, inputs) if w]
    assert len(steps) == out.num_forward_passes
    # the block is the input's last 4 positions, cached (the block alone) or not (the canvas)
    assert [w for w, _ in steps] == [int((x[:, -4:] == MASK).any(0).sum()) for _, x in steps]
    assert sum(w for w, _ in steps) < 4 * len(steps)  # a block's second step has fewer masks left
    if use_cache:
        assert len(widths) > len(steps)  # prefill / append forwards ran, projecting nothing


def test_runners_pass_no_mask_when_nothing_is_padded():
    model = tiny_model(layout="bidirectional")
    x = torch.randint(0, 60, (2, 8))
    assert FullRunner(model, x, torch.ones(2, 8, dtype=torch.bool), False)._mask() is None  # SDPA's fast path
    real = torch.ones(2, 8, dtype=torch.bool)
    real[0, 0] = False
    assert torch.equal(FullRunner(model, x, real, False)._mask(6), real[:, :6])


# --- token editing (LLaDA2.1), one step by hand ----------------------------------------------------


def editing_rule(threshold=0.5, editing=0.6, block_length=4, steps=4, post=0):
    from diffusion_moe.generation.denoising import TokenEditing

    config = DiffusionGenerationConfig(block_length=block_length, steps=steps, threshold=threshold,
                                       editing_threshold=editing, max_post_steps=post, mask_token_id=9)
    return TokenEditing(config, mask_token_id=9)


def test_token_editing_step_by_hand():
    rule = editing_rule()  # num_to_transfer = 4 // 4 = 1
    block = torch.tensor([[9, 9, 9, 5], [9, 9, 3, 4]])
    over = rule.start_block(block, torch.tensor([[True] * 4, [True] * 4]))
    assert over.tolist() == [False, False] and rule.max_steps == 4
    assert rule.before_step(block).tolist() == [False, False]
    tokens = torch.tensor([[1, 2, 7, 6], [1, 2, 8, 4]])
    # row 0: masks at .5 (not above the threshold), .9, .7 -> two confident -> both; decided 5 -> 6 at .6 (not above)
    # row 1: masks at .2, .3 -> none confident -> the best one; decided 3 -> 8 at .61 edits, 4 stays 4
    confidence = torch.tensor([[0.5, 0.9, 0.7, 0.6], [0.2, 0.3, 0.61, 0.99]])
    block, over = rule.update(block, tokens, confidence)
    assert block.tolist() == [[9, 2, 7, 5], [9, 2, 8, 4]]
    assert over.tolist() == [False, False]
    # next step: row 0 commits its last mask; row 1 edits nothing and still has a mask
    block, over = rule.update(block, torch.tensor([[1, 2, 7, 5], [1, 2, 8, 4]]), torch.full((2, 4), 0.1))
    assert block.tolist() == [[1, 2, 7, 5], [1, 2, 8, 4]] and over.tolist() == [False, False]
    # a step that starts without masks and edits nothing ends the block, per row
    block, over = rule.update(block, torch.tensor([[1, 2, 7, 5], [1, 6, 8, 4]]), torch.full((2, 4), 0.9))
    assert block.tolist() == [[1, 2, 7, 5], [1, 6, 8, 4]] and over.tolist() == [True, False]


def test_token_editing_without_a_threshold_commits_the_quota_and_idles_finished_rows():
    rule = editing_rule(threshold=None, block_length=4, steps=2)  # num_to_transfer 2, no confidence shortcut
    block = torch.tensor([[9, 9, 9, 9], [5, 6, 7, 8]])
    over = rule.start_block(block, torch.tensor([[True] * 4, [False] * 4]))  # row 1: nothing to decode
    assert over.tolist() == [False, True]
    tokens = torch.tensor([[1, 2, 3, 4], [0, 0, 0, 0]])
    block, over = rule.update(block, tokens, torch.tensor([[0.99, 0.2, 0.98, 0.1], [1.0] * 4]))
    assert block.tolist() == [[1, 9, 3, 9], [5, 6, 7, 8]] and over.tolist() == [False, True]


def test_token_editing_post_steps_end_the_block():
    rule = editing_rule(post=1)
    block = torch.tensor([[1, 2, 3, 4], [9, 2, 3, 4]])
    rule.start_block(block, torch.ones(2, 4, dtype=torch.bool))
    assert rule.max_steps == 4 + 1
    assert rule.before_step(block).tolist() == [False, False]  # row 0's first mask-free step
    assert rule.post_steps.tolist() == [1, 0]
    assert rule.before_step(block).tolist() == [True, False]  # its second one is past max_post_steps


def test_token_editing_ends_each_rows_block_on_its_own():
    rule = editing_rule()
    block = torch.tensor([[1, 2, 3, 4], [9, 2, 3, 4]])
    rule.start_block(block, torch.ones(2, 4, dtype=torch.bool))
    # row 0: no mask and no edit -> its block is over; row 1 commits its mask and goes on
    block, over = rule.update(block, torch.tensor([[1, 2, 3, 4], [5, 2, 3, 4]]), torch.full((2, 4), 0.1))
    assert block.tolist() == [[1, 2, 3, 4], [5, 2, 3, 4]] and over.tolist() == [True, False]


def test_mask_filling_commits_each_steps_quota_and_idles_rows_without_masks():
    config = DiffusionGenerationConfig(block_length=8, steps=5, mask_token_id=9)
    rule = MaskFilling(config, mask_token_id=9)
    block = torch.full((2, 8), 9)
    block[1] = torch.arange(8)  # row 1: nothing to decode
    assert rule.start_block(block, torch.ones(2, 8, dtype=torch.bool)).tolist() == [False, True]
    assert rule.max_steps == 5
    confidence = torch.linspace(0.9, 0.1, 8).expand(2, 8)  # position 0 is always the most confident
    commits, done = [], torch.tensor([False, False])
    while not done[0]:
        assert not rule.before_step(block).any()
        before = int((block[0] == 9).sum())
        block, done = rule.update(block, torch.full((2, 8), 3), confidence)
        commits.append(before - int((block[0] == 9).sum()))
    assert commits == [2, 2, 2, 1, 1]  # step_quota(8, 5), in order
    assert block[0].tolist() == [3] * 8 and block[1].tolist() == list(range(8))


def test_router_stats_report_no_drops_without_a_capacity():
    decision, stats = route(make_router(), left_padded([6, 3], 6))
    assert isinstance(stats.dropped_fraction, torch.Tensor) and float(stats.dropped_fraction) == 0.0
    assert stats.capacity is None and stats.experts_per_token.tolist() == [[2] * 6, [0, 0, 0, 2, 2, 2]]
    capped = route(make_router(capacity_factor=0.5), left_padded([6, 3], 6))[1]
    kept = capped.expert_mask.sum().item()
    assert float(capped.dropped_fraction) == pytest.approx(1 - kept / (9 * 2))


def test_expert_choice_gates_with_one_expert_per_token_are_not_renormalised():
    """k = 1: as LLaDA2's gate, the weight is the score itself (times the scaling factor), even
    for a token two experts chose; renormalising would give every gate 1/choosers."""
    from diffusion_moe.modeling.routing import build_router, routing_inputs_for

    config = tiny_config(router_type="expert_choice", num_experts_per_tok=1, router_score_function="sigmoid",
                         routed_scaling_factor=2.0, num_experts=4)
    router = build_router(config)
    logits = torch.randn(1, 8, 4)
    decision = router.decide(logits, routing_inputs_for(config, torch.ones(1, 8, dtype=torch.bool),
                                                        torch.arange(8).view(1, 8)))
    gates = torch.zeros(8, 4).index_put_((decision.token_index.reshape(-1),
                                          torch.arange(4).view(1, 4, 1).expand_as(decision.token_index).reshape(-1)),
                                         decision.gates.reshape(-1), accumulate=True)
    chosen = decision.chosen.view(8, 4)
    assert (chosen.sum(-1) > 1).any()  # a token two experts chose (this draw has one)
    torch.testing.assert_close(gates, logits.view(8, 4).sigmoid() * 2.0 * chosen, rtol=0, atol=1e-6)


def test_router_losses_are_computed_only_for_a_nonzero_coefficient():
    from diffusion_moe import DiffusionMoeForMaskedLM

    ids = torch.randint(1, 63, (2, 8))
    labels = ids.clone()
    for aux, z in ((0.0, 0.1), (0.5, 0.0)):
        model = DiffusionMoeForMaskedLM(tiny_config(router_aux_loss_coef=aux, router_z_loss_coef=z)).train()
        out = model(ids.masked_fill(torch.rand(2, 8) < 0.5, 63), labels=labels)
        assert (out.aux_loss is None) == (aux == 0) and (out.z_loss is None) == (z == 0)
        extra = (aux * out.aux_loss if aux else 0) + (z * out.z_loss if z else 0)
        assert out.loss.item() == pytest.approx((out.diffusion_loss + extra).item(), rel=1e-6)


def test_router_stats_carry_the_capacity_and_a_single_tokens_drops():
    ec = route(make_router(router_type="expert_choice"), left_padded([6, 3], 6))
    assert ec[1].capacity.tolist() == ec[0].capacity.tolist() == [max(6 * 2 // 8, 1), max(3 * 2 // 8, 1)]
    # one real token, k = 1, capacity 1: its one assignment is kept, nothing dropped
    decision, stats = route(make_router(num_experts_per_tok=1, capacity_factor=1.0), left_padded([1], 4))
    assert stats.expert_mask.sum().item() == 1 and float(stats.dropped_fraction) == 0.0


def test_each_blocks_mask_ratio_counts_only_its_own_real_tokens():
    """Block-causal capacity groups of 4, 4 and 2 real tokens (row 0) and of 4, 4 and 1 (row 1,
    left-padded): each block's k comes from its own masked / real count (linear_reverse, k 1..3)."""
    from diffusion_moe.modeling.routing import routing_inputs_for

    config = tiny_config(router_type="expert_choice", attention_layout="block_causal", block_size=4,
                         capacity_schedule="linear_reverse", capacity_min=1, capacity_max=3)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, 0] = False
    masked = torch.zeros(2, 10, dtype=torch.bool)
    masked[0, 4:6] = True  # row 0: block 1 half masked, the 2-token block 2 clean
    masked[1, 9] = True  # row 1: its 1-token last block masked
    positions = (padding.long().cumsum(-1) - 1).clamp(min=0)
    inputs = routing_inputs_for(config, padding, positions, masked=masked)
    # ratios 0, .5, 0 | 0, 0, 1 -> k = round(1 + 2 (1 - r)): 3, 2, 3 | 3, 3, 1
    assert inputs.experts_per_group.tolist() == [3, 2, 3, 3, 3, 1]


@pytest.mark.parametrize("top_p, coreset, score", [(0.75, [True, True, True, False], 0.8),
                                                   (0.3, [True, False, False, False], 0.8),
                                                   (0.3, [True, False, False, False], 0.25)])
def test_the_coreset_keeps_the_vote_prefix_up_to_top_p_and_the_first_past_it(top_p, coreset, score):
    """Votes 1/2, 1/4, 1/4, 0 (exact in binary) whatever the scores' scale (votes are divided by
    their sum): cumulative 1/2, 3/4, 1. With top_p = 3/4 the prefix up to 3/4 is kept, plus the
    first expert past it; with 0.3 only the first expert."""
    from diffusion_moe.modeling.routing import block_coreset
    from diffusion_moe.modeling.routing_groups import GroupedView, chunk_runs

    config = tiny_config(router_type="block", num_experts=4, num_experts_per_tok=1, block_router_size=4,
                         block_router_min_experts=1, block_router_top_p=top_p)
    scores = score * torch.tensor([[[1.0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]])
    padding = torch.ones(1, 4, dtype=torch.bool)
    allowed = block_coreset(scores, padding, GroupedView(chunk_runs(torch.arange(4).view(1, 4), 4)), config)
    assert allowed[0, 0].tolist() == coreset


def test_the_batch_group_lays_the_whole_batch_out_as_one_group():
    from diffusion_moe.modeling.routing_groups import BatchGroup

    batch = BatchGroup(2, 3, "cpu")
    x = torch.arange(12.0).view(2, 3, 2)
    assert torch.equal(batch.scatter(x, 0), x.view(1, 6, 2)) and torch.equal(batch.gather(batch.scatter(x, 0)), x)
    assert torch.equal(batch.flat_index, torch.arange(6).view(1, 6))
    assert torch.equal(batch.per_group(torch.tensor([7.0])), torch.full((2, 3), 7.0))
    assert torch.equal(batch.per_group(torch.tensor([[1.0, 2.0]])), torch.tensor([1.0, 2.0]).expand(2, 3, 2))
    assert torch.equal(batch.per_sequence_sum(torch.tensor([5.0])), torch.tensor([5.0, 5.0]))


@pytest.mark.parametrize("batch_level", [False, True])
def test_expert_choice_under_expert_parallelism_sends_its_slots_as_tokens(batch_level):
    """Transformers' EP replaces the experts' forward with its token-layout dispatch and marks the
    module; one process with the mark (and the plain forward) must give the unmarked logits."""
    from diffusion_moe import DiffusionMoeForMaskedLM

    model = DiffusionMoeForMaskedLM(tiny_config(router_type="expert_choice", batch_level_expert_choice=batch_level))
    ids = torch.randint(1, 60, (2, 10))
    padding = torch.ones(2, 10, dtype=torch.long)
    padding[1, :3] = 0
    layouts = []  # how each call reaches the experts: token layout (EP) or expert layout
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(
            lambda module, args, kwargs: layouts.append("expert" if "token_index" in kwargs else "token"),
            with_kwargs=True)
    with torch.no_grad():
        expected = model(ids, attention_mask=padding).logits
        for layer in model.model.layers:
            layer.mlp.experts._is_expert_parallel = True
        got = model(ids, attention_mask=padding).logits
    assert layouts == ["expert", "expert", "token", "token"]
    torch.testing.assert_close(got[padding.bool()], expected[padding.bool()], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length, schedule, slots", [(8, "constant", 2), (4, "constant", 1), (8, "linear_reverse", 4)])
def test_static_expert_choice_slots_are_the_most_a_group_of_its_size_can_get(length, schedule, slots):
    """Static shapes: every expert gets size * k_max // E slots (at least 1), k_max = k, or
    capacity_max under a schedule; never more than the group holds."""
    from diffusion_moe.modeling.routing import routing_inputs_for

    config = tiny_config(router_type="expert_choice", capacity_schedule=schedule, capacity_min=1, capacity_max=4)
    padding = torch.ones(2, length, dtype=torch.bool)
    positions = torch.arange(length).expand(2, length)
    inputs = routing_inputs_for(config, padding, positions, mask_ratio=torch.tensor([0.5, 1.0]), static=True)
    assert inputs.expert_choice_slots == slots


@pytest.mark.parametrize("layout, real", [("bidirectional", [8, 8]), ("block_causal", [4, 4, 4, 4])])
def test_capacity_groups_are_sequences_or_attention_blocks(layout, real):
    """Expert choice's capacity groups: whole sequences in a bidirectional model, however long
    against `block_size`; each attention block in a block-causal one."""
    from diffusion_moe.modeling.routing import routing_inputs_for

    config = tiny_config(router_type="expert_choice", attention_layout=layout, block_size=4)
    inputs = routing_inputs_for(config, torch.ones(2, 8, dtype=torch.bool), torch.arange(8).expand(2, 8))
    assert inputs.real_per_group.tolist() == real


def test_scheduled_token_choice_takes_each_tokens_k_and_renormalises_only_above_one():
    """Token choice under a capacity schedule: a token of a sequence with k_t experts gets exactly
    k_t nonzero weights (k_t from 1 to capacity_max = 4 > num_experts_per_tok), renormalised to 1
    when k_t > 1, the score itself when k_t = 1 (as LLaDA2's gate for k = 1)."""
    router = make_router(capacity_schedule="linear_reverse", capacity_min=1, capacity_max=4, norm_topk_prob=True)
    padding = torch.ones(4, 6, dtype=torch.bool)
    ratio = torch.tensor([1.0, 0.6, 0.3, 0.0])
    decision, stats = route(router, padding, mask_ratio=ratio)
    k = decision.inputs.experts_per_token.view(-1)
    assert sorted(set(k.tolist())) == [1, 2, 3, 4]
    weights = decision.expert_weights.view(24, -1)
    assert torch.equal((weights > 0).sum(-1), k) and torch.equal(stats.experts_per_token.view(-1), k)
    sums = weights.sum(-1)
    torch.testing.assert_close(sums[k > 1], torch.ones(int((k > 1).sum())))
    one = k == 1
    scores = decision.router_probs.view(24, -1).gather(-1, decision.expert_index.view(24, -1)[:, :1])
    torch.testing.assert_close(sums[one], scores[one].view(-1))
    assert (sums[one] < 1).all()


def test_group_limited_token_choice_keeps_two_groups_apart():
    """n_group = 2, topk_group = 1: every token's experts come from one half of the experts."""
    router = make_router(n_group=2, topk_group=1, num_experts_per_tok=2)
    decision, _ = route(router, torch.ones(3, 16, dtype=torch.bool))
    halves = decision.expert_index.view(48, 2) // 4
    assert torch.equal(halves[:, 0], halves[:, 1])
    assert set(halves[:, 0].tolist()) == {0, 1}  # both halves are used, by different tokens


def test_the_loss_defaults_to_elbo_reads_label_zero_and_computes_bf16_logits_in_fp32():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.tensor([[0, -100, 3, 0, -100], [-100, 6, 0, -100, -100]])  # token 0 is a label like any other
    padding = torch.ones(2, 5, dtype=torch.long)
    padding[1, 4] = 0
    weights = diffusion_loss_weights(labels, padding)
    # ELBO: t_b = labelled / real tokens (3/5, 2/4), each labelled position weighs 1 / (t_b * 9 real tokens)
    expected_weights = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 0]]) / torch.tensor([[0.6 * 9], [0.5 * 9]])
    torch.testing.assert_close(weights, expected_weights)
    loss = diffusion_loss.masked_diffusion_loss(logits, labels, padding)
    log_p = logits.log_softmax(-1)
    expected = sum(expected_weights[b, i] * -log_p[b, i, labels[b, i]]
                   for b in range(2) for i in range(5) if labels[b, i] >= 0)
    torch.testing.assert_close(loss, expected)
    half = logits.bfloat16()
    upcast = diffusion_loss.masked_diffusion_loss(half.float(), labels, padding)
    assert torch.equal(diffusion_loss.masked_diffusion_loss(half, labels, padding), upcast)  # fp32, not bf16


# --- dtypes in a bf16 model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    """A saved fp32 checkpoint loaded with dtype=bfloat16, for each token-layout rule."""
    folder = tmp_path_factory.mktemp("bf16")
    models = {}
    for router in ("token_choice", "block", "block_pool"):
        config = tiny_config(router_type=router, router_score_function="sigmoid", expert_capacity=4,
                             attention_layout="block_causal", block_size=4, block_router_size=4)
        torch.manual_seed(0)
        DiffusionMoeForMaskedLM(config).save_pretrained(folder / router)
        models[router] = DiffusionMoeForMaskedLM.from_pretrained(folder / router, dtype=torch.bfloat16)
    return models


@pytest.mark.parametrize("router", ["token_choice", "block", "block_pool"])
def test_a_bf16_model_keeps_its_expert_bias_in_fp32_and_hands_the_experts_bf16_weights(bf16_models, router):
    """The loss-free bias moves in steps of `expert_bias_update_rate` (1e-3) that bf16 would round
    away, so it stays fp32; the experts get their weights in the hidden states' dtype, as
    Transformers' MoE experts expect."""
    model = bf16_models[router]
    gates = [m for m in model.modules() if isinstance(m, DiffusionMoeRouter)]
    assert gates and all(g.expert_bias.dtype == torch.float32 and g.weight.dtype == torch.bfloat16 for g in gates)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((args[0].dtype, args[2].dtype)))
             for m in model.modules() if isinstance(m, DiffusionMoeExperts)]
    with torch.no_grad():
        model(torch.randint(1, MASK, (2, 8)))
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_routing_inputs_under_a_schedule_without_a_mask_ratio_name_what_to_pass(router):
    from diffusion_moe.modeling.routing import routing_inputs_for

    config = tiny_config(router_type=router, capacity_schedule="linear_reverse", capacity_min=1, capacity_max=3)
    padding = torch.ones(1, 4, dtype=torch.bool)
    message = ("capacity_schedule='linear_reverse' needs the mask ratio: pass `mask_ratio` explicitly, or "
               "`input_ids` with `mask_token_id` set in the config.")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        routing_inputs_for(config, padding, torch.arange(4).unsqueeze(0))


def test_capacity_keeps_a_token_whose_weight_rounds_to_exactly_one():
    """k = 1: a dominant router logit gives a softmax weight of exactly 1.0 in fp32. Under
    `capacity_factor` that token outranks a weaker one for the expert's single slot (a weight
    of 1.0 is a real weight, not the "dropped" marker)."""
    router = make_router(num_experts_per_tok=1, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0
    hidden = torch.zeros(1, 2, router.config.hidden_size)
    hidden[0, 0, 0], hidden[0, 1, 0] = 0.5, 100.0  # both pick expert 0; token 1's weight is 1.0
    decision, _ = route(router, torch.ones(1, 2, dtype=torch.bool), hidden=hidden)
    assert decision.expert_index[:, 0].tolist() == [0, 0]
    assert decision.expert_weights[1, 0].item() == 1.0 and decision.expert_weights[0, 0].item() == 0.0
