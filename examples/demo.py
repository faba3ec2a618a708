"""`make demo`: train a small expert-choice diffusion LM on the Python docs, reload it, generate.

1. Train a byte-level BPE tokenizer on the Python reference documentation that ships
   with CPython (`pydoc_data.topics`; nothing is downloaded).
2. Pretrain a small expert-choice MoE masked-diffusion model with the `linear_reverse`
   capacity schedule (more experts per token when the input is nearly clean) using
   `DiffusionTrainer`, with a progress bar; evaluate the ELBO on held-out text.
3. `save_pretrained` (weights + remote code) and write plots: training loss, and expert
   capacity and load against the mask ratio.
4. In a fresh Python process that loads only `transformers` (not this package), reload
   with `AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True)` and generate
   from a few prompts with block-parallel denoising; print the text and routing statistics.

Run: `make demo`, or `python examples/demo.py --output_dir outputs/demo [--max_steps N]`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["The \"if\" statement", "A function definition", "Exceptions are raised", "The for statement"]
MASK_RATIOS = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]


def choose_threads(requested: int | None) -> int:
    """Intra-op threads. On a busy machine, spinning OpenMP threads that compete with other
    processes are many times slower than fewer threads, so by default use the cores the
    current load average leaves free (at least 1)."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - int(os.getloadavg()[0] + 0.5)))


@torch.no_grad()
def routing_profile(model, input_ids, mask_token_id, ratios=MASK_RATIOS, seed=0):
    """Per mask ratio r: mask a fraction r of `input_ids` and report, averaged over MoE
    layers, the experts per token (capacity as a compute budget), the tokens per expert per
    sequence (capacity C_b) and the load imbalance (max / mean tokens per expert)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for r in ratios:
        masked = torch.rand(input_ids.shape, generator=generator) < r
        noisy = input_ids.masked_fill(masked, mask_token_id)
        stats = model(input_ids=noisy, output_router_stats=True).router_stats
        per_token = sum(s.experts_per_token.float().mean().item() for s in stats) / len(stats)
        per_expert = [s.tokens_per_expert.float() for s in stats]
        load = sum(t.mean().item() for t in per_expert) / len(stats)
        imbalance = sum((t.max(-1).values / t.mean(-1).clamp(min=1e-9)).mean().item() for t in per_expert) / len(stats)
        rows.append({"mask_ratio": float(masked.float().mean()), "experts_per_token": per_token,
                     "tokens_per_expert": load, "load_imbalance": imbalance})
    return rows


def plot(log_history, profile, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*zip(*train), label="train loss (mean CE over masked tokens)")
    if evals:
        ax.plot(*zip(*evals), "o", label="validation ELBO")
    ax.set(xlabel="optimizer step", ylabel="nats per token", title="Masked-diffusion training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "training_loss.png", dpi=120)
    plt.close(fig)

    r = [row["mask_ratio"] for row in profile]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(r, [row["experts_per_token"] for row in profile], "o-", label="experts per token (k_b)")
    axes[0].plot(r, [row["tokens_per_expert"] / 8 for row in profile], "s--", label="tokens per expert / 8 (C_b / 8)")
    axes[0].set(xlabel="mask ratio r", ylabel="capacity", title="Expert capacity vs mask ratio (linear_reverse)")
    axes[0].legend()
    axes[1].plot(r, [row["load_imbalance"] for row in profile], "o-")
    axes[1].set(xlabel="mask ratio r", ylabel="max / mean tokens per expert", title="Expert load vs mask ratio",
                ylim=(0.9, max(1.5, max(row["load_imbalance"] for row in profile) + 0.1)))
    fig.tight_layout()
    fig.savefig(out_dir / "capacity_vs_mask_ratio.png", dpi=120)
    plt.close(fig)


def train(args) -> Path:
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    class QuietProgressCallback(ProgressCallback):
        """The usual progress bar, showing the latest loss on the bar instead of printing every log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
    from diffusion_moe.training import (
        DiffusionPretrainCollator,
        DiffusionTrainer,
        default_corpus,
        train_tokenizer,
        train_validation_split,
    )

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    print("[1/4] tokenizer + data: the Python reference documentation (pydoc_data.topics)")
    documents = default_corpus()
    tokenizer = train_tokenizer(documents, vocab_size=2048)
    train_set, val_set = train_validation_split(tokenizer, documents, args.seq_len, validation_fraction=0.04)
    print(f"      {len(documents)} topics, vocab {len(tokenizer)}, {len(train_set)} train / {len(val_set)} "
          f"validation sequences of {args.seq_len} tokens")

    config = DiffusionMoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_shared_experts=1,
        router_type="expert_choice", capacity_schedule="linear_reverse", capacity_min=1, capacity_max=3,
        router_z_loss_coef=1e-3, mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, initializer_range=0.05,
        loss_weighting="none",  # mean CE over masked tokens: lower-variance gradients than 1/t weights
    )
    model = DiffusionMoeForMaskedLM(config)
    print(f"[2/4] training a {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter expert-choice MoE "
          f"(2 layers, 8 experts, k = 1..3 by linear_reverse, 1 shared) for {args.max_steps} steps, {torch.get_num_threads()} thread(s)")
    training_args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=64, learning_rate=3e-3, warmup_steps=min(100, args.max_steps // 10),
        lr_scheduler_type="cosine", weight_decay=0.01, logging_steps=25,
        eval_strategy="no", save_strategy="no", report_to=[], use_cpu=True, seed=args.seed,
        dataloader_drop_last=True, disable_tqdm=False,
    )
    trainer = DiffusionTrainer(
        model=model, args=training_args, train_dataset=train_set, eval_dataset=val_set,
        data_collator=DiffusionPretrainCollator.from_config(config, tokenizer, time_sampling="low_discrepancy"),
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback())
    start = time.time()
    trainer.train()
    # report the ELBO: evaluate with the "elbo" weighting (1/t weights, per-token normaliser)
    model.config.loss_weighting = "elbo"
    trainer.data_collator = DiffusionPretrainCollator.from_config(config, tokenizer, time_sampling="low_discrepancy")
    metrics = trainer.evaluate()
    print(f"      trained in {time.time() - start:.0f}s; validation ELBO {metrics['eval_loss']:.3f} nats/token "
          f"(perplexity bound {metrics['eval_perplexity_bound']:.1f}); router statistics of the last log:")
    last = next(h for h in reversed(trainer.state.log_history) if "loss" in h)
    for key, value in last.items():
        if key.startswith("router/"):
            print(f"        {key} = {value:.3f}")

    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    model.eval()
    val_ids = torch.tensor(val_set[:32]["input_ids"])
    profile = routing_profile(model, val_ids, config.mask_token_id)
    plot(trainer.state.log_history, profile, out_dir)
    (out_dir / "metrics.json").write_text(json.dumps({"eval": metrics, "routing_profile": profile,
                                                      "log_history": trainer.state.log_history}, indent=1))
    print(f"[3/4] saved to {model_dir} (save_pretrained with remote code); plots in {out_dir}: "
          "training_loss.png, capacity_vs_mask_ratio.png")
    return model_dir


