"""An independent reference for LLaDA2.2's Levenshtein (insert/delete) editing decoding, for tests only.

`reference_generate_llada22(logits_fn, input_ids, ...)` decodes ONE sequence (batch 1,
temperature 0) the way the LLaDA2.2 checkpoint's `generate()` / `_joint_decode_block` is
documented to, uncached: `logits_fn(x)` returns the logits [1, len(x), V] of a block-causal
forward over the whole window x (the reference recomputes the prefix every step; block
causality makes that equal to a prefix cache). Nothing here imports diffusion_moe.

Sources, and how far each was visible
------------------------------------
THE CHECKPOINT'S OWN CODE WAS NOT VISIBLE TO ME. `LLaDA2MoeModelLM._joint_decode_block` and
its helpers `_apply_edit_operations_with_tracking`, `_resample_to_escape_loop`,
`_get_num_transfer_tokens`, `_diffusion_sample`, `_top_k_logits`, `_top_p_logits`, and
`generate()` (hub file `modeling_llada2_moe.py` of inclusionAI/LLaDA2.2-flash; FluxServe's
guide gives lines 1389, 1249 and 1649 for the first, second and last) are in no index
searched here; neither are sglang's earlier LLaDA2.2 model PRs' decoding parts. What is
visible, and what each part below follows:

1. The per-iteration body (`_iteration`, op order included) is a scalar transcription of
   `levenshtein_graph_step` in FLX-OSS/FluxServe
   `python/fluxserve/backend/execution/decoders/llada/levenshtein.py`, commit
   0485806b1b0ba6bed3c5e1459b3848f95a089304 (the newest version indexed; the same function
   at `python/fluxserve/backend/execution/decoders/levenshtein.py`, commits
   99b73a0a41661b567eb8b55e9b76754afdd81fce and 5dcf8a8a2961eaea5e089f6b0dd12f188abd173f,
   differs only in the history store (exact token tuples vs. a hash pair) and, in 5dcf8a8,
   in taking candidates from `topk(3)` instead of argmax). That function is a fixed-shape,
   vectorised PORT whose docstring says it "mirrors the reference `_joint_decode_block`
   body". FluxServe's test `test/runtime/test_llada22_levenshtein_decoder.py` (commits
   5dcf8a8 and 0485806) runs the hub method itself, bound to a stub with a scripted forward,
   against that port on seven scenarios (plain fill, schedule-only fill, T2T, DELETE,
   SPLIT, budget termination with rotating edits, max_post_steps=0) and requires identical
   final tokens and "ref_fwd <= flux_iters <= ref_fwd + 1"; scripts are built so the
   anti-loop never fires or has one candidate. The port's DOCUMENTED deviations from the
   reference are undone here, as that documentation describes the reference:
     - the port sets the mask logit to -inf before every argmax; "the reference does not
       enforce no-remask on writes". Here `never_mask` (default True, the rule
       tests/llada2_reference.py and DESIGN.md section 5 use) picks the best non-mask token
       with its probability under the softmax over the FULL vocabulary (the port's softmax
       comes after the -inf, i.e. renormalised without the mask); `never_mask=False`
       argmaxes the raw logits as the reference is described to;
     - the port picks the lowest-confidence changed position for the anti-loop; "the
       reference uses `torch.randint`" (guide section 5.2). Here torch.randint with the
       caller's `generator` (the reference, as described, passes none: global RNG);
     - the port force-resolves at `max_steps_per_block - 1`; "the reference warns and can
       return residual masks". Here: warning, masks left;
     - the port keeps literal DELETE/SPLIT tokens in the prompt; "the upstream reference
       warns and still consumes these tokens". Here: one warning at block entry, then the
       scan runs over the whole block (prompt included), as `_apply_edit_operations_with_
       tracking` is described to (the port's `prompt_length` argument is its extension).
2. `apply_edit_operations` is FluxServe's scalar `apply_edit_operations` (same file and
   commit), docstring: "Direct port of the reference `_apply_edit_operations_with_tracking`",
   with `prompt_length=0`. sgl-project/sglang PR #31773
   `python/sglang/srt/dllm/algorithm/joint_threshold_indel.py` (commit
   0fbe7e46218ce8b728c72095f1332c3b98e6de19), `_apply_edit_operations`, does the same scan
   (SPLIT -> [mask, old_block_tokens[i]], the mask non-original, the old token keeping the
   position's flag; truncate / pad with non-original masks).
3. The loop around the body (block entry, post_steps, where the budget and stable exits sit,
   the step cap) follows FLX-OSS/FluxServe
   `docs/serving/llada2.2-model-support-development-guide.md` (commit
   ccb53e57438ea31255ccfac34d39a98388304bea) sections 3.4, 5, 7.1, 9.1, 11, the port's
   `_begin_block_rows` (prompt = non-mask at entry, "original" flags = mask at entry; a
   block with no mask at entry: "reference returns immediately"), and its runner contract
   (`run_flux_loop`: a block is done when the pre-step block had no mask and the step
   changed nothing, "exactly the reference's stability test").
4. `reference_generate_llada22`'s outer loop and its EOS rule, and `llada22_answer`, are
   LLaDA2.1's `generate()` (its transcription `reference_generate_llada21` in
   tests/llada2_reference.py: `eos_early_stop` branch; final cut after the first EOS). The
   guide (3.4) says the 2.2/2.1 modeling diff is confined to the gate and to `generate()`
   "now delegat[ing] to `_joint_decode_block`"; the 2.2 `generate()` body itself was not
   seen, so its EOS handling is an ASSUMPTION carried over from 2.1. LLaDA2.2's
   generation_config lists two EOS ids (156892, 156900): `eos_id` may be an int or a tuple.
   2.0's `generate()` clamped `steps = min(steps, gen_length // minimal_topk)`; whether 2.2
   does is not visible; not applied.
5. No source tracks per-block edit counts; `count_edit_ops` is this file's own bookkeeping,
   computed from each step's writes and never fed back into decoding.

Points that are inferred, ambiguous or chosen (each marked "ASSUMED" where it is used):
  a. The budget exit (`no mask and post_steps > max_post_steps`) is checked at the top of an
     iteration, after post_steps is updated and BEFORE the forward: the guide says the port
     "performs exactly one extra stability forward relative to the reference" on
     budget-terminated blocks, which only holds if the reference does not run the model on
     its breaking pass.
  b. The final round is the port's predicate: post_steps (already updated this iteration)
     >= max_post_steps; for max_post_steps == 0, the iteration whose M2T set covers every
     remaining original mask. The guide's table (9.1) words the trigger as
     "post_steps > max_post_steps"; the code's `>=` on the pre-incremented counter is the
     same iteration as the reference's exit minus one. Not confirmed in hub code.
  c. The anti-loop re-picks a random changed position on each of its at most 5 tries
     (changed = differs from the pre-step block, recomputed after each resample, as the
     port does); each try suppresses only the token currently there (fresh copy of that
     position's logits, argmax); it stops once the state is new or nothing is changed; it
     is skipped on the final round (as in the port); the state recorded in the seen set is
     the pre-edit block after the escape, every iteration (the port's `block_result`, "the
     device-side form of the reference's `seen_block_results.add(...)`"). The exact
     torch.randint call (its shape, whether once per try) was not visible.
  d. M2T top-k uses torch.topk over the block's confidences (-inf off the masks): the port
     says "The reference topk fallback does not specify an order for tied positions", so
     exact confidence ties at the cut are unspecified; argmax ties go to the lowest token
     id (torch.argmax), "matching the reference" per the port's comment.
  e. Logits are cast with `.float()` before argmax/softmax, as LLaDA2.1's generate() does;
     2.2's dtype handling was not seen (the port takes the softmax in fp32).
  f. The step counter used for the schedule (and for "after `steps` steps fill every mask")
     counts every refinement iteration of the block, T2T-only ones included (the port's
     `step_id`). `max_steps_per_block` bounds the loop passes; the warning text is this
     file's.
  g. mask positions = `block == mask_id` on the pre-step block (the port also excludes
     prompt positions; identical unless a consumed prompt literal shifts the block).

Where DESIGN.md section 8 is silent or looser than the source as visible: it does not say
that the budget exit precedes the forward (a), that the final round is the iteration
before that exit and has its own max_post_steps == 0 rule (b), that the anti-loop is skipped
on the final round and re-picks its position per try (c), or that literal DELETE/SPLIT in a
prompt are consumed (with a warning) although prompt positions are otherwise never edited.
Its other bullets agree with the port. sglang PR #31773 (`JointThresholdInDel`) is NOT
followed for the loop: by its own docstring its post-edit budget "intentionally differs from
the released reference decoder" (cumulative, never reset); it also has no per-step schedule
(it asks for 1 + introduced masks), a deterministic lowest-confidence anti-loop with a
per-position history, and finishes on the cleanup update.
"""

