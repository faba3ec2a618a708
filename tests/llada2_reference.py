"""An independent, plainly written LLaDA2-MoE reference, for tests only.

It works directly on a LLaDA2-layout state dict (DESIGN 6 key names) in float64, with
explicit loops: one token at a time through the router and the experts, attention masks
built element by element. Nothing here imports diffusion_moe, so agreement with the
library is evidence, not a tautology. Also writes tiny random LLaDA2 checkpoints.
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def tiny_llada2_config(**overrides) -> dict:
    """hidden 64, 4 heads / 2 KV heads of 16, partial rotary 0.5, 3 layers (1 dense), 8 experts top-2."""
    config = {
        "model_type": "llada2_moe",
        "architectures": ["LLaDA2MoeModelLM"],
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "use_qkv_bias": False,
        "use_bias": False,
        "use_qk_norm": True,
        "rms_norm_eps": 1e-6,
        "rope_theta": 600000,
        "partial_rotary_factor": 0.5,
        "rope_scaling": None,
        "max_position_embeddings": 512,
        "num_experts": 8,
        "num_shared_experts": 1,
        "num_experts_per_tok": 2,
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
        "moe_intermediate_size": 32,
        "first_k_dense_replace": 1,
        "tie_word_embeddings": False,
        "norm_topk_prob": True,
        "score_function": "sigmoid",
        "pad_token_id": 155,
    }
    config.update(overrides)
    return config


def random_llada2_weights(config: dict, seed: int = 0, lm_head_scale: float = 1.0) -> dict:
    """Random weights under LLaDA2's key names (float32), including a nonzero expert bias."""
    g = torch.Generator().manual_seed(seed)
    H, hd = config["hidden_size"], config["head_dim"]
    nh, nkv, E = config["num_attention_heads"], config["num_key_value_heads"], config["num_experts"]

    def linear(out_features, in_features):
        return torch.randn(out_features, in_features, generator=g) / math.sqrt(in_features)

    def norm(size):
        return 1.0 + 0.1 * torch.randn(size, generator=g)

    def mlp(prefix, size):
        return {
            f"{prefix}.gate_proj.weight": linear(size, H),
            f"{prefix}.up_proj.weight": linear(size, H),
            f"{prefix}.down_proj.weight": linear(H, size),
        }

    w = {"model.word_embeddings.weight": torch.randn(config["vocab_size"], H, generator=g)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = norm(H)
        w[f"{p}.post_attention_layernorm.weight"] = norm(H)
        w[f"{p}.attention.query_key_value.weight"] = linear((nh + 2 * nkv) * hd, H)
        w[f"{p}.attention.query_layernorm.weight"] = norm(hd)
        w[f"{p}.attention.key_layernorm.weight"] = norm(hd)
        w[f"{p}.attention.dense.weight"] = linear(H, nh * hd)
        if i < config["first_k_dense_replace"]:
            w.update(mlp(f"{p}.mlp", config["intermediate_size"]))
            continue
        w[f"{p}.mlp.gate.weight"] = 2.0 * linear(E, H)
        w[f"{p}.mlp.gate.expert_bias"] = 0.1 * torch.randn(E, generator=g)
        for e in range(E):
            w.update(mlp(f"{p}.mlp.experts.{e}", config["moe_intermediate_size"]))
        w.update(mlp(f"{p}.mlp.shared_experts", config["moe_intermediate_size"] * config["num_shared_experts"]))
    w["model.norm.weight"] = norm(H)
    w["lm_head.weight"] = lm_head_scale * linear(config["vocab_size"], H)
    return w


def write_llada2_checkpoint(folder, config: dict, weights: dict, num_shards: int = 2) -> list[str]:
    """config.json + `num_shards` safetensors shards of roughly equal size + the index.

    Keys are written in model order (experts in numeric order), so with equal-size shards a
    layer's experts straddle a shard boundary. Returns the shard file names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps({"mask_token": "<|mask|>"}))
    keys = list(weights)
    total = sum(t.numel() for t in weights.values())
    shards, current, size = [], [], 0
    for key in keys:
        current.append(key)
        size += weights[key].numel()
        if size >= total * (len(shards) + 1) / num_shards and len(shards) < num_shards - 1:
            shards.append(current)
            current = []
    shards.append(current)
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: weights[k].contiguous() for k in shard}, folder / name, metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": 4 * total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return names


# ----------------------------------------------------------------------------------------
# reference forward


def block_causal_allowed(length: int, block: int) -> list[list[bool]]:
    """allowed[i][j]: query i may attend key j (j's block is not after i's block)."""
    return [[(j // block) <= (i // block) for j in range(length)] for i in range(length)]


def full_allowed(length: int) -> list[list[bool]]:
    return [[True] * length for _ in range(length)]


def _rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _swiglu(x, weights, prefix):
    gate = x @ weights[f"{prefix}.gate_proj.weight"].T
    up = x @ weights[f"{prefix}.up_proj.weight"].T
    return (gate * torch.sigmoid(gate) * up) @ weights[f"{prefix}.down_proj.weight"].T


def _rotate(x, position, rotary_dim, theta):
    """Rotate-half rotary on the first `rotary_dim` dims of each head vector x [heads, hd] at one position."""
    half = rotary_dim // 2
    out = x.clone()
    for j in range(half):
        angle = position / (theta ** (2 * j / rotary_dim))
        c, s = math.cos(angle), math.sin(angle)
        a, b = x[:, j], x[:, j + half]
        out[:, j] = a * c - b * s
        out[:, j + half] = b * c + a * s
    return out


def _group_limited_top_k(biased, config, allowed=None):
    """Indices of one token's k experts: best topk_group groups (by their two best scores), then top-k."""
    E, k = len(biased), config["num_experts_per_tok"]
    scores = [biased[e] if allowed is None or allowed[e] else -math.inf for e in range(E)]
    n_group, topk_group = config.get("n_group"), config.get("topk_group")
    if n_group and n_group > 1:
        size = E // n_group
        group_score = []
        for grp in range(n_group):
            members = sorted((scores[e] for e in range(grp * size, (grp + 1) * size)), reverse=True)
            group_score.append(members[0] + members[1])
        kept = sorted(range(n_group), key=lambda grp: group_score[grp], reverse=True)[:topk_group]
        scores = [scores[e] if e // size in kept else -math.inf for e in range(E)]
    return sorted(range(E), key=lambda e: scores[e], reverse=True)[:k]


def _block_coresets(biased, config, chunk_size, top_p, min_experts):
    """dMoE coreset per aligned chunk of one sequence: list (per chunk) of sets of experts."""
    L, E, k = len(biased), len(biased[0]), config["num_experts_per_tok"]
    coresets = []
    for start in range(0, L, chunk_size):
        votes = [0.0] * E
        for t in range(start, min(start + chunk_size, L)):
            for e in sorted(range(E), key=lambda e: biased[t][e], reverse=True)[:k]:
                votes[e] += biased[t][e]
        total = sum(votes)
        votes = [v / total for v in votes]
        order = sorted(range(E), key=lambda e: votes[e], reverse=True)
        kept, mass = [], 0.0
        for e in order:
            if kept and mass > top_p:
                break
            kept.append(e)
            mass += votes[e]
        if len(kept) < min_experts:
            kept = order[:min_experts]
        coresets.append(set(kept))
    return coresets


def reference_forward(weights, config, input_ids, allowed, router="token_choice", block_router=None):
    """Logits [B, L, V] (float64) and, per MoE layer, the chosen experts [B][L] -> sorted list.

    `allowed` is the [L][L] attention pattern shared by the batch (no padding).
    `block_router`: dict(size, top_p, min_experts) for router="block" (dMoE).
    """
    w = {k: v.double() for k, v in weights.items()}
    B, L = input_ids.shape
    H, hd, eps = config["hidden_size"], config["head_dim"], config["rms_norm_eps"]
    nh, nkv, E = config["num_attention_heads"], config["num_key_value_heads"], config["num_experts"]
    rotary_dim = int(hd * config["partial_rotary_factor"])
    h = w["model.word_embeddings.weight"][input_ids]  # [B, L, H]
    routing = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        x = _rms_norm(h, w[f"{p}.input_layernorm.weight"], eps)
        qkv = (x @ w[f"{p}.attention.query_key_value.weight"].T).view(B, L, nh + 2 * nkv, hd)
        q, k, v = qkv[:, :, :nh], qkv[:, :, nh : nh + nkv], qkv[:, :, nh + nkv :]
        if config.get("use_qk_norm", True):
            q = _rms_norm(q, w[f"{p}.attention.query_layernorm.weight"], eps)
            k = _rms_norm(k, w[f"{p}.attention.key_layernorm.weight"], eps)
        q, k = q.clone(), k.clone()
        for b in range(B):
            for t in range(L):
                q[b, t] = _rotate(q[b, t], t, rotary_dim, config["rope_theta"])
                k[b, t] = _rotate(k[b, t], t, rotary_dim, config["rope_theta"])
        attn = torch.zeros(B, L, nh, hd, dtype=torch.float64)
        for b in range(B):
            for head in range(nh):
                kv_head = head // (nh // nkv)
                scores = (q[b, :, head] @ k[b, :, kv_head].T) / math.sqrt(hd)  # [L, L]
                scores = scores.masked_fill(~torch.tensor(allowed), -math.inf)
                attn[b, :, head] = torch.softmax(scores, dim=-1) @ v[b, :, kv_head]
        h = h + attn.reshape(B, L, nh * hd) @ w[f"{p}.attention.dense.weight"].T
        x = _rms_norm(h, w[f"{p}.post_attention_layernorm.weight"], eps)
        if i < config["first_k_dense_replace"]:
            h = h + _swiglu(x, w, f"{p}.mlp")
            continue
        out = _swiglu(x, w, f"{p}.mlp.shared_experts") if config["num_shared_experts"] else torch.zeros_like(x)
        chosen_layer = []
        for b in range(B):
            scores = torch.sigmoid(x[b] @ w[f"{p}.mlp.gate.weight"].T).tolist()  # [L][E]
            bias = w[f"{p}.mlp.gate.expert_bias"].tolist()
            biased = [[scores[t][e] + bias[e] for e in range(E)] for t in range(L)]
            coresets = None
            if router == "block":
                coresets = _block_coresets(biased, config, block_router["size"], block_router["top_p"],
                                           block_router["min_experts"])
            chosen_seq = []
            for t in range(L):
                allowed_experts = None
                if coresets is not None:
                    allowed_experts = [e in coresets[t // block_router["size"]] for e in range(E)]
                chosen = _group_limited_top_k(biased[t], config, allowed_experts)
                gates = [scores[t][e] for e in chosen]
                if config.get("norm_topk_prob", True) and len(chosen) > 1:
                    gates = [g / sum(gates) for g in gates]
                for e, gate in zip(chosen, gates):
                    expert = _swiglu(x[b, t], w, f"{p}.mlp.experts.{e}")
                    out[b, t] = out[b, t] + gate * config["routed_scaling_factor"] * expert
                chosen_seq.append(sorted(chosen))
            chosen_layer.append(chosen_seq)
        routing.append(chosen_layer)
        h = h + out
    h = _rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.word_embeddings.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T, routing


# ----------------------------------------------------------------------------------------
# reference sampler (DESIGN 5), batch size 1, uncached: block-causal attention makes
# re-running the finished prefix exact, so this equals the cached LLaDA2 sampler.


def reference_generate(weights, config, prompt, gen_length, block_length, steps, threshold, mask_id, eos_id):
    """Greedy block-parallel denoising; returns the [1, total] token tensor (undecoded tail stays mask).

    One deliberate difference from LLaDA2's sampler: the mask token is never predicted (its
    logit is -inf), as in diffusion-moe's `generate`.
    """
    P = prompt.shape[1]
    num_blocks = -(-(P + gen_length) // block_length)
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[:, :P] = prompt
    quota = [block_length // steps + (1 if j < block_length % steps else 0) for j in range(steps)]
    for block in range(P // block_length, num_blocks):
        start, end = block * block_length, (block + 1) * block_length
        for step in range(steps):
            masked = [t for t in range(start, end) if x[0, t] == mask_id]
            if not masked:
                break
            logits, _ = reference_forward(weights, config, x[:, :end], block_causal_allowed(end, block_length))
            logits[..., mask_id] = -math.inf
            probs = torch.softmax(logits[0], dim=-1)
            prediction = {t: int(probs[t].argmax()) for t in masked}
            confidence = {t: float(probs[t, prediction[t]]) for t in masked}
            confident = [t for t in masked if confidence[t] > threshold]
            if len(confident) >= quota[step]:
                commit = confident
            else:
                commit = sorted(masked, key=lambda t: confidence[t], reverse=True)[: quota[step]]
            for t in commit:
                x[0, t] = prediction[t]
        if (x[0, P:end] == eos_id).any():
            break
    return x
