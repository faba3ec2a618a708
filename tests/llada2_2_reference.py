"""An independent reference for LLaDA2.2's block expert pool router, for tests only.

Both functions route ONE sequence: fp32 router logits [T, E] -> (topk_ids [T, k] long,
topk_weights [T, k] fp32, routed_scaling_factor already applied). Nothing here imports
diffusion_moe, so agreement with the library is evidence, not a tautology.

Sources, and how far each was visible
------------------------------------
`block_topk_reference` transcribes, op by op, the PyTorch oracle `block_topk_reference` of
sgl-project/sglang PR #31768 ("[Model] Add LLaDA2.2 Block Routing MoE support"), file
`test/registered/kernels/test_block_topk_triton.py`, in the version stored at commit
32ee0f548da6f051bf4186631d3f4b7d4bcb9687 (the latest one the search index holds; it is the
revision made after the 2026-08-11 review, which replaced a uniform-weight fallback with
`sum + 1e-20`). That oracle:
  - returns empty [0, k] tensors for T == 0;
  - pads a partial tail block with rows of -inf (corrected scores), reshapes into
    [num_blocks, block_size, E] and takes `amax(dim=1)`, so missing lanes never win a max;
  - picks the pool with `argsort(descending=True, stable=True)[:, :expert_capacity]` and each
    token's experts with the same stable argsort on the corrected scores, pool-outside
    experts `masked_fill`-ed with -inf: exact ties go to the LOWER expert id, and the ids
    come out in descending-score order;
  - weights: unbiased sigmoid scores gathered at the chosen ids, divided by
    `(sum + 1e-20)` when k > 1 (k == 1: the raw score), in fp32;
  - returns `(weights, ids.int32)` WITHOUT routed_scaling_factor. In the PR's model code the
    CUDA path leaves the scaling to the MoE runner and the NPU path multiplies the weights
    by it (`test/registered/unit/models/test_llada2_block_routing.py`, tests
    `test_cuda_leaves_scaling_to_moe_runner` / `test_npu_folds_routed_scaling_factor_...`).
    Here the factor is applied last, as the hub gate does (below).
  The PR's model file `python/sglang/srt/models/llada2.py` (Triton kernels
  `_block_aggregation_kernel` / `_token_topk_kernel`) is NOT in the index; only review
  excerpts of it were seen. Earlier revisions of the oracle, not followed here: the first
  one subtracted `expert_id * 3e-7` from the scores as a tie-break, masked with -10000.0
  and rescaled weights by the row max with a uniform `1/k` fallback; the reviewer
  (rwang5203, 2026-07-28) measured that the 3e-7 shift changes the selected set for 0.37 to
  9.83 % of tokens against exact `torch.topk`. A middle revision (commit
  27652b54e290431abaaa6edced1a70e76e7762d5) already used the stable argsort but kept a
  `clamp_min(1e-30)` / uniform fallback. An older CUDA oracle stored at
  `test/registered/unit/models/test_llada2_block_routing.py` (commit
  6a39d5ee8ba9303f998c850129a1311c280619d7, apparently from the closed PR #31743) used
  `torch.topk`, re-ordered the ids by ascending expert id, masked with -10000.0, and
  normalised without epsilon under a `renormalize` flag.

`hub_block_routing_reference` is the checkpoint's own gate, `LLaDA2MoeGate.block_routing`
in the hub file `modeling_llada2_moe.py` of inclusionAI/LLaDA2.2-flash (the sglang reviewer
links revision ee56264534721014d8e651293543f6dc3fcb1f9c, lines 244-275 for selection and
290-298 for the weights). THAT FILE WAS NOT VISIBLE TO ME: it is in no index searched here.
The function is built from second-hand descriptions only:
  - FLX-OSS/FluxServe `docs/serving/llada2.2-model-support-development-guide.md` (commit
    ccb53e57438ea31255ccfac34d39a98388304bea), section 4, which quotes the gate as:
    `assert num_tokens % block_size == 0`; `scores.view(num_blocks, block_size, E)
    .max(dim=1).values`; `topk(block_scores, k=expert_capacity)`;
    `scores.masked_fill(~allowed_per_token, -inf)`; `topk(masked, k=top_k)`; then the
    bias-free sigmoid scores gathered, normalised and scaled "same as before";
  - the sglang PR #31768 review: the released gate uses the unmodified scores with
    `torch.topk` and divides by `sum + 1e-20`;
  - FLX-OSS/FluxServe `test/runtime/test_llada22_block_routing.py` (commit
    5dcf8a8a2961eaea5e089f6b0dd12f188abd173f): `gate(hidden)` returns
    `(topk_idx, topk_weight, router_logits)`, topk_weight already multiplied by
    routed_scaling_factor, ids compared with `torch.equal` (so order matters); FluxServe's
    own helper raises ValueError on a token count not divisible by block_size;
  - the "before" weight step, i.e. LLaDA2.0's hub `LLaDA2MoeGate.forward` as transcribed in
    tests/llada2_reference.py (`llada2_gate`): `sigmoid(logits.float())`, gather,
    `/ (sum + 1e-20)` if k > 1, then `* routed_scaling_factor`.
  So its differences from the sglang oracle are: `torch.topk` instead of the stable argsort
  (the ids tied exactly are unspecified there; with no exact ties both agree in set and
  order), and no partial tail block (it asserts alignment). Whether the hub gate reads
  `norm_topk_prob`, and its exact dtypes (`type_as(logits)` in 2.0), were not visible;
  with fp32 logits (router_dtype fp32) the dtype question is moot.

DESIGN.md section 7 adopts the sglang oracle's -inf rule for a partial tail block.
`norm_topk_prob=False` (skip the division) is an extension; no source shows that branch.
"""

