"""Block-parallel denoising generate(): reference semantics, cache, batching, stats, errors."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GenerationConfig, PreTrainedTokenizerFast, TextIteratorStreamer

from diffusion_moe.configuration.configuration_diffusion_moe import CAPACITY_SCHEDULES, DiffusionMoeConfig
from diffusion_moe.generation import DiffusionGenerationConfig
from diffusion_moe.generation.denoising import select_commits, step_quota
from diffusion_moe.generation.generation_utils import DiffusionGenerateOutput
from diffusion_moe.modeling.modeling_diffusion_moe import DiffusionMoeForMaskedLM

PAD, EOS, MASK, V = 61, 62, 63, 64
ROUTERS = ("token_choice", "expert_choice", "block", "block_pool")


def tiny_model(layout="block_causal", router="token_choice", seed=0, sharpen=8.0, **overrides):
    """2 layers, H=32, 8 experts top-2, attention/router blocks of 4; lm_head scaled so predictions are confident."""
    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, mask_token_id=MASK,
        eos_token_id=EOS, pad_token_id=PAD, attention_layout=layout, block_size=4, router_type=router,
        block_router_size=4, block_router_min_experts=2, expert_capacity=4 if router == "block_pool" else None,
    )
    kwargs.update(overrides)
    model = DiffusionMoeForMaskedLM(DiffusionMoeConfig(**kwargs)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    return model


def prompt(length, seed=1):
    return torch.randint(0, 60, (1, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts):
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), PAD)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[1] :] = p[0]
        mask[i, width - p.shape[1] :] = 1
    return ids, mask


GEN = dict(max_new_tokens=10, block_length=4, steps=2)


def reference_generate(model, ids, max_new_tokens, block_length, steps, threshold=None, eos=EOS):
    """LLaDA2 / dMoE reference loop, batch 1, greedy, no cache: re-run prefix + current block every step."""
    P = ids.shape[1]
    num_blocks = -(-(P + max_new_tokens) // block_length)
    x = torch.full((1, num_blocks * block_length), MASK)
    x[:, :P] = ids
    quota = [block_length // steps + (1 if j < block_length % steps else 0) for j in range(steps)]
    for blk in range(P // block_length, num_blocks):
        end = (blk + 1) * block_length
        for q in quota:
            block = x[0, end - block_length : end]  # a view: writes go into x
            masked = block == MASK
            if not masked.any():
                break
            logits = model(x[:, :end]).logits[0, -block_length:].float()
            probs = logits.softmax(-1)  # over the full vocabulary, as LLaDA2's / dMoE's generate
            predicted = logits.index_fill(-1, torch.tensor([MASK]), float("-inf")).argmax(-1)  # never the mask token
            confidence = probs.gather(-1, predicted.unsqueeze(-1)).squeeze(-1)  # its full-softmax probability
            confidence = torch.where(masked, confidence, torch.tensor(float("-inf")))
            if threshold is not None and (confidence > threshold).sum() >= q:
                commit = confidence > threshold
            else:
                commit = torch.zeros_like(masked)
                commit[confidence.topk(min(q, int(masked.sum()))).indices] = True
            block[commit] = predicted[commit]
        if (x[0, P:end] == eos).any():
            break
    answer = x[0, P : P + max_new_tokens].clone()
    answer[answer == MASK] = PAD
    eos_positions = (answer == eos).nonzero()
    if len(eos_positions):
        answer[int(eos_positions[0]) + 1 :] = PAD
    return torch.cat([ids[0], answer])


# --- reference semantics, cache ---------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.parametrize("prompt_length", [3, 8])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_block_causal_matches_reference_loop(prompt_length, threshold):
    model = tiny_model()
    ids = prompt(prompt_length)
    expected = reference_generate(model, ids, 10, 4, 3, threshold)
    for use_cache in (True, False):
        out = model.generate(ids, max_new_tokens=10, block_length=4, steps=3, threshold=threshold, use_cache=use_cache)
        assert out.shape == (1, prompt_length + 10)
        assert out[0].tolist() == expected.tolist()


def test_reference_loop_stops_after_eos_block():
    model = tiny_model()
    ids = prompt(5)
    plain = model.generate(ids, **GEN, eos_token_id=None)[0, 5:]
    eos = int(plain[3])  # declare the token at answer position 3 to be EOS
    first = int((plain == eos).nonzero()[0])
    out = model.generate(ids, **GEN, eos_token_id=eos, return_dict_in_generate=True)
    answer = out.sequences[0, 5:]
    assert answer[: first + 1].tolist() == plain[: first + 1].tolist()
    assert (answer[first + 1 :] == PAD).all()
    # the prompt's tail block [4, 8) holds answer positions 0..2, so EOS at <= 3 ends decoding in block [8, 12)
    full = model.generate(ids, **GEN, eos_token_id=None, return_dict_in_generate=True)
    assert out.num_forward_passes < full.num_forward_passes
    assert out.sequences[0].tolist() == reference_generate(model, ids, 10, 4, 2, eos=eos).tolist()


@pytest.mark.smoke
@pytest.mark.parametrize("router", [*ROUTERS, "capacity_factor"])
@pytest.mark.parametrize("threshold", [None, 0.2])
def test_exact_cache_equals_no_cache_batched(router, threshold):
    # expert choice and capacity-limited token choice select within each attention block of
    # a block-causal model, so they are as cache-exact as the other routers
    if router == "capacity_factor":
        model = tiny_model(router="token_choice", capacity_factor=1.0, seed=3)
    else:
        model = tiny_model(router=router, seed=3)
    ids, mask = left_pad([prompt(2, 1), prompt(9, 2), prompt(5, 3)])
    cached = model.generate(ids, mask, **GEN, threshold=threshold, return_dict_in_generate=True)
    uncached = model.generate(ids, mask, **GEN, threshold=threshold, use_cache=False, return_dict_in_generate=True)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert cached.num_forward_passes == uncached.num_forward_passes
    assert cached.router_stats["unique_experts_per_layer"] == pytest.approx(
        uncached.router_stats["unique_experts_per_layer"]
    )


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_projecting_only_the_masked_positions_changes_no_token(router, use_cache, monkeypatch):
    """generate() projects only the block positions still masked onto the vocabulary; with
    processors that read each position's answer offset, batched and left-padded, the tokens
    are those of projecting the whole block."""
    import diffusion_moe.generation.generation_utils as generation_utils

    model = tiny_model(router=router, seed=3)
    ids, mask = left_pad([prompt(2, 1), prompt(9, 2), prompt(5, 3)])
    settings = dict(**GEN, threshold=0.3, use_cache=use_cache, repetition_penalty=3.0, min_new_tokens=5)
    narrowed = model.generate(ids, mask, **settings)
    monkeypatch.setattr(generation_utils, "_predicted_columns", lambda positions: None)
    assert torch.equal(narrowed, model.generate(ids, mask, **settings))


@pytest.mark.parametrize("schedule", CAPACITY_SCHEDULES)
@pytest.mark.parametrize("router", ROUTERS)
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lengths=st.lists(st.integers(1, 9), min_size=2, max_size=3), later=st.integers(1, 3), seed=st.integers(0, 99))
def test_capacity_schedules_keep_block_causality(router, schedule, lengths, later, seed):
    # each attention block reads its own mask ratio, so: later blocks never change earlier
    # blocks' logits, whatever they hold; cached == uncached; batched == alone
    model = tiny_model(router=router, seed=seed, capacity_schedule=schedule, capacity_min=1, capacity_max=4)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 60, (1, 4 * (later + 1)), generator=g)
    ids[torch.rand(ids.shape, generator=g) < 0.5] = MASK
    changed = ids.clone()
    changed[0, 4:] = torch.where(torch.rand(4 * later, generator=g) < 0.5, MASK, torch.randint(0, 60, (4 * later,)))
    torch.testing.assert_close(model(ids).logits[:, :4], model(changed).logits[:, :4], rtol=0, atol=1e-6)
    prompts = [prompt(n, seed + i) for i, n in enumerate(lengths)]
    batch, mask = left_pad(prompts)
    cached = model.generate(batch, mask, **GEN, threshold=0.3)
    assert torch.equal(cached, model.generate(batch, mask, **GEN, threshold=0.3, use_cache=False))
    for i, p in enumerate(prompts):
        alone = model.generate(p, **GEN, threshold=0.3)
        assert cached[i, batch.shape[1] :].tolist() == alone[0, p.shape[1] :].tolist()


def test_prefix_buffer_cache_behaves_as_dynamic_cache_without_copying_the_prefix():
    from transformers.cache_utils import DynamicCache

    from diffusion_moe.generation.prefix_cache import prefix_buffer_cache

    buffered, dynamic = prefix_buffer_cache(num_layers=2, max_length=12), DynamicCache()
    for length, crop_to in [(5, 5), (3, 5), (3, 8), (4, 8)]:  # prefill, step, extend, step
        for layer in range(2):
            new = torch.randn(2, 3, length, 4), torch.randn(2, 3, length, 4)
            got, expected = buffered.update(*new, layer), dynamic.update(*new, layer)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
            assert got[0].data_ptr() == buffered.layers[layer].key_buffer.data_ptr()  # a view, not a copy
        for cache in (buffered, dynamic):
            cache.crop(crop_to - cache.get_seq_length())
        assert buffered.get_seq_length() == dynamic.get_seq_length() == crop_to
    with pytest.raises(ValueError, match="max_length 12"):
        buffered.update(torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4), 0)


def test_exact_cache_needs_aligned_block_length():
    model = tiny_model(block_size=8, block_router_size=8)
    with pytest.raises(ValueError, match="block_length.*block_size"):
        model.generate(prompt(3), max_new_tokens=8, block_length=4, steps=2)
    out = model.generate(prompt(3), max_new_tokens=8, block_length=4, steps=2, use_cache=False)
    assert out.shape == (1, 11)


# --- batching ------------------------------------------------------------------------------


@pytest.mark.smoke
@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
@pytest.mark.parametrize("router", ROUTERS)
def test_batch_invariance(layout, router):
    model = tiny_model(layout, router, seed=5)
    prompts = [prompt(3, 11), prompt(9, 12), prompt(6, 13)]
    ids, mask = left_pad(prompts)
    caches = [{"use_cache": True}, {"use_cache": False}] if layout == "block_causal" else [{"use_cache": False}]
    for cache in caches:
        batched = model.generate(ids, mask, **GEN, **cache)
        assert batched.shape == (3, ids.shape[1] + 10)
        assert torch.equal(batched[:, : ids.shape[1]], ids)
        for i, p in enumerate(prompts):
            alone = model.generate(p, **GEN, **cache)
            assert batched[i, ids.shape[1] :].tolist() == alone[0, p.shape[1] :].tolist(), (router, cache, i)


def test_right_padding_rejected():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7, PAD], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="left"):
        model.generate(ids, mask, **GEN)


# --- step schedule, threshold, sampling ----------------------------------------------------


def test_step_quota_schedule():
    assert step_quota(32, 32) == [1] * 32
    assert step_quota(10, 4) == [3, 3, 2, 2]
    assert step_quota(7, 3) == [3, 2, 2]
    assert all(sum(step_quota(n, s)) == n for n in range(1, 20) for s in range(1, n + 1))


def test_generate_commits_the_quota_each_step():
    model = tiny_model()
    ids = prompt(8)  # two whole prompt blocks: decoding starts on a fresh block
    out = model.generate(
        ids, max_new_tokens=12, block_length=4, steps=3, output_history=True, return_dict_in_generate=True,
        eos_token_id=None,
    )
    undecided = [int((h == MASK).sum()) for h in out.history]
    commits = [12 - undecided[0]] + [a - b for a, b in zip(undecided, undecided[1:])]
    assert commits == [2, 1, 1] * 3  # blocks of 4 tokens, 3 steps: quota [2, 1, 1]
    assert len(out.history) == out.num_forward_passes == 9
    assert (out.sequences != MASK).all()


def test_select_commits_threshold_rule():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.7], [0.9, 0.2, 0.1, 0.3]])
    cand = torch.tensor([[True, True, True, True], [True, True, True, False]])
    # row 0: three candidates above 0.5 >= quota 2 -> all three; row 1: one above -> the quota best
    got = select_commits(scores, cand, quota=2, threshold=0.5)
    assert got.tolist() == [[True, True, False, True], [True, True, False, False]]
    assert select_commits(scores, cand, quota=2, threshold=None).tolist() == [
        [True, True, False, False], [True, True, False, False]
    ]
    # strictly above: a score equal to the threshold is not confident (as in LLaDA's `> threshold`)
    at = torch.tensor([[0.5, 0.6, 0.5, 0.1]])
    assert select_commits(at, torch.ones(1, 4, dtype=torch.bool), quota=1, threshold=0.5).tolist() == [
        [False, True, False, False]
    ]
    few = torch.tensor([[False, False, True, False], [False, False, False, False]])
    assert select_commits(scores, few, quota=3, threshold=None).tolist() == [[False, False, True, False], [False] * 4]


def test_threshold_commits_more_per_step():
    model = tiny_model()
    ids = prompt(8)
    off = model.generate(ids, **GEN, eos_token_id=None, return_dict_in_generate=True)
    on = model.generate(ids, **GEN, eos_token_id=None, threshold=1e-6, return_dict_in_generate=True)
    assert off.num_forward_passes == 3 * 2  # 3 blocks x 2 steps
    assert on.num_forward_passes == 3  # everything clears the threshold: one step per block


def test_greedy_is_deterministic_and_sampling_is_seeded():
    model = tiny_model(layout="bidirectional")
    ids = prompt(5)
    assert torch.equal(model.generate(ids, **GEN), model.generate(ids, **GEN))
    torch.manual_seed(0)
    a = model.generate(ids, **GEN, do_sample=True, temperature=1.0, top_k=5, top_p=0.9)
    torch.manual_seed(0)
    b = model.generate(ids, **GEN, do_sample=True, temperature=1.0, top_k=5, top_p=0.9)
    assert torch.equal(a, b) and not (a == MASK).any()


@pytest.mark.parametrize("remasking", ["low_confidence", "random", "margin", "entropy"])
def test_remasking_strategies_fill_every_position(remasking):
    model = tiny_model()
    out = model.generate(prompt(6), **GEN, remasking=remasking, threshold=0.9, eos_token_id=None)
    assert out.shape == (1, 16) and not (out == MASK).any()


def test_eos_early_stop():
    model = tiny_model(seed=2)
    ids = prompt(8)
    plain = model.generate(ids, **GEN, eos_token_id=None)[0, 8:]
    eos = int(plain[1])
    first = int((plain == eos).nonzero()[0])
    late = model.generate(ids, **GEN, eos_token_id=eos, return_dict_in_generate=True)
    early = model.generate(ids, **GEN, eos_token_id=eos, eos_early_stop=True, return_dict_in_generate=True)
    for out in (late, early):
        assert out.sequences[0, 8 : 8 + first + 1].tolist() == plain[: first + 1].tolist()
        assert (out.sequences[0, 8 + first + 1 :] == PAD).all()
    assert early.num_forward_passes <= late.num_forward_passes


# --- bidirectional approximate caches --------------------------------------------------------


@pytest.mark.parametrize("approximate_cache", ["prefix", "dual"])
def test_bidirectional_approximate_cache(approximate_cache):
    model = tiny_model(layout="bidirectional")
    ids, mask = left_pad([prompt(3, 1), prompt(7, 2)])
    settings = dict(GEN, eos_token_id=None, return_dict_in_generate=True)
    out = model.generate(ids, mask, **settings, approximate_cache=approximate_cache)
    full = model.generate(ids, mask, **settings)
    assert out.sequences.shape == full.sequences.shape and not (out.sequences == MASK).any()
    assert out.num_forward_passes == full.num_forward_passes
    # with one step per block only the (exact) first, full forward of each block runs
    one_step = dict(max_new_tokens=8, block_length=4, steps=1)
    assert torch.equal(
        model.generate(ids, mask, **one_step, approximate_cache=approximate_cache),
        model.generate(ids, mask, **one_step),
    )


# --- outputs, stats, streaming, progress -----------------------------------------------------


@pytest.mark.smoke
def test_output_object_fields_and_shapes():
    model = tiny_model(layout="bidirectional", router="block")
    ids, mask = left_pad([prompt(3), prompt(5)])
    out = model.generate(ids, mask, **GEN, eos_token_id=None, output_history=True, return_dict_in_generate=True)
    assert isinstance(out, DiffusionGenerateOutput)
    assert out.sequences.shape == (2, 5 + 10)
    assert out.num_forward_passes == 6  # blocks of 4, 4, 2 tokens x 2 steps
    assert len(out.history) == 6 and all(h.shape == (2, 15) for h in out.history)
    assert (out.history[0] == MASK).any() and not (out.history[-1] == MASK).any()
    stats = out.router_stats
    assert len(stats["unique_experts_per_forward"]) == out.num_forward_passes
    assert 2 <= stats["unique_experts_per_layer"] <= 8
    bytes_per_expert = 3 * 32 * 16 * 4  # gate, up, down of H=32, I=16 in float32
    assert stats["bytes_per_expert"] == bytes_per_expert
    assert stats["expert_bytes_per_forward"] == pytest.approx(stats["unique_experts_per_layer"] * bytes_per_expert)
    assert model.generate(ids, mask, **GEN, output_history=True).shape == (2, 15)


def test_unique_experts_metric_hand_checked():
    # token choice with a zero router and a bias favouring experts 5 and 2: every token picks {5, 2}
    model = tiny_model(router="token_choice")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.expert_bias[5] = 1.0
            layer.mlp.gate.expert_bias[2] = 0.5
    out = model.generate(prompt(6), **GEN, return_dict_in_generate=True)
    assert out.router_stats["unique_experts_per_forward"] == [2.0] * out.num_forward_passes
    # expert choice on a cached 4-token block: capacity max(floor(4 * 2 / 8), 1) = 1 token per expert, so
    # all 8 experts touch the block, and prefill / extension forwards (other sizes) are not counted
    model = tiny_model(router="expert_choice")
    out = model.generate(prompt(9), **GEN, return_dict_in_generate=True)
    assert out.router_stats["unique_experts_per_layer"] == 8.0
    assert len(out.router_stats["unique_experts_per_forward"]) == out.num_forward_passes


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(61)}
    vocab.update({"[PAD]": PAD, "[EOS]": EOS, "[MASK]": MASK})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="[EOS]", mask_token="[MASK]")


class RecordingStreamer(TextIteratorStreamer):
    def __init__(self, tokenizer, **kwargs):
        super().__init__(tokenizer, **kwargs)
        self.puts = []

    def put(self, value):
        self.puts.append(value.clone())
        super().put(value)


@pytest.mark.parametrize("eos_at", [None, 5])
def test_streamer_receives_the_final_text(eos_at):
    tokenizer = tiny_tokenizer()
    model = tiny_model(seed=4)
    ids = tokenizer("w1 w2 w3 w4 w5 w6", return_tensors="pt").input_ids
    eos = None
    if eos_at is not None:
        eos = int(model.generate(ids, **GEN, eos_token_id=None)[0, 6 + eos_at])
    streamer = RecordingStreamer(tokenizer, skip_special_tokens=True)
    out = model.generate(ids, **GEN, eos_token_id=eos, streamer=streamer)
    assert torch.equal(streamer.puts[0], ids)  # the prompt first, as Transformers does
    new_tokens = torch.cat([p[0] for p in streamer.puts[1:]])
    answer = out[0, 6:]
    if eos is None:
        assert len(streamer.puts) == 1 + 3  # blocks [4, 8), [8, 12), [12, 16)
        assert new_tokens.tolist() == answer.tolist()
    else:
        assert new_tokens[-1] == eos and new_tokens.tolist() == answer[: len(new_tokens)].tolist()
    assert "".join(streamer) == tokenizer.decode(out[0], skip_special_tokens=True)


def test_show_progress(capsys):
    model = tiny_model()
    model.generate(prompt(3), **GEN, eos_token_id=None, show_progress=True)
    assert "4/4" in capsys.readouterr().err  # blocks [0, 4) ... [12, 16): one tick each


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(block_length=0), "block_length"),
        (dict(steps=0), "steps"),
        (dict(steps=5, block_length=4), "steps"),
        (dict(temperature=-0.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(threshold=0.0), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(remasking="lowest"), "remasking"),
        (dict(approximate_cache="prefix"), "approximate_cache"),
        (dict(not_a_setting=1), "not_a_setting"),
    ],
)
def test_bad_settings_fail_before_compute(kwargs, match):
    model = tiny_model()
    model.model.forward = lambda *a, **k: pytest.fail("forward ran before the error")
    with pytest.raises(ValueError, match=match):
        model.generate(prompt(3), **{**GEN, **kwargs})


def test_bad_inputs_fail_before_compute():
    model = tiny_model()
    model.model.forward = lambda *a, **k: pytest.fail("forward ran before the error")
    with pytest.raises(ValueError, match="mask token"):
        model.generate(torch.tensor([[1, MASK, 2]]), **GEN)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(torch.ones(2, 3, dtype=torch.long), **GEN, streamer=RecordingStreamer(tiny_tokenizer()))
    with pytest.raises(ValueError, match="steps"):
        DiffusionGenerationConfig(block_length=4, steps=8)
    no_mask = tiny_model(mask_token_id=None)
    with pytest.raises(ValueError, match="mask_token_id"):
        no_mask.generate(prompt(3), **GEN)


# --- config, saving, remote code -------------------------------------------------------------


def test_config_defaults_and_overrides():
    model = tiny_model()
    assert model.can_generate()
    config = model.generation_config
    assert isinstance(config, DiffusionGenerationConfig)
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (MASK, EOS, PAD)
    assert config.block_length == 4  # block-causal default: the attention block size
    assert config.greedy and not config.do_sample and config.threshold is None and config.use_cache
    model.generation_config.max_new_tokens = 6
    assert model.generate(prompt(3)).shape == (1, 9)
    assert model.generate(prompt(3), max_new_tokens=4).shape == (1, 7)
    assert model.generation_config.max_new_tokens == 6  # kwargs do not leak into the model's config
    # a passed config overrides what it sets; the rest (ids, block length) comes from the model's
    plain = GenerationConfig(max_new_tokens=5)
    out = model.generate(prompt(3), generation_config=plain, return_dict_in_generate=True)
    # model defaults: block_length = steps = 4, so block [0, 4) (1 mask) takes 1 step and [4, 8) takes 4
    assert out.sequences.shape == (1, 8) and out.num_forward_passes == 1 + 4
    own = DiffusionGenerationConfig(max_new_tokens=5, block_length=8, steps=2, eos_token_id=None)
    out = model.generate(prompt(3), generation_config=own, return_dict_in_generate=True)
    assert out.sequences.shape == (1, 8) and out.num_forward_passes == 2  # one block [0, 8), 2 steps


@pytest.mark.smoke
def test_save_and_remote_code_load(tmp_path):
    model = tiny_model()
    model.generation_config.max_new_tokens = 9
    model.generation_config.steps = 2
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["max_new_tokens"] == 9 and saved["steps"] == 2 and saved["mask_token_id"] == MASK
    ids = prompt(5)
    expected = model.generate(ids).tolist()
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["diffusion_moe"] = None  # the package must not be importable here
        try:
            import diffusion_moe
            raise SystemExit("diffusion_moe is importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        config = model.generation_config
        print(json.dumps({{
            "config": type(config).__name__, "steps": config.steps, "max_new_tokens": config.max_new_tokens,
            "out": model.generate(torch.tensor({ids.tolist()})).tolist(),
        }}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["config"] == "DiffusionGenerationConfig"
    assert (loaded["steps"], loaded["max_new_tokens"]) == (2, 9)
    assert loaded["out"] == expected
