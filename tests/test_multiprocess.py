"""Several processes on CPU (gloo): data parallelism, and Transformers' distributed engine
(tensor, expert and FSDP2 parallelism) against one process, for every router.

Each test writes a script and runs it as one process and under torchrun on 2 ranks (`launch`).
"""

import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file
from transformers.distributed import DistributedConfig, consolidate_distributed_checkpoint

from diffusion_moe import DiffusionMoeForMaskedLM

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from transformers import TrainingArguments
    from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
    from diffusion_moe.training import (DiffusionPretrainCollator, DiffusionTrainer, ExpertBiasUpdateCallback,
                                        default_corpus, train_tokenizer, train_validation_split)

    class SkewedLoads(ExpertBiasUpdateCallback):
        def record(self, layer, router, decision):
            super().record(layer, router, decision)
            if dist.get_rank() == 1:
                self.loads[layer, 0] += 1e6

    out = sys.argv[1]
    tokenizer = train_tokenizer(default_corpus()[:20], vocab_size=320)
    train_set, _ = train_validation_split(tokenizer, default_corpus()[:6], 32)
    config = DiffusionMoeConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=64, expert_bias_update_rate=0.05, router_aux_loss_coef=0.01,
    )
    torch.manual_seed(0)
    model = DiffusionMoeForMaskedLM(config)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2,
                             use_cpu=True, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
                             ddp_broadcast_buffers=False, gradient_accumulation_steps=2)
    trainer = DiffusionTrainer(model=model, args=args, train_dataset=train_set, callbacks=[SkewedLoads()],
                               data_collator=DiffusionPretrainCollator.from_config(config, tokenizer, seed=0))
    trainer.train()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"initial": initial, "final": state, "world": dist.get_world_size()}, f"{out}/rank{dist.get_rank()}.pt")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script, *args, ranks: int = 2) -> None:
    """Run `script args` as one process (ranks=1) or under torchrun on `ranks` gloo processes."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                "127.0.0.1", "--master_port", str(free_port())]
    command = [*([sys.executable] if ranks == 1 else torchrun), str(script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, (args, result.stderr[-3000:])


# every router's settings, in a block-causal model: sigmoid scores, a shared expert, pools of 4 of 8 experts
EVERY_ROUTER = dict(num_shared_experts=1, router_score_function="sigmoid", expert_capacity=4,
                    attention_layout="block_causal", block_size=4, block_router_size=4, block_router_min_experts=2)


def run_against_one_process(script_text: str, folder, modes) -> dict:
    """Run the script as one process ("one"), then on 2 ranks for each mode; the one-process results."""
    script = folder / "script.py"
    script.write_text(script_text)
    launch(script, folder, "one", ranks=1)
    for mode in modes:
        launch(script, folder, mode)
    return torch.load(folder / "one.pt")


def test_two_processes_keep_identical_weights_and_expert_bias(tmp_path):
    """DDP with buffer broadcasting off (`ddp_broadcast_buffers=False`): the expert bias stays equal
    on both ranks only because ExpertBiasUpdateCallback all-reduces the loads. Rank 1 reports a huge
    extra load on expert 0: both ranks must lower b_0 at every step."""
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    launch(script, tmp_path)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), name
    for layer in (0, 1):
        bias = rank0["final"][f"model.layers.{layer}.mlp.gate.expert_bias"]
        assert bias[0].item() == pytest.approx(-0.05 * 3), "rank 1's load reached rank 0 at each of the 3 steps"
    weight = "model.layers.0.mlp.experts.gate_up_proj"
    assert not torch.equal(rank0["final"][weight], rank0["initial"][weight]), "training moved the weights"


# --- Transformers' distributed engine: tensor and expert parallelism for every router ------------

PARALLEL_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from transformers.distributed import DistributedConfig
    from diffusion_moe import DiffusionMoeForMaskedLM
    folder, mode = sys.argv[1], sys.argv[2]
    configs = {"tp": DistributedConfig(tp_size=2),                  # attention, MLPs, experts, LM head sharded
               "ep": DistributedConfig(ep_size=2, fsdp_size=2),     # EP x FSDP: tokens exchanged all-to-all
               "tp_ep": DistributedConfig(tp_size=2, ep_size=2)}    # EP over the TP group: outputs all-reduced
    out = {}
    for router in ("token_choice", "expert_choice", "block", "block_pool"):
        overrides = dict(router_type=router, distributed_config=configs[mode]) if mode != "one" else dict(
            router_type=router)
        model = DiffusionMoeForMaskedLM.from_pretrained(folder + "/ckpt", dtype=torch.float32, **overrides).eval()
        ids = torch.randint(1, 60, (2, 12), generator=torch.Generator().manual_seed(0))
        padding = torch.ones(2, 12, dtype=torch.long)
        padding[1, :3] = 0
        with torch.no_grad():
            logits = model(ids, attention_mask=padding).logits
        tokens = model.generate(ids, padding, max_new_tokens=8, block_length=4, steps=4, threshold=0.5)
        out[router] = (logits, tokens)
    if not dist.is_initialized() or dist.get_rank() == 0:
        torch.save(out, f"{folder}/{mode}.pt")
    """
)


