"""`make demo`: four routers on a task with checkable answers, and what parallel decoding buys.

The task (`--task add`, the default): add two 7-digit numbers. Prompt
"3 2 3 1 6 7 1 + 3 5 2 8 0 1 0 =" (two 8-token attention blocks), answer "6 7 5 9 6 8 1" + EOS
(the next block). The answer is unique, so exact match is the metric; most digits follow from
the two digits above them and the carry from the right, but a carry can run through several
digits (1 9 9 9 + 0 0 0 1), and such a chain is the case where deciding every digit in one
forward is hard and deciding them one after another is easy: where parallel decoding should
slow down. The model learns the task within the time budget on a CPU.

1. Pretrain a small block-causal token-choice MoE (sigmoid scores, expert bias with the
   auxiliary-loss-free update, as LLaDA2 is trained) on prompt/answer pairs with
   `DiffusionSFTCollator` (the prompt is never masked) and `DiffusionTrainer`.
2. Retrofit it by config alone to expert choice (`capacity_schedule="linear_reverse"`), to
   block routing (dMoE) and to LLaDA2.2's block pool (`router_type="block_pool"`,
   `expert_capacity`), and fine-tune each; token choice continues as long, so the four have
   the same training budget. Save all four with remote code.
3. For each model, on the same prompts, none of them trained on: 512 random ones and 256 with a
   carry chain of 3 to 5 digits. Exact-match accuracy and tokens per denoising forward with the
   step's quota only (one token per forward), then with a confidence threshold (every token
   above it is committed: LLaDA2.1's speed mode) of 0.99, 0.95, 0.9, 0.7, 0.5; unique routed
   experts per layer per forward, expert bytes read, seconds per generated token (one prompt
   at a time, and in batches of 128), validation ELBO. Written to `metrics.json`, printed as
   tables, plotted (`routers.png`).
4. Reload the expert-choice model in a fresh process with `trust_remote_code=True` (this
   package not importable there) and check it decodes the same answers.

`--task sort` (sort 7 digits) is an easier checkable task; `--task docs` runs the earlier
language-model demo: the same four routers pretrained on the Python reference documentation
shipped with CPython (no accuracy there: text has no right answer; its threshold sweep reports
tokens per forward only).

Run: `make demo`, or `python examples/demo.py --output_dir outputs/demo [--task sort|docs] [--pretrain_steps N]`.
"""

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

BLOCK = 8  # attention block of the checkable tasks; the answer (with its EOS) fills exactly one
THRESHOLDS = [None, 0.99, 0.95, 0.9, 0.7, 0.5]  # None: commit the step's quota only
LATENCY_PROMPTS = 16  # seconds per token: batch size 1 over this many prompts
MASK_RATIOS = [0.05, 0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95]
DOCS_PROMPTS = ["The \"if\" statement", "A function definition", "Exceptions are raised", "The for statement"]
LABELS = {"token_choice": "token choice", "expert_choice": "expert choice (linear_reverse)",
          "block": "block routing (dMoE)", "block_pool": "block pool (LLaDA2.2)"}
SETS = {"held_out": "random held-out prompts", "carry_chains": "carry-chain prompts"}


def add_prompt(a, b):
    return f"{' '.join(f'{a:07d}')} + {' '.join(f'{b:07d}')} =", " ".join(f"{a + b:07d}")


def add_example(rng):
    """Two numbers below 5,000,000 (zero-padded to 7 digits), so the sum has 7 digits too."""
    return add_prompt(rng.randrange(5 * 10**6), rng.randrange(5 * 10**6))


def carry_chain_example(rng):
    """An addition where a carry runs through 3 to 5 digits: digit p of the operands sums to 10 or
    more and the next `length` digits sum to exactly 9, so each of them is 0 in the answer and
    carries on: '3 9 3 4 1 4 1 + 4 0 6 5 9 1 3 =' -> '8 0 0 0 0 5 4' (digits counted from the right)."""
    while True:
        length = rng.randint(3, 5)
        p = rng.randint(0, 5 - length)  # the chain ends below the leading digit (both operands < 5,000,000)
        a = [rng.randrange(10) for _ in range(6)] + [rng.randrange(5)]
        b = [rng.randrange(10) for _ in range(6)] + [rng.randrange(5)]
        a[p] = rng.randint(1, 9)
        b[p] = rng.randint(10 - a[p], 9)
        for i in range(p + 1, p + length + 1):
            a[i] = rng.randrange(10)
            b[i] = 9 - a[i]
        x, y = (int("".join(map(str, digits[::-1]))) for digits in (a, b))
        if x < 5 * 10**6 and y < 5 * 10**6:
            return add_prompt(x, y)


