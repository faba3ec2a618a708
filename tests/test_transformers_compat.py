"""The Transformers integration points that move between releases: the `cache` rename
(5.24), the internals isolated in `modeling/transformers_compat.py`, and warnings that would
report a setting we honour as ignored. Runs on the oldest and the newest supported release."""

import inspect
import logging
import warnings

import pytest
import torch
import transformers
from transformers import GenerationConfig, Trainer
from transformers.cache_utils import DynamicCache

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionGenerationConfig, DiffusionMoeForMaskedLM
from diffusion_moe.generation.block_runners import new_static_cache
from diffusion_moe.generation.generation_config_diffusion import NO_OP_VALUES, SUPPORTED_FIELDS
from diffusion_moe.modeling import transformers_compat as compat

pytestmark = pytest.mark.smoke
VERSION = f"transformers {transformers.__version__}"


def block_causal_model(**overrides):
    return DiffusionMoeForMaskedLM(tiny_config(attention_layout="block_causal", block_size=4, **overrides)).eval()


def test_outputs_name_the_cache_cache_and_forward_takes_cache():
    model = block_causal_model()
    ids = torch.randint(1, MASK_ID, (1, 12))
    prefix = model(ids[:, :8], use_cache=True)
    assert isinstance(prefix.cache, DynamicCache) and prefix.cache.get_seq_length() == 8
    assert prefix["cache"] is prefix.cache
    step = model(ids[:, 8:], attention_mask=torch.ones(1, 12), cache=prefix.cache)
    torch.testing.assert_close(step.logits, model(ids).logits[:, 8:], atol=1e-5, rtol=1e-5)