def test_tensor_and_expert_parallel_runs_equal_one_process_for_every_router(tmp_path):
    """Transformers' own engine on CPU (gloo): TP=2, EP=2 x FSDP=2 (all-to-all) and EP=2 over
    TP=2 (all-reduce) give the one-process logits and greedy tokens, batched and cached."""

    DiffusionMoeForMaskedLM(tiny_config(**EVERY_ROUTER)).save_pretrained(tmp_path / "ckpt")
    reference = run_against_one_process(PARALLEL_SCRIPT, tmp_path, ("tp", "ep", "tp_ep"))
    for mode in ("tp", "ep", "tp_ep"):
        for router, (logits, tokens) in torch.load(tmp_path / f"{mode}.pt").items():
            real = torch.ones(2, 12, dtype=torch.bool)
            real[1, :3] = False
            torch.testing.assert_close(logits[real], reference[router][0][real], rtol=1e-5, atol=1e-5,
                                       msg=f"{mode} {router}")
            assert torch.equal(tokens, reference[router][1]), (mode, router)


# --- FSDP2 training through Trainer: Transformers' DistributedConfig and accelerate's plugin -------

FSDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import TrainingArguments
    from transformers.distributed import DistributedConfig, gather_full_state_dict
    from diffusion_moe import DiffusionMoeForMaskedLM
    from diffusion_moe.training import DiffusionPretrainCollator, DiffusionTrainer

    folder, mode = sys.argv[1], sys.argv[2]
    world = int(os.environ.get("WORLD_SIZE", 1))
    layouts = {"fsdp": DistributedConfig(fsdp_size=2), "ep_fsdp": DistributedConfig(ep_size=2, fsdp_size=2)}
    plugin = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2,
                                                  "transformer_layer_cls_to_wrap": ["DiffusionMoeDecoderLayer"]})
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(1, 60, (int(n),), generator=g).tolist()}  # lengths 5..12: the loss
            for n in torch.randint(5, 13, (12,), generator=g)]                      # normaliser varies by row
    rank0 = int(os.environ.get("RANK", 0)) == 0
    out = {}
    for router in ("token_choice", "expert_choice", "block", "block_pool"):
        extra = {"distributed_config": layouts[mode]} if mode in layouts else {}
        model = DiffusionMoeForMaskedLM.from_pretrained(folder + "/ckpt", router_type=router, **extra)
        if mode in layouts:  # loading shards the one-process checkpoint exactly
            full = gather_full_state_dict(model)
            if rank0:
                saved = load_file(folder + "/ckpt/model.safetensors")
                assert all(torch.equal(full[k].cpu(), v) for k, v in saved.items()), "sharded load"
        collator = DiffusionPretrainCollator.from_config(model.config, seed=0)  # noise seeded by the row
        accumulate = 4 // world  # one row per micro-batch: the same rows, and the same noise, in every layout

        def collate(features):
            # The first token stays clean. In a row (or a first block) of masks only, every position has the same
            # hidden state: expert choice then picks among exactly tied scores by float rounding, which the
            # gradient reductions of each layout perturb differently.
            batch = collator(features)
            labels, ids = batch["labels"], batch["input_ids"]
            ids[:, 0] = torch.where(labels[:, 0] >= 0, labels[:, 0], ids[:, 0])
            labels[:, 0] = -100
            return batch
        args = TrainingArguments(
            output_dir=f"{folder}/run_{mode}", per_device_train_batch_size=1,
            gradient_accumulation_steps=accumulate, max_steps=3, learning_rate=1.0, optim="sgd", use_cpu=True,
            report_to=[],
            save_strategy="no", seed=0, disable_tqdm=True, logging_steps=1, gradient_checkpointing=mode == "fsdp",
            **(plugin if mode == "accelerate" else {}))
        trainer = DiffusionTrainer(model=model, args=args, train_dataset=data, data_collator=collate)
        trainer.train()
        out[router] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        trainer.save_model(f"{folder}/{mode}_{router}")  # gathered on rank 0: one safetensors file
        if mode == "fsdp":
            model.save_pretrained(f"{folder}/dcp_{router}", distributed_checkpoint=True)  # one file per rank
    if rank0:
        torch.save(out, f"{folder}/{mode}.pt")
    """
)


def test_fsdp2_training_equals_one_process_for_every_router(tmp_path):
    """Trainer on FSDP2 over 2 ranks (Transformers' DistributedConfig, with gradient accumulation and
    checkpointing; EP=2 x FSDP=2; accelerate's FSDP2 plugin) gives the one-process run's losses, weights
    and expert bias for the same global batch, for every router; its checkpoints load in one process
    bit for bit, both the gathered save and the per-rank DCP files once consolidated."""

    config = tiny_config(**EVERY_ROUTER, expert_bias_update_rate=0.05, router_z_loss_coef=1e-3)
    DiffusionMoeForMaskedLM(config).save_pretrained(tmp_path / "ckpt")
    reference = run_against_one_process(FSDP_SCRIPT, tmp_path, ("fsdp", "ep_fsdp", "accelerate"))
    for router in ("token_choice", "expert_choice", "block", "block_pool"):
        expected = load_file(tmp_path / f"one_{router}" / "model.safetensors")
        bias = "model.layers.0.mlp.gate.expert_bias"
        assert (router == "expert_choice") == torch.equal(expected[bias], torch.zeros(8)), "balanced: no bias"
        for mode in ("fsdp", "ep_fsdp", "accelerate"):
            assert torch.load(tmp_path / f"{mode}.pt")[router] == pytest.approx(reference[router], rel=1e-5), (mode,
                                                                                                             router)
            got = load_file(tmp_path / f"{mode}_{router}" / "model.safetensors")
            assert got.keys() == expected.keys()
            for name, value in expected.items():
                if name.endswith("expert_bias"):  # loads summed over ranks: the same sign steps
                    assert torch.equal(got[name], value), (mode, router, name)
                else:
                    torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{mode} {router} {name}")
        consolidate_distributed_checkpoint(tmp_path / f"dcp_{router}", tmp_path / f"dcp_{router}_one")
        shutil.copy(tmp_path / f"fsdp_{router}" / "config.json", tmp_path / f"dcp_{router}_one")  # DCP keeps weights
        consolidated = DiffusionMoeForMaskedLM.from_pretrained(tmp_path / f"dcp_{router}_one").state_dict()
        gathered = load_file(tmp_path / f"fsdp_{router}" / "model.safetensors")
        for name, value in gathered.items():
            assert torch.equal(consolidated[name], value), (router, name)


@pytest.mark.parametrize("layout, overrides, message", [
    (dict(pp_size=2), {}, "pipeline parallelism is not supported"),
    (dict(tp_size=2, enable_sequence_parallel=True), {}, "sequence parallelism is not supported"),
    (dict(ep_size=3, fsdp_size=3), {}, r"num_experts \(8\) must be a multiple of ep_size \(3\)"),
    (dict(tp_size=3), {}, r"num_attention_heads \(4\) must be a multiple of tp_size \(3\)"),
    (dict(tp_size=2), dict(num_key_value_heads=1), r"num_key_value_heads \(1\) must be a multiple of tp_size"),
    (dict(tp_size=2), dict(moe_intermediate_size=15), r"moe_intermediate_size \(15\) must be a multiple"),
    (dict(tp_size=2), dict(first_k_dense_replace=1, intermediate_size=63), r"intermediate_size \(63\) must be"),
])
def test_layouts_the_model_cannot_take_are_refused_by_name(layout, overrides, message):
    """Checked when the model is built, before Transformers shards anything; the same config
    without the layout builds."""
    config = tiny_config(**overrides)
    config.distributed_config = DistributedConfig(**layout)
    with pytest.raises(ValueError, match=message):
        DiffusionMoeForMaskedLM(config)
    del config.distributed_config
    DiffusionMoeForMaskedLM(config)


def test_the_dense_mlp_width_is_checked_only_where_layers_are_dense():
    config = tiny_config(intermediate_size=63)  # every layer MoE: the dense width is never sharded
    config.distributed_config = DistributedConfig(tp_size=2)
    DiffusionMoeForMaskedLM(config)
