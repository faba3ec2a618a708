"""An independent LLaDA2-MoE reference, for tests only.

The model itself is written plainly on a LLaDA2-layout state dict in float64 (one token
at a time through the experts, attention masks built element by element); the routers are
line-by-line transcriptions of the published gate code (LLaDA2's and dMoE's
`LLaDA2MoeGate`), so that ties and `-inf` resolve exactly as there. Nothing here imports
diffusion_moe, so agreement with the library is evidence, not a tautology. Also writes
tiny random LLaDA2 checkpoints.
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


# ----------------------------------------------------------------------------------------
# the published gates, transcribed op by op (ties and -inf included)
#
# `llada2_gate`: LLaDA2MoeGate.forward + group_limited_topk of LLaDA2's hub modeling code
# (modeling_llada2_moe.py). `dmoe_gate`: LLaDA2MoeGate.forward + block_experts_select of
# dMoE's modeling_llada2_moe_be_adaptive.py. Both take router logits [bsz, seq_len, E]
# (the fp32 `F.linear` of the hidden states) instead of hidden states; the only other
# change is that dMoE's hard-coded `guard_size = 16` and `block_size = 32` are arguments.


def _published_group_limited_topk(scores, top_k, n_group, topk_group, num_experts):
    num_tokens, _ = scores.size()
    group_scores = scores.view(num_tokens, n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1).expand(num_tokens, n_group, num_experts // n_group).reshape(num_tokens, -1)
    )
    masked_scores = scores.masked_fill(~score_mask.bool(), float("-inf"))
    probs, top_indices = torch.topk(masked_scores, k=top_k, dim=-1)
    return probs, top_indices


def llada2_gate(logits, expert_bias, config: dict):
    """LLaDA2's gate: (topk_idx [N, k], topk_weight [N, k]) for logits [bsz, seq_len, E]."""
    top_k, E = config["num_experts_per_tok"], config["num_experts"]
    logits = logits.reshape(-1, E)
    scores = torch.sigmoid(logits.float()).type_as(logits)
    scores_for_routing = scores + expert_bias
    _, topk_idx = _published_group_limited_topk(
        scores_for_routing, top_k, config["n_group"], config["topk_group"], E
    )
    scores = torch.gather(scores, dim=1, index=topk_idx).type_as(logits)
    topk_weight = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if top_k > 1 else scores
    topk_weight = topk_weight * config["routed_scaling_factor"]
    return topk_idx, topk_weight


def _published_block_experts_select(block_scores, top_k, core_threshold, guard_size):
    bsz, block_len, _ = block_scores.shape
    local_scores, local_idx = torch.topk(block_scores, k=top_k, dim=-1)
    masked_scores = torch.zeros_like(block_scores)
    masked_scores.scatter_(-1, local_idx, local_scores)
    votes = masked_scores.sum(dim=1)
    votes = votes / (votes.sum(dim=-1, keepdim=True) + 1e-20)
    sorted_votes, sorted_idx = torch.sort(votes, dim=-1, descending=True)
    cum_probs = torch.cumsum(sorted_votes, dim=-1)
    top_p = core_threshold
    sorted_keep = cum_probs <= top_p
    sorted_keep[..., 0] = True
    exceed = cum_probs > top_p
    exceed_prev = torch.cat([torch.zeros_like(exceed[..., :1]), exceed[..., :-1]], dim=-1)
    first_exceed = exceed & (~exceed_prev)
    sorted_keep = sorted_keep | first_exceed
    coreset_mask = torch.zeros_like(votes, dtype=torch.bool)
    coreset_mask.scatter_(1, sorted_idx, sorted_keep)
    num_selected = coreset_mask.sum(dim=-1)
    need_fix = num_selected < guard_size
    if need_fix.any():
        fallback_idx = torch.topk(votes, k=guard_size, dim=-1).indices
        fallback_mask = torch.zeros_like(coreset_mask, dtype=torch.bool)
        fallback_mask.scatter_(1, fallback_idx, True)
        coreset_mask = torch.where(need_fix.unsqueeze(-1), fallback_mask, coreset_mask)
    return coreset_mask


