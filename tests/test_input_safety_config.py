"""Issue 17, "Bad input never gives a silent wrong answer": config values, unknown keys,
derived defaults, activations and training data fail at construction, naming what is wrong."""

import json
import logging
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForMaskedLM

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.configuration.remote_code import VERSION_KEY, __version__
from diffusion_moe.training import (
    DiffusionPretrainCollator,
    DiffusionSFTCollator,
    default_corpus,
    pack_documents,
    train_tokenizer,
    train_validation_split,
)

CONFIG_LOGGER = "diffusion_moe.configuration.configuration_diffusion_moe"
COLLATOR_LOGGER = "diffusion_moe.training.collators"


def saved(tmp_path, edit=None, **overrides):
    """A saved tiny config; `edit(dict)` rewrites its config.json."""
    tiny_config(**overrides).save_pretrained(tmp_path)
    if edit is not None:
        path = tmp_path / "config.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data, indent=2))
    return tmp_path


def config_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == CONFIG_LOGGER and r.levelno >= logging.WARNING]


# ------------------------------------------------------------------ 1. field types


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("use_qk_norm", "no", "a bool"),  # a non-empty string is truthy
        ("norm_topk_prob", "False", "a bool"),
        ("tie_word_embeddings", 1, "a bool"),
        ("use_qk_norm", None, "a bool"),
        ("hidden_size", True, "a positive integer"),  # bool is an int subclass
        ("num_experts_per_tok", 2.0, "a positive integer"),
        ("num_hidden_layers", "2", "a positive integer"),
        ("num_shared_experts", False, "an integer >= 0"),
        ("n_group", True, "None or a positive integer"),
        ("capacity_min", True, "a positive integer"),
        ("head_dim", 8.0, "a positive integer"),
        ("rope_theta", "10000", "a finite number > 0"),
        ("rms_norm_eps", float("nan"), "a finite number > 0"),
        ("routed_scaling_factor", math.inf, "a finite number > 0"),
        ("initializer_range", -0.02, "a finite number >= 0"),
        ("router_z_loss_coef", True, "a finite number >= 0"),
        ("attention_dropout", 1.5, "a number in [0, 1]"),
        ("capacity_factor", "1.25", "None or a finite number > 0"),
        ("router_type", ["token_choice"], "one of ('token_choice'"),
        ("loss_weighting", None, "one of ('elbo', 'none')"),
        ("mask_token_id", True, "None or a token id in [0, vocab_size=64)"),
        ("pad_token_id", -1, "None or a token id in [0, vocab_size=64)"),
        ("bos_token_id", 64, "None or a token id in [0, vocab_size=64)"),
        ("eos_token_id", "2", "None, a token id in [0, vocab_size=64) or a non-empty list"),
        ("eos_token_id", [1, 64], "None, a token id in [0, vocab_size=64) or a non-empty list"),
    ],
)
def test_every_field_is_type_checked_naming_field_value_and_allowed(field, value, allowed):
    with pytest.raises(ValueError) as error:
        tiny_config(**{field: value})
    message = str(error.value)
    assert f"`{field}` must be {allowed}" in message
    assert f"got {value!r}" in message


def test_well_typed_values_are_accepted_ints_included_for_number_fields():
    config = tiny_config(rope_theta=600000, routed_scaling_factor=2, attention_dropout=0, eos_token_id=[1, 2],
                         hidden_act="gelu_pytorch_tanh", capacity_factor=1)
    assert (config.rope_theta, config.eos_token_id, config.hidden_act) == (600000, [1, 2], "gelu_pytorch_tanh")


@pytest.mark.parametrize("key, value", [("use_qk_norm", "no"), ("norm_topk_prob", "False"), ("num_experts", "8")])
def test_string_values_in_config_json_are_refused_at_load(tmp_path, key, value):
    folder = saved(tmp_path, lambda d: d.update({key: value}))
    for load in (DiffusionMoeConfig.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=f"`{key}` must be .*; got {value!r}"):
            load(folder)


def test_a_field_assigned_a_bad_value_after_construction_is_not_saved(tmp_path):
    config = tiny_config()
    config.use_qk_norm = "no"
    with pytest.raises(ValueError, match="`use_qk_norm` must be a bool"):
        config.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


# ------------------------------------------------------------------ 2. unknown keys