import torch


def _check(router_logits, expert_bias, block_size, expert_capacity, top_k):
    if router_logits.dim() != 2 or expert_bias.shape != (router_logits.shape[1],):
        raise ValueError("router_logits must be [T, E] and expert_bias [E]")
    if not (block_size >= 1 and 1 <= top_k <= router_logits.shape[1]
            and 1 <= expert_capacity <= router_logits.shape[1]):
        raise ValueError("need block_size >= 1 and 1 <= top_k, expert_capacity <= E")


def _weights(base_scores, topk_ids, top_k, routed_scaling_factor, norm_topk_prob):
    # both sources: unbiased sigmoid scores at the chosen ids; / (sum + 1e-20) when k > 1
    selected = base_scores.gather(1, topk_ids)
    if top_k > 1 and norm_topk_prob:
        selected = selected / (selected.sum(dim=-1, keepdim=True) + 1e-20)
    # hub gate: `* routed_scaling_factor` inside the gate (sglang: downstream / NPU fold)
    return (selected * routed_scaling_factor).float()


def block_topk_reference(router_logits, expert_bias, block_size, expert_capacity, top_k,
                         routed_scaling_factor, norm_topk_prob=True):
    """sglang PR #31768 oracle (stable argsort; -inf tail lanes). -> (ids [T, k] long, weights [T, k] fp32)."""
    _check(router_logits, expert_bias, block_size, expert_capacity, top_k)
    num_tokens, num_experts = router_logits.shape
    device = router_logits.device
    # oracle: empty input -> empty outputs
    if num_tokens == 0:
        return (torch.empty((0, top_k), dtype=torch.long, device=device),
                torch.empty((0, top_k), dtype=torch.float32, device=device))
    # oracle: base = sigmoid(fp32 logits); corrected = base + bias (bias for selection only)
    base_scores = torch.sigmoid(router_logits.float())
    corrected = base_scores + expert_bias.float().unsqueeze(0)
    # oracle: pad the partial tail block with -inf rows, view [blocks, block_size, E], amax
    num_blocks = (num_tokens + block_size - 1) // block_size
    pad = num_blocks * block_size - num_tokens
    padded = corrected
    if pad:
        padded = torch.nn.functional.pad(corrected, (0, 0, 0, pad), value=float("-inf"))
    block_scores = padded.view(num_blocks, block_size, num_experts).amax(dim=1)
    # oracle: pool = stable descending argsort[:capacity] (exact ties: lower expert id first)
    pool_ids = torch.argsort(block_scores, dim=-1, descending=True, stable=True)[:, :expert_capacity]
    pool = torch.zeros((num_blocks, num_experts), dtype=torch.bool, device=device)
    pool.scatter_(1, pool_ids, True)
    token_pool = pool.repeat_interleave(block_size, dim=0)[:num_tokens]
    # oracle: experts outside the pool -> -inf; per-token stable descending argsort[:k]
    token_scores = corrected.masked_fill(~token_pool, float("-inf"))
    topk_ids = torch.argsort(token_scores, dim=-1, descending=True, stable=True)[:, :top_k]
    return topk_ids.long(), _weights(base_scores, topk_ids, top_k, routed_scaling_factor, norm_topk_prob)


def hub_block_routing_reference(router_logits, expert_bias, block_size, expert_capacity, top_k,
                                routed_scaling_factor, norm_topk_prob=True):
    """LLaDA2MoeGate.block_routing as described second-hand (torch.topk; aligned T only)."""
    _check(router_logits, expert_bias, block_size, expert_capacity, top_k)
    num_tokens, num_experts = router_logits.shape
    # hub (per FluxServe's guide): assert num_tokens % block_size == 0
    if num_tokens % block_size != 0:
        raise ValueError(f"{num_tokens} tokens are not a multiple of block_size {block_size}")
    # hub 2.0/2.2: scores = sigmoid(fp32 logits); scores_for_routing = scores + expert_bias
    scores = torch.sigmoid(router_logits.float())
    scores_for_routing = scores + expert_bias.float()
    # hub: block max over the view [num_blocks, block_size, E]
    num_blocks = num_tokens // block_size
    block_scores = scores_for_routing.view(num_blocks, block_size, num_experts).max(dim=1).values
    # hub: pool = torch.topk(block_scores, k=expert_capacity) (tie choice unspecified)
    pool_ids = torch.topk(block_scores, k=expert_capacity, dim=-1).indices
    pool = torch.zeros((num_blocks, num_experts), dtype=torch.bool, device=router_logits.device)
    pool.scatter_(1, pool_ids, True)
    token_pool = pool.unsqueeze(1).expand(num_blocks, block_size, num_experts)
    token_pool = token_pool.reshape(num_tokens, num_experts)
    # hub: masked_fill(~allowed, -inf); torch.topk(k=top_k) on the biased scores
    masked = scores_for_routing.masked_fill(~token_pool, float("-inf"))
    topk_ids = torch.topk(masked, k=top_k, dim=-1).indices
    return topk_ids.long(), _weights(scores, topk_ids, top_k, routed_scaling_factor, norm_topk_prob)
