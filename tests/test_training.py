"""Training side: collators, loss normalisation under Trainer, callbacks, Trainer features."""

import math

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.modeling.attention_masks import two_stream_attention_mask
from diffusion_moe.training import (
    DiffusionPretrainCollator,
    DiffusionSFTCollator,
    DiffusionTrainer,
    ExpertBiasUpdateCallback,
    RouterStatsCallback,
    default_corpus,
    train_tokenizer,
    train_validation_split,
)

SEQ = 32


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(default_corpus()[:20], vocab_size=320)


@pytest.fixture(scope="module")
def datasets(tokenizer):
    return train_validation_split(tokenizer, default_corpus()[:6], SEQ, validation_fraction=0.1)


def tiny_config(tokenizer, **overrides):
    fields = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=64, block_size=8,
    )
    fields.update(overrides)
    return DiffusionMoeConfig(**fields)


def make_model(config, seed=0):
    torch.manual_seed(seed)
    return DiffusionMoeForMaskedLM(config)


def training_args(path, **overrides):
    fields = dict(
        output_dir=str(path), per_device_train_batch_size=4, max_steps=3, learning_rate=3e-3, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True, dataloader_drop_last=True,
        lr_scheduler_type="constant",
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


# ---------------------------------------------------------------------------- collators


@pytest.mark.smoke
def test_pretrain_collator_masks_and_labels(tokenizer):
    collator = DiffusionPretrainCollator(tokenizer=tokenizer)
    torch.manual_seed(0)
    features = [{"input_ids": list(range(5, 5 + n))} for n in (20, 12, 16)]
    batch = collator(features)
    clean = torch.full((3, 20), tokenizer.pad_token_id)
    for i, f in enumerate(features):
        clean[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
    masked = batch["input_ids"] == tokenizer.mask_token_id
    padding = batch["attention_mask"].bool()
    assert padding.sum(-1).tolist() == [20, 12, 16]
    assert not (masked & ~padding).any(), "padding is never masked"
    assert torch.equal(batch["labels"][masked], clean[masked])
    assert (batch["labels"][~masked] == -100).all()
    assert torch.equal(batch["input_ids"][~masked], clean[~masked])
    assert torch.allclose(batch["noise_level"], masked.sum(-1) / padding.sum(-1).float())
    assert int(batch["num_items_in_batch"]) == 48  # "elbo": real tokens


def test_noise_level_follows_t(tokenizer):
    """Per-sequence masking probability t ~ U(eps, 1): realised ratios spread over (0, 1)
    and average 1/2; low-discrepancy sampling puts exactly one t in each of B strata."""
    torch.manual_seed(0)
    collator = DiffusionPretrainCollator(tokenizer=tokenizer, eps=0.1)
    ratios = collator([list(range(5, 5 + 400))] * 64)["noise_level"]
    assert abs(ratios.mean().item() - 0.55) < 0.06 and ratios.min() > 0.05 and ratios.max() > 0.9
    stratified = DiffusionPretrainCollator(tokenizer=tokenizer, eps=0.1, time_sampling="low_discrepancy")
    t = stratified.sample_t(8)
    strata = ((t - 0.1) / 0.9 * 8).floor().long().sort().values
    assert strata.tolist() == list(range(8))


def test_seeded_noise_depends_only_on_seed_and_batch(tokenizer):
    collator = DiffusionPretrainCollator(tokenizer=tokenizer, seed=3)
    rows = [list(range(5, 37)), list(range(40, 72))]
    torch.manual_seed(0)
    first = collator(rows)
    torch.rand(100)  # whatever else consumes the global RNG
    second = collator(rows)
    assert torch.equal(first["input_ids"], second["input_ids"])
    other = DiffusionPretrainCollator(tokenizer=tokenizer, seed=4)(rows)
    assert not torch.equal(first["input_ids"], other["input_ids"])


def test_sft_collator_never_masks_prompt_and_pads_with_eos(tokenizer):
    torch.manual_seed(0)
    collator = DiffusionSFTCollator(tokenizer=tokenizer, eps=0.999)  # t ~ 1: every answer token masked
    features = [
        {"prompt": "What does assert do?", "answer": "It raises AssertionError."},
        {"messages": [{"role": "user", "content": "Define a function."}, {"role": "assistant", "content": "def f(): pass"}]},
        {"input_ids": [7, 8, 9, 10], "prompt_length": 3},
    ]
    batch = collator(features)
    eos, mask = tokenizer.eos_token_id, tokenizer.mask_token_id
    assert batch["attention_mask"].all(), "EOS padding is real: no attention padding"
    for i, feature in enumerate(features):
        ids, prompt_length = collator.encode(feature)
        assert ids[-1] == eos
        row, labels = batch["input_ids"][i], batch["labels"][i]
        assert row[:prompt_length].tolist() == ids[:prompt_length]
        assert (row[prompt_length:] == mask).all()
        assert (labels[:prompt_length] == -100).all()
        assert labels[prompt_length : len(ids)].tolist() == ids[prompt_length:]
        assert (labels[len(ids) :] == eos).all(), "the EOS padding is a target"
    prompt = tokenizer.apply_chat_template(features[1]["messages"][:1], tokenize=False, add_generation_prompt=True)
    assert collator.encode(features[1])[1] == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "block", "block_pool"])
