"""Transformers' model conventions: output flags and tuples, router logits, experts
implementations under every router, remote code pushed with the weights, bad token ids,
and settings a router ignores."""

import logging
import os
from types import SimpleNamespace
from unittest.mock import patch

import pytest
import torch
from transformers.integrations import moe
from transformers.utils import logging as hf_logging

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeForMaskedLM, DiffusionMoeModel
from diffusion_moe.configuration.remote_code import REMOTE_CODE_FILES
from diffusion_moe.modeling import experts as experts_module
from diffusion_moe.modeling.routing import DiffusionMoeRouter, build_router, routing_inputs_for

pytestmark = pytest.mark.smoke

ROUTERS = [
    dict(router_type="token_choice"),
    dict(router_type="expert_choice"),
    dict(router_type="block", router_score_function="sigmoid", block_router_size=4),
    dict(router_type="block_pool", router_score_function="sigmoid", block_size=4, expert_capacity=3),
]
IDS = lambda r: r["router_type"]  # noqa: E731


def model_for(attn="sdpa", **overrides):
    config = tiny_config(num_hidden_layers=3, first_k_dense_replace=1, **overrides)
    return DiffusionMoeForMaskedLM._from_config(config, attn_implementation=attn).eval()


@pytest.mark.parametrize("router", ROUTERS, ids=IDS)
def test_return_dict_false_returns_the_output_fields_as_a_tuple(router):
    model = model_for(**router)
    ids = torch.randint(1, MASK_ID, (2, 8))
    labels = torch.where(ids % 2 == 0, ids, -100)
    as_dict = model(ids, labels=labels, output_hidden_states=True, output_router_logits=True)
    as_tuple = model(ids, labels=labels, output_hidden_states=True, output_router_logits=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == len(as_dict.to_tuple())
    for a, b in zip(as_tuple, as_dict.to_tuple()):
        torch.testing.assert_close(a, b)
    model.config.return_dict = False  # the config's default is honoured too
    assert isinstance(model(ids), tuple)
    assert isinstance(model.model(ids), tuple)


def test_hidden_states_follow_the_keyword_or_the_config():
    model = model_for()
    ids = torch.randint(1, MASK_ID, (2, 8))
    assert model(ids).hidden_states is None
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[0].shape == (2, 8, 32)
    torch.testing.assert_close(out.hidden_states[0], model.model.embed_tokens(ids))
    model.config.output_hidden_states = True
    assert len(model(ids).hidden_states) == 4
    assert model(ids, output_hidden_states=False).hidden_states is None


def test_attention_weights_under_eager_attention_respect_the_block_causal_mask():
    model = model_for("eager", attention_layout="block_causal", block_size=4)
    ids = torch.randint(1, MASK_ID, (2, 10))
    padding = torch.tensor([[0, 0] + [1] * 8, [1] * 10])
    out = model(ids, attention_mask=padding, output_attentions=True)
    assert len(out.attentions) == 3
    for weights in out.attentions:
        assert weights.shape == (2, 4, 10, 10)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 10))
        # sample 1 (no padding): query block 0 never sees keys of blocks 1 and 2
        assert (weights[1, :, :4, 4:] == 0).all() and (weights[1, :, 4:8, 8:] == 0).all()
        assert (weights[0, :, 2:, :2] == 0).all()  # nobody real attends to padding
    model.config.output_attentions = True
    assert len(model(ids).attentions) == 3
    # gradients flow into the returned weights
    model.train()
    out = model(ids, output_attentions=True, output_hidden_states=True)
    out.attentions[0].retain_grad()
    out.hidden_states[0].retain_grad()
    out.logits.sum().backward()
    assert out.attentions[0].grad is not None and out.hidden_states[0].grad is not None


def test_attention_weights_under_sdpa_are_what_transformers_gives_and_a_warning(caplog):
    """Transformers' own MoE models return what the backend gives (SDPA: no weights) instead of
    raising; ours do the same and say why the tuple is empty."""
    from transformers import Qwen3MoeConfig, Qwen3MoeModel

    qwen = Qwen3MoeModel(Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=16),
                         ).eval()
    qwen.set_attn_implementation("sdpa")
    theirs = qwen(torch.randint(1, 60, (1, 4)), output_attentions=True).attentions
    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            out = model_for("sdpa")(torch.randint(1, MASK_ID, (1, 4)), output_attentions=True)
    finally:
        hf_logging.disable_propagation()
    assert out.attentions == theirs == ()
    assert out.logits.shape == (1, 4, 64)
    assert any("output_attentions" in r.getMessage() and "eager" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("router", ROUTERS, ids=IDS)
def test_router_logits_are_recorded_once_per_moe_layer(router):
    model = model_for(**router)
    ids = torch.randint(1, MASK_ID, (2, 8))
    captured = []
    hooks = [m.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
             for m in model.modules() if isinstance(m, DiffusionMoeRouter)]
    out = model(ids, output_router_logits=True)
    for h in hooks:
        h.remove()
    assert len(out.router_logits) == 2  # 3 layers, the first dense
    for logits, expected in zip(out.router_logits, captured):
        assert logits.shape == (16, 8) and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected)
    assert model(ids).router_logits is None


def _recording(mapping_name):
    calls = []
    real = moe.ALL_EXPERTS_FUNCTIONS._global_mapping[mapping_name]

    def wrapper(*args, **kwargs):
        calls.append(mapping_name)
        return real(*args, **kwargs)

    return wrapper, calls


