"""generate() the Transformers way: sampling semantics, lengths, logits processors, stopping
criteria, cache reuse across turns, diffusion streaming, static shapes and torch.compile."""

import logging

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import TextDiffusionStreamer
from transformers.utils import logging as hf_logging

from test_generation import EOS, GEN, MASK, PAD, ROUTERS, left_pad, prompt, tiny_model, tiny_tokenizer
from diffusion_moe.generation.block_runners import static_block_step


def test_do_sample_false_is_greedy_whatever_the_temperature_and_warns(caplog):
    model = tiny_model()
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            a = model.generate(prompt(5), **GEN, temperature=0.7)
    finally:
        hf_logging.disable_propagation()
    assert torch.equal(a, model.generate(prompt(5), **GEN))
    assert any("temperature" in r.getMessage() for r in caplog.records)
    torch.manual_seed(0)
    sampled = [model.generate(prompt(5), **GEN, do_sample=True, temperature=5.0) for _ in range(3)]
    assert not all(torch.equal(sampled[0], s) for s in sampled[1:])
    # temperature 0 stays greedy even with do_sample (LLaDA's convention)
    assert torch.equal(model.generate(prompt(5), **GEN, do_sample=True, temperature=0.0), a)


def test_lengths_follow_transformers():
    model = tiny_model()
    ids = prompt(5)
    assert model.generate(ids, max_length=12, block_length=4, steps=2).shape == (1, 12)
    assert model.generate(ids, max_length=12, max_new_tokens=3, block_length=4, steps=2).shape == (1, 8)
    model.generation_config.max_new_tokens = 9  # a model default gives way to the call's max_length
    assert model.generate(ids, max_length=7, block_length=4, steps=2).shape == (1, 7)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids, max_length=5, block_length=4, steps=2)


def test_num_return_sequences_needs_sampling_and_returns_that_many_rows():
    model = tiny_model()
    ids, mask = left_pad([prompt(3, 1), prompt(6, 2)])
    torch.manual_seed(0)
    out = model.generate(ids, mask, **GEN, do_sample=True, num_return_sequences=3)
    assert out.shape == (6, 6 + 10)
    assert torch.equal(out[:3, :6], ids[:1].expand(3, -1)) and torch.equal(out[3:, :6], ids[1:].expand(3, -1))
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate(ids, mask, **GEN, num_return_sequences=2)


@pytest.mark.parametrize("setting", [dict(num_beams=2), dict(penalty_alpha=0.5), dict(guidance_scale=2.0),
                                     dict(output_scores=True), dict(force_words_ids=[[1]])])
def test_settings_generate_cannot_honour_are_rejected_by_name(setting):
    model = tiny_model()
    model.model.forward = lambda *a, **k: pytest.fail("forward ran before the error")
    with pytest.raises(ValueError, match=next(iter(setting))):
        model.generate(prompt(3), **GEN, **setting)


def test_repetition_penalty_changes_repetitive_greedy_output():
    model = tiny_model(seed=1, sharpen=2.0)
    ids = prompt(4)
    plain = model.generate(ids, max_new_tokens=16, block_length=4, steps=4, eos_token_id=None)[0, 4:]
    assert len(set(plain.tolist())) < 16  # repeats
    penalised = model.generate(ids, max_new_tokens=16, block_length=4, steps=4, eos_token_id=None,
                               repetition_penalty=5.0)[0, 4:]
    assert not torch.equal(plain, penalised)
    assert len(set(penalised.tolist())) > len(set(plain.tolist()))