def test_two_stream_batch_for_block_causal(tokenizer, router):
    # expert choice selects within each attention block of each stream (positions restart
    # in the clean half), so clean tokens never compete with noisy ones for expert slots;
    # a block pool is admitted by its own block of its own stream
    config = tiny_config(tokenizer, attention_layout="block_causal", router_type=router,
                         router_score_function="softmax" if router in ("token_choice", "expert_choice") else "sigmoid",
                         block_router_size=8, expert_capacity=3 if router == "block_pool" else None)
    collator = DiffusionPretrainCollator.from_config(config, tokenizer)
    torch.manual_seed(0)
    clean = torch.randint(5, 200, (2, 24))
    batch = collator([row.tolist() for row in clean])
    L = 24
    assert batch["input_ids"].shape == (2, 2 * L)
    assert torch.equal(batch["input_ids"][:, L:], clean)
    assert torch.equal(batch["position_ids"], torch.arange(L).repeat(2).expand(2, -1))
    assert (batch["labels"][:, L:] == -100).all()
    masked = batch["input_ids"][:, :L] == tokenizer.mask_token_id
    assert torch.allclose(batch["noise_level"], masked.float().mean(-1))
    assert torch.equal(batch["attention_mask"], two_stream_attention_mask(torch.ones(2, L, dtype=torch.bool), 8))
    # The noisy half must not see its own clean block: changing clean block 1 leaves the
    # noisy predictions of blocks 0 and 1 unchanged, but changes those of block 2.
    model = make_model(config).eval()
    out = model(**batch, logits_to_keep=0)
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][:, L + 8 : L + 16] = 3
    out2 = model(**changed, logits_to_keep=0)
    assert torch.allclose(out.logits[:, :16], out2.logits[:, :16], atol=1e-5)
    assert not torch.allclose(out.logits[:, 16:24], out2.logits[:, 16:24], atol=1e-5)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tok: DiffusionPretrainCollator(mask_token_id=None), "mask_token_id"),
        (lambda tok: DiffusionPretrainCollator(tokenizer=tok, eps=0.0), "eps"),
        (lambda tok: DiffusionPretrainCollator(tokenizer=tok, eps=1.0), "eps"),
        (lambda tok: DiffusionPretrainCollator(tokenizer=tok, attention_layout="causal"), "attention_layout"),
        (lambda tok: DiffusionPretrainCollator(tokenizer=tok, max_length=100, max_position_embeddings=64), "max_length"),
        (lambda tok: DiffusionPretrainCollator(tokenizer=tok, max_position_embeddings=16)([list(range(5, 25))]),
         "max_position_embeddings"),
        (lambda tok: DiffusionSFTCollator(tokenizer=tok, max_length=4)([{"input_ids": [5, 6, 7, 8, 9], "prompt_length": 4}]),
         "prompt"),
        (lambda tok: DiffusionSFTCollator(tokenizer=tok)([{"question": "x"}]), "prompt"),
    ],
)
def test_bad_input_is_rejected(tokenizer, make, message):
    with pytest.raises(ValueError, match=message):
        make(tokenizer)


