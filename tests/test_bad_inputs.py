"""Bad input is an error naming the argument, never a silent wrong answer (issue 17's
findings as regression tests, plus generated inputs: each call either raises a ValueError
naming the argument or returns finite outputs)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeForMaskedLM

SCHEDULED = dict(router_type="expert_choice", capacity_schedule="linear_reverse")


def model(**overrides):
    return DiffusionMoeForMaskedLM(tiny_config(**overrides)).eval()


@pytest.mark.parametrize("value", [float("nan"), -0.1, 1.5, float("inf")])
def test_mask_ratio_outside_zero_one_or_nan_is_an_error(value):
    """NaN used to give every token 0 experts; values outside [0, 1] were clamped silently."""
    ids = torch.randint(1, MASK_ID, (2, 8))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(**SCHEDULED)(ids, mask_ratio=torch.tensor([0.5, value]))


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), 2.0])
def test_noise_level_of_a_labelled_sequence_must_be_in_zero_one_open_at_zero(value):
    """t = 0 multiplied a sequence's ELBO loss by 10^6 (the clamp), without a word."""
    ids = torch.randint(1, MASK_ID, (2, 8))
    labels = torch.where(torch.arange(8) % 2 == 0, ids, -100)
    with pytest.raises(ValueError, match="noise_level"):
        model()(ids.masked_fill(labels != -100, MASK_ID), labels=labels, noise_level=torch.tensor([0.5, value]))


def test_a_sequence_without_labels_may_have_noise_level_zero():
    """What a collator gives a sequence in which no token happened to be masked."""
    ids = torch.randint(1, MASK_ID, (2, 8))
    labels = torch.where(torch.arange(8) % 2 == 0, ids, -100)
    labels[1] = -100
    out = model()(ids.masked_fill(labels != -100, MASK_ID), labels=labels, noise_level=torch.tensor([0.5, 0.0]))
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("value", [2, -1, 0.5])
def test_attention_mask_values_other_than_zero_and_one_are_an_error(value):
    """A 2 used to count as a real token, a 0.5 too."""
    ids = torch.randint(1, MASK_ID, (1, 6))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1]], dtype=torch.float if isinstance(value, float) else torch.long)
    mask[0, 2] = value
    with pytest.raises(ValueError, match="attention_mask"):
        model()(ids, attention_mask=mask)


def test_valid_fractions_and_masks_still_work():
    ids = torch.randint(1, MASK_ID, (2, 8))
    m = model(**SCHEDULED)
    for ratio in ([0.0, 1.0], [0.25, 0.75]):
        assert torch.isfinite(m(ids, mask_ratio=torch.tensor(ratio)).logits).all()
    bool_mask = torch.ones(2, 8, dtype=torch.bool)
    assert torch.equal(m(ids, attention_mask=bool_mask).logits, m(ids, attention_mask=bool_mask.long()).logits)


@settings(max_examples=40, deadline=None)
@given(ratio=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_any_mask_ratio_is_rejected_by_name_or_gives_finite_logits(ratio):
    m = model(**SCHEDULED)
    ids = torch.randint(1, MASK_ID, (1, 8))
    if 0 <= ratio <= 1:
        logits = m(ids, mask_ratio=torch.tensor([ratio])).logits
        assert torch.isfinite(logits).all()
    else:
        assert math.isnan(ratio) or ratio < 0 or ratio > 1
        with pytest.raises(ValueError, match="mask_ratio"):
            m(ids, mask_ratio=torch.tensor([ratio]))


def left_padded_batch():
    ids = torch.randint(1, MASK_ID, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # row 1: three pad tokens, then nine real ones
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("positions", ["from the mask", "arange (pads counted)"])
@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_explicit_position_ids_keep_block_causality_on_a_left_padded_batch(positions, router):
    """diffusers' LLaDA2Pipeline passes position_ids; queries' blocks came from them and keys'
    from the mask, so rows attended to later blocks (earlier logits moved by up to 52)."""
    m = model(attention_layout="block_causal", block_size=4, router_type=router)
    ids, mask = left_padded_batch()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) if positions == "from the mask" else torch.arange(12).expand(2, 12)
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % MASK_ID + 1  # a token of the last block
    a = m(ids, attention_mask=mask, position_ids=position_ids).logits
    b = m(changed, attention_mask=mask, position_ids=position_ids).logits
    last_block_start = (position_ids // 4 == position_ids[:, -1:] // 4).long().argmax(-1)
    for row in range(2):
        earlier = slice(0, int(last_block_start[row]))
        real = mask[row, earlier].bool()
        torch.testing.assert_close(a[row, earlier][real], b[row, earlier][real], atol=1e-6, rtol=0)


def block_aligned_batch():
    """Row 1 is left-padded by a whole block, so both rows' cached prefixes are whole blocks."""
    ids = torch.randint(1, MASK_ID, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 0), mask


def test_position_ids_that_disagree_with_a_cached_prefix_are_an_error():
    m = model(attention_layout="block_causal", block_size=4)
    ids, mask = block_aligned_batch()
    wrong = torch.arange(8, 12).expand(2, 4)  # row 1's real positions are 4..7
    with pytest.raises(ValueError, match="position_ids"):
        m(ids[:, 8:], attention_mask=mask, position_ids=wrong,
          cache=m(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).cache)
    right = ((mask.cumsum(-1) - 1).clamp(min=0))[:, 8:]
    step = m(ids[:, 8:], attention_mask=mask, position_ids=right,
             cache=m(ids[:, :8], attention_mask=mask[:, :8], use_cache=True).cache).logits
    real = mask[:, 8:].bool()
    torch.testing.assert_close(step[real], m(ids, attention_mask=mask).logits[:, 8:][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padded", [True, False])
def test_a_cache_that_ends_inside_a_block_is_an_error(padded):
    """Its last block's keys were computed without the rest of the block: silently inexact."""
    m = model(attention_layout="block_causal", block_size=4)
    ids, mask = left_padded_batch()  # row 1 has 5 real tokens in the first 8
    if not padded:
        ids, mask = ids[:1], None
    prefix_mask = None if mask is None else mask[:, :6]
    prefix = m(ids[:, :6], attention_mask=prefix_mask, use_cache=True)
    with pytest.raises(ValueError, match="inside an attention block"):
        m(ids[:, 6:], attention_mask=mask, cache=prefix.cache)


@pytest.mark.parametrize("shape", [(2, 0), (0, 5), (5,), (1, 2, 3)])
def test_empty_or_misshapen_input_ids_are_an_error_naming_them(shape):
    with pytest.raises(ValueError, match="input_ids"):
        model()(torch.zeros(shape, dtype=torch.long))


def test_float_input_ids_and_misshapen_embeddings_are_errors():
    m = model()
    with pytest.raises(ValueError, match="input_ids"):
        m(torch.ones(1, 4))
    with pytest.raises(ValueError, match="inputs_embeds"):
        m(inputs_embeds=torch.zeros(1, 4, m.config.hidden_size + 1))