def sort_example(rng):
    """'6 6 0 4 8 7 6 >' -> '0 4 6 6 6 7 8'."""
    digits = [rng.randrange(10) for _ in range(BLOCK - 1)]
    return " ".join(map(str, digits)) + " >", " ".join(map(str, sorted(digits)))


# steps = block_length: the quota is one token per forward, so quota-only decoding is the
# one-token-at-a-time baseline and anything above 1 token per forward is the threshold's doing
CHECKABLE = dict(block_size=BLOCK, decoding=dict(max_new_tokens=BLOCK, block_length=BLOCK, steps=BLOCK),
                 batch_size=64, lr=3e-3)
TASKS = {
    "add": dict(CHECKABLE, example=add_example, hard=carry_chain_example, prompt_length=2 * BLOCK,
                seq_len=3 * BLOCK, pretrain_steps=1500, finetune_steps=150),
    "sort": dict(CHECKABLE, example=sort_example, hard=None, prompt_length=BLOCK, seq_len=2 * BLOCK,
                 pretrain_steps=900, finetune_steps=150),
    "docs": dict(block_size=16, seq_len=64, decoding=dict(max_new_tokens=48, block_length=16, steps=16),
                 pretrain_steps=1100, finetune_steps=200, batch_size=16, lr=3e-3),
}


def routers(block_size):
    return {
        "token_choice": {},
        "expert_choice": dict(router_type="expert_choice", capacity_schedule="linear_reverse", capacity_min=1,
                              capacity_max=3),
        "block": dict(router_type="block", block_router_size=block_size, block_router_top_p=0.6,
                      block_router_min_experts=2),
        "block_pool": dict(router_type="block_pool", expert_capacity=4),  # each block admits 4 of the 8 experts
    }


def choose_threads(requested: int | None) -> int:
    """Intra-op threads: the cores the current load leaves free (at least 1). On a busy machine
    spinning OpenMP threads that compete with other processes are many times slower."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, cores - int(os.getloadavg()[0] + 0.5)))


# ---------------------------------------------------------------------------------------------- data


def digit_tokenizer():
    """A word-level tokenizer over the checkable tasks' symbols (digits, "+", "=", ">") and the
    diffusion special tokens; text is whitespace-separated, decoded tokens are joined by spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from diffusion_moe.training.tokenizer import EOS, MASK, PAD

    words = [PAD, EOS, MASK, "<|unk|>", "+", "=", ">", *map(str, range(10))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, mask_token=MASK,
                                   unk_token="<|unk|>", clean_up_tokenization_spaces=False)


def task_data(task, tokenizer, n_train, n_test, n_hard, seed):
    """(training rows, {set name: [(prompt, answer)]}): the evaluation prompts are drawn first and
    no training pair repeats one. Training rows are pre-tokenised (`input_ids` + `prompt_length`)
    for `DiffusionSFTCollator`."""
    from datasets import Dataset

    rng = random.Random(seed)
    evaluation = {"held_out": {}, "carry_chains": {}}
    for name, n, draw in (("held_out", n_test, task["example"]), ("carry_chains", n_hard, task["hard"])):
        while draw is not None and len(evaluation[name]) < n:
            prompt, answer = draw(rng)
            evaluation[name][prompt] = answer
    seen = set(evaluation["held_out"]) | set(evaluation["carry_chains"])
    rows = {"input_ids": [], "prompt_length": []}
    while len(rows["input_ids"]) < n_train:
        prompt, answer = task["example"](rng)
        if prompt not in seen:
            rows["input_ids"].append(tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"])
            rows["prompt_length"].append(task["prompt_length"])
    return Dataset.from_dict(rows), {name: list(pairs.items()) for name, pairs in evaluation.items() if pairs}


def base_config(tokenizer, seq_len, block_size):
    from diffusion_moe import DiffusionMoeConfig

    return DiffusionMoeConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=seq_len,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, num_shared_experts=1,
        router_type="token_choice", router_score_function="sigmoid", expert_bias_update_rate=1e-3,
        router_z_loss_coef=1e-3, attention_layout="block_causal", block_size=block_size,
        mask_token_id=tokenizer.mask_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, initializer_range=0.05,
        loss_weighting="none",  # mean CE over masked tokens: lower-variance gradients than 1/t weights
    )