def test_suppressed_and_bad_tokens_never_appear_and_min_new_tokens_holds_eos_back():
    model = tiny_model(seed=2)
    ids = prompt(6)
    plain = model.generate(ids, **GEN, eos_token_id=None)[0, 6:]
    common = plain.mode().values.item()
    out = model.generate(ids, **GEN, eos_token_id=None, suppress_tokens=[common])[0, 6:]
    assert common not in out.tolist()
    out = model.generate(ids, **GEN, eos_token_id=None, bad_words_ids=[[common]])[0, 6:]
    assert common not in out.tolist()
    # declare the first answer token EOS: min_new_tokens=4 keeps EOS out of the first 4 positions
    eos = int(plain[0])
    out = model.generate(ids, **GEN, eos_token_id=eos, min_new_tokens=4)[0, 6:]
    assert eos not in out[:4].tolist()
    biased = model.generate(ids, **GEN, eos_token_id=None, sequence_bias={(common,): -100.0})[0, 6:]
    assert common not in biased.tolist()


class Recorder(LogitsProcessor):
    def __init__(self):
        self.calls = []

    def __call__(self, input_ids, scores):
        self.calls.append((input_ids.clone(), scores.shape))
        return scores


def test_a_processor_sees_the_prompt_and_the_answer_before_each_position():
    model = tiny_model()
    ids = prompt(5)
    recorder = Recorder()
    out = model.generate(ids, **GEN, eos_token_id=None, logits_processor=LogitsProcessorList([recorder]),
                         return_dict_in_generate=True)
    lengths = sorted({call[0].shape[1] for call in recorder.calls})
    assert lengths == list(range(5, 16))  # prompt + answer offsets 0..10 (the canvas rounds 15 up to 16)
    for input_ids, shape in recorder.calls:
        assert torch.equal(input_ids[:, :5], ids) and shape == (1, 64)
        answer = input_ids[0, 5:]
        final = out.sequences[0, 5 : 5 + len(answer)]
        assert ((answer == final) | (answer == MASK)).all()  # decided tokens, or the mask token


class StopAfter(StoppingCriteria):
    def __init__(self, length):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_stopping_criteria_are_checked_after_every_block_and_pad_like_eos():
    model = tiny_model()
    ids = prompt(4)
    plain = model.generate(ids, **GEN, eos_token_id=None, return_dict_in_generate=True)
    out = model.generate(ids, **GEN, eos_token_id=None, stopping_criteria=StoppingCriteriaList([StopAfter(8)]),
                         return_dict_in_generate=True)
    # blocks [4, 8), [8, 12), [12, 16): the criterion fires once 4 answer tokens are decided
    assert out.sequences[0, :8].tolist() == plain.sequences[0, :8].tolist()
    assert (out.sequences[0, 8:] == PAD).all() and out.num_forward_passes < plain.num_forward_passes
    timed = model.generate(ids, **GEN, eos_token_id=None, max_time=0.0)
    assert timed[0, :8].tolist() == plain.sequences[0, :8].tolist() and (timed[0, 8:] == PAD).all()


def test_stop_strings_stop_at_the_first_answer_position_that_completes_them():
    from diffusion_moe.training import default_corpus, train_tokenizer

    tokenizer = train_tokenizer(default_corpus()[:5], vocab_size=300)
    model = tiny_model(vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    ids = tokenizer("The quick brown", return_tensors="pt").input_ids
    P = ids.shape[1]
    plain = model.generate(ids, **GEN, eos_token_id=None)[0, P:]
    text = [tokenizer.decode(plain[: i + 1]) for i in range(len(plain))]
    stop = text[3][len(text[2]):]  # what the answer's fourth token adds
    assert stop.strip(), "pick a seed whose fourth answer token is not blank"
    first = next(i for i, t in enumerate(text) if stop in t)
    out = model.generate(ids, **GEN, eos_token_id=None, stop_strings=[stop], tokenizer=tokenizer)[0, P:]
    assert out[: first + 1].tolist() == plain[: first + 1].tolist() and (out[first + 1 :] == pad).all()
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(ids, **GEN, stop_strings=[stop])


@pytest.mark.parametrize("router", ROUTERS)
def test_the_returned_cache_serves_the_next_turn(router):
    model = tiny_model(router=router, seed=5)
    first_ids, first_mask = left_pad([prompt(6, 1), prompt(3, 2)])
    out = model.generate(first_ids, first_mask, **GEN, threshold=0.3, return_dict_in_generate=True)
    assert out.cache is not None
    turns = []
    for b in range(2):  # the next prompt: the whole first turn, then new user tokens
        row = out.sequences[b][torch.cat([first_mask[b].bool(), out.sequences[b, first_ids.shape[1] :] != PAD])]
        turns.append(torch.cat([row, prompt(3, 10 + b)[0]]).unsqueeze(0))
    ids, mask = left_pad(turns)
    embedded = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, a, o: embedded.append(a[0].numel()))
    fresh = model.generate(ids, mask, **GEN, threshold=0.3)
    fresh_tokens, embedded = sum(embedded), embedded.clear() or embedded
    reused = model.generate(ids, mask, **GEN, threshold=0.3, cache=out.cache)
    hook.remove()
    assert torch.equal(reused, fresh)
    assert sum(embedded) < fresh_tokens  # the cached blocks were not run again
    with pytest.raises(ValueError, match="does not extend"):
        other, other_mask = left_pad([prompt(12, 3), prompt(9, 4)])
        model.generate(other, other_mask, **GEN, cache=out.cache)


