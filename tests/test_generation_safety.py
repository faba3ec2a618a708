"""Issue 17, "bad input never gives a silent wrong answer", for generate(): every input that
used to run silently into a wrong (or unbounded) result is now an error naming the argument,
or, for a padded batch without its attention mask, read as Transformers reads it, with a
warning. Each test fails on the code before the fix."""

import logging

import pytest
import torch
from transformers.utils import logging as hf_logging

from test_generation import EOS, GEN, MASK, PAD, ROUTERS, left_pad, prompt, tiny_model
from diffusion_moe.generation import generate_checks


def no_forward(model):
    model.model.forward = lambda *a, **k: pytest.fail("forward ran before the error")
    return model


# --- 1. length and memory bounds --------------------------------------------------------------


@pytest.mark.parametrize("layout, new_tokens, fits", [
    ("block_causal", 24, False),  # 5 + 24 = 29 positions, rounded up to whole blocks of 4: 32 > 30
    ("bidirectional", 24, True),  # 29 <= 30: bidirectional blocks start after the prompt, no rounding
    ("block_causal", 20, True),  # 25, rounded up to 28 <= 30
    ("bidirectional", 26, False),  # 31 > 30
])
def test_an_answer_past_max_position_embeddings_is_an_error_naming_the_lengths(layout, new_tokens, fits):
    model = tiny_model(layout, max_position_embeddings=30)
    ids = prompt(5)
    if fits:
        assert model.generate(ids, max_new_tokens=new_tokens, block_length=4, steps=1).shape == (1, 5 + new_tokens)
        return
    no_forward(model)
    with pytest.raises(ValueError, match=rf"`max_new_tokens`={new_tokens}.*longest prompt \(5 tokens\).*"
                                         r"max_position_embeddings=30"):
        model.generate(ids, max_new_tokens=new_tokens, block_length=4, steps=1)


def test_max_length_past_max_position_embeddings_names_max_length():
    model = no_forward(tiny_model(max_position_embeddings=30))
    with pytest.raises(ValueError, match=r"`max_length`=40.*max_position_embeddings=30"):
        model.generate(prompt(5), max_length=40, block_length=4, steps=1)


def test_a_padded_batch_is_bounded_by_its_longest_real_prompt():
    # width 9 (the longest prompt), rows of 3 and 9 tokens: 9 + 19 = 28 fits 28 positions exactly
    model = tiny_model(max_position_embeddings=28)
    ids, mask = left_pad([prompt(3, 1), prompt(9, 2)])
    assert model.generate(ids, mask, max_new_tokens=19, block_length=4, steps=1).shape == (2, 9 + 19)
    with pytest.raises(ValueError, match=r"longest prompt \(9 tokens\).*at most 19 new tokens"):
        model.generate(ids, mask, max_new_tokens=20, block_length=4, steps=1)