def collator(model, tokenizer, task):
    from diffusion_moe.training import DiffusionPretrainCollator, DiffusionSFTCollator

    kind = DiffusionPretrainCollator if task == "docs" else DiffusionSFTCollator
    return kind.from_config(model.config, tokenizer, time_sampling="low_discrepancy")


# ------------------------------------------------------------------------------------------ training


def fit(model, tokenizer, data, args, steps, lr, out_dir, start_step=0):
    """Train with DiffusionTrainer; returns the (step, loss) history, steps counted from `start_step`."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import ProgressCallback

    from diffusion_moe.training import DiffusionTrainer

    class QuietProgressCallback(ProgressCallback):
        """The usual progress bar, with the latest loss on the bar instead of a printed line per log."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.training_bar is not None and logs and "loss" in logs:
                self.training_bar.set_postfix(loss=f"{logs['loss']:.3f}")

    training_args = TrainingArguments(
        output_dir=str(out_dir / "trainer"), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, warmup_steps=min(50, steps // 10), lr_scheduler_type="cosine", weight_decay=0.01,
        logging_steps=20, save_strategy="no", report_to=[], use_cpu=True, seed=args.seed, dataloader_drop_last=True,
        remove_unused_columns=False,  # the SFT collator reads `prompt_length`
    )
    trainer = DiffusionTrainer(model=model, args=training_args, train_dataset=data,
                               data_collator=collator(model, tokenizer, args.task))
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgressCallback())
    trainer.train()
    return [(start_step + h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]


def validation_elbo(model, tokenizer, val_set, args) -> float:
    """Negative ELBO (nats) on held-out data with fixed noise (DiffusionTrainer.evaluate): per
    answer token for the checkable tasks (the prompt is never masked), per token for docs."""
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from diffusion_moe.training import DiffusionTrainer

    weighting, model.config.loss_weighting = model.config.loss_weighting, "elbo"
    eval_args = TrainingArguments(output_dir="/tmp/diffusion_moe_demo_eval", per_device_eval_batch_size=64,
                                  report_to=[], use_cpu=True, seed=args.seed, disable_tqdm=True,
                                  remove_unused_columns=False)
    trainer = DiffusionTrainer(model=model, args=eval_args, eval_dataset=val_set,
                               data_collator=collator(model, tokenizer, args.task), router_stats=False)
    trainer.remove_callback(PrinterCallback)  # the table below reports it
    loss = trainer.evaluate()["eval_loss"]
    model.config.loss_weighting = weighting
    return loss


# --------------------------------------------------------------------------------------- measurement


@torch.no_grad()
def routing_profile(model, input_ids, mask_token_id, ratios=MASK_RATIOS, seed=0):
    """Per mask ratio r: mask a fraction r of each attention block of `input_ids` and report,
    averaged over MoE layers, the experts per token and the load imbalance (max / mean
    tokens per expert of each block)."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for r in ratios:
        masked = torch.rand(input_ids.shape, generator=generator) < r
        stats = model(input_ids=input_ids.masked_fill(masked, mask_token_id), output_router_stats=True).router_stats
        per_token = sum(s.experts_per_token.float().mean().item() for s in stats) / len(stats)
        block = model.config.block_size
        imbalance = 0.0
        for s in stats:  # per attention block: the unit routing balances over
            per_block = s.expert_mask.unflatten(1, (-1, block)).sum(2).float()  # [B, blocks, E]
            imbalance += (per_block.max(-1).values / per_block.mean(-1).clamp(min=1e-9)).mean().item()
        rows.append({"mask_ratio": float(masked.float().mean()), "experts_per_token": per_token,
                     "load_imbalance": imbalance / len(stats)})
    return rows


@torch.no_grad()
def decode(model, tokenizer, prompts, decoding, threshold=None, batch_size=128):
    """Greedy block-parallel decoding with the exact cache, in batches of `batch_size`: the
    answers (text), tokens per forward (mean over prompts), unique routed experts per layer per
    forward and the expert bytes they hold (mean over batches), seconds per generated token
    (answer tokens up to and including EOS)."""
    tokenizer.padding_side = "left"
    answers, per_prompt, unique, seconds, generated = [], [], [], 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        start = time.perf_counter()
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], threshold=threshold,
                             return_dict_in_generate=True, **decoding)
        seconds += time.perf_counter() - start
        answer = out.sequences[:, batch["input_ids"].shape[1]:]
        generated += int((answer != tokenizer.pad_token_id).sum())
        answers += [a.strip() for a in tokenizer.batch_decode(answer, skip_special_tokens=True)]
        per_prompt += out.tokens_per_forward.tolist()
        unique.append(out.router_stats["unique_experts_per_layer"])
    experts = sum(unique) / len(unique)
    return {"answers": answers, "tokens_per_forward": sum(per_prompt) / len(per_prompt),
            "unique_experts_per_layer": experts,
            "expert_bytes_per_forward": experts * out.router_stats["bytes_per_expert"],
            "seconds_per_token": seconds / max(generated, 1)}


def sweep(model, tokenizer, pairs, decoding):
    """One point per THRESHOLDS entry: accuracy (exact match, None without references), tokens
    per forward, routing, seconds per token (one prompt at a time, and in batches of 128); and
    the answers at each."""
    prompts = [p for p, _ in pairs]
    references = [a for _, a in pairs] if pairs and pairs[0][1] is not None else None
    points, answers = [], {}
    for threshold in THRESHOLDS:
        run = decode(model, tokenizer, prompts, decoding, threshold)
        answers[str(threshold)] = run.pop("answers")
        # a batch takes as many forwards as its slowest prompt: latency is timed one prompt at a time
        run["seconds_per_token_batched"] = run.pop("seconds_per_token")
        run["seconds_per_token"] = decode(model, tokenizer, prompts[:LATENCY_PROMPTS], decoding, threshold,
                                          batch_size=1)["seconds_per_token"]
        accuracy = None if references is None else (
            sum(a == r for a, r in zip(answers[str(threshold)], references)) / len(references))
        points.append({"threshold": threshold, "accuracy": accuracy, **run})
    return points, answers


def target(points) -> dict | None:
    """The issue's target: some threshold commits >= 2 tokens per forward with exact-match accuracy
    within 5 points of quota-only decoding. The threshold with the most tokens per forward among
    those within 5 points, and whether it reaches 2."""
    quota = points[0]["accuracy"]
    if quota is None:
        return None
    within = [p for p in points[1:] if p["accuracy"] >= quota - 0.05 - 1e-9]
    best = max(within, key=lambda p: p["tokens_per_forward"], default=None)
    return {"met": bool(best and best["tokens_per_forward"] >= 2.0), "quota_accuracy": quota,
            **{k: best and best[k] for k in ("threshold", "tokens_per_forward", "accuracy")}}


def measure(model, tokenizer, evaluation, val_set, args) -> tuple[dict, dict]:
    """Per router: the held-out set's numbers at top level (`accuracy`: quota-only decoding; the
    routing and timing columns at `args.threshold`), every set's sweep and target; and the answers."""
    decoding = TASKS[args.task]["decoding"]
    decode(model, tokenizer, [evaluation["held_out"][0][0]], decoding)  # warm-up
    result, answers = {}, {}
    for name, pairs in evaluation.items():
        points, answers[name] = sweep(model, tokenizer, pairs, decoding)
        result[name] = {"accuracy": points[0]["accuracy"], "threshold_sweep": points, "target": target(points)}
    held_out = result.pop("held_out")
    on = next(p for p in held_out["threshold_sweep"] if p["threshold"] == args.threshold)
    metrics = {"accuracy": held_out["accuracy"], "threshold": args.threshold, "accuracy_at_threshold": on["accuracy"],
               **{k: on[k] for k in ("tokens_per_forward", "unique_experts_per_layer", "expert_bytes_per_forward",
                                     "seconds_per_token")},
               "elbo": validation_elbo(model, tokenizer, val_set, args), **held_out, **result}
    return metrics, answers