class DraftRecorder(TextDiffusionStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_special_tokens=True)
        self.drafts, self.puts = [], []

    def put_draft(self, value, **kwargs):
        self.drafts.append(value.clone())

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        pass


def test_diffusion_streamer_gets_drafts_after_every_step_and_blocks_when_committed():
    tokenizer = tiny_tokenizer()
    model = tiny_model()
    ids = tokenizer("w1 w2 w3 w4 w5 w6", return_tensors="pt").input_ids
    streamer = DraftRecorder(tokenizer)
    out = model.generate(ids, **GEN, eos_token_id=None, streamer=streamer, return_dict_in_generate=True)
    assert len(streamer.drafts) == out.num_forward_passes
    assert all(d.shape[0] == 1 and not (d == MASK).any() for d in streamer.drafts)
    assert torch.equal(torch.cat([p[0] for p in streamer.puts[1:]]), out.sequences[0, 6:])


def test_tokens_per_forward_per_row():
    model = tiny_model()
    ids, mask = left_pad([prompt(3, 1), prompt(8, 2)])
    out = model.generate(ids, mask, **GEN, eos_token_id=None, threshold=0.2, return_dict_in_generate=True)
    assert out.tokens_per_forward.shape == (2,)
    assert (out.tokens_per_forward >= 1).all() and (out.tokens_per_forward <= 4).all()


# --- static shapes and torch.compile -------------------------------------------------------


def static_inputs(model, B=2):
    from diffusion_moe.generation.block_runners import new_static_cache

    cache = new_static_cache(model, B, 16)
    ids = torch.randint(0, 60, (B, 4))
    positions = torch.arange(4, 8).expand(B, 4)
    mask = torch.ones(B, 1, 4, 16, dtype=torch.bool)
    return cache, ids, positions, mask, torch.ones(B, 4, dtype=torch.bool)


@pytest.mark.parametrize("router", ROUTERS)
def test_the_static_step_compiles_without_graph_breaks(router):
    from diffusion_moe.modeling.transformers_compat import install_output_recorders

    model = tiny_model(router=router, capacity_schedule="linear_reverse", capacity_min=1, capacity_max=3)
    install_output_recorders(model.base_model)  # as the static runner does before its first step
    for collect in (False, True):
        with torch.no_grad():  # as in generate()
            explanation = torch._dynamo.explain(static_block_step)(model, *static_inputs(model), collect)
        assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("router", ROUTERS)