def test_misspelt_keyword_argument_is_refused_with_the_closest_field():
    typo = r"unknown keyword argument `num_expert_per_tok`; did you mean `num_experts_per_tok`\?"
    with pytest.raises(ValueError, match=typo):
        tiny_config(num_expert_per_tok=4)
    with pytest.raises(ValueError, match="unknown keyword argument `routing`: not a field of DiffusionMoeConfig"):
        tiny_config(routing="expert_choice")
    with pytest.raises(ValueError, match="`temperature`: it is a generation setting.*generate"):
        tiny_config(temperature=0.5)


def test_misspelt_override_at_load_is_refused_with_the_closest_field(tmp_path):
    folder = saved(tmp_path)
    expected = r"unknown override `num_expert_per_tok`; did you mean `num_experts_per_tok`\?"
    with pytest.raises(ValueError, match=expected):
        AutoConfig.from_pretrained(folder, num_expert_per_tok=4)
    with pytest.raises(ValueError, match=expected):
        DiffusionMoeConfig.from_pretrained(folder, num_expert_per_tok=4)
    with pytest.raises(ValueError, match=expected):
        DiffusionMoeConfig.from_dict(json.loads((folder / "config.json").read_text()), num_expert_per_tok=4)
    with pytest.raises(ValueError, match=r"unknown override `use_qknorm`; did you mean `use_qk_norm`\?"):
        DiffusionMoeConfig.from_pretrained(folder, use_qknorm=False)
    with pytest.raises(ValueError, match="unknown override `foo`"):
        DiffusionMoeConfig.from_pretrained(folder, foo=1)


def test_misspelt_override_through_the_model_loader_is_refused(tmp_path):
    """PreTrainedModel.from_pretrained passes every argument to the config with
    return_unused_kwargs=True; a misspelt field must not reach the model as a stray kwarg."""
    DiffusionMoeForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    typo = r"unknown override `num_expert_per_tok`; did you mean `num_experts_per_tok`\?"
    with pytest.raises(ValueError, match=typo):
        AutoModelForMaskedLM.from_pretrained(tmp_path, num_expert_per_tok=4)
    with pytest.raises(ValueError, match="did you mean `num_experts_per_tok`"):
        DiffusionMoeForMaskedLM.from_pretrained(tmp_path, num_expert_per_tok=4)


def test_transformers_loading_arguments_and_return_unused_kwargs_still_work(tmp_path):
    DiffusionMoeForMaskedLM(tiny_config()).save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(
        tmp_path, trust_remote_code=True, revision="main", cache_dir=str(tmp_path / "c"), local_files_only=True,
        attn_implementation="eager", dtype="float32", num_experts_per_tok=4,
    )
    assert config.num_experts_per_tok == 4 and config._attn_implementation == "eager"
    config, unused = DiffusionMoeConfig.from_pretrained(tmp_path, return_unused_kwargs=True, foo=1, device_map="cpu")
    assert unused == {"foo": 1, "device_map": "cpu"}  # Transformers' documented contract
    model, info = AutoModelForMaskedLM.from_pretrained(tmp_path, dtype="auto", attn_implementation="eager",
                                                       output_loading_info=True, num_experts_per_tok=4)
    assert model.config.num_experts_per_tok == 4 and not info["missing_keys"]


def test_config_json_with_transformers_and_tooling_keys_loads_silently(tmp_path, caplog):
    extra = {"use_cache": False, "torchscript": False, "torch_dtype": "float32", "_name_or_path": "somewhere",
             "output_router_logits": False, "_attn_implementation_autoset": True, "is_decoder": False,
             "architectures": ["DiffusionMoeForMaskedLM"], "transformers_version": "4.57.0"}
    folder = saved(tmp_path, lambda d: d.update(extra))
    caplog.set_level(logging.WARNING)
    config = DiffusionMoeConfig.from_pretrained(folder)
    assert config.num_experts_per_tok == 2
    assert not config_warnings(caplog)


def test_misspelt_key_in_config_json_is_an_error_naming_key_and_file(tmp_path):
    folder = saved(tmp_path, lambda d: d.update(num_expert_per_tok=4))
    with pytest.raises(ValueError) as error:
        AutoConfig.from_pretrained(folder)
    message = str(error.value)
    assert "unknown key `num_expert_per_tok`; did you mean `num_experts_per_tok`?" in message
    assert f"config.json of {folder}" in message
    with pytest.raises(ValueError, match=f"config.json of {folder} has an unknown key `num_expert_per_tok`"):
        DiffusionMoeConfig.from_pretrained(folder)
    with pytest.raises(ValueError, match=f"{folder / 'config.json'} has an unknown key"):
        DiffusionMoeConfig.from_json_file(folder / "config.json")