def test_tokenizer_without_mask_token_is_rejected(tokenizer):
    from transformers import PreTrainedTokenizerFast

    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, pad_token="<|pad|>")
    with pytest.raises(ValueError, match="mask_token_id"):
        DiffusionSFTCollator(tokenizer=plain)


# ------------------------------------------------------------------- loss under Trainer


def pre_noised(dataset, collator, n=16):
    """Noise once, then serve fixed rows: micro-batching cannot change the noise."""
    torch.manual_seed(1)
    batch = collator([dataset[i] for i in range(n)])
    rows = []
    for i in range(n):
        row = {k: batch[k][i] for k in ("input_ids", "attention_mask", "labels", "noise_level")}
        row["num_items_in_batch"] = (
            batch["attention_mask"][i].sum() if collator.loss_weighting == "elbo" else (batch["labels"][i] != -100).sum()
        )
        rows.append(row)
    return Dataset.from_list([{k: v.tolist() for k, v in r.items()} for r in rows]).with_format("torch")


@pytest.mark.smoke
@pytest.mark.parametrize("weighting, z_coef", [("elbo", 0.01), ("none", 0.0)])
def test_gradient_accumulation_matches_large_batch(tokenizer, datasets, tmp_path, weighting, z_coef):
    config = tiny_config(tokenizer, loss_weighting=weighting, router_z_loss_coef=z_coef)
    data = pre_noised(datasets[0], DiffusionPretrainCollator.from_config(config, tokenizer))
    results = []
    for batch_size, accumulation in ((8, 1), (4, 2), (2, 4)):
        model = make_model(config)
        args = training_args(tmp_path / f"ga{accumulation}", per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=2)
        trainer = DiffusionTrainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        results.append((losses, torch.cat([p.detach().flatten() for p in model.parameters()])))
    for losses, params in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-4)
        assert torch.allclose(params, results[0][1], atol=2e-5)


def test_trainer_steps_project_only_labelled_positions_onto_the_vocabulary(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer, attention_layout="block_causal")
    model = make_model(config)
    shapes = []
    model.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    collator = DiffusionPretrainCollator.from_config(config, tokenizer)
    trainer = DiffusionTrainer(model=model, args=training_args(tmp_path, max_steps=2), train_dataset=datasets[0],
                               data_collator=collator)
    trainer.train()
    # [rows, H] chunks of labelled positions only: never [B, 2L, H], the whole two-stream batch
    assert shapes and all(len(shape) == 2 and shape[0] < 4 * SEQ for shape in shapes)


def test_elbo_normaliser_differs_from_label_count(tokenizer, datasets):
    """The default Trainer count (labels != -100) is not the ELBO's real-token count; ours is."""
    config = tiny_config(tokenizer)
    collator = DiffusionPretrainCollator.from_config(config, tokenizer)
    torch.manual_seed(0)
    batches = [collator([datasets[0][i] for i in range(j, j + 4)]) for j in (0, 4)]
    trainer = DiffusionTrainer(model=make_model(config), args=training_args("/tmp/unused"))
    count = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert int(count) == 8 * SEQ
    assert int(count) != sum(int((b["labels"] != -100).sum()) for b in batches)


# ------------------------------------------------------------------------- callbacks


def test_expert_bias_update_rule(tokenizer):
    config = tiny_config(tokenizer, num_hidden_layers=1)
    model = make_model(config)
    callback = ExpertBiasUpdateCallback(update_rate=0.5)
    callback.on_train_begin(None, None, None, model=model)
    callback.loads[0] = torch.tensor([1.0, 5.0, 3.0, 3.0])  # mean 3
    callback.on_step_end(None, None, None)
    assert model.model.layers[0].mlp.gate.expert_bias.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert callback.loads.abs().sum() == 0