@torch.no_grad()
def decoding_trace(model, tokenizer, prompt, decoding, threshold) -> list[str]:
    """The answer after each denoising forward ("_" = still masked): what parallel decoding looks like."""
    ids = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, threshold=threshold, output_history=True, return_dict_in_generate=True, **decoding)
    show = lambda t: "_" if t == tokenizer.mask_token_id else tokenizer.convert_ids_to_tokens(t)  # noqa: E731
    return [" ".join(show(t) for t in step[0, ids.shape[1]:].tolist()).replace(tokenizer.eos_token, "<eos>")
            for step in out.history]


# ------------------------------------------------------------------------------------------------ plot


def plot(curves, profiles, results, task, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    colours = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    markers = dict(zip(results, "osD^"))
    ax = axes[0, 0]
    for name, r in results.items():
        for key, style in (("held_out", "-"), ("carry_chains", "--")):
            points = r["threshold_sweep"] if key == "held_out" else r.get(key, {}).get("threshold_sweep")
            if not points:
                continue
            y = [p["tokens_per_forward"] if task == "docs" else 100 * p["accuracy"] for p in points]
            ax.plot([p["tokens_per_forward"] for p in points], y, style, marker=markers[name], color=colours[name],
                    alpha=0.85)
            if name == "token_choice" and (key == "carry_chains" or "carry_chains" not in r):
                for p, yy in zip(points, y):
                    ax.annotate("quota" if p["threshold"] is None else f"{p['threshold']}",
                                (p["tokens_per_forward"], yy), textcoords="offset points", xytext=(5, 3),
                                fontsize=7, color=colours[name])
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[n], marker=markers[n], label=LABELS[n]) for n in results]
    if any("carry_chains" in r for r in results.values()):
        handles += [Line2D([], [], color="k", ls=ls, label=SETS[key]) for key, ls in (("held_out", "-"),
                                                                                      ("carry_chains", "--"))]
    if task != "docs":
        ax.axvline(2.0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="tokens committed per denoising forward (max 8)", ylabel="exact-match accuracy (%)",
               ylim=(0, 104), title="Accuracy vs tokens per forward: quota only (1 per forward), then\n"
                                    "confidence thresholds 0.99 ... 0.5 (labelled on token choice's curve)")
    else:
        ax.set(xlabel="tokens per forward", ylabel="tokens per forward", title="Tokens per forward (no accuracy)")
    ax.legend(handles=handles, fontsize=8, loc="lower left")

    ax = axes[0, 1]
    names = list(results)
    on = results[names[0]]["threshold"]
    width = 0.38
    for j, threshold in enumerate((None, on)):
        points = [next(p for p in results[n]["threshold_sweep"] if p["threshold"] == threshold) for n in names]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(names))],
                      [p["unique_experts_per_layer"] for p in points], width,
                      label="quota only" if threshold is None else f"threshold {threshold}")
        for bar, p in zip(bars, points):
            x, height = bar.get_x() + width / 2, p["unique_experts_per_layer"]
            kib = p["expert_bytes_per_forward"] / max(p["tokens_per_forward"], 1e-9) / 1024
            ax.annotate(f"{height:.1f}", (x, height), ha="center", va="bottom", fontsize=8)
            ax.annotate(f"{kib:.0f} KiB/token", (x, 0.15), ha="center", va="bottom", rotation=90, fontsize=8,
                        color="white")
    ax.set_xticks(range(len(names)), [LABELS[n].replace(" (", "\n(") for n in names], fontsize=8)
    ax.set(ylabel="unique routed experts per layer per forward (of 8)", ylim=(0, 9),
           title="Experts read per denoising forward (held-out prompts); inside:\n"
                 "expert bytes read per layer per answer token")
    ax.legend(fontsize=8, loc="upper right")

    ax = axes[1, 0]
    r = [row["mask_ratio"] for row in profiles["expert_choice"]]
    ax.plot(r, [row["experts_per_token"] for row in profiles["expert_choice"]], "o-",
            label="expert choice: experts per token (capacity k)")
    ax.plot(r, [row["load_imbalance"] for row in profiles["token_choice"]], "s--",
            label="token choice: load max/mean per block")
    ax.plot(r, [row["load_imbalance"] for row in profiles["expert_choice"]], "^:",
            label="expert choice: load max/mean per block")
    ax.set(xlabel="mask ratio of the input", title="Capacity and balance vs mask ratio")
    ax.legend(fontsize=8)

    ax = axes[1, 1]
    for name, history in curves.items():
        ax.plot(*zip(*history), label=LABELS[name], color=colours[name])
    ax.set(xlabel="optimizer step", ylabel="train loss (mean CE, masked tokens)", yscale="log",
           title="Pretrain token choice, then retrofit and fine-tune")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "routers.png", dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- run