def dmoe_gate(logits, expert_bias, config: dict, core_threshold, guard_size=16, block_size=32):
    """dMoE's block gate: (topk_idx [N, k], topk_weight [N, k]) for logits [bsz, seq_len, E]."""
    top_k, num_experts = config["num_experts_per_tok"], config["num_experts"]
    bsz, seq_len, _ = logits.shape
    logits = logits.reshape(-1, num_experts)
    scores = torch.sigmoid(logits.float()).type_as(logits)
    scores = scores.view(bsz, seq_len, num_experts)
    scores_for_routing = scores + expert_bias.view(1, 1, -1)
    block_size = min(block_size, seq_len)
    pad_len = (block_size - seq_len % block_size) % block_size
    if pad_len > 0:
        scores_padded = torch.cat(
            [scores, torch.zeros(bsz, pad_len, num_experts, dtype=scores.dtype, device=scores.device)], dim=1
        )
        routing_padded = torch.cat(
            [scores_for_routing, torch.full((bsz, pad_len, num_experts), float("-inf"),
                                            dtype=scores_for_routing.dtype, device=scores_for_routing.device)],
            dim=1,
        )
    else:
        scores_padded = scores
        routing_padded = scores_for_routing
    padded_len = scores_padded.shape[1]
    n_blocks = padded_len // block_size
    routing_blocks = routing_padded.view(bsz, n_blocks, block_size, num_experts)
    coreset_mask = _published_block_experts_select(
        routing_blocks.reshape(bsz * n_blocks, block_size, num_experts), top_k, core_threshold, guard_size
    ).view(bsz, n_blocks, num_experts)
    token_coreset_mask = coreset_mask.unsqueeze(2).expand(-1, -1, block_size, -1).reshape(
        bsz, padded_len, num_experts
    )
    constrained_scores = routing_padded.masked_fill(~token_coreset_mask, float("-inf"))
    _, topk_idx = _published_group_limited_topk(
        constrained_scores.reshape(-1, num_experts), top_k, config["n_group"], config["topk_group"], num_experts
    )
    topk_idx = topk_idx.view(bsz, padded_len, top_k)
    if pad_len > 0:
        topk_idx = topk_idx[:, :seq_len, :]
    selected_scores = torch.gather(scores, dim=-1, index=topk_idx).reshape(-1, top_k).type_as(logits)
    topk_weight = (
        selected_scores / (selected_scores.sum(dim=-1, keepdim=True) + 1e-20) if top_k > 1 else selected_scores
    )
    topk_weight = topk_weight * config["routed_scaling_factor"]
    return topk_idx.view(-1, top_k), topk_weight


def reference_forward(weights, config, input_ids, allowed, router="token_choice", block_router=None):
    """Logits [B, L, V] (float64) and, per MoE layer, the chosen experts [B][L] -> sorted list.

    `allowed` is the [L][L] attention pattern shared by the batch (no padding).
    `block_router`: dict(size, top_p, min_experts) for router="block" (dMoE); router="block_pool"
    is LLaDA2.2's (config["block_size"], config["expert_capacity"]).
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
            logits = (x[b] @ w[f"{p}.mlp.gate.weight"].T).unsqueeze(0)  # [1, L, E]
            bias = w[f"{p}.mlp.gate.expert_bias"]
            if router == "block":
                index, weight = dmoe_gate(logits, bias, config, block_router["top_p"], block_router["min_experts"],
                                          block_router["size"])
            elif router == "block_pool":  # LLaDA2.2's gate (tests/llada2_2_reference.py)
                from llada2_2_reference import hub_block_routing_reference

                index, weight = hub_block_routing_reference(
                    logits[0], bias, config["block_size"], config["expert_capacity"],
                    config["num_experts_per_tok"], config["routed_scaling_factor"])
                weight = weight.double()
            else:
                index, weight = llada2_gate(logits, bias, config)
            chosen_seq = []
            for t in range(L):
                for e, gate in zip(index[t].tolist(), weight[t]):
                    out[b, t] = out[b, t] + gate * _swiglu(x[b, t], w, f"{p}.mlp.experts.{e}")
                chosen_seq.append(sorted(index[t].tolist()))
            chosen_layer.append(chosen_seq)
        routing.append(chosen_layer)
        h = h + out
    h = _rms_norm(h, w["model.norm.weight"], eps)
    head = w["model.word_embeddings.weight"] if config.get("tie_word_embeddings") else w["lm_head.weight"]
    return h @ head.T, routing


def _without(logits, mask_id):
    """logits with the mask token's at -inf: its argmax is the best non-mask token."""
    logits = logits.clone()
    logits[..., mask_id] = -math.inf
    return logits


# ----------------------------------------------------------------------------------------
# reference sampler, batch size 1, uncached: block-causal attention makes
# re-running the finished prefix exact, so this equals the cached LLaDA2 sampler.


