"""The public API under generated bad and edge-case input: every call ends in exactly one of
two ways. Either a ValueError / TypeError whose message names the offending argument, or a
valid result that keeps the documented invariants (shapes, finite outputs from finite inputs,
batch == alone, cached == uncached, save/load round trips, the converter's source intact)."""

import hashlib

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.cli import main as cli_main
from diffusion_moe.training.collators import DiffusionPretrainCollator, DiffusionSFTCollator

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
ROUTERS = st.sampled_from([
    dict(router_type="token_choice"),
    dict(router_type="expert_choice"),
    dict(router_type="block", router_score_function="sigmoid", block_router_size=4),
    dict(router_type="block_pool", router_score_function="sigmoid", expert_capacity=3),
])
ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["", "no", "False", "true", "silu", "gelu", "token_choice", "block_causal", "linear_reverse"]),
    st.lists(st.integers(0, 3), max_size=2),
)


def named_error(call, *names):
    """Run `call`; return None on a ValueError/TypeError naming one of `names`, else its result."""
    try:
        return call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert any(name in message for name in names), f"the error does not name {names}: {message}"
        return None


def model_for(**overrides):
    return DiffusionMoeForMaskedLM(tiny_config(**overrides)).eval()


# --- config construction ----------------------------------------------------------------

CONFIG_FIELDS = [
    "hidden_act", "use_qk_norm", "norm_topk_prob", "router_type", "router_score_function", "num_experts_per_tok",
    "capacity_factor", "capacity_schedule", "capacity_min", "capacity_max", "capacity_sigma", "n_group",
    "topk_group", "routed_scaling_factor", "attention_layout", "block_size", "mask_token_id", "loss_weighting",
    "block_router_size", "block_router_top_p", "block_router_min_experts", "first_k_dense_replace",
    "num_shared_experts", "rope_theta", "partial_rotary_factor", "rms_norm_eps", "expert_bias_update_rate",
]


@SETTINGS
@given(field=st.sampled_from(CONFIG_FIELDS), value=ANY_VALUE)
def test_a_config_field_is_rejected_by_name_or_builds_a_working_model(field, value):
    config = named_error(lambda: tiny_config(**{field: value}), field)
    if config is None:
        return
    assert getattr(config, field) == value or field in ("capacity_min", "capacity_max", "block_router_min_experts")
    again = DiffusionMoeConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    model = DiffusionMoeForMaskedLM(config).eval()
    ids = torch.randint(1, min(config.vocab_size, MASK_ID), (2, 8))
    logits = named_error(lambda: model(ids).logits, field, "mask_ratio", "mask_token_id")
    if logits is not None:
        assert logits.shape == (2, 8, config.vocab_size) and torch.isfinite(logits).all()


# --- forward ----------------------------------------------------------------------------


@st.composite
def forward_inputs(draw):
    B, L = draw(st.integers(0, 3)), draw(st.integers(0, 9))
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(-2, 66), min_size=L, max_size=L), min_size=B, max_size=B)),
                       dtype=torch.long).reshape(B, L)
    kwargs = {}
    if draw(st.booleans()):
        pads = [draw(st.integers(0, L)) for _ in range(B)]
        mask = torch.tensor([[0] * p + [1] * (L - p) for p in pads], dtype=torch.long).reshape(B, L)
        if draw(st.booleans()) and B and L:
            mask[draw(st.integers(0, B - 1)), draw(st.integers(0, L - 1))] = draw(st.sampled_from([2, -1]))
        kwargs["attention_mask"] = mask
    if draw(st.booleans()):
        kwargs["mask_ratio"] = torch.tensor(
            draw(st.lists(st.one_of(st.floats(-0.5, 1.5), st.just(float("nan"))), min_size=B, max_size=B)), dtype=torch.float
        ).reshape(B)
    return ids, kwargs


@SETTINGS
@given(router=ROUTERS, layout=st.sampled_from(["bidirectional", "block_causal"]), inputs=forward_inputs())
def test_forward_rejects_bad_input_by_name_or_gives_finite_logits(router, layout, inputs):
    ids, kwargs = inputs
    model = model_for(attention_layout=layout, block_size=4, capacity_schedule="linear_reverse", **router)
    logits = named_error(lambda: model(ids, **kwargs).logits, "input_ids", *kwargs)
    if logits is None:
        return
    assert logits.shape == (*ids.shape, 64)
    real = kwargs["attention_mask"].bool() if "attention_mask" in kwargs else torch.ones_like(ids, dtype=torch.bool)
    assert torch.isfinite(logits[real]).all()
    assert ((ids >= 0) & (ids < 64)).all()  # out-of-vocabulary ids never get this far
    if "mask_ratio" in kwargs:
        ratio = kwargs["mask_ratio"]
        assert not torch.isnan(ratio).any() and ((ratio >= 0) & (ratio <= 1)).all()


# --- generate ---------------------------------------------------------------------------


@SETTINGS
@given(router=ROUTERS, lengths=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       max_new_tokens=st.sampled_from([1, 4, 7, 8]), threshold=st.sampled_from([None, 0.5]),
       seed=st.integers(0, 3))
