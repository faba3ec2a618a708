"""Supervised fine-tuning of a diffusion MoE LM with `DiffusionTrainer` (LLaDA recipe).

The prompt is never masked; the answer, its EOS and the EOS padding are noised and
predicted. Data: a JSON-lines file or `datasets` folder with `prompt` / `answer` or
chat `messages` columns (`--data`); by default, pairs built from the Python docs
("Explain: <topic title>" -> the topic's first paragraph). `--lora` trains LoRA
adapters on the attention projections and the fused expert weights (peft
`target_parameters`) instead of the full model.

    python examples/demo.py                        # or examples/pretrain.py, then:
    python examples/sft.py --model_name_or_path runs/tc --output_dir runs/sft --max_steps 100 [--lora]
"""

from dataclasses import dataclass, field

from datasets import Dataset, load_dataset, load_from_disk
from transformers import AutoTokenizer, HfArgumentParser, TrainingArguments

from diffusion_moe import DiffusionMoeForMaskedLM
from diffusion_moe.training import DiffusionSFTCollator, DiffusionTrainer, default_corpus


@dataclass
class SFTArguments:
    model_name_or_path: str = field(metadata={"help": "a folder written by save_pretrained (with its tokenizer)"})
    data: str | None = field(default=None, metadata={"help": ".jsonl file or datasets folder; default: Python docs"})
    max_length: int = 64
    lora: bool = field(default=False, metadata={"help": "LoRA on attention + experts instead of full fine-tuning"})
    lora_rank: int = 8
    loss_weighting: str = field(default="none", metadata={"help": "none (LLaDA2 SFT) | elbo"})


def docs_pairs() -> Dataset:
    """'Explain: <title>' -> first paragraph, for every topic of the Python reference docs."""
    pairs = []
    for text in default_corpus():
        lines = text.splitlines()
        paragraphs = [p.strip() for p in "\n".join(lines[2:]).split("\n\n") if p.strip()]
        if paragraphs:
            pairs.append({"prompt": f"Explain: {lines[0].strip()}\n", "answer": paragraphs[0]})
    return Dataset.from_list(pairs)


def load_pairs(path: str | None) -> Dataset:
    if path is None:
        return docs_pairs()
    if path.endswith((".json", ".jsonl")):
        return load_dataset("json", data_files=path, split="train")
    return load_from_disk(path)


def main():
    sft_args, training_args = HfArgumentParser((SFTArguments, TrainingArguments)).parse_args_into_dataclasses()
    training_args.remove_unused_columns = False  # the collator reads the raw text columns
    model = DiffusionMoeForMaskedLM.from_pretrained(sft_args.model_name_or_path)
    model.config.loss_weighting = sft_args.loss_weighting
    tokenizer = AutoTokenizer.from_pretrained(sft_args.model_name_or_path)
    if sft_args.lora:
        from peft import LoraConfig, get_peft_model

        # peft adapts the fused 3-D expert tensors (target_parameters) around the experts' forward()
        lora = LoraConfig(
            r=sft_args.lora_rank, lora_alpha=2 * sft_args.lora_rank,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        model = get_peft_model(model, lora)
        model.print_trainable_parameters()
    config = model.config
    collator = DiffusionSFTCollator.from_config(
        config, tokenizer, max_length=sft_args.max_length, loss_weighting=sft_args.loss_weighting,
        seed=training_args.seed,
    )
    dataset = load_pairs(sft_args.data).train_test_split(test_size=0.1, seed=training_args.seed)
    trainer = DiffusionTrainer(
        model=model, args=training_args, train_dataset=dataset["train"], eval_dataset=dataset["test"],
        data_collator=collator,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.log_metrics("eval", trainer.evaluate())
    if sft_args.lora:
        model = model.merge_and_unload()  # a plain DiffusionMoeForMaskedLM again
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)
        tokenizer.save_pretrained(training_args.output_dir)


if __name__ == "__main__":
    main()