def reference_generate(weights, config, prompt, gen_length, block_length, steps, threshold, mask_id, eos_id):
    """Greedy block-parallel denoising; returns the [1, total] token tensor (undecoded tail stays mask).

    Confidence is the predicted token's probability under the softmax over the full
    vocabulary, as in LLaDA2's sampler. One deliberate difference from it, as in
    diffusion-moe's `generate`: the mask token is never committed, so where the argmax is
    the mask token the best non-mask token is taken, with its full-softmax probability.
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
            probs = torch.softmax(logits[0], dim=-1)  # the full vocabulary, the mask token included
            candidates = logits[0].clone()
            candidates[:, mask_id] = -math.inf  # deliberate difference: never the mask token
            prediction = {t: int(candidates[t].argmax()) for t in masked}
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


# ----------------------------------------------------------------------------------------
# LLaDA2.1's sampler with token editing, transcribed from `LLaDA2MoeModelLM.generate` of its
# hub modeling code, op by op, for temperature 0 and batch 1. Two deliberate differences:
# the block-causal mask is strict (LLaDA2.1's generate passes a 0/1 tensor as an *additive*
# mask, so nothing is masked; LLaDA2.0's used 0/-inf, and only the strict mask makes a
# prefix KV cache exact), and the mask token is never committed: where the argmax is the
# mask token, the best non-mask token is taken, with its probability under the (published)
# softmax over the full vocabulary as x0_p. The published code would commit the mask token
# there: a no-op for a masked position, a re-masking T2T edit for a decided one.
# `logits_fn(x)` returns the logits [1, len(x), V] of a block-causal forward over x.


def reference_generate_llada21(logits_fn, inputs, gen_length, block_length, threshold, editing_threshold,
                               max_post_steps, mask_id, eos_id, num_to_transfer=1, eos_early_stop=False):
    input_ids = inputs
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids.clone()
    prefill_blocks = prompt_length // block_length
    for num_block in range(prefill_blocks, num_blocks):
        current_window_end = (num_block + 1) * block_length
        cur_x = x[:, :current_window_end]
        block_start_pos = num_block * block_length
        post_steps = 0
        while True:
            old_block_tokens = cur_x[:, -block_length:].clone()
            active_block_mask = cur_x[:, -block_length:] == mask_id
            if torch.any(active_block_mask) == False:  # noqa: E712 (as published)
                post_steps += 1
            if post_steps > max_post_steps:
                break
            prompt_mask_in_block = torch.zeros(block_length, dtype=torch.bool)
            if block_start_pos < prompt_length:
                prompt_end_in_block = min(prompt_length - block_start_pos, block_length)
                prompt_mask_in_block[:prompt_end_in_block] = True
            logits = logits_fn(cur_x).float()
            active_logits = logits[:, -block_length:, :]
            # _sample_with_temperature_topk_topp at temperature 0
            flat = active_logits.reshape(-1, active_logits.shape[-1])
            token = torch.argmax(_without(flat, mask_id), dim=-1, keepdim=True)  # deliberate difference (above)
            token_prob = torch.gather(torch.softmax(flat, dim=-1), -1, token)
            x0, x0_p = token.view(1, block_length), token_prob.view(1, block_length)
            mask_transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            if active_block_mask.sum() > 0:
                mask_confidence = torch.where(active_block_mask, x0_p, -torch.inf)
                high_conf_mask = (mask_confidence[0] > threshold) & active_block_mask[0]
                num_high_confidence = high_conf_mask.sum().item()
                if num_high_confidence >= num_to_transfer:
                    mask_transfer_index[0] = high_conf_mask
                else:
                    num_available = active_block_mask.sum().item()
                    if num_available > 0:
                        _, idx = torch.topk(mask_confidence[0], k=min(num_to_transfer, num_available))
                        mask_transfer_index[0, idx] = True
            editing_transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            non_mask_positions = ~active_block_mask
            non_prompt_positions = ~prompt_mask_in_block
            editable_positions = non_mask_positions & non_prompt_positions[None, :]
            editing_confidence = torch.where(editable_positions, x0_p, -torch.inf)
            high_conf_editing = (editing_confidence[0] > editing_threshold) & editable_positions[0]
            token_changed = x0[0] != old_block_tokens[0]
            editing_transfer_index[0] = high_conf_editing & token_changed
            final_transfer_index = mask_transfer_index | editing_transfer_index
            if final_transfer_index.any():
                cur_x[:, -block_length:][final_transfer_index] = x0[final_transfer_index]
            if active_block_mask.sum() == 0 and not editing_transfer_index.any():
                break
        x[:, :current_window_end] = cur_x
        if eos_early_stop:
            generated_part = x[0, prompt_length:current_window_end]
            if (generated_part == mask_id).sum() == 0:
                eos_positions = (generated_part == eos_id).nonzero(as_tuple=True)[0]
                if len(eos_positions) > 0:
                    break
    generated_answer = x[:, : prompt_length + gen_length]
    mask_positions = (generated_answer[0][input_ids.shape[1] :] == eos_id).nonzero(as_tuple=True)[0]
    if len(mask_positions) > 0:
        first_mask_position = mask_positions[0].item()
    else:
        first_mask_position = gen_length
    return generated_answer[:, input_ids.shape[1] : input_ids.shape[1] + first_mask_position + 1]


# ----------------------------------------------------------------------------------------
# LLaDA2.0's / dMoE's sampler, transcribed from `LLaDA2MoeModelLM.generate` of dMoE's
# modeling code (the LLaDA2.0 hub loop plus a prefix KV cache), op by op, for batch 1
# (`eos_early_stop` left out). The cache only saves recomputing the finished prefix, which
# block-causal attention leaves unchanged, so `logits_fn(x)` (the logits [1, len(x), V] of
# a block-causal forward over x) stands in for it. Greedy decoding is the temperature-0
# branch of LLaDA2.1's `_sample_with_temperature_topk_topp` (argmax, and the confidence
# from the softmax over the full vocabulary): dMoE's and LLaDA2.0's samplers have no such
# branch and sample at temperature 1 when asked for 0. As published, a position whose
# argmax is the mask token "commits" it (it stays masked); `best_non_mask=True` applies
# diffusion-moe's rule instead: the best non-mask token, with its full-softmax probability.


def reference_generate_llada20(logits_fn, inputs, gen_length, block_length, steps, threshold, mask_id, eos_id,
                               minimal_topk=1, best_non_mask=False):
    steps = min(steps, gen_length // minimal_topk)
    input_ids = inputs
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids.clone()
    prefill_blocks = prompt_length // block_length
    base, remainder = divmod(block_length, steps)
    num_transfer_tokens_schedule = torch.full((steps,), base, dtype=torch.int64)
    num_transfer_tokens_schedule[:remainder] += 1
    for num_block in range(prefill_blocks, num_blocks):
        prefix_end = num_block * block_length
        current_window_end = (num_block + 1) * block_length
        cur_block_x = x[:, prefix_end:current_window_end]  # a view: writes go into x
        for step in range(steps):
            active_block_mask = cur_block_x == mask_id
            if active_block_mask.sum() == 0:
                break
            logits = logits_fn(x[:, :current_window_end])[:, -block_length:, :]
            # _sample_with_temperature_topk_topp at temperature 0
            flat = logits.reshape(-1, logits.shape[-1])
            token = torch.argmax(_without(flat, mask_id) if best_non_mask else flat, dim=-1, keepdim=True)
            token_prob = torch.gather(torch.softmax(flat.float(), dim=-1), -1, token)
            x0, x0_p = token.view(1, block_length), token_prob.view(1, block_length)
            num_to_transfer = num_transfer_tokens_schedule[step].item()
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            confidence = torch.where(active_block_mask, x0_p, -torch.inf)
            high_conf_mask = confidence[0] > threshold
            num_high_confidence = high_conf_mask.sum().item()
            if num_high_confidence >= num_to_transfer:
                transfer_index[0] = high_conf_mask
            else:
                _, idx = torch.topk(confidence[0], k=min(num_to_transfer, active_block_mask.sum().item()))
                transfer_index[0, idx] = True
            if transfer_index.any():
                cur_block_x[transfer_index] = x0[transfer_index]
        if eos_id is not None and (x[0, prompt_length:current_window_end] == eos_id).any():
            break
    generated_answer = x[:, : prompt_length + gen_length]
    mask_positions = (generated_answer[0][input_ids.shape[1] :] == eos_id).nonzero(as_tuple=True)[0]
    if len(mask_positions) > 0:
        first_mask_position = mask_positions[0].item()
    else:
        first_mask_position = gen_length
    return generated_answer[:, input_ids.shape[1] : input_ids.shape[1] + first_mask_position + 1]