import math
import warnings

import torch


def _eos_set(eos_id):
    if eos_id is None:
        return ()
    return tuple(eos_id) if isinstance(eos_id, (tuple, list)) else (int(eos_id),)


# ----------------------------------------------------------------------------------------
# `_apply_edit_operations_with_tracking`, as FluxServe's scalar port has it (prompt_length=0)


def apply_edit_operations(block_tokens, old_block_tokens, is_original_mask, mask_id, block_length,
                          delete_token_id, split_token_id):
    """Consume DELETE/SPLIT left to right; returns (tokens, is_original_mask) as lists of block_length.

    DELETE drops the position (and its flag); SPLIT becomes [mask (non-original), the token that
    stood there before this step's write (keeping the position's flag)]; then truncate, or pad
    with non-original masks, back to block_length.
    """
    result_tokens = []
    result_tracking = []
    for i, token in enumerate(block_tokens):
        if token == delete_token_id:
            continue
        if token == split_token_id:
            old_token = old_block_tokens[i] if i < len(old_block_tokens) else mask_id
            snapshot = is_original_mask[i] if i < len(is_original_mask) else False
            result_tokens.extend([mask_id, old_token])
            result_tracking.extend([False, snapshot])
        else:
            snapshot = is_original_mask[i] if i < len(is_original_mask) else False
            result_tokens.append(token)
            result_tracking.append(snapshot)
    if len(result_tokens) > block_length:
        result_tokens = result_tokens[:block_length]
        result_tracking = result_tracking[:block_length]
    elif len(result_tokens) < block_length:
        pad = block_length - len(result_tokens)
        result_tokens.extend([mask_id] * pad)
        result_tracking.extend([False] * pad)
    return result_tokens, result_tracking