def prepare(args):
    """(tokenizer, training set, ELBO set, {set name: [(prompt, answer or None)]})."""
    if args.task != "docs":
        from datasets import Dataset

        tokenizer = digit_tokenizer()
        task = TASKS[args.task]
        train_set, evaluation = task_data(task, tokenizer, args.pretrain_steps * args.batch_size + 64,
                                          args.test_prompts, args.hard_prompts, args.seed)
        val_set = Dataset.from_list([{"prompt": p, "answer": a} for p, a in evaluation["held_out"]])
        example = evaluation["held_out"][0]
        print(f"[1/4] data: {args.task}, {len(train_set)} training pairs, prompts none of them holds: "
              + ", ".join(f"{len(pairs)} {SETS[name]}" for name, pairs in evaluation.items())
              + f" (e.g. {example[0]!r} -> {example[1]!r}), vocab {len(tokenizer)}")
        return tokenizer, train_set, val_set, evaluation
    from diffusion_moe.training import default_corpus, train_tokenizer, train_validation_split

    documents = default_corpus()
    tokenizer = train_tokenizer(documents, vocab_size=2048)
    train_set, val_set = train_validation_split(tokenizer, documents, TASKS["docs"]["seq_len"],
                                                validation_fraction=0.04)
    print(f"[1/4] data: {len(documents)} Python documentation topics, vocab {len(tokenizer)}, "
          f"{len(train_set)} train / {len(val_set)} validation sequences of {TASKS['docs']['seq_len']} tokens")
    return tokenizer, train_set, val_set, {"held_out": [(p, None) for p in DOCS_PROMPTS]}