@pytest.mark.parametrize("router", ROUTERS, ids=IDS)
def test_every_router_honours_the_experts_implementation(router):
    model = model_for(**router, num_shared_experts=1)
    expert_choice = router["router_type"] == "expert_choice"
    default = "expert_choice_static" if expert_choice else "grouped_mm"
    assert model.config._experts_implementation == default
    ids = torch.randint(1, MASK_ID, (2, 12))
    padding = torch.tensor([[0] * 4 + [1] * 8, [1] * 12])
    batched, batched_calls = _recording("batched_mm")
    grouped, grouped_calls = _recording("grouped_mm")
    fused_calls = []
    real_fused = experts_module.expert_choice_swiglu

    def fused(*args):
        fused_calls.append(1)
        return real_fused(*args)

    outputs = {}
    with patch.dict(moe.ALL_EXPERTS_FUNCTIONS._global_mapping, {"batched_mm": batched, "grouped_mm": grouped}), \
            patch.object(experts_module, "expert_choice_swiglu", fused):
        for implementation in ("eager", "batched_mm", "grouped_mm") + (("expert_choice_static",) * expert_choice):
            batched_calls.clear(), grouped_calls.clear(), fused_calls.clear()
            model.set_experts_implementation(implementation)
            outputs[implementation] = model(ids, attention_mask=padding).logits[padding.bool()]
            # Transformers' names mean Transformers' functions for every rule; the fused kernel has its own name
            ran = {"batched_mm": bool(batched_calls), "grouped_mm": bool(grouped_calls), "fused": bool(fused_calls)}
            assert ran == {"batched_mm": implementation == "batched_mm", "grouped_mm": implementation == "grouped_mm",
                           "fused": implementation == "expert_choice_static"}
        if not expert_choice:
            with pytest.raises(ValueError, match="expert_choice_static"):
                model.set_experts_implementation("expert_choice_static")
    for implementation in outputs:
        torch.testing.assert_close(outputs["eager"], outputs[implementation], atol=1e-5, rtol=1e-5)


def test_unknown_experts_implementation_is_rejected():
    with pytest.raises(ValueError, match="experts_implementation"):
        model_for(router_type="expert_choice").set_experts_implementation("magic")


def test_out_of_vocabulary_ids_name_the_id_and_the_vocabulary_size():
    model = model_for(mask_token_id=MASK_ID)
    for bad in (64, -3):
        ids = torch.tensor([[1, 2, bad, 4]])
        with pytest.raises(ValueError, match=f"token id {bad}.*vocab_size=64"):
            model(ids)
        with pytest.raises(ValueError, match=f"token id {bad}.*vocab_size=64"):
            model.generate(ids, max_new_tokens=4, block_length=4, steps=2)
    with pytest.raises(ValueError, match="vocab_size=64"):
        DiffusionMoeModel(tiny_config())(torch.tensor([[99]]))


def test_push_to_hub_uploads_the_remote_code_with_the_weights(tmp_path, monkeypatch):
    """The .py files that `auto_map` names are in the folder before the upload lists it,
    on a fresh folder and on one that already held an earlier save."""
    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            uploads.append(sorted(op.path_in_repo for op in operations))

    class FakeCard:
        def save(self, path):
            open(path, "w").write("card")

    # uploads go through the public `push_to_hub` (transformers.utils.hub); the private paths
    # of Transformers' own save_pretrained(push_to_hub=True) must stay unused
    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: FakeApi())
    monkeypatch.setattr("transformers.utils.hub.create_and_tag_model_card", lambda *a, **k: FakeCard())
    monkeypatch.setattr("transformers.modeling_utils.hf_api", lambda: pytest.fail("private upload path"))
    monkeypatch.setattr("transformers.configuration_utils.hf_api", lambda: pytest.fail("private upload path"))
    model = model_for(router_type="expert_choice")
    folder = tmp_path / "repo"
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/repo")
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/repo")  # files exist already
    assert len(uploads) == 2
    for uploaded in uploads:
        assert {"config.json", "model.safetensors", *REMOTE_CODE_FILES} <= set(uploaded)
    uploads.clear()
    model.config.save_pretrained(str(tmp_path / "config_only"), push_to_hub=True, repo_id="me/config")
    assert {"config.json", *REMOTE_CODE_FILES} <= set(uploads[0])
    assert set(REMOTE_CODE_FILES) <= set(os.listdir(tmp_path / "config_only"))


def test_settings_a_router_ignores_are_named_in_one_warning(caplog):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            tiny_config(router_type="expert_choice", n_group=4, topk_group=2, router_aux_loss_coef=0.01,
                        block_router_top_p=0.8)
        warned = [r.getMessage() for r in caplog.records if "ignores" in r.getMessage()]
        assert len(warned) == 1
        for name in ("n_group=4", "router_aux_loss_coef=0.01", "block_router_top_p=0.8"):
            assert name in warned[0]
        assert tiny_config(router_type="token_choice").ignored_settings() == []
        assert tiny_config(router_type="block", capacity_schedule="linear").ignored_settings() == []
        caplog.clear()
        router = build_router(tiny_config(router_type="expert_choice"))
        torch.nn.init.normal_(router.weight)
        router.expert_bias[3] = 0.5
        context = routing_inputs_for(router.config, torch.ones(1, 4, dtype=torch.bool), torch.arange(4).view(1, 4))
        with caplog.at_level(logging.WARNING):
            router(torch.randn(1, 4, 32), context)
            router(torch.randn(1, 4, 32), context)
        assert [r.getMessage() for r in caplog.records if "expert_bias" in r.getMessage()] == [
            "router_type='expert_choice' ignores the routers' nonzero `expert_bias` (experts pick tokens by logits; "
            "load is balanced by construction). It stays in the checkpoint, so a switch back to token choice or "
            "block routing uses it again."]  # once, whole
    finally:
        hf_logging.disable_propagation()