@pytest.mark.uses_deprecated_names
def test_past_key_values_is_accepted_the_way_transformers_accepts_it():
    """Under 5.24+ the old name gives Transformers' own FutureWarning; before, it was the name."""
    model = block_causal_model()
    ids = torch.randint(1, MASK_ID, (1, 12))
    expected = model(ids[:, 8:], attention_mask=torch.ones(1, 12), cache=model(ids[:, :8], use_cache=True).cache)
    prefix = model(ids[:, :8], use_cache=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = model(ids[:, 8:], attention_mask=torch.ones(1, 12), past_key_values=prefix.cache)
    futures = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    if compat.CACHE_IS_THE_NAME:
        assert futures and "`past_key_values` is deprecated" in futures[0] and "Use `cache`" in futures[0], VERSION
    else:
        assert not futures, VERSION
    assert torch.equal(old.logits, expected.logits)
    assert old.past_key_values is old.cache  # the old attribute name still reads the field
    with pytest.raises(ValueError, match="past_key_values"):  # both names: which one is meant?
        model(ids, cache=prefix.cache, past_key_values=prefix.cache)


@pytest.mark.uses_deprecated_names
def test_generate_takes_cache_and_accepts_past_key_values():
    model = block_causal_model()
    ids = torch.randint(1, MASK_ID, (1, 5))
    settings = dict(max_new_tokens=8, block_length=4, steps=4, return_dict_in_generate=True)
    first = model.generate(ids, **settings)
    longer = torch.cat([first.sequences, torch.randint(1, MASK_ID, (1, 3))], dim=1)
    new = model.generate(longer, **settings, cache=first.cache)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = model.generate(longer, **settings, past_key_values=first.cache)
    assert torch.equal(new.sequences, old.sequences)
    assert torch.equal(new.sequences, model.generate(longer, **settings).sequences)


def test_greedy_temperature_zero_is_not_reported_as_an_ignored_flag(caplog):
    """LLaDA's convention `temperature=0.0` means greedy; generate() honours it, so
    Transformers' "generation flags are not valid and may be ignored" must not appear."""
    model = block_causal_model()
    ids = torch.randint(1, MASK_ID, (1, 5))
    with caplog.at_level(logging.WARNING, logger="transformers"):
        greedy = model.generate(ids, max_new_tokens=8, block_length=4, steps=4, temperature=0.0)
        DiffusionGenerationConfig(temperature=0.0)
        DiffusionGenerationConfig(do_sample=True, temperature=0.0).validate()
    assert "may be ignored" not in caplog.text, caplog.text
    assert torch.equal(greedy, model.generate(ids, max_new_tokens=8, block_length=4, steps=4))
    config = DiffusionGenerationConfig(temperature=0.0)
    assert config.temperature == 0.0 and config.greedy  # the value is kept, not dropped


def test_a_sampling_flag_without_sampling_is_still_reported(caplog):
    """Hiding temperature 0 from Transformers' check must not hide the check itself."""
    with caplog.at_level(logging.WARNING, logger="transformers"):
        DiffusionGenerationConfig(do_sample=False, temperature=0.7)
    assert "temperature" in caplog.text


def test_no_op_values_are_transformers_defaults():
    """`NO_OP_VALUES` replaces `GenerationConfig._get_default_generation_params` (private);
    they must still be the values that do nothing in Transformers."""
    defaults = getattr(GenerationConfig, "_get_default_generation_params", None)
    if defaults is None:
        pytest.skip(f"{VERSION} has no _get_default_generation_params to compare with")
    defaults = defaults()
    for name, value in NO_OP_VALUES.items():
        assert name not in SUPPORTED_FIELDS
        if name in defaults:
            assert defaults[name] == value, f"{name}: Transformers' default is {defaults[name]!r} under {VERSION}"
    unsupported_defaults = {n: v for n, v in defaults.items() if n not in SUPPORTED_FIELDS and v not in (None, False)}
    missing = set(unsupported_defaults) - set(NO_OP_VALUES)
    assert not missing, f"{VERSION} has new defaulted fields generate() does not support: {sorted(missing)}"
    config = DiffusionGenerationConfig(**NO_OP_VALUES)  # a generation_config.json may carry them
    assert list(config.unsupported_fields()) == []
    with pytest.raises(ValueError, match="num_beams"):
        DiffusionGenerationConfig(num_beams=4)


@pytest.mark.parametrize("start", [0, 4])
def test_rewinding_a_static_cache_makes_the_next_update_overwrite(start):
    model = block_causal_model()
    cache = new_static_cache(model, 1, 16)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim

    def write(length, value):
        k = torch.full((1, heads, length, dim), float(value))
        for i in range(model.config.num_hidden_layers):
            cache.update(k, k, i)

    write(start, 1.0)
    write(4, 2.0)  # slots [start, start + 4)
    compat.rewind_static_cache(cache, start, start + 4)
    write(4, 3.0)  # must land on the same slots
    keys = cache.layers[0].keys[0, 0, :, 0]
    assert torch.all(keys[start:start + 4] == 3.0), f"{VERSION}: {keys.tolist()}"
    assert torch.all(keys[:start] == 1.0) and torch.all(keys[start + 4:] == 0.0)
    assert int(cache.get_seq_length()) == start + 4


def test_our_experts_function_is_registered_where_transformers_looks_it_up():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from diffusion_moe.modeling.experts import EXPERT_CHOICE_STATIC, expert_choice_only

    assert ALL_EXPERTS_FUNCTIONS.get_interface(EXPERT_CHOICE_STATIC, None) is expert_choice_only, VERSION
    model = DiffusionMoeForMaskedLM(tiny_config(router_type="expert_choice")).eval()
    model.set_experts_implementation("eager")
    model.set_experts_implementation(EXPERT_CHOICE_STATIC)  # a name Transformers accepts
    assert model.config._experts_implementation == EXPERT_CHOICE_STATIC, VERSION


def test_output_recorders_can_be_installed_before_a_compiled_forward():
    model = DiffusionMoeForMaskedLM(tiny_config()).eval()
    compat.install_output_recorders(model.base_model)
    hooked = [m for m in model.modules() if m._forward_hooks]
    assert any(type(m).__name__ == "TokenChoiceRouter" for m in hooked), VERSION
    out = model(torch.randint(1, 60, (1, 4)), output_router_decisions=True, output_router_logits=True)
    assert len(out.router_decisions) == len(out.router_logits) == 2, VERSION


def test_experts_implementation_hooks_are_still_consulted():
    compat.check_experts_implementation_hooks(DiffusionMoeForMaskedLM)
    model = DiffusionMoeForMaskedLM(tiny_config(router_type="expert_choice")).eval()
    assert model.config._experts_implementation == "expert_choice_static"  # expert choice's default
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager", VERSION
    token_choice = DiffusionMoeForMaskedLM(tiny_config()).eval()
    assert token_choice.config._experts_implementation in ("grouped_mm", "eager")


def test_output_recording_and_trainer_hooks_exist():
    """Internals without a public equivalent (see the README's list)."""
    assert compat.OutputRecorder is not None and callable(compat.capture_outputs)
    hook = getattr(Trainer, "_get_num_items_in_batch", None)
    assert hook is not None, f"Trainer._get_num_items_in_batch is gone in {VERSION}"
    assert list(inspect.signature(hook).parameters)[:3] == ["self", "batch_samples", "device"], VERSION


def test_compatibility_errors_name_the_version_and_the_fix():
    message = str(compat.incompatible("thing"))
    assert transformers.__version__ in message and "upgrade-code" in message and "pip install -U" in message


def test_transformers_still_marks_expert_parallel_experts():
    """`is_expert_parallel` reads the flag Transformers' experts wrapper sets (False) and its EP
    parameter style sets (True); tests/test_multiprocess.py runs the True side."""
    from transformers.distributed.expert_parallel import MoEParamShard

    from diffusion_moe.modeling.experts import DiffusionMoeExperts

    experts = DiffusionMoeExperts(tiny_config())
    assert experts._is_expert_parallel is False and not compat.is_expert_parallel(experts), VERSION
    assert "_is_expert_parallel" in __import__("inspect").getsource(MoEParamShard.shard_param), VERSION
