"""Confidences are the published references': greedy generate() equals LLaDA2's / dMoE's
generate token for token wherever the reference's argmax is not the mask token.

The references rank positions by the predicted token's probability under the softmax over
the FULL vocabulary. Dropping the mask token before the softmax divides each position by a
different 1 - p(mask) and reorders close positions (issue 18: 16 of 64 tokens differed on a
LLaDA2-layout checkpoint with dMoE's block routing). The models here make the ranking
sensitive on purpose: near-uniform predictions over a small vocabulary, and a mask token
that holds a varying share of every position's probability without ever being the argmax.
The references are driven by the model's own uncached forward, so only the sampler is
compared (the forward is checked against an independent one in test_llada2.py).
"""

import math

import pytest
import torch

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.conversion.llada2 import convert_llada2_to_diffusion_moe
from diffusion_moe.generation import generation_utils
from diffusion_moe.generation.denoising import predict, select_commits
from llada2_reference import (
    random_llada2_weights,
    reference_generate_llada20,
    reference_generate_llada21,
    tiny_llada2_config,
    write_llada2_checkpoint,
)

ROUTERS = ("token_choice", "expert_choice", "block", "block_pool")
V, PAD, MASK = 8, 6, 7  # tokens 0..5; no EOS (generation runs to the end, so every token is compared)
NO_EOS = -1  # the references' eos_id: a token never produced


pytestmark = pytest.mark.usefixtures("single_thread")


def near_uniform_model(router, seed, mask_row="mean"):
    """2 layers, H=32, 8 experts top-2, attention/router blocks of 4, 8 tokens, random weights.

    lm_head ~ N(0, 0.5 / sqrt(H)): predictions are near-uniform (top probability 0.16-0.24
    against 1/8), so positions' confidences are close. mask_row "mean": the mask token's row
    is the mean of tokens 0 and 1, so its logit never exceeds the larger of theirs (it is
    never the argmax) yet it holds a share of each position's probability (0.07-0.11) that
    varies from position to position. "boosted": the row is 1.2 times token 0's, so the mask token is the argmax
    wherever token 0 leads with a positive logit.
    """
    torch.manual_seed(seed)
    block = {"block": {"block_router_size": 4, "block_router_min_experts": 2},
             "block_pool": {"expert_capacity": 4}}.get(router, {})
    config = DiffusionMoeConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, mask_token_id=MASK,
        pad_token_id=PAD, attention_layout="block_causal", block_size=4, router_type=router, **block,
    )
    model = DiffusionMoeForMaskedLM(config).eval()
    with torch.no_grad():
        head = model.lm_head.weight
        head.normal_(0, 0.5 / math.sqrt(32))
        head[MASK] = 0.5 * (head[0] + head[1]) if mask_row == "mean" else 1.2 * head[0]
    return model


def prompt_for(seed, length=5):
    return torch.randint(0, V - 3, (1, length), generator=torch.Generator().manual_seed(seed + 100))


class Forward:
    """The model's uncached block-causal forward as the references' `logits_fn`; counts the
    masked positions of the current block (its last `block` positions) whose argmax is the
    mask token."""

    def __init__(self, model, block, mask=MASK):
        self.model, self.block, self.mask, self.mask_argmax = model, block, mask, 0

    def __call__(self, x):
        logits = self.model(x).logits
        masked = x[0, -self.block :] == self.mask
        self.mask_argmax += int((logits[0, -self.block :].argmax(-1) == self.mask)[masked].sum())
        return logits


def differing(got, want) -> int:
    return int((got != want).sum())


# --- LLaDA2.0 / dMoE mask filling -------------------------------------------------------


@pytest.mark.parametrize("threshold", [None, 0.1875], ids=["quota", "threshold"])
@pytest.mark.parametrize("seed", [0, 3])
@pytest.mark.parametrize("router", ROUTERS)
def test_greedy_generate_is_the_published_generate_token_for_token(router, seed, threshold):
    """Block 16, 16 steps, a 5-token prompt, 32 new tokens (the prompt's tail block, then two
    more), every router, cached and uncached, with and without a threshold (1.5 / V: some
    positions pass it)."""
    model, ids = near_uniform_model(router, seed), prompt_for(seed)
    forward = Forward(model, 16)
    want = reference_generate_llada20(forward, ids, 32, 16, 16, math.inf if threshold is None else threshold, MASK,
                                      NO_EOS)[0]
    assert forward.mask_argmax == 0  # so the published code never "commits" the mask token here
    assert want.shape == (32,)
    for use_cache in (True, False):
        got = model.generate(ids, max_new_tokens=32, block_length=16, steps=16, threshold=threshold,
                             use_cache=use_cache, eos_token_id=None)[0, ids.shape[1] :]
        assert differing(got, want) == 0, (use_cache, got.tolist(), want.tolist())


