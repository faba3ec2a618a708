"""Router study on the default corpus (a benchmark, not a test).

Same data order, noise, seeds and steps for every variant; matched active FLOPs (on
average 2 of 8 routed experts per token, plus one shared expert):

    EC constant            expert choice, k = 2
    TC dropless + aux      token choice top-2, aux loss 0.01
    TC cap 1.25 + aux      token choice top-2, capacity factor 1.25, aux loss 0.01
    EC <schedule>          expert choice, k_b in [1, 3] by mask ratio (mean 2 for r ~ U(0, 1)):
                           linear, linear_reverse, cosine_reverse, bell_gaussian

`--shape ec_dlm` is EC-DLM's published shape instead (github zhangshuibai/EC-DLM, the scripts
under examples/dlm_training/openwebtxt-H200/: EC/dlm_pretrain_moe_H200_topk32_dynamic_reverse_linear.sh,
EC/dlm_pretrain_moe_H200_topk20.sh, TC/dlm_pretrain_moe_H200_topk32_dropless_lb.sh). There: 512 routed
experts of width 384 (0.75 x hidden 512), 2 shared experts (--moe-shared-expert-intermediate-size
768 = 2 x 384), --enable-scaling-factor everywhere, z loss 1e-3, sequences of 513 tokens;
EC linear_reverse with k in [8, 32] (mean 20 for r ~ U(0, 1)) against static EC k=20, and
TC top-k with aux loss 0.01, dropless. Scaled down by 4 with its ratios kept: E = 128 experts
of width 48 (0.75 x hidden 64), 2 shared, k in [2, 8] (k/E from 1/64 to 1/16, mean 5), and
sequences of 128 = E tokens so that an expert takes C = L k / E = k tokens per sequence, as
there (513 k / 512):

    EC-DLM: EC linear_reverse k 2..8   expert choice, k_b = round(2 + 6 (1 - r_b)), ec_dlm scaling
    EC constant k=5                    expert choice, k = 5, ec_dlm scaling
    TC top-5 + aux                     token choice top-5, dropless, aux loss 0.01, ec_dlm scaling
    TC top-5 + aux, constant scaling   the same with routed_scaling_mode="constant" (a control)

Training minimises the mean CE over masked tokens (loss_weighting="none", lower variance);
reports the validation negative ELBO (nats/token, lower is better) at the end and at
evenly spaced checkpoints, and the wall-clock seconds per optimizer step, as mean and
seed-to-seed spread over `--seeds`.

    python benchmarks/router_study.py [--shape default|ec_dlm] [--steps 600] [--seeds 0 1]
                                      [--out outputs/router_study.json]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.training import DiffusionPretrainCollator, DiffusionTrainer, default_corpus, train_tokenizer
from diffusion_moe.training.data import train_validation_split

VARIANTS = {
    "EC constant": dict(router_type="expert_choice"),
    "TC dropless + aux": dict(router_type="token_choice", router_aux_loss_coef=0.01),
    "TC cap 1.25 + aux": dict(router_type="token_choice", router_aux_loss_coef=0.01, capacity_factor=1.25),
    "EC linear": dict(router_type="expert_choice", capacity_schedule="linear"),
    "EC linear_reverse": dict(router_type="expert_choice", capacity_schedule="linear_reverse"),
    "EC cosine_reverse": dict(router_type="expert_choice", capacity_schedule="cosine_reverse"),
    "EC bell_gaussian": dict(router_type="expert_choice", capacity_schedule="bell_gaussian"),
}

EC_DLM_VARIANTS = {
    "EC-DLM: EC linear_reverse k 2..8, ec_dlm scaling": dict(router_type="expert_choice",
                                                             capacity_schedule="linear_reverse"),
    "EC constant k=5, ec_dlm scaling": dict(router_type="expert_choice"),
    "TC top-5 + aux, ec_dlm scaling": dict(router_type="token_choice", router_aux_loss_coef=0.01),
    "TC top-5 + aux, constant scaling": dict(router_type="token_choice", router_aux_loss_coef=0.01,
                                             routed_scaling_mode="constant"),
}

# shape: (MoE settings shared by its variants, its variants, default seq_len, default batch size)
SHAPES = {
    "default": (dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, num_shared_experts=1,
                     capacity_min=1, capacity_max=3), VARIANTS, 64, 16),
    "ec_dlm": (dict(num_experts=128, num_experts_per_tok=5, moe_intermediate_size=48, num_shared_experts=2,
                    capacity_min=2, capacity_max=8, routed_scaling_mode="ec_dlm"), EC_DLM_VARIANTS, 128, 8),
}


class EvalCurve(TrainerCallback):
    """Validation ELBO every `every` steps, with the training wall-clock spent so far (eval time excluded)."""

    def __init__(self, every):
        self.every, self.points, self.trainer, self.train_seconds, self._t = every, [], None, 0.0, None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self._t
        if state.global_step % self.every == 0:
            trainer, config = self.trainer, self.trainer.model.config
            train_collator = trainer.data_collator
            config.loss_weighting = "elbo"  # train on mean masked CE, report the ELBO
            trainer.data_collator = DiffusionPretrainCollator.from_config(config, train_collator.tokenizer, seed=123)
            loss = trainer.evaluate()["eval_loss"]
            config.loss_weighting, trainer.data_collator = "none", train_collator
            self.points.append((state.global_step, self.train_seconds, loss))


def run(name, overrides, seed, tokenizer, train_set, val_set, args):
    config = DiffusionMoeConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=args.seq_len,
        router_z_loss_coef=1e-3, mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        initializer_range=0.05, loss_weighting="none", **{**SHAPES[args.shape][0], **overrides},
    )
    if seed == args.seeds[0]:
        print(f"{name}: {json.dumps(config.to_diff_dict())}", flush=True)
    torch.manual_seed(seed)
    model = DiffusionMoeForMaskedLM(config)
    curve = EvalCurve(max(1, args.steps // args.evals))
    trainer = DiffusionTrainer(
        model=model, train_dataset=train_set, eval_dataset=val_set, callbacks=[curve],
        data_collator=DiffusionPretrainCollator.from_config(config, tokenizer, seed=seed),
        args=TrainingArguments(
            output_dir="/tmp/router_study", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=len(val_set), learning_rate=3e-3, warmup_steps=args.steps // 10,
            lr_scheduler_type="cosine", logging_steps=10, report_to=[], use_cpu=True, save_strategy="no",
            seed=seed, data_seed=0, disable_tqdm=True, dataloader_drop_last=True,
        ),
    )
    curve.trainer = trainer
    trainer.train()
    final = curve.points[-1]
    return {"variant": name, "seed": seed, "elbo": final[2], "seconds_per_step": final[1] / args.steps,
            "curve": curve.points}


def table(results, steps, variants):
    lines = [f"| variant | val. neg. ELBO @ {steps} steps (mean ± spread) | s / step | ELBO @ 50% steps |",
             "|---|---|---|---|"]
    for name in variants:
        rows = [r for r in results if r["variant"] == name]
        if not rows:
            continue
        elbo = [r["elbo"] for r in rows]
        sec = [r["seconds_per_step"] for r in rows]
        half = [r["curve"][len(r["curve"]) // 2 - 1][2] for r in rows]
        spread = (max(elbo) - min(elbo)) / 2
        lines.append(f"| {name} | {statistics.mean(elbo):.3f} ± {spread:.3f} | {statistics.mean(sec):.3f} | "
                     f"{statistics.mean(half):.3f} |")
    return "\n".join(lines)


def curve_table(results, variants):
    """Validation neg. ELBO at every checkpoint, mean ± spread over seeds."""
    steps = [point[0] for point in results[0]["curve"]]
    lines = ["| variant | " + " | ".join(f"@ {step}" for step in steps) + " |", "|---|" + "---|" * len(steps)]
    for name in variants:
        curves = [[point[2] for point in r["curve"]] for r in results if r["variant"] == name]
        if curves:
            cells = [f"{statistics.mean(c):.3f} ± {(max(c) - min(c)) / 2:.3f}" for c in zip(*curves)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shape", default="default", choices=list(SHAPES))
    parser.add_argument("--batch_size", type=int, help="default: 16 (default shape), 8 (ec_dlm)")
    parser.add_argument("--seq_len", type=int, help="default: 64 (default shape), 128 (ec_dlm)")
    parser.add_argument("--variants", nargs="+", help="default: all of the shape's",
                        choices=[*VARIANTS, *EC_DLM_VARIANTS])
    parser.add_argument("--evals", type=int, default=4, help="validation checkpoints, evenly spaced")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="outputs/router_study.json")
    args = parser.parse_args()
    _, variants, seq_len, batch_size = SHAPES[args.shape]
    args.seq_len, args.batch_size = args.seq_len or seq_len, args.batch_size or batch_size
    args.variants = args.variants or list(variants)
    if unknown := [name for name in args.variants if name not in variants]:
        parser.error(f"--variants {unknown} are not variants of --shape {args.shape}")
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    documents = default_corpus()
    tokenizer = train_tokenizer(documents, vocab_size=1024)
    train_set, val_set = train_validation_split(tokenizer, documents, args.seq_len, validation_fraction=0.04)
    val_set = val_set.select(range(min(64, len(val_set))))
    results = []
    for seed in args.seeds:
        for name in args.variants:
            result = run(name, variants[name], seed, tokenizer, train_set, val_set, args)
            print(f"{name:20s} seed {seed}: ELBO {result['elbo']:.3f}  {result['seconds_per_step']:.3f} s/step",
                  flush=True)
            results.append(result)
    print()
    print(table(results, args.steps, variants))
    print()
    print(curve_table(results, variants))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