def run(args):
    from diffusion_moe import DiffusionMoeForMaskedLM

    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    task = TASKS[args.task]
    tokenizer, train_set, val_set, evaluation = prepare(args)

    model = DiffusionMoeForMaskedLM(base_config(tokenizer, task["seq_len"], task["block_size"]))
    print(f"[2/4] pretraining a {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M-parameter block-causal "
          f"token-choice MoE (2 layers, 8 experts top-2 + 1 shared, sigmoid, loss-free bias) for "
          f"{args.pretrain_steps} steps of {args.batch_size} on {torch.get_num_threads()} thread(s)")
    start = time.time()
    curves = {"token_choice": fit(model, tokenizer, train_set, args, args.pretrain_steps, args.lr, out_dir)}
    print(f"      {time.time() - start:.0f}s")

    print(f"[3/4] retrofit by config and fine-tune {args.finetune_steps} steps each: expert choice "
          "(linear_reverse capacity 1..3), block routing (dMoE, top-p 0.6, coreset >= 2) and the block pool "
          "(4 of 8 experts per block); token choice continues as many steps, so all four have the same budget")
    pretrained, models, paths = out_dir / "pretrained", {}, {}
    model.save_pretrained(pretrained)
    for name, overrides in routers(task["block_size"]).items():
        retrofit = DiffusionMoeForMaskedLM.from_pretrained(pretrained, **overrides)
        history = fit(retrofit, tokenizer, train_set, args, args.finetune_steps, args.lr / 3, out_dir,
                      start_step=args.pretrain_steps)
        curves[name] = curves.get(name, []) + history
        paths[name] = out_dir / name
        retrofit.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
        models[name] = retrofit.eval()
    print(f"      {time.time() - start:.0f}s")

    print(f"[4/4] measuring each model on the same prompts: quota-only decoding, then thresholds "
          f"{', '.join(str(t) for t in THRESHOLDS[1:])}")
    results, answers, profiles = {}, {}, {}
    if args.task == "docs":
        clean = torch.tensor(val_set[:32]["input_ids"])
    else:  # clean held-out sequences (prompt, answer, EOS), masked at each ratio by the profile
        clean = torch.tensor([tokenizer(f"{p} {a}", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                              for p, a in evaluation["held_out"][:64]])
    for name, m in models.items():
        results[name], answers[name] = measure(m, tokenizer, evaluation, val_set, args)
        profiles[name] = routing_profile(m, clean, m.config.mask_token_id)
    shown = (evaluation.get("carry_chains") or evaluation["held_out"])[0]
    traces = {str(t): decoding_trace(models["token_choice"], tokenizer, shown[0], task["decoding"], t)
              for t in (None, args.threshold)} if args.task != "docs" else None
    samples = sample_texts(models["token_choice"], tokenizer, task["decoding"], args.seed) if args.task == "docs" \
        else None
    plot(curves, profiles, results, args.task, out_dir)
    metrics = {**results, "routing_profile": profiles, "loss_curves": curves,
               "examples": {name: {"pairs": pairs[:8], "answers": {r: {t: a[:8] for t, a in answers[r][name].items()}
                                                                   for r in answers}}
                            for name, pairs in evaluation.items()},
               "trace": traces and {"prompt": shown[0], "router": "token_choice", "forwards": traces},
               "samples": samples,
               "settings": {**vars(args), **{k: v for k, v in task.items() if not callable(v)},
                            "thresholds": THRESHOLDS}}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report(results, traces, shown, samples, args)
    print(f"\nmodels in {', '.join(str(p) for p in paths.values())}; plot {out_dir / 'routers.png'}; "
          f"metrics {out_dir / 'metrics.json'}")
    prompts = [p for p, _ in evaluation["held_out"][:16]]
    reload = {"prompts": prompts, "decoding": task["decoding"],
              "answers": decode(models["expert_choice"], tokenizer, prompts, task["decoding"])["answers"]}
    (out_dir / "reload.json").write_text(json.dumps(reload))
    return paths["expert_choice"], out_dir / "reload.json"


def report(results, traces, shown, samples, args):
    pct = lambda a: "  n/a" if a is None else f"{100 * a:5.1f}"  # noqa: E731
    head = "".join(f"{'quota' if t is None else t:>13}" for t in THRESHOLDS)
    for key, label in SETS.items():
        label = label if args.task != "docs" else "Python documentation prompts"
        rows = [(name, r if key == "held_out" else r.get(key)) for name, r in results.items()]
        if any(r is None for _, r in rows):
            continue
        what = "exact-match accuracy (%) / tokens per forward" if args.task != "docs" else "tokens per forward"
        print(f"\n{label}: {what}, by threshold\n{'router':31s}{head}   target (>= 2 tokens/forward, "
              "accuracy within 5 points of quota)")
        for name, r in rows:
            cells = "".join(f" {pct(p['accuracy'])} / {p['tokens_per_forward']:4.2f}" for p in r["threshold_sweep"])
            t = r["target"]
            verdict = "" if t is None else (
                f"met at {t['threshold']}: {t['tokens_per_forward']:.2f}/forward, {pct(t['accuracy']).strip()}%"
                if t["met"] else "NOT met" + (" (no threshold within 5 points)" if t["threshold"] is None else
                                              f" (best within 5 points: {t['tokens_per_forward']:.2f} at "
                                              f"{t['threshold']})"))
            print(f"{LABELS[name]:31s}{cells}   {verdict}")
    print(f"\n{SETS['held_out'] if args.task != 'docs' else 'Python documentation prompts'}, quota only -> threshold "
          f"{args.threshold}:\n"
          f"{'router':31s} {'val ELBO':>9s} {'unique experts/layer':>21s} {'expert KiB/layer/forward':>25s} "
          f"{'us/token, batch 1':>18s} {'batch 128':>15s}")
    for name, r in results.items():
        quota, on = r["threshold_sweep"][0], next(p for p in r["threshold_sweep"] if p["threshold"] == args.threshold)
        pair = lambda key, scale, width: f"{scale * quota[key]:{width}.1f} -> {scale * on[key]:6.1f}"  # noqa: E731
        print(f"{LABELS[name]:31s} {r['elbo']:9.3f} {pair('unique_experts_per_layer', 1, 11)} "
              f"{pair('expert_bytes_per_forward', 1 / 1024, 15)} {pair('seconds_per_token', 1e6, 8)} "
              f"{pair('seconds_per_token_batched', 1e6, 5)}")
    for t, lines in (traces or {}).items():
        label = "quota only" if t == "None" else f"threshold {t}"
        print(f"\ntoken choice, {shown[0]!r} (answer {shown[1]!r}), {label}: {len(lines)} forwards")
        for i, line in enumerate(lines, 1):
            print(f"  forward {i}: {line}")
    if samples:
        print(f"\n--- token choice, prompt {DOCS_PROMPTS[0]!r}\n  greedy : {samples['greedy']}\n"
              f"  sampled: {samples['sampled']}")


@torch.no_grad()
def sample_texts(model, tokenizer, decoding, seed) -> dict:
    """Greedy and sampled (do_sample, temperature 0.8, top-p 0.9) continuations of DOCS_PROMPTS[0]."""
    ids = tokenizer(DOCS_PROMPTS[:1], return_tensors="pt", add_special_tokens=False)["input_ids"]
    greedy = model.generate(ids, **decoding)
    torch.manual_seed(seed)
    sampled = model.generate(ids, do_sample=True, temperature=0.8, top_p=0.9, **decoding)
    text = lambda out: tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)  # noqa: E731
    return {"greedy": DOCS_PROMPTS[0] + text(greedy), "sampled": DOCS_PROMPTS[0] + text(sampled)}


