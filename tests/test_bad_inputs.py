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