def test_a_canvas_larger_than_the_device_memory_is_an_error_before_anything_is_allocated(monkeypatch):
    model = tiny_model(max_position_embeddings=10**6)
    ids = torch.randint(0, 60, (8, 5))
    settings = dict(max_new_tokens=4000, block_length=4, steps=1)
    need = generate_checks.canvas_bytes(model, 8, 4008, model.generation_config)
    # KV cache: 2 layers x 2 (keys, values) x 8 rows x 2 kv heads x 4008 positions x head_dim 8 x 4 bytes
    assert need["kv_cache"] == 2 * 2 * 8 * 2 * 4008 * 8 * 4
    monkeypatch.setattr(generate_checks, "available_bytes", lambda device: need["kv_cache"] // 2)
    assert model.generate(ids, max_new_tokens=10, block_length=4, steps=1).shape == (8, 15)  # small calls still run
    no_forward(model)
    with pytest.raises(ValueError, match=r"at least .* GiB on cpu.*2 layers x 2 x 8 x 2 kv heads x 4008.*"
                                         r"`max_new_tokens`"):
        model.generate(ids, **settings)


def test_an_absurd_length_is_refused_instead_of_exhausting_memory():
    # a model claiming 10^12 positions: the length fits, the KV cache (256 TB) does not
    model = no_forward(tiny_model(max_position_embeddings=10**12))
    with pytest.raises(ValueError, match="GiB.*`max_new_tokens`"):
        model.generate(prompt(3), max_new_tokens=10**12 - 8, block_length=4, steps=1)


def test_available_memory_is_read_on_the_cpu():
    assert generate_checks.available_bytes(torch.device("cpu")) > 2**20
    assert generate_checks.available_bytes(torch.device("meta")) is None  # unknown devices: no check


# --- 2. empty prompts; batched == alone for one-token and one-block prompts -------------------


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
def test_an_empty_prompts_first_block_is_symmetric(layout):
    """Why empty prompts are refused: with nothing before it, every position of the first block
    holds the mask token and sees the same keys and values, so the logits are equal up to float
    rounding, and rounding (which padding, the cache and the batch change) would pick the commits."""
    model = tiny_model(layout, seed=0)
    logits = model(torch.full((1, 4), MASK)).logits[0]
    torch.testing.assert_close(logits, logits[:1].expand_as(logits), atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
def test_empty_prompts_are_an_error_naming_the_argument(layout):
    model = no_forward(tiny_model(layout))
    with pytest.raises(ValueError, match=r"`input_ids` has no tokens.*bos_token_id"):
        model.generate(torch.zeros(2, 0, dtype=torch.long), **GEN)
    ids, mask = left_pad([prompt(5, 1), prompt(3, 2)])
    mask[1] = 0  # row 1: an all-padding row
    with pytest.raises(ValueError, match=r"row 1 of `attention_mask` is all 0.*bos_token_id"):
        model.generate(ids, mask, **GEN)
    ids[1] = PAD  # without the mask, the same row is all pad tokens
    with pytest.raises(ValueError, match=rf"row 1 of `input_ids` is all pad_token_id={PAD}"):
        model.generate(ids, **GEN)


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
@pytest.mark.parametrize("router", ROUTERS)
def test_one_token_and_one_block_prompts_decode_batched_as_alone_cached_as_uncached(layout, router):
    # lengths 1 and 4 = block_length: the first decoded block holds the prompt's only token,
    # or starts right after a whole prompt block; 8: two whole blocks (prefilled)
    model = tiny_model(layout, router, seed=4)
    prompts = [prompt(1, 21), prompt(4, 22), prompt(8, 23), prompt(4, 24)]
    ids, mask = left_pad(prompts)
    caches = [dict(use_cache=True), dict(use_cache=False)] if layout == "block_causal" else [dict(use_cache=False)]
    outputs = [model.generate(ids, mask, **GEN, threshold=0.3, **cache) for cache in caches]
    assert all(torch.equal(outputs[0], out) for out in outputs[1:])
    for i, p in enumerate(prompts):
        for cache in caches:
            alone = model.generate(p, **GEN, threshold=0.3, **cache)
            assert outputs[0][i, ids.shape[1] :].tolist() == alone[0, p.shape[1] :].tolist(), (i, cache)


# --- 3. a cache from another model --------------------------------------------------------------


@pytest.mark.parametrize("other, field", [
    (dict(num_hidden_layers=3), "num_hidden_layers"),
    (dict(hidden_size=48, head_dim=8), "hidden_size"),
    (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(num_attention_heads=2, head_dim=16), "head_dim"),
    (dict(router="expert_choice"), "router_type"),
    (dict(block_size=2, block_router_size=2), "block_size"),
    (dict(seed=7), "weights differ"),
    (dict(dtype=torch.float64), "dtype"),
])
def test_a_cache_from_another_model_is_an_error_naming_what_differs(other, field):
    model = tiny_model(seed=5)
    other = dict(other)
    dtype = other.pop("dtype", None)
    different = tiny_model(**{"seed": 5, **other})
    if dtype is not None:
        different = different.to(dtype)
    ids = prompt(6)
    first = model.generate(ids, **GEN, return_dict_in_generate=True)
    follow_up = torch.cat([first.sequences, prompt(3, 9)], dim=1)
    assert torch.equal(model.generate(follow_up, **GEN, cache=first.cache), model.generate(follow_up, **GEN))
    no_forward(different)
    with pytest.raises(ValueError, match=rf"`cache` was computed by a different model.*{field}"):
        different.generate(follow_up, **GEN, cache=first.cache)


def test_a_cache_from_another_device_is_an_error_naming_the_device():
    model = tiny_model()
    first = model.generate(prompt(6), **GEN, return_dict_in_generate=True)
    first.cache.signature = {**first.cache.signature, "device": "cuda:0"}  # as if computed on a GPU
    with pytest.raises(ValueError, match=r"device: 'cuda:0' \(this model: 'cpu'\)"):
        no_forward(model).generate(first.sequences, **GEN, cache=first.cache)


class QuantizedWeight(torch.Tensor):
    """A stand-in for a quantized weight (torchao's Int8Tensor): a tensor subclass that
    implements `detach` (what `nn.Parameter` needs) and `dequantize()`, and no other op."""

    @staticmethod
    def __new__(cls, values):
        return torch.Tensor._make_wrapper_subclass(cls, values.shape, dtype=values.dtype, device=values.device)

    def __init__(self, values):
        self.values = values

    def dequantize(self):
        return self.values

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            return cls(args[0].values.detach())
        raise NotImplementedError(f"QuantizedWeight dispatch: {func}")


def test_a_quantized_models_cache_signature_reads_its_weights_through_dequantize():
    from diffusion_moe.generation.prefix_cache import model_signature

    model, other = tiny_model(seed=5), tiny_model(seed=6)
    plain = model_signature(model)
    attention = model.model.layers[0].self_attn
    attention.k_proj.weight = torch.nn.Parameter(QuantizedWeight(attention.k_proj.weight.detach()),
                                                 requires_grad=False)
    assert model_signature(model) == plain  # the same values: the same model
    assert model_signature(other)["weights"] != plain["weights"]


def test_a_cache_made_by_hand_is_an_error():
    from diffusion_moe.generation.prefix_cache import prefix_buffer_cache

    with pytest.raises(ValueError, match="`cache` must be the cache a previous generate"):
        no_forward(tiny_model()).generate(prompt(6), **GEN, cache=prefix_buffer_cache(2, 16))


# --- 4. a padded batch without attention_mask --------------------------------------------------


def generate_logging(model, *args, **kwargs):
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    hf_logging.get_logger("transformers").addHandler(handler)
    hf_logging.get_logger("diffusion_moe").addHandler(handler)
    try:
        out = model.generate(*args, **kwargs)
    finally:
        hf_logging.get_logger("transformers").removeHandler(handler)
        hf_logging.get_logger("diffusion_moe").removeHandler(handler)
    return out, [r for r in records if "attention_mask" in r]


@pytest.mark.parametrize("layout", ["block_causal", "bidirectional"])
def test_a_padded_batch_without_attention_mask_is_read_as_padding_with_one_warning(layout):
    model = tiny_model(layout)
    ids, mask = left_pad([prompt(3, 1), prompt(7, 2)])
    expected = model.generate(ids, mask, **GEN)
    out, warnings = generate_logging(model, ids, **GEN)
    assert torch.equal(out, expected)
    assert len(warnings) == 1 and f"pad_token_id={PAD}" in warnings[0] and "left padding" in warnings[0]
    assert generate_logging(model, ids, **GEN)[1] == []  # once
    assert generate_logging(tiny_model(layout), prompt(5), **GEN)[1] == []  # no pad token: no warning


def test_without_attention_mask_a_pad_id_equal_to_eos_is_text_with_a_warning():
    model = tiny_model(pad_token_id=EOS)
    ids = torch.cat([prompt(3), torch.tensor([[EOS]]), prompt(2, 2)], dim=1)  # a previous turn's EOS
    out, warnings = generate_logging(model, ids, **GEN)
    assert torch.equal(out, model.generate(ids, torch.ones_like(ids), **GEN))
    assert len(warnings) == 1 and "cannot be told from text" in warnings[0]


def test_without_attention_mask_a_pad_token_after_text_is_an_error():
    ids = torch.cat([prompt(3), torch.tensor([[PAD]]), prompt(2, 2)], dim=1)
    with pytest.raises(ValueError, match=rf"Row 0 of `input_ids` holds pad_token_id={PAD} after a real token.*"
                                         "`attention_mask`"):
        no_forward(tiny_model()).generate(ids, **GEN)


# --- 5. other malformed inputs ------------------------------------------------------------------


@pytest.mark.parametrize("input_ids, match", [
    (torch.arange(5), r"2-D LongTensor.*\(5,\)"),
    (torch.ones(1, 2, 3, dtype=torch.long), r"2-D LongTensor.*\(1, 2, 3\)"),
    ([[1, 2, 3]], "2-D LongTensor.*list"),
    (torch.ones(1, 4), "integer token ids.*float32"),
    (torch.ones(1, 4, dtype=torch.bool), "integer token ids.*bool"),
    (torch.ones(0, 4, dtype=torch.long), "no rows"),
])
def test_malformed_input_ids_are_an_error_naming_them(input_ids, match):
    with pytest.raises(ValueError, match=match) as error:
        no_forward(tiny_model()).generate(input_ids, **GEN)
    assert "`input_ids`" in str(error.value)


@pytest.mark.parametrize("attention_mask, match", [
    (torch.ones(2, 4, dtype=torch.long), r"shape of `input_ids` \(2, 5\)"),
    (torch.ones(2, 1, 5, 5, dtype=torch.bool), r"shape of `input_ids` \(2, 5\)"),
    (torch.tensor([[1, 1, 1, 1, 1], [0, 0, 2, 2, 2]]), "0 \\(padding\\) and 1"),
    (torch.tensor([[0.0] * 5, [float("-inf")] * 2 + [0.0] * 3]), "0 \\(padding\\) and 1"),
    (torch.tensor([[1.0] * 5, [0.5] * 5]), "0 \\(padding\\) and 1"),
    ([[1] * 5, [1] * 5], "must be a tensor"),
    (torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 1, 1]]), "left-padded.*row 1 has padding after a real token"),
    (torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), "left-padded.*row 1 has padding after a real token"),
])
def test_malformed_attention_masks_are_an_error_naming_it(attention_mask, match):
    ids = torch.randint(0, 60, (2, 5))
    with pytest.raises(ValueError, match=match) as error:
        no_forward(tiny_model()).generate(ids, attention_mask, **GEN)
    assert "`attention_mask`" in str(error.value)


def test_narrow_integer_prompts_give_the_int64_tokens():
    # uint8 cannot hold mask id 299: the canvas held 299 mod 256 = 43 where the masks belong, so
    # nothing was ever masked and the answer was 43s, without a single forward
    model = tiny_model(vocab_size=300, mask_token_id=299, pad_token_id=298, eos_token_id=297)
    ids = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(3))
    expected = model.generate(ids, **GEN)
    assert (expected[0, 5:] != 43).any()
    for dtype in (torch.uint8, torch.int16, torch.int32):
        assert torch.equal(model.generate(ids.to(dtype), **GEN), expected), dtype


def test_stop_strings_with_a_tokenizer_transformers_cannot_index_is_an_early_error_naming_them():
    """Transformers' StopStringCriteria fails with `substring not found` on word-level vocabularies."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import tiny_config
    from diffusion_moe import DiffusionMoeForMaskedLM

    words = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(62)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    model = DiffusionMoeForMaskedLM(tiny_config(attention_layout="block_causal", block_size=4)).eval()
    with pytest.raises(ValueError, match="stop_strings"):
        model.generate(torch.tensor([[2, 3, 4]]), max_new_tokens=4, block_length=4, steps=4, stop_strings=["w5"],
                       tokenizer=tokenizer)