@pytest.fixture(scope="module")
def dmoe_checkpoint(tmp_path_factory):
    """A tiny LLaDA2-layout checkpoint with dMoE's block routing (mode "aggregate"), converted:
    160 tokens, lm_head scaled by 0.5, the mask token's row the mean of two others."""
    folder = tmp_path_factory.mktemp("dmoe_confidence")
    config = tiny_llada2_config(mode="aggregate", core_threshold=0.6)
    weights = random_llada2_weights(config, seed=0, lm_head_scale=0.5)
    mask, eos = 157, 156
    weights["lm_head.weight"][mask] = 0.5 * (weights["lm_head.weight"][0] + weights["lm_head.weight"][1])
    write_llada2_checkpoint(folder / "src", config, weights)
    convert_llada2_to_diffusion_moe(folder / "src", folder / "dst", mask, eos)
    # dMoE keeps at least 16 experts; with 8 that is all of them, so use a smaller floor (as test_llada2.py)
    model = DiffusionMoeForMaskedLM.from_pretrained(folder / "dst", dtype=torch.float32,
                                                    block_router_min_experts=6).eval()
    return model, mask


@pytest.mark.parametrize("threshold", [0.95, None], ids=["threshold", "quota"])
def test_block_routing_on_a_llada2_checkpoint_is_dmoe_generate(dmoe_checkpoint, threshold):
    """Issue 18's case: LLaDA2's block 32, 32 steps; a 20-token prompt, 64 new tokens (the
    prompt's tail block, then two more). Before the fix 16 of the 64 tokens differed, from
    the second block on."""
    model, mask = dmoe_checkpoint
    assert model.config.router_type == "block"
    ids = torch.randint(0, 155, (1, 20), generator=torch.Generator().manual_seed(4))
    forward = Forward(model, 32, mask)
    want = reference_generate_llada20(forward, ids, 64, 32, 32, math.inf if threshold is None else threshold, mask,
                                      NO_EOS)[0]
    assert forward.mask_argmax == 0 and want.shape == (64,)
    for use_cache in (True, False):
        got = model.generate(ids, max_new_tokens=64, threshold=threshold, use_cache=use_cache, eos_token_id=None)
        assert differing(got[0, 20:], want) == 0, use_cache


# --- LLaDA2.1 token editing -------------------------------------------------------------


@pytest.mark.parametrize("threshold, editing, post", [(0.1875, 0.15, 4), (0.5, 0.0, 2)], ids=["quality", "speed"])
@pytest.mark.parametrize("router", ROUTERS)
def test_editing_is_the_published_llada21_generate_token_for_token(router, threshold, editing, post):
    """Block 8, steps 8 (LLaDA2.1's one mask per step at least), 24 new tokens; LLaDA2.1's
    quality- and speed-like settings, scaled to these near-uniform confidences."""
    model, ids = near_uniform_model(router, 3), prompt_for(3)
    forward = Forward(model, 8)
    want = reference_generate_llada21(forward, ids, 24, 8, threshold, editing, post, MASK, NO_EOS)[0]
    assert forward.mask_argmax == 0 and want.shape == (24,)
    for use_cache in (True, False):
        got = model.generate(ids, max_new_tokens=24, block_length=8, steps=8, threshold=threshold,
                             editing_threshold=editing, max_post_steps=post, use_cache=use_cache,
                             eos_token_id=None)[0, ids.shape[1] :]
        assert differing(got, want) == 0, (use_cache, got.tolist(), want.tolist())


# --- where the reference's argmax is the mask token -----------------------------------------