def test_other_unknown_key_in_config_json_is_kept_with_one_warning_naming_it(tmp_path, caplog):
    folder = saved(tmp_path, lambda d: d.update(my_dataset_notes="wikitext, 3 epochs"))
    caplog.set_level(logging.WARNING)
    config = DiffusionMoeConfig.from_pretrained(folder)
    assert config.my_dataset_notes == "wikitext, 3 epochs"  # kept, as Transformers keeps it
    [warning] = config_warnings(caplog)
    assert "`my_dataset_notes`" in warning and str(folder) in warning and "no effect" in warning


def test_unknown_key_from_a_newer_diffusion_moe_is_an_error(tmp_path):
    folder = saved(tmp_path, lambda d: d.update({"router_temperature": 0.5, VERSION_KEY: "99.0.0"}))
    with pytest.raises(ValueError, match=rf"`router_temperature`, which diffusion-moe {__version__} does not know.*"
                                         r"written by diffusion-moe 99\.0\.0"):
        DiffusionMoeConfig.from_pretrained(folder)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_parameters"),
        (dict(per_layer_config={0: {"num_experts_per_tok": 1}}), "per_layer_config"),
    ],
)
def test_transformers_settings_the_model_would_ignore_are_refused(overrides, field):
    with pytest.raises(ValueError, match=f"`{field}` must be None"):
        tiny_config(**overrides)


def test_a_no_op_rope_setting_is_accepted():
    assert tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).rope_theta == 10000.0


# ------------------------------------------------------------------ 3. derived defaults


def test_derived_defaults_follow_a_load_time_override_of_k(tmp_path):
    folder = saved(tmp_path)  # k=2, E=8: capacity (1, 3), block_router_min_experts 8
    stored = json.loads((folder / "config.json").read_text())
    assert [stored[name] for name in ("head_dim", "capacity_min", "capacity_max", "block_router_min_experts")] == [
        None, None, None, None]  # derived: saved as null
    for load in (DiffusionMoeConfig.from_pretrained, AutoConfig.from_pretrained):
        config = load(folder, num_experts_per_tok=4)
        assert (config.capacity_min, config.capacity_max, config.block_router_min_experts) == (2, 6, 8)
    config = DiffusionMoeConfig.from_pretrained(folder, num_experts=4, num_experts_per_tok=3)
    assert (config.capacity_min, config.capacity_max, config.block_router_min_experts) == (1, 4, 4)
    assert DiffusionMoeConfig.from_dict(stored, hidden_size=64).head_dim == 16


def test_explicit_values_survive_save_load_and_overrides(tmp_path):
    folder = saved(tmp_path, router_type="expert_choice", capacity_schedule="linear", capacity_min=1, capacity_max=3,
                   head_dim=16)
    config = DiffusionMoeConfig.from_pretrained(folder, num_experts_per_tok=3, hidden_size=64)
    assert (config.capacity_min, config.capacity_max, config.head_dim) == (1, 3, 16)
    assert config.block_router_min_experts == 8  # derived, follows k
    assert config.explicit_fields() == {"head_dim": 16, "capacity_min": 1, "capacity_max": 3}


def test_derived_defaults_follow_assignment_and_can_be_reset():
    config = tiny_config()
    config.num_experts_per_tok = 4
    assert (config.capacity_min, config.capacity_max) == (2, 6)
    config.capacity_min = 1
    assert (config.capacity_min, config.capacity_max) == (1, 7)  # capacity_max derives from capacity_min
    config.capacity_min = None
    assert config.capacity_min == 2