def num_transfer_tokens(initial_mask_count, steps, step_id):
    """`_get_num_transfer_tokens` as the port has it (m2t_schedule_need): floor(N/S) + (t < N mod S)."""
    base, remainder = divmod(initial_mask_count, steps)
    return base + (1 if step_id < remainder else 0)


# ----------------------------------------------------------------------------------------
# edit bookkeeping: NOT from any source (no source counts edits); never feeds back


def new_block_stats():
    return {"forwards": 0, "iterations": 0, "end": None, "final_round": False, "fills": 0,
            "substitutions": 0, "remasks": 0, "deletions": 0, "insertions": 0, "pushed_out": 0,
            "anti_loop_resamples": 0}


def count_edit_ops(written, old, mask_id, delete_token_id, split_token_id, block_length, stats):
    """Add one step's operations to `stats`, from the pre-edit block `written` vs. the pre-step `old`.

    fills: a mask became an ordinary token; substitutions: an ordinary token became another
    ordinary token; remasks: a token became the mask (only with never_mask=False);
    deletions / insertions: DELETE / SPLIT tokens consumed by the scan (wherever they stand);
    pushed_out: non-mask tokens cut off by the truncation back to block_length.
    """
    ops = (delete_token_id, split_token_id)
    expanded = []
    for w, o in zip(written, old):
        if w == delete_token_id:
            stats["deletions"] += 1
            continue
        if w == split_token_id:
            stats["insertions"] += 1
            expanded.extend([mask_id, o])
            continue
        expanded.append(w)
        if w != o and o not in ops:  # (a literal prompt op token is never "written" over)
            if o == mask_id:
                stats["fills"] += 1
            elif w == mask_id:
                stats["remasks"] += 1
            else:
                stats["substitutions"] += 1
    stats["pushed_out"] += sum(t != mask_id for t in expanded[block_length:])