def generate(model_dir: str, max_new_tokens: int):
    """Runs in a fresh interpreter: only transformers + the saved remote code."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    sys.modules["diffusion_moe"] = None  # prove the saved folder is self-contained
    model = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    print(f"[4/4] reloaded {type(model).__name__} from {type(model).__module__} in a fresh process")
    if not hasattr(model, "generate") or "DiffusionGenerationMixin" not in [c.__name__ for c in type(model).__mro__]:
        raise SystemExit("model.generate (block-parallel denoising) is not available in this checkout")
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    start = time.time()
    out = model.generate(
        batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=max_new_tokens,
        block_length=16, steps=16, temperature=0.0, threshold=0.9, return_dict_in_generate=True,
    )
    seconds = time.time() - start
    prompt_length = batch["input_ids"].shape[1]
    for prompt, row in zip(PROMPTS, out.sequences):
        text = tokenizer.decode(row[prompt_length:], skip_special_tokens=True)
        print(f"\n--- {prompt!r}\n{prompt}{text}")
    print(f"\n      {out.num_forward_passes} denoising forwards for {len(PROMPTS)} x {max_new_tokens} tokens "
          f"in {seconds:.1f}s")
    if out.router_stats:
        for key, value in out.router_stats.items():
            print(f"      {key}: {value}")
    profile = routing_profile(model, out.sequences[:, : model.config.max_position_embeddings],
                              model.config.mask_token_id, ratios=[0.0, 0.5, 1.0])
    print("      routing of the generated text re-masked at ratio r (expert choice, linear_reverse):")
    for row in profile:
        print(f"        r={row['mask_ratio']:.2f}: {row['experts_per_token']:.2f} experts/token, "
              f"{row['tokens_per_expert']:.1f} tokens/expert, load max/mean {row['load_imbalance']:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--max_steps", type=int, default=2400)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: free cores)")
    parser.add_argument("--generate_only", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(choose_threads(args.threads))
    if args.generate_only:
        return generate(args.generate_only, args.max_new_tokens)
    start = time.time()
    model_dir = train(args)
    command = [sys.executable, __file__, "--generate_only", str(model_dir), "--max_new_tokens",
               str(args.max_new_tokens), "--threads", str(torch.get_num_threads())]
    subprocess.run(command, check=True)
    print(f"\ndemo finished in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
