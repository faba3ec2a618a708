"""Time LLaDA2's own published `generate` on a LLaDA2-layout checkpoint (used by decode_roofline.py).

    python benchmarks/llada2_generate.py --code DIR --checkpoint DIR --prompts prompts.json --out result.json

DIR (--code) holds LLaDA2's modeling code, `modeling_llada2_moe.py` + `configuration_llada2_moe.py`
as published (the dMoE repository carries a copy: github.com/fscdc/dMoE, `evaluations/models`).
That code imports `transformers.modeling_attn_mask_utils`, which Transformers 5 removed, so run
this file with a Python whose Transformers is 4.56-4.57; it imports nothing of diffusion_moe.

One change to the published code, so that tokens can be compared: its temperature-0 path
samples with `torch.multinomial` at temperature 1 (DESIGN.md, section 5), so the sampler is
replaced by the argmax and its probability. Everything else (cache rebuilding, masks, the
per-expert loop, the `.item()` syncs) runs as published. Its `generate` builds the attention
mask in bfloat16 (0 / -inf), which SDPA refuses next to float32 queries; in float32 the
mask is cast to float32 on its way into `forward` (exact: 0 and -inf are the same values).
Writes the tokens, seconds and
denoising forwards of each prompt, decoded one at a time (its `generate` takes batch 1).
"""

import argparse
import importlib
import json
import sys
import time
import types

import torch


def load_published_module(code_dir: str):
    """Import modeling_llada2_moe.py from `code_dir` as a package module (it imports its config relatively)."""
    package = types.ModuleType("llada2_published")
    package.__path__ = [code_dir]
    sys.modules["llada2_published"] = package
    return importlib.import_module("llada2_published.modeling_llada2_moe")


def greedy(self, logits, temperature=0.0, top_k=None, top_p=None):
    confidence, token = torch.softmax(logits.float(), dim=-1).max(dim=-1)
    return token, confidence


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("code", "checkpoint", "prompts", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    published = load_published_module(args.code)
    model = published.LLaDA2MoeModelLM.from_pretrained(args.checkpoint, torch_dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    model._sample_with_temperature_topk_topp = types.MethodType(greedy, model)
    if model.dtype != torch.bfloat16:
        forward = model.forward

        def forward_with_mask_in_model_dtype(*inputs, attention_mask=None, **kwargs):
            return forward(*inputs, attention_mask=attention_mask.to(model.dtype), **kwargs)

        model.forward = forward_with_mask_in_model_dtype
    spec = json.load(open(args.prompts))
    settings = dict(temperature=0.0, block_length=args.block, steps=args.block, gen_length=args.new,
                    threshold=1.0, eos_id=-1, mask_id=spec["mask_id"])  # threshold 1.0: one token per step
    results = []
    with torch.no_grad():
        model.generate(torch.tensor([spec["prompts"][0]]), **{**settings, "gen_length": args.block})  # warm-up
        for prompt in spec["prompts"]:
            synchronize()
            start = time.perf_counter()
            tokens, unique = model.generate(torch.tensor([prompt]), **settings)
            synchronize()
            results.append({"seconds": time.perf_counter() - start, "tokens": tokens[0].tolist(),
                            "unique_experts_per_layer": unique})
    json.dump(results, open(args.out, "w"))


if __name__ == "__main__":
    main()