def test_the_best_non_mask_token_keeps_its_full_softmax_probability():
    """Two positions; the mask token is index 2. Position 0: p = (0.3, 0.2, 0.5), the mask
    token is the argmax; position 1: p = (0.4, 0.35, 0.25)."""
    probs = torch.tensor([[[0.3, 0.2, 0.5], [0.4, 0.35, 0.25]]])
    scores = probs.log()
    tokens, confidence = predict(scores, greedy=True, mask_token_id=2)
    assert tokens.tolist() == [[0, 0]]  # never the mask token
    assert confidence[0].tolist() == pytest.approx([0.3, 0.4])  # full softmax, not renormalised (0.6, 0.533)
    # so position 1 commits first, as in the references; renormalised, position 0 would
    assert select_commits(confidence, torch.ones(1, 2, dtype=torch.bool), 1, None).tolist() == [[False, True]]
    _, margin = predict(scores, greedy=True, remasking="margin", mask_token_id=2)
    assert margin[0].tolist() == pytest.approx([0.1, 0.05])  # top-1 - top-2 among the non-mask tokens
    _, entropy = predict(scores, greedy=True, remasking="entropy", mask_token_id=2)
    expected = torch.exp(-torch.special.entr(probs).sum(-1))  # of the full distribution
    assert entropy[0].tolist() == pytest.approx(expected[0].tolist())
    torch.manual_seed(0)
    sampled, confidence = predict(scores.expand(1000, 2, 3).contiguous(), greedy=False, mask_token_id=2)
    assert not (sampled == 2).any()  # sampling is conditioned on not drawing the mask token
    assert (sampled[:, 0] == 0).float().mean().item() == pytest.approx(0.6, abs=0.06)  # 0.3 / (0.3 + 0.2)
    full = probs.expand(1000, 2, 3).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(confidence, full)  # the sampled token's full-softmax probability


def test_a_position_left_with_only_the_mask_token_falls_back_and_commits_last():
    scores = torch.tensor([[[float("-inf"), float("-inf"), 0.0], [0.0, -1.0, -2.0]]])  # position 0: only the mask
    fallback = torch.tensor([[[0.0, 1.0, 5.0], [0.0, -1.0, -2.0]]])
    for greedy in (True, False):
        for remasking in ("low_confidence", "margin", "entropy", "random"):
            tokens, score = predict(scores, greedy, remasking, mask_token_id=2, fallback=fallback)
            assert tokens[0, 0] == 1 if greedy else tokens[0, 0] != 2
            assert score[0, 0] == 0
    tokens, _ = predict(scores, True, mask_token_id=2)  # without a fallback: some non-mask id
    assert tokens[0, 0] != 2


@pytest.mark.parametrize("router", ROUTERS)
def test_where_the_argmax_is_the_mask_token_generate_commits_the_best_other_token(router):
    """A model whose mask token is often the argmax. The published code "commits" the mask
    token there (the position stays masked and masks remain in its answer); generate takes
    the best non-mask token with its full-softmax probability, which is the published code
    with that one change (`best_non_mask=True`), cached or not."""
    model, ids = near_uniform_model(router, 2, mask_row="boosted"), prompt_for(2)
    published = Forward(model, 16)
    as_published = reference_generate_llada20(published, ids, 32, 16, 16, 0.1875, MASK, NO_EOS)[0]
    assert published.mask_argmax > 0
    assert (as_published == MASK).any()  # left masked by the published code
    want = reference_generate_llada20(Forward(model, 16), ids, 32, 16, 16, 0.1875, MASK, NO_EOS,
                                      best_non_mask=True)[0]
    assert not (want == MASK).any()
    for use_cache in (True, False):
        got = model.generate(ids, max_new_tokens=32, block_length=16, steps=16, threshold=0.1875,
                             use_cache=use_cache, eos_token_id=None)[0, ids.shape[1] :]
        assert differing(got, want) == 0, use_cache


def test_sampling_that_leaves_only_the_mask_token_still_commits_other_tokens(monkeypatch):
    """top_k=1 keeps one token per position: where it is the mask token, the position falls
    back to the best non-mask token of the scores processed without the mask token (the
    behaviour before confidences followed the references), with confidence 0."""
    model, ids = near_uniform_model("token_choice", 2, mask_row="boosted"), prompt_for(2)
    stuck, original = [], generation_utils.only_mask_left

    def spy(scores, mask_id):
        found = original(scores, mask_id)
        stuck.append(int(found.sum()))
        return found

    monkeypatch.setattr(generation_utils, "only_mask_left", spy)
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=32, block_length=16, steps=16, do_sample=True, top_k=1,
                         eos_token_id=None)
    assert sum(stuck) > 0  # the fallback ran
    assert not (out[0, ids.shape[1] :] == MASK).any()