def test_generate_rows_decode_as_they_would_alone_cached_or_not(router, lengths, max_new_tokens, threshold, seed):
    torch.manual_seed(seed)
    model = model_for(attention_layout="block_causal", block_size=4, **router)
    width = max(lengths)
    assume(width > 0)
    prompts = [torch.randint(1, MASK_ID, (n,)) for n in lengths]
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, width - len(prompt):], mask[row, width - len(prompt):] = prompt, 1
    settings_ = dict(max_new_tokens=max_new_tokens, block_length=4, steps=4, threshold=threshold)
    batched = named_error(lambda: model.generate(ids, mask, **settings_), "prompt", "attention_mask", "input_ids")
    if batched is None:
        return
    uncached = model.generate(ids, mask, **settings_, use_cache=False)
    assert torch.equal(batched, uncached), "cached != uncached"
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            continue  # an empty prompt alone is a [1, 0] tensor: checked in the generation tests
        alone = model.generate(prompt[None], **settings_)
        assert torch.equal(batched[row, width:], alone[0, len(prompt):]), f"row {row} differs from its run alone"


# --- collators --------------------------------------------------------------------------


@SETTINGS
@given(sequences=st.lists(st.lists(st.integers(-1, 66), min_size=0, max_size=10), min_size=1, max_size=3),
       prompt_lengths=st.lists(st.integers(-2, 12), min_size=3, max_size=3),
       max_length=st.sampled_from([None, 4, 8]))
def test_collators_reject_bad_data_by_name_or_only_label_what_they_masked(sequences, prompt_lengths, max_length):
    pretrain = DiffusionPretrainCollator(mask_token_id=MASK_ID, pad_token_id=0, max_length=max_length, seed=0)
    batch = named_error(lambda: pretrain([{"input_ids": s} for s in sequences]), "input_ids", "mask", "token",
                        "max_length", "empty", "sequence")
    if batch is not None:
        labelled = batch["labels"] != -100
        assert torch.all(batch["input_ids"][labelled] == MASK_ID)
        assert torch.all((batch["labels"][labelled] >= 0) & (batch["labels"][labelled] != MASK_ID))
        assert ((batch["noise_level"] >= 0) & (batch["noise_level"] <= 1)).all()
    sft = DiffusionSFTCollator(mask_token_id=MASK_ID, pad_token_id=0, eos_token_id=1, max_length=max_length, seed=0)
    features = [{"input_ids": s, "prompt_length": p} for s, p in zip(sequences, prompt_lengths)]
    batch = named_error(lambda: sft(features), "prompt_length", "input_ids", "mask", "token", "max_length",
                        "sequence", "eos")
    if batch is not None:
        for row, (seq, p) in enumerate(zip(sequences, prompt_lengths)):
            assert torch.all(batch["labels"][row, :p] == -100), "a prompt token became a target"


# --- save / load ------------------------------------------------------------------------


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(router=ROUTERS, layout=st.sampled_from(["bidirectional", "block_causal"]), shared=st.integers(0, 1),
       dense=st.integers(0, 1))
def test_save_and_load_round_trip_bit_for_bit(tmp_path_factory, router, layout, shared, dense):
    folder = tmp_path_factory.mktemp("saved")
    model = model_for(attention_layout=layout, block_size=4, num_shared_experts=shared, first_k_dense_replace=dense,
                      **router)
    model.save_pretrained(folder)
    loaded = DiffusionMoeForMaskedLM.from_pretrained(folder).eval()
    ids = torch.randint(1, MASK_ID, (2, 8))
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    model.save_pretrained(folder)  # saving again into the same folder is fine and changes nothing loaded
    assert torch.equal(DiffusionMoeForMaskedLM.from_pretrained(folder).eval()(ids).logits, loaded(ids).logits)


# --- converter --------------------------------------------------------------------------


def digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert")
    model_for(attention_layout="block_causal", block_size=4, router_score_function="sigmoid", n_group=4,
              topk_group=2, num_shared_experts=1).save_pretrained(root / "models" / "ours")
    return root


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(relation=st.sampled_from(["src", "src/..", "src/sub", "src/../sibling", "src/../..", "src/sub/deeper"]),
       overwrite=st.booleans())
def test_the_converter_never_touches_its_source(saved_checkpoint, relation, overwrite):
    src = saved_checkpoint / "models" / "ours"
    dst = Path(str(relation).replace("src", str(src)))
    before = digest(saved_checkpoint / "models")
    argv = ["convert", "to-llada2", str(src), str(dst)] + (["--overwrite"] if overwrite else [])
    code = cli_main(argv)
    after = {k: v for k, v in digest(saved_checkpoint / "models").items() if k.startswith("ours")}
    assert after == {k: v for k, v in before.items() if k.startswith("ours")}, "the source changed"
    if relation == "src/../sibling" and code == 0:
        assert (dst / "config.json").is_file()
        import shutil

        shutil.rmtree(dst)
    else:
        assert code == 2 or relation == "src/../sibling"