# ----------------------------------------------------------------------------------------
# `_joint_decode_block`, batch 1, temperature 0 (see the module docstring for what is seen)


def _greedy(logits, mask_id, never_mask):
    """`_diffusion_sample` at temperature 0: argmax and its probability under the full softmax."""
    candidates = logits.clone()
    if never_mask:  # deliberate difference (docstring, 1.): the best non-mask token
        candidates[..., mask_id] = -math.inf
    x0 = torch.argmax(candidates, dim=-1)
    x0_p = torch.gather(torch.softmax(logits, dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
    return x0, x0_p


def reference_joint_decode_block(logits_fn, x, block_start, block_end, steps, threshold, editing_threshold,
                                 max_post_steps, mask_id, delete_id, split_id, max_steps_per_block=1000,
                                 generator=None, never_mask=True):
    """Decode x[0, block_start:block_end] in place; returns this block's stats dict."""
    block_length = block_end - block_start
    block = x[0, block_start:block_end]  # a view: writes go into x
    stats = new_block_stats()
    # block entry (port `_begin_block_rows`): original masks = masks now; prompt = the rest
    is_original_mask = (block == mask_id).tolist()
    prompt = torch.tensor([not m for m in is_original_mask])
    initial_mask_count = sum(is_original_mask)
    if initial_mask_count == 0:  # "reference returns immediately"
        stats["end"] = "no_mask"
        return stats
    if bool((prompt & ((block == delete_id) | (block == split_id))).any()):
        warnings.warn("LLaDA2.2 reference: the prompt part of this block holds DELETE/SPLIT tokens; "
                      "the edit scan consumes them")  # the reference warns and consumes (text not seen)
    post_steps = 0
    seen = set()
    for step_id in range(max_steps_per_block):
        stats["iterations"] += 1
        old = block.clone()
        # ---- top-of-iteration accounting, from the pre-update block
        mask_index = old == mask_id
        original_index = mask_index & torch.tensor(is_original_mask)
        original_count = int(original_index.sum())
        mask_count = int(mask_index.sum())
        new_count = mask_count - original_count
        post_steps = post_steps + 1 if original_count == 0 else 0
        if mask_count == 0 and post_steps > max_post_steps:  # budget exit, before the forward (ASSUMED a.)
            stats["end"] = "budget"
            return stats
        logits = logits_fn(x[:, :block_end]).float()[0, block_start:block_end]  # [L, V] (ASSUMED e.)
        stats["forwards"] += 1
        x0, x0_p = _greedy(logits, mask_id, never_mask)
        # ---- M2T with the schedule floor: strict > threshold, else top-k (ASSUMED d., f.)
        m2t = torch.zeros(block_length, dtype=torch.bool)
        if mask_count > 0:
            if step_id >= steps:
                m2t = mask_index.clone()
            else:
                num_need = num_transfer_tokens(initial_mask_count, steps, step_id) + new_count
                confidence = torch.where(mask_index, x0_p, -math.inf)
                high_conf = (confidence > threshold) & mask_index
                if int(high_conf.sum()) >= num_need:
                    m2t = high_conf
                else:
                    _, idx = torch.topk(confidence, k=min(num_need, mask_count))
                    m2t[idx] = True
        # ---- T2T: non-prompt non-mask positions, strict > editing_threshold, candidate differs
        editable = (~mask_index) & (~prompt)
        t2t = (torch.where(editable, x0_p, -math.inf) > editing_threshold) & editable & (x0 != old)
        # ---- final round (ASSUMED b.)
        if max_post_steps > 0:
            final_round = post_steps >= max_post_steps
        else:
            final_round = original_count > 0 and not bool((original_index & ~m2t).any())
        if final_round:
            stats["final_round"] = True
            m2t = mask_index.clone()
            banned = (m2t | t2t) & ((x0 == delete_id) | (x0 == split_id))
            if bool(banned.any()):
                alternative = logits[banned].clone()
                alternative[:, delete_id] = -math.inf
                alternative[:, split_id] = -math.inf
                if never_mask:
                    alternative[:, mask_id] = -math.inf
                x0[banned] = torch.argmax(alternative, dim=-1)
        # ---- writes
        write = m2t | t2t
        written = old.clone()
        written[write] = x0[write]
        # ---- anti-loop (ASSUMED c.): the reference draws with torch.randint from the global
        # RNG; here the caller's generator, so runs are reproducible
        if not final_round and tuple(written.tolist()) in seen:
            for _ in range(5):
                changed = (written != old).nonzero(as_tuple=True)[0]
                if len(changed) == 0:
                    break
                pos = int(changed[torch.randint(len(changed), (1,), generator=generator)])
                row = logits[pos].clone()
                row[written[pos]] = -math.inf
                if never_mask:
                    row[mask_id] = -math.inf
                written[pos] = torch.argmax(row)
                stats["anti_loop_resamples"] += 1
                if tuple(written.tolist()) not in seen:
                    break
        seen.add(tuple(written.tolist()))
        count_edit_ops(written.tolist(), old.tolist(), mask_id, delete_id, split_id, block_length, stats)
        # ---- edit-op consumption, left to right
        tokens, is_original_mask = apply_edit_operations(written.tolist(), old.tolist(), is_original_mask,
                                                         mask_id, block_length, delete_id, split_id)
        block[:] = torch.tensor(tokens, dtype=block.dtype)
        # ---- stable exit: the pre-step block had no mask and nothing changed
        if mask_count == 0 and torch.equal(block, old):
            stats["end"] = "stable"
            return stats
    warnings.warn(f"LLaDA2.2 reference: max_steps_per_block={max_steps_per_block} reached; "
                  f"{int((block == mask_id).sum())} masks left")
    stats["end"] = "max_steps"
    return stats


# ----------------------------------------------------------------------------------------
# generate(): LLaDA2.1's outer loop and EOS rule (ASSUMED for 2.2, docstring 4.)


def reference_generate_llada22(logits_fn, input_ids, gen_length, block_length, steps, threshold, editing_threshold,
                               max_post_steps, mask_id, delete_id, split_id, eos_id=None, max_steps_per_block=1000,
                               generator=None, never_mask=True):
    """Returns (x [1, num_blocks * block_length], per-block stats list).

    x keeps the prompt, every decoded block, and masks after an EOS stop (or left by the step
    cap). eos_id: None (no early stop), an id, or a tuple of ids; stop after a block once the
    generated part holds no mask and some EOS (LLaDA2.1's `eos_early_stop`).
    """
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    x = torch.full((1, num_blocks * block_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids.clone()
    eos_ids = _eos_set(eos_id)
    all_stats = []
    for num_block in range(prompt_length // block_length, num_blocks):
        block_start, block_end = num_block * block_length, (num_block + 1) * block_length
        all_stats.append(reference_joint_decode_block(
            logits_fn, x, block_start, block_end, steps, threshold, editing_threshold, max_post_steps, mask_id,
            delete_id, split_id, max_steps_per_block, generator, never_mask))
        if eos_ids:
            generated_part = x[0, prompt_length:block_end]
            if (generated_part == mask_id).sum() == 0:
                if torch.isin(generated_part, torch.tensor(eos_ids)).any():
                    break
    return x, all_stats


def llada22_answer(x, prompt_length, gen_length, eos_id):
    """LLaDA2.1 generate()'s return value: the generated part up to and including the first EOS."""
    generated = x[:, prompt_length: prompt_length + gen_length]
    eos_ids = _eos_set(eos_id)
    positions = torch.isin(generated[0], torch.tensor(eos_ids)).nonzero(as_tuple=True)[0] if eos_ids else []
    first = positions[0].item() if len(positions) > 0 else gen_length
    return generated[:, : first + 1]