def reload_and_decode(model_dir: str, expected_file: str):
    """Runs in a fresh interpreter: only transformers + the saved remote code."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    sys.modules["diffusion_moe"] = None  # prove the saved folder is self-contained
    expected = json.loads(Path(expected_file).read_text())
    model = AutoModelForMaskedLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    tokenizer.padding_side = "left"
    batch = tokenizer(expected["prompts"], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **expected["decoding"])
    answers = [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:],
                                                          skip_special_tokens=True)]
    same = answers == expected["answers"]
    print(f"\nreloaded {type(model).__name__} from {type(model).__module__} in a fresh process "
          f"(trust_remote_code=True): greedy answers to {len(answers)} prompts {'identical' if same else 'DIFFERENT'}")
    if not same:
        raise SystemExit(f"reloaded model decoded {answers!r}, expected {expected['answers']!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--task", choices=sorted(TASKS), default="add",
                        help="add: 7-digit addition (default); sort: sort 7 digits; docs: LM on the Python docs")
    parser.add_argument("--pretrain_steps", type=int, default=None, help="default: add 1500, sort 900, docs 1100")
    parser.add_argument("--finetune_steps", type=int, default=None, help="default: 150 (docs 200)")
    parser.add_argument("--batch_size", type=int, default=None, help="default: 64 (docs 16)")
    parser.add_argument("--lr", type=float, default=None, help="pretraining learning rate (fine-tuning: a third)")
    parser.add_argument("--test_prompts", type=int, default=512, help="random held-out prompts (add, sort)")
    parser.add_argument("--hard_prompts", type=int, default=256, help="carry-chain prompts (add)")
    parser.add_argument("--threshold", type=float, default=0.9, choices=[t for t in THRESHOLDS if t],
                        help="the threshold the routing and timing columns are reported at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: free cores)")
    parser.add_argument("--reload", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("pretrain_steps", "finetune_steps", "batch_size", "lr"):
        if getattr(args, name) is None:
            setattr(args, name, TASKS[args.task][name])
    torch.set_num_threads(choose_threads(args.threads))
    if args.reload:
        return reload_and_decode(*args.reload)
    start = time.time()
    model_dir, expected = run(args)
    subprocess.run([sys.executable, __file__, "--reload", str(model_dir), str(expected), "--threads",
                    str(torch.get_num_threads())], check=True)
    print(f"\ndemo finished in {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