def test_static_shapes_give_the_eager_tokens_and_compile_once_per_call(router, monkeypatch):
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_model(router=router, seed=3)
    # prompts of 9 and 13 tokens: a prefill of several blocks, then blocks with and without padding
    ids, mask = left_pad([prompt(9, 2), prompt(13, 3)])
    eager = model.generate(ids, mask, **GEN, threshold=0.3)
    counter = CompileCounterWithBackend("aot_eager")  # counts graphs; inductor runs in the test below
    model._compiled_block_step = torch.compile(static_block_step, backend=counter, fullgraph=True)
    out = model.generate(ids, mask, **GEN, threshold=0.3, cache_implementation="static", return_dict_in_generate=True)
    assert torch.equal(out.sequences, eager)
    assert counter.frame_count == 2  # the step with and without router statistics: no recompilation across blocks
    model.generate(ids, mask, **GEN, threshold=0.3, cache_implementation="static")
    assert counter.frame_count == 2  # nor on the next call of the same shapes
    assert torch.equal(model.generate(ids, mask, **GEN, threshold=0.3, cache_implementation="static",
                                      disable_compile=True), eager)
    torch._dynamo.reset()


def test_inductor_compiled_decoding_gives_the_eager_tokens():
    model = tiny_model(router="expert_choice", seed=3)
    ids, mask = left_pad([prompt(2, 1), prompt(13, 2)])
    eager = model.generate(ids, mask, **GEN, threshold=0.3)
    assert torch.equal(model.generate(ids, mask, **GEN, threshold=0.3, cache_implementation="static"), eager)
    torch._dynamo.reset()


def test_static_cache_needs_a_block_causal_cached_model():
    for cache in ("static", "dynamic"):
        with pytest.raises(ValueError, match="block-causal"):
            tiny_model(layout="bidirectional").generate(prompt(3), **GEN, cache_implementation=cache)
    with pytest.raises(ValueError, match="use_cache"):
        tiny_model().generate(prompt(3), **GEN, cache_implementation="static", use_cache=False)
    with pytest.raises(ValueError, match="cache_implementation"):
        tiny_model().generate(prompt(3), **GEN, cache_implementation="offloaded")


@pytest.mark.parametrize("router", ROUTERS)
def test_the_static_runner_gives_the_exact_runner_logits_after_a_long_prefill(router):
    from diffusion_moe.generation.block_runners import ExactCacheRunner, StaticCacheRunner
    from diffusion_moe.generation.generation_utils import _block_causal_layout

    model = tiny_model(router=router, seed=3)
    ids, mask = left_pad([prompt(9, 2), prompt(13, 3)])
    config = model.generation_config
    x, real, _, _, _, blocks = _block_causal_layout(ids, mask.bool(), config, 10)
    (s, e) = blocks[0]
    assert s >= 8  # several prompt blocks are prefilled
    exact, static = ExactCacheRunner(model, x, real, False), StaticCacheRunner(model, x, real, False, static_block_step)
    with torch.no_grad():
        for runner in (exact, static):
            runner.prefill(s)
        torch.testing.assert_close(static.block_logits(s, e)[0], exact.block_logits(s, e)[0], rtol=1e-5, atol=1e-5)


def test_the_static_runner_prefills_a_single_token():
    """block_size 1 (a causal model): a one-token prompt is a whole block, and the static cache
    must hold its keys/values before the first step, as the exact cache does."""
    import copy

    from diffusion_moe.generation.block_runners import ExactCacheRunner, StaticCacheRunner
    from diffusion_moe.generation.generation_utils import _block_causal_layout

    model = tiny_model(seed=3, sharpen=1.0, block_size=1, block_router_size=1)
    config = copy.deepcopy(model.generation_config)
    config.block_length = 1
    ids, mask = left_pad([prompt(1, 2), prompt(1, 3)])
    x, real, _, _, _, blocks = _block_causal_layout(ids, mask.bool(), config, 3)
    (s, e) = blocks[0]
    assert (s, e) == (1, 2)
    exact, static = ExactCacheRunner(model, x, real, False), StaticCacheRunner(model, x, real, False, static_block_step)
    with torch.no_grad():
        for runner in (exact, static):
            runner.prefill(s)
        torch.testing.assert_close(static.block_logits(s, e)[0], exact.block_logits(s, e)[0], rtol=1e-5, atol=1e-5)
