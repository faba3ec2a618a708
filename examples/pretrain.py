"""Pretrain a mixture-of-experts masked-diffusion LM from scratch with `DiffusionTrainer`.

Data: local text files / folders of .txt / a `datasets` folder (`--data`), or by default
the Python documentation shipped with CPython. The tokenizer is `--tokenizer` (a saved
Transformers tokenizer with a mask token) or a byte-level BPE trained on the data.
Every `TrainingArguments` flag works (--bf16, --gradient_checkpointing,
--gradient_accumulation_steps, --fsdp, --deepspeed, --resume_from_checkpoint, ...).

    python examples/pretrain.py --output_dir runs/ec --router_type expert_choice \
        --capacity_schedule linear_reverse --max_steps 300
    accelerate launch --num_processes 2 --cpu examples/pretrain.py --output_dir runs/ddp --max_steps 50
    torchrun --nproc_per_node 2 examples/pretrain.py --output_dir runs/ddp --use_cpu --max_steps 50
    torchrun --nproc_per_node 2 examples/pretrain.py --output_dir runs/fsdp --use_cpu --fsdp_size 2 --save_only_model
"""

import tempfile
from dataclasses import dataclass, field

from safetensors.torch import save_model
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments, set_seed
from transformers.distributed import DistributedConfig

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.training import (
    DiffusionPretrainCollator,
    DiffusionTrainer,
    read_corpus,
    train_tokenizer,
    train_validation_split,
)


@dataclass
class ModelArguments:
    router_type: str = field(default="expert_choice", metadata={"help": "token_choice | expert_choice | block"})
    capacity_schedule: str = field(default="constant", metadata={"help": "expert choice: constant, linear_reverse, ..."})
    capacity_min: int | None = None
    capacity_max: int | None = None
    capacity_factor: float | None = field(default=None, metadata={"help": "token choice: None = dropless"})
    num_experts: int = 8
    num_experts_per_tok: int = 2
    num_shared_experts: int = 1
    moe_intermediate_size: int = 128
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    attention_layout: str = field(default="bidirectional", metadata={"help": "bidirectional | block_causal"})
    block_size: int = 32
    router_aux_loss_coef: float = 0.0
    router_z_loss_coef: float = 1e-3
    expert_bias_update_rate: float = 0.0
    loss_weighting: str = field(default="elbo", metadata={"help": "elbo | none"})


@dataclass
class ParallelArguments:
    """Transformers' distributed engine (`DistributedConfig`); launch with torchrun, one process per device."""
    tp_size: int | None = field(default=None, metadata={"help": "tensor parallel ranks"})
    ep_size: int | None = field(default=None, metadata={"help": "expert parallel ranks (divides num_experts)"})
    fsdp_size: int | None = field(default=None, metadata={"help": "FSDP2 ranks"})
    dp_replicate_size: int | None = field(default=None, metadata={"help": "FSDP2 replicas (HSDP), e.g. one per node"})


@dataclass
class DataArguments:
    data: list[str] = field(default_factory=list, metadata={"help": "text files, folders, or a datasets folder"})
    text_column: str = "text"
    tokenizer: str | None = field(default=None, metadata={"help": "saved tokenizer (else BPE trained on the data)"})
    vocab_size: int = 2048
    seq_len: int = 64
    validation_fraction: float = 0.04
    time_sampling: str = field(default="low_discrepancy", metadata={"help": "uniform | low_discrepancy"})
    eps: float = 1e-3


def main():
    parser = HfArgumentParser((ModelArguments, ParallelArguments, DataArguments, TrainingArguments))
    model_args, parallel_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)  # the same initial weights on every rank

    documents = read_corpus(data_args.data, data_args.text_column)
    if data_args.tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(data_args.tokenizer)
    else:
        tokenizer = train_tokenizer(documents, data_args.vocab_size)  # deterministic: same on every rank
    train_set, val_set = train_validation_split(
        tokenizer, documents, data_args.seq_len, data_args.validation_fraction, seed=training_args.seed
    )
    config = DiffusionMoeConfig(
        vocab_size=len(tokenizer), intermediate_size=2 * model_args.hidden_size,
        max_position_embeddings=max(data_args.seq_len, 512), mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
        **vars(model_args),
    )
    model = DiffusionMoeForMaskedLM(config)
    layout = {k: v for k, v in vars(parallel_args).items() if v is not None}
    if layout:  # the engine shards at load time: save the initial weights, load them sharded
        with tempfile.TemporaryDirectory() as initial:  # each rank its own copy (save_pretrained writes on rank 0)
            config.save_pretrained(initial)
            save_model(model, f"{initial}/model.safetensors")
            model = DiffusionMoeForMaskedLM.from_pretrained(initial, distributed_config=DistributedConfig(**layout))
    collator = DiffusionPretrainCollator.from_config(
        config, tokenizer, time_sampling=data_args.time_sampling, eps=data_args.eps, seed=training_args.seed
    )
    trainer = DiffusionTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set, data_collator=collator
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_model()  # save_pretrained: weights, config, remote code (main process only)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