def test_training_balances_with_bias_and_logs_router_stats(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer, expert_bias_update_rate=0.01, capacity_factor=0.5)
    model = make_model(config)
    trainer = DiffusionTrainer(model=model, args=training_args(tmp_path, max_steps=4), train_dataset=datasets[0],
                               data_collator=DiffusionPretrainCollator.from_config(config, tokenizer))
    assert any(isinstance(cb, ExpertBiasUpdateCallback) for cb in trainer.callback_handler.callbacks)
    loads = []  # per training forward (one per step here), per layer: assignments each expert kept

    def count(router, args, output):
        if router.training:
            kept = output[1].assignment & output[1].inputs.padding_mask.unsqueeze(-1)
            loads.append(kept.sum((0, 1)).double())

    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(count)
    trainer.train()
    bias = model.model.layers[0].mlp.gate.expert_bias
    assert bias.abs().sum() > 0 and bias.abs().max() <= 4 * 0.01 + 1e-6  # moved, by at most u per step
    logged = [h for h in trainer.state.log_history if "loss" in h]
    # max / mean expert load, averaged over the 2 layers, of each step's forward
    layers = len(model.model.layers)
    assert len(logged) == 4 and len(loads) == 4 * layers
    for step, h in enumerate(logged):
        by_layer = loads[step * layers : (step + 1) * layers]
        expected = sum(float(load.max() / load.mean()) for load in by_layer) / layers
        assert h["router/load_imbalance"] == pytest.approx(expected)
    # capacity 0.5 keeps ceil(L * k / E * 0.5) of L * k / E proposed slots at best: at least half dropped
    assert all(h["router/dropped_fraction"] >= 0.5 for h in logged)
    assert any(key.startswith("router/experts_per_token@") for key in logged[0])


def test_router_stats_follow_the_capacity_schedule(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer, router_type="expert_choice", capacity_schedule="linear_reverse",
                         capacity_min=1, capacity_max=3)
    model = make_model(config)
    stats = RouterStatsCallback(num_buckets=2)
    trainer = DiffusionTrainer(model=model, args=training_args(tmp_path, max_steps=3, per_device_train_batch_size=8,
                                                               logging_steps=3),
                               train_dataset=datasets[0], callbacks=[stats],
                               data_collator=DiffusionPretrainCollator.from_config(config, tokenizer))
    trainer.train()
    last = stats.history[-1]
    assert last["router/load_imbalance"] == pytest.approx(1.0)  # expert choice: balanced by construction
    assert last["router/experts_per_token@r=0.0-0.5"] > last["router/experts_per_token@r=0.5-1.0"]


# -------------------------------------------------------------------- Trainer features


def test_evaluate_returns_deterministic_elbo_bound(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer)
    trainer = DiffusionTrainer(model=make_model(config), args=training_args(tmp_path), eval_dataset=datasets[1],
                               data_collator=DiffusionPretrainCollator.from_config(config, tokenizer))
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]
    assert first["eval_perplexity_bound"] == pytest.approx(math.exp(first["eval_loss"]))
    # an untrained model predicts about uniformly: ELBO per token ~ log(vocab) (masked tokens / t ~ all tokens)
    assert 0.5 * math.log(len(tokenizer)) < first["eval_loss"] < 2 * math.log(len(tokenizer))


def test_bf16_autocast_and_gradient_checkpointing(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer, router_type="expert_choice")
    collator = DiffusionPretrainCollator.from_config(config, tokenizer)
    runs = {}
    for name, extra in {"fp32": {}, "checkpointing": {"activation_checkpointing": True}, "bf16": {"bf16": True}}.items():
        model = make_model(config)
        trainer = DiffusionTrainer(model=model, args=training_args(tmp_path / name, **extra),
                                   train_dataset=datasets[0], data_collator=collator)
        trainer.train()
        runs[name] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], model)
    assert runs["checkpointing"][0] == pytest.approx(runs["fp32"][0], rel=1e-5)
    bf16_losses, bf16_model = runs["bf16"]
    assert all(math.isfinite(x) for x in bf16_losses)
    assert bf16_losses != runs["fp32"][0]  # really ran in bf16
    assert bf16_losses == pytest.approx(runs["fp32"][0], rel=0.05)
    assert next(bf16_model.parameters()).dtype == torch.float32  # autocast, weights stay fp32


