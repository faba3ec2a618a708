"""LLaDA2.1's token-editing decoding against a line-by-line transcription of its generate()."""

import pytest
import torch

from llada2_reference import reference_generate_llada21
from test_generation import EOS, MASK, PAD, ROUTERS, left_pad, prompt, tiny_model

SETTINGS = [  # (threshold, editing_threshold, max_post_steps, steps): quality, speed, no post steps, quota 2
    (0.7, 0.5, 16, 4),
    (0.5, 0.0, 16, 4),
    (0.6, 0.3, 0, 4),
    (0.9, 0.2, 3, 2),
]


def reference(model, ids, new, threshold, editing, post, steps, eos=EOS):
    logits_fn = lambda x: model(x).logits  # noqa: E731  (an uncached block-causal forward)
    out = reference_generate_llada21(logits_fn, ids, new, 4, threshold, editing, post, MASK, eos,
                                     num_to_transfer=4 // steps)
    answer = torch.full((new,), PAD)
    answer[: out.shape[1]] = out[0]
    return torch.cat([ids[0], answer])


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("threshold, editing, post, steps", SETTINGS)
def test_editing_matches_the_llada21_reference_cached_uncached_and_batched(router, threshold, editing, post, steps):
    model = tiny_model(router=router, seed=7, sharpen=3.0)
    prompts = [prompt(6, 1), prompt(3, 2)]
    settings = dict(max_new_tokens=10, block_length=4, steps=steps, threshold=threshold, editing_threshold=editing,
                    max_post_steps=post)
    expected = [reference(model, p, 10, threshold, editing, post, steps) for p in prompts]
    for p, want in zip(prompts, expected):
        for use_cache in (True, False):
            assert model.generate(p, **settings, use_cache=use_cache)[0].tolist() == want.tolist()
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, mask, **settings)
    for i, (p, want) in enumerate(zip(prompts, expected)):
        assert batched[i, ids.shape[1] :].tolist() == want[p.shape[1] :].tolist()


def test_editing_changes_tokens_and_costs_post_steps():
    model = tiny_model(seed=7, sharpen=3.0)
    ids = prompt(6, 1)
    settings = dict(max_new_tokens=10, block_length=4, steps=4, threshold=0.5, eos_token_id=None,
                    return_dict_in_generate=True, output_history=True)
    plain = model.generate(ids, **settings)
    edited = model.generate(ids, **settings, editing_threshold=0.0, max_post_steps=4)
    assert not torch.equal(plain.sequences, edited.sequences)  # some committed token was revised
    revised = any(((a != MASK) & (b != MASK) & (a != b)).any() for a, b in zip(edited.history, edited.history[1:]))
    assert revised
    assert edited.num_forward_passes > plain.num_forward_passes
    # with nothing confident enough to edit and no post steps, editing is LLaDA2.0's rule at quota 1
    off = model.generate(ids, **settings, editing_threshold=2.0, max_post_steps=0)
    assert torch.equal(off.sequences, plain.sequences)


def test_each_rows_substitution_count_is_the_edits_its_history_shows():
    """`edits["substitutions"]` counts, per row and over the whole call, the decided tokens that a
    step replaced: exactly the changes between consecutive history entries. Both rows fill whole
    blocks (prompt + answer a multiple of block_length), so every decoded slot is returned."""
    model = tiny_model(seed=7, sharpen=3.0)
    ids, mask = left_pad([prompt(6, 1), prompt(2, 2)])
    out = model.generate(ids, mask, max_new_tokens=10, block_length=4, steps=4, threshold=0.5, eos_token_id=None,
                         editing_threshold=0.0, max_post_steps=4, return_dict_in_generate=True, output_history=True)
    shown = sum(((a != MASK) & (b != MASK) & (a != b)).sum(-1) for a, b in zip(out.history, out.history[1:]))
    counts = out.edits["substitutions"]
    assert counts.dtype == torch.long and counts.tolist() == shown.tolist()
    assert counts[0] != counts[1] and counts.min() > 1  # different per row, and summed over steps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_post_steps=4), "max_post_steps"),
        (dict(editing_threshold=-0.1), "editing_threshold"),
        (dict(editing_threshold=0.5, remasking="margin"), "remasking"),
    ],
)
def test_bad_editing_settings_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model().generate(prompt(3), max_new_tokens=4, block_length=4, steps=4, **kwargs)


def test_editing_is_for_block_causal_models():
    with pytest.raises(ValueError, match="editing_threshold"):
        tiny_model(layout="bidirectional").generate(prompt(3), max_new_tokens=4, block_length=4, steps=4,
                                                     editing_threshold=0.5)


def test_static_shapes_edit_like_eager():
    model = tiny_model(seed=7, sharpen=3.0)
    ids, mask = left_pad([prompt(6, 1), prompt(9, 2)])
    settings = dict(max_new_tokens=10, block_length=4, steps=4, threshold=0.5, editing_threshold=0.0,
                    max_post_steps=4)
    eager = model.generate(ids, mask, **settings)
    static = model.generate(ids, mask, **settings, cache_implementation="static", disable_compile=True)
    assert torch.equal(eager, static)