def legacy_config_json(folder, **explicit):
    """Turn a saved config.json into what the code before derived-field tracking wrote: every
    derived field concrete, computed with that code's formulas."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    k, experts = data["num_experts_per_tok"], data["num_experts"]
    data["head_dim"] = data["hidden_size"] // data["num_attention_heads"]
    data["capacity_min"] = max(1, k // 2)
    data["capacity_max"] = min(2 * k - data["capacity_min"], experts)
    data["block_router_min_experts"] = max(k, min(16, experts))
    data.update(explicit)
    path.write_text(json.dumps(data, indent=2))
    return data


def test_existing_checkpoints_load_with_the_same_values_and_logits(tmp_path):
    model = DiffusionMoeForMaskedLM(tiny_config(router_type="expert_choice", capacity_schedule="linear_reverse",
                                                capacity_max=4)).eval()
    model.save_pretrained(tmp_path)
    legacy = legacy_config_json(tmp_path, capacity_max=4)
    loaded = DiffusionMoeForMaskedLM.from_pretrained(tmp_path).eval()
    for name in ("head_dim", "capacity_min", "capacity_max", "block_router_min_experts"):
        assert getattr(loaded.config, name) == legacy[name], name
    ids = torch.randint(1, MASK_ID, (2, 12))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    # the values equal to the derivation are read as derived, the one that differs stays explicit
    assert loaded.config.explicit_fields() == {"capacity_max": 4}
    overridden = DiffusionMoeConfig.from_pretrained(tmp_path, num_experts_per_tok=3)
    assert (overridden.capacity_min, overridden.capacity_max, overridden.block_router_min_experts) == (1, 4, 8)


def test_derived_fields_follow_in_remote_code_without_the_package_fresh_interpreter(tmp_path):
    DiffusionMoeForMaskedLM(tiny_config()).save_pretrained(tmp_path / "model")
    script = """
        import sys
        sys.modules["diffusion_moe"] = None
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True, num_experts_per_tok=4)
        assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
        print("DERIVED", config.capacity_min, config.capacity_max, config.block_router_min_experts)
        try:
            AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True, num_expert_per_tok=4)
        except ValueError as error:
            print("REFUSED", error)
    """
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), str(tmp_path / "model")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DERIVED 2 6 8" in done.stdout
    assert "REFUSED DiffusionMoeConfig: unknown override `num_expert_per_tok`; did you mean `num_experts_per_tok`?" in (
        done.stdout)


# ------------------------------------------------------------------ 4. activations


def test_hidden_act_typo_fails_at_construction_listing_the_activations():
    with pytest.raises(ValueError) as error:
        tiny_config(hidden_act="swiglu")
    message = str(error.value)
    assert "`hidden_act` must be one of transformers' activations" in message and "'silu'" in message
    assert "got 'swiglu'" in message


# ------------------------------------------------------------------ 5. training data


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(default_corpus()[:20], vocab_size=320)


def test_pretrain_data_holding_the_mask_token_is_refused_naming_row_and_position(tokenizer):
    mask = tokenizer.mask_token_id
    collator = DiffusionPretrainCollator(tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"row 1 of the batch holds mask_token_id={mask} at position 3"):
        collator([[5, 6, 7, 8], [5, 6, 7, mask, 9]])
    if tokenizer.pad_token_id != mask:  # padding is not data
        assert collator([[5, 6], [5, 6, 7, 8]])["input_ids"].shape == (2, 4)


def test_sft_data_holding_the_mask_token_is_refused(tokenizer):
    mask = tokenizer.mask_token_id
    collator = DiffusionSFTCollator(tokenizer=tokenizer)
    with pytest.raises(ValueError, match=f"row 0 of the batch holds mask_token_id={mask} at position 4"):
        collator([{"input_ids": [7, 8, 9, 10, mask, 11], "prompt_length": 3}])
    with pytest.raises(ValueError, match="holds mask_token_id"):  # text that spells the mask token
        collator([{"prompt": "Say it:", "answer": f"the {tokenizer.mask_token} token"}])


@pytest.mark.parametrize("prompt_length", [-1, 4, 9, 2.5, "2", True, None])
def test_sft_prompt_length_outside_the_sequence_is_refused(tokenizer, prompt_length):
    collator = DiffusionSFTCollator(tokenizer=tokenizer)
    with pytest.raises(ValueError, match=rf"`prompt_length` must be an integer in \[0, 4\) for input_ids of 4 tokens.*"
                                         rf"got {prompt_length!r}"):
        collator([{"input_ids": [7, 8, 9, 10], "prompt_length": prompt_length}])


def test_sft_prompt_length_accepts_integer_types_of_datasets(tokenizer):
    collator = DiffusionSFTCollator(tokenizer=tokenizer)
    for prompt_length in (np.int64(3), torch.tensor(3), 0):
        batch = collator([{"input_ids": [7, 8, 9, 10], "prompt_length": prompt_length}])
        assert (batch["labels"][0, :int(prompt_length)] == -100).all()
    with pytest.raises(ValueError, match="needs `prompt_length`"):
        collator([{"input_ids": [7, 8, 9, 10]}])


def test_sft_empty_answer_and_conversation_not_ending_with_the_answer_are_refused(tokenizer):
    collator = DiffusionSFTCollator(tokenizer=tokenizer)
    with pytest.raises(ValueError, match="the answer is empty"):
        collator([{"prompt": "Question?", "answer": ""}])
    with pytest.raises(ValueError, match="`messages` must end with the answer, a message with role 'assistant'"):
        collator([{"messages": [{"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Thanks"}]}])


def test_sft_truncation_cuts_without_eos_and_is_logged_once(tokenizer, caplog):
    eos = tokenizer.eos_token_id
    collator = DiffusionSFTCollator(tokenizer=tokenizer, max_length=6, eps=0.999)
    caplog.set_level(logging.WARNING, logger=COLLATOR_LOGGER)
    long = {"input_ids": [7, 8, 9, 10, 11, 12, 13, 14], "prompt_length": 2}
    batch = collator([long, {"input_ids": [7, 8, 9], "prompt_length": 1}])
    assert batch["input_ids"].shape == (2, 6)
    assert batch["labels"][0].tolist() == [-100, -100, 9, 10, 11, 12], "cut at max_length, no EOS appended"
    assert batch["labels"][1].tolist() == [-100, 8, 9, eos, eos, eos]
    collator([long])
    messages = [r.getMessage() for r in caplog.records if r.name == COLLATOR_LOGGER]
    assert len(messages) == 1, messages
    assert "1 of 2 sequences in this batch are longer than max_length=6 (the longest has 9 tokens)" in messages[0]
    assert "without EOS" in messages[0]


def test_pretrain_truncation_is_logged_once(tokenizer, caplog):
    collator = DiffusionPretrainCollator(tokenizer=tokenizer, max_length=4)
    caplog.set_level(logging.WARNING, logger=COLLATOR_LOGGER)
    assert collator([list(range(5, 15))])["input_ids"].shape == (1, 4)
    collator([list(range(5, 15))])
    messages = [r.getMessage() for r in caplog.records if r.name == COLLATOR_LOGGER]
    assert len(messages) == 1 and "longer than max_length=4" in messages[0] and "pack_documents" in messages[0]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(max_length=0), "max_length"),  # was: no truncation at all (0 is falsy)
        (dict(max_length=-2), "max_length"),  # was: the last 2 tokens of every row dropped
        (dict(max_length=True), "max_length"),
        (dict(max_length="8"), "max_length"),
        (dict(block_size=True), "block_size"),
        (dict(seed="0"), "seed"),
        (dict(mask_token_id=True), "mask_token_id"),
        (dict(pad_token_id=-1), "pad_token_id"),
        (dict(max_position_embeddings=0), "max_position_embeddings"),
        (dict(eps=True), "eps"),
    ],
)
def test_collator_arguments_are_type_checked(tokenizer, kwargs, field):
    for cls in (DiffusionPretrainCollator, DiffusionSFTCollator):
        with pytest.raises(ValueError, match=f"`{field}` must be"):
            cls(tokenizer=tokenizer, **kwargs)


def test_sft_collator_refuses_eos_equal_to_mask_and_a_non_bool_pad_flag(tokenizer):
    with pytest.raises(ValueError, match="`eos_token_id` must differ from mask_token_id"):
        DiffusionSFTCollator(tokenizer=tokenizer, eos_token_id=tokenizer.mask_token_id)
    with pytest.raises(ValueError, match="`pad_to_max_length` must be a bool"):
        DiffusionSFTCollator(tokenizer=tokenizer, max_length=8, pad_to_max_length="yes")


def test_packing_refuses_mask_text_a_missing_eos_and_a_single_chunk(tokenizer):
    with pytest.raises(ValueError, match=f"document 1 holds the mask token \\(id {tokenizer.mask_token_id}\\)"):
        pack_documents(tokenizer, ["plain text here", f"text with {tokenizer.mask_token} inside"], 4)
    with pytest.raises(ValueError, match="`seq_len` must be a positive integer"):
        pack_documents(tokenizer, ["plain text"], True)

    class NoEos:
        eos_token_id = None

    with pytest.raises(ValueError, match="no EOS token"):
        pack_documents(NoEos(), ["plain text"], 4)
    n_tokens = len(tokenizer("one short document", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ValueError, match="packs into 1 chunk.*at least 2 are needed"):  # was: an empty train set
        train_validation_split(tokenizer, ["one short document"], n_tokens)


@pytest.mark.parametrize("bad", [-1, 2.0, True, "3"])
def test_collators_refuse_what_is_not_a_token_id(bad):
    """A -1 in the data became label -1 (a crash in the loss, or worse, a wrong target)."""
    import numpy as np

    from diffusion_moe.training.collators import DiffusionPretrainCollator

    collator = DiffusionPretrainCollator(mask_token_id=63, pad_token_id=0, seed=0)
    with pytest.raises(ValueError, match="input_ids"):
        collator([{"input_ids": [5, bad, 7]}])
    batch = collator([{"input_ids": np.array([5, 6, 7])}, {"input_ids": [5, 6]}])  # numpy ints are token ids
    assert batch["input_ids"].shape == (2, 3)