@pytest.mark.smoke
def test_resume_from_checkpoint_continues_identically(tokenizer, datasets, tmp_path):
    config = tiny_config(tokenizer, expert_bias_update_rate=0.01)
    collator = DiffusionPretrainCollator.from_config(config, tokenizer, seed=0)

    def run(path, resume=None, **extra):
        model = make_model(config, seed=1 if resume else 0)
        args = training_args(path, max_steps=4, save_strategy="steps", save_steps=2, **extra)
        trainer = DiffusionTrainer(model=model, args=args, train_dataset=datasets[0], data_collator=collator)
        trainer.train(resume_from_checkpoint=resume)
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    full, full_losses = run(tmp_path / "full")
    resumed, resumed_losses = run(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    assert resumed_losses[-2:] == pytest.approx(full_losses[-2:], rel=1e-6)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_peft_lora_on_attention_and_experts(tokenizer, datasets, tmp_path, router):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(tokenizer, router_type=router)
    base = make_model(config)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = get_peft_model(base, lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("q_proj.lora_A" in n for n in trainable)
    assert any("experts" in n and "lora" in n for n in trainable)
    assert all("lora" in n for n in trainable)
    trainer = DiffusionTrainer(model=model, args=training_args(tmp_path, max_steps=2, learning_rate=1e-2),
                               train_dataset=datasets[0],
                               data_collator=DiffusionPretrainCollator.from_config(config, tokenizer))
    trainer.train()
    lora_b = [p for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "expert LoRA weights were trained"
    merged = model.merge_and_unload()
    after = merged.state_dict()
    assert not torch.equal(after["model.layers.0.mlp.experts.gate_up_proj"], before["model.layers.0.mlp.experts.gate_up_proj"])
    assert torch.equal(after["model.layers.0.self_attn.k_proj.weight"], before["model.layers.0.self_attn.k_proj.weight"])


def test_local_corpus_from_text_files_and_datasets_folder(tmp_path):
    from diffusion_moe.training import read_corpus

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second document")
    Dataset.from_dict({"body": ["third", "fourth"]}).save_to_disk(str(tmp_path / "ds"))
    assert read_corpus([str(tmp_path / "a.txt"), str(tmp_path / "docs")]) == ["first document", "second document"]
    assert read_corpus([str(tmp_path / "ds")], text_column="body") == ["third", "fourth"]
    with pytest.raises(ValueError, match="text_column"):
        read_corpus([str(tmp_path / "ds")])
    with pytest.raises(ValueError, match="does not exist"):
        read_corpus([str(tmp_path / "missing.txt")])
    assert len(read_corpus(None)) == len(default_corpus()) > 50


def test_router_stats_bucket_each_sequence_under_batch_level_expert_choice():
    """EC-DLM's batch-level expert choice makes the batch one capacity group, but the statistics by
    mask ratio still count each sequence (the routing unit) in its own bucket."""
    from conftest import MASK_ID
    from conftest import tiny_config as plain_config

    model = DiffusionMoeForMaskedLM(plain_config(router_type="expert_choice", batch_level_expert_choice=True)).train()
    stats = RouterStatsCallback(num_buckets=2)
    stats.attach(model)
    ids = torch.randint(1, 60, (2, 8))
    ids[0] = MASK_ID  # mask ratio 1.0
    ids[1, :2] = MASK_ID  # 0.25
    model(ids)
    stats.detach()
    assert stats.bucket_count.tolist() == [2.0, 2.0]  # one sequence per bucket, in each of the 2 MoE layers


@pytest.mark.parametrize("router", ["token_choice", "expert_choice"])
def test_router_stats_bucket_by_the_mask_ratio_given_to_the_model(router):
    """An explicit `mask_ratio` is the routing unit's ratio for the statistics, not the mask
    tokens counted in `input_ids` (here none)."""
    from conftest import tiny_config as plain_config

    model = DiffusionMoeForMaskedLM(plain_config(router_type=router)).train()
    stats = RouterStatsCallback(num_buckets=2)
    stats.attach(model)
    ids = torch.randint(1, 60, (2, 8))
    model(ids, mask_ratio=torch.tensor([1.0, 0.25]))
    model(ids)  # no masks, no ratio given: both sequences at ratio 0
    stats.detach()
    assert stats.bucket_count.tolist() == [6.0, 2.0]  # per MoE layer (2): 1 + 2 in the low bucket, 1 in the high
