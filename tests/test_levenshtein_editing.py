"""LLaDA2.2's Levenshtein editing in generate(), token for token against the transcription of
its decoding loop (tests/llada2_2_editing_reference.py).

A random model rarely predicts DELETE or SPLIT, so, as FluxServe's parity harness does, the
logits are scripted: a forward hook replaces the model's logits by a deterministic function
of each position's block (its tokens and the position's slot in it). Scripts are drawn from
seeds and cover every edit path (fills, substitutions, deletes, splits that push a token out,
the final round, the loop guard); the model still runs, so the cache, batching and the
static runner are the real ones.
"""

import functools
import hashlib

import pytest
import torch

from llada2_2_editing_reference import apply_edit_operations, llada22_answer, reference_generate_llada22
from test_generation import EOS, MASK, PAD, ROUTERS, V, left_pad, tiny_model

from diffusion_moe.generation import DiffusionGenerationConfig
from diffusion_moe.generation.levenshtein_editing import LevenshteinEditing
from diffusion_moe.generation.levenshtein_editing import apply_edit_operations as ours_apply

DELETE, SPLIT = 59, 60
BLOCK = 4
LIKELY = [1, 2, 3, 4, 5, DELETE, SPLIT]  # a small vocabulary: states repeat, so loops happen


def script(seed: int, sharpness: float = 2.0, loopy: float = 4.0, split_bias: float = 0.5):
    """logits [V] of a position from its block's tokens and its slot in the block: random
    (from the seed and the block) over a few tokens, plus a pull from token 1 to 2 and back
    (`loopy`), so edits cycle and the loop guard has work."""
    @functools.lru_cache(maxsize=None)
    def logits(block: tuple, slot: int) -> torch.Tensor:
        digest = hashlib.sha256(repr((seed, block, slot)).encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        out = torch.full((V,), -12.0)
        out[LIKELY] = torch.randn(len(LIKELY), generator=g) * sharpness
        out[SPLIT] += split_bias
        out[EOS] = -3.0
        if block[slot] in (1, 2):
            out[3 - block[slot]] += loopy
        return out
    return logits


def scripted_logits(fn, ids: torch.Tensor) -> torch.Tensor:
    """[B, L, V] for token ids [B, L] laid out in whole blocks from index 0."""
    B, L = ids.shape
    out = torch.empty(B, L, V)
    for b in range(B):
        for i in range(L):
            start = i - i % BLOCK
            out[b, i] = fn(tuple(ids[b, start:start + BLOCK].tolist()), i % BLOCK)
    return out


def scripted_model(fn, router="token_choice", edit_ids=True):
    """A tiny model whose logits the hook replaces: inputs are whole aligned blocks (cached
    steps, uncached canvases, the static runner), so blocks start at index 0 of the input."""
    ids = dict(delete_token_id=DELETE, split_token_id=SPLIT) if edit_ids else {}
    model = tiny_model(router=router, **ids)

    def hook(module, args, kwargs, output):
        keep = kwargs.get("logits_to_keep")
        full = scripted_logits(fn, kwargs["input_ids"])
        if isinstance(keep, (slice, torch.Tensor)):  # a tensor: the positions generate still predicts
            full = full[:, keep]
        elif isinstance(keep, int) and keep > 0:
            full = full[:, -keep:]
        output.logits = full.to(output.logits.dtype)
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def reference(fn, ids, new, threshold, editing, post, steps, eos):
    x, stats = reference_generate_llada22(lambda x: scripted_logits(fn, x), ids, new, BLOCK, steps, threshold,
                                          editing, post, MASK, DELETE, SPLIT, eos)
    answer = llada22_answer(x, ids.shape[1], new, eos)[0]
    out = torch.full((new,), PAD)
    out[: answer.shape[0]] = answer
    return torch.cat([ids[0], out]), stats


def prompt(length, seed):
    return torch.randint(0, 50, (1, length), generator=torch.Generator().manual_seed(seed))


SETTINGS = [  # threshold, editing_threshold, max_post_steps, steps, EOS
    (0.5, 0.0, 16, 4, None),  # LLaDA2.2's defaults (block 4 here)
    (0.7, 0.3, 3, 2, None),
    (0.6, 0.1, 0, 4, None),  # no post steps: the final round is the step that fills the last mask
    (0.5, 0.0, 4, 4, EOS),
    (0.5, 0.2, 1, 2, None),  # one post step: the final round is the first step after the last mask
]


def check_against_the_reference(seeds, threshold, editing, post, steps, eos, new=10):
    """Our tokens and edit counts equal the reference's for each seed's script and prompt;
    returns the reference's per-block statistics, summed."""
    settings = dict(max_new_tokens=new, block_length=BLOCK, steps=steps, threshold=threshold,
                    editing_threshold=editing, max_post_steps=post, eos_token_id=eos, return_dict_in_generate=True)
    total = {}
    for seed in seeds:
        fn = script(seed)
        ids = prompt(3 + seed % 3, seed)
        torch.manual_seed(seed)  # the loop guard draws from torch's global generator, as the reference
        want, stats = reference(fn, ids, new, threshold, editing, post, steps, eos)
        model = scripted_model(fn)  # (building it draws from the global generator)
        torch.manual_seed(seed)
        out = model.generate(ids, **settings)
        assert out.sequences[0].tolist() == want.tolist(), seed
        for name in ("substitutions", "deletions", "insertions"):
            assert out.edits[name].item() == sum(s[name] for s in stats), (seed, name)
        assert out.num_forward_passes == sum(s["forwards"] for s in stats), seed  # blocks end when the reference's do
        for s in stats:
            for name, value in s.items():
                if not isinstance(value, str):
                    total[name] = total.get(name, 0) + int(value)
    return total


@pytest.mark.parametrize("threshold, editing, post, steps, eos", SETTINGS)
def test_levenshtein_editing_matches_the_reference_token_for_token(threshold, editing, post, steps, eos):
    total = check_against_the_reference(range(4), threshold, editing, post, steps, eos)
    if eos is None:
        assert total["deletions"] and total["insertions"] and total["final_round"], total


def test_splits_that_push_tokens_out_and_the_loop_guard_match_the_reference():
    total = check_against_the_reference([2, 6], 0.5, 0.0, 4, 4, None)
    assert total["pushed_out"] >= 10 and total["anti_loop_resamples"] >= 2, total


@pytest.mark.parametrize("router", ROUTERS)
def test_cached_uncached_static_and_batched_runs_agree(router):
    fn = script(11)
    model = scripted_model(fn, router)
    prompts = [prompt(5, 1), prompt(2, 2)]
    settings = dict(max_new_tokens=7, block_length=BLOCK, steps=4, threshold=0.5, editing_threshold=0.0,
                    max_post_steps=4, eos_token_id=None)
    alone = []
    for p in prompts:
        torch.manual_seed(0)
        runs = [model.generate(p, **settings, use_cache=use_cache) for use_cache in (True, False)]
        torch.manual_seed(0)
        runs.append(model.generate(p, **settings, cache_implementation="static", disable_compile=True))
        assert all(torch.equal(r, runs[0]) for r in runs)
        alone.append(runs[0][0, p.shape[1]:])
    ids, mask = left_pad(prompts)
    batched = model.generate(ids, mask, **settings)
    for row, want in zip(batched, alone):
        assert row[ids.shape[1]:].tolist() == want.tolist()


@pytest.mark.parametrize("seed", [3, 11])
def test_each_row_of_a_batch_counts_its_own_masks_steps_and_edits(seed):
    """Rows whose blocks settle at different steps: each row's forwards and edit counts are
    its own run's (a batch-wide mask count or stability test would keep rows going)."""
    fn = script(seed)
    model = scripted_model(fn)
    prompts = [prompt(5, 1), prompt(2, 2), prompt(7, 3)]
    settings = dict(max_new_tokens=7, block_length=BLOCK, steps=2, threshold=0.6, editing_threshold=0.1,
                    max_post_steps=0, eos_token_id=None, return_dict_in_generate=True)
    alone = []
    for p in prompts:
        torch.manual_seed(0)
        alone.append(model.generate(p, **settings))
    ids, mask = left_pad(prompts)
    torch.manual_seed(0)
    batched = model.generate(ids, mask, **settings)
    for i, (p, one) in enumerate(zip(prompts, alone)):
        assert batched.sequences[i, ids.shape[1]:].tolist() == one.sequences[0, p.shape[1]:].tolist()
        assert batched.tokens_per_forward[i].item() == pytest.approx(one.tokens_per_forward[0].item())
        for name, counts in batched.edits.items():
            assert counts.dtype == torch.long and counts[i].item() == one.edits[name][0].item(), (i, name)


def editing_rule(**settings):
    config = DiffusionGenerationConfig(**{"block_length": BLOCK, "steps": 2, "threshold": 0.5, "editing_threshold": 0.25,
                                          "max_post_steps": 4, **settings})
    return LevenshteinEditing(config, MASK, DELETE, SPLIT)


def step(rule, block, tokens, confidence):
    """One step of a one-row block: `rows_step` for a single row."""
    return rows_step(rule, block, [tokens], [confidence])


def test_a_step_fills_above_the_threshold_and_edits_above_the_editing_threshold_strictly():
    rule = editing_rule()
    block = torch.full((1, 4), MASK)
    rule.start_block(block, torch.ones(1, 4, dtype=torch.bool))
    # quota 4 / 2 = 2; exactly two masks above 0.5: they fill, the one at exactly 0.5 does not
    block, _ = step(rule, block, [1, 2, 3, 4], [0.5, 0.6, 0.9, 0.1])
    assert block.tolist() == [[MASK, 2, 3, MASK]]
    # decided positions are edited above 0.25 only: 0.25 exactly keeps 2, 0.3 replaces 3
    block, _ = step(rule, block, [1, 5, 4, 4], [0.1, 0.25, 0.3, 0.1])
    assert block[0, 1:3].tolist() == [2, 4]


def test_the_quota_counts_only_the_masks_of_the_blocks_entry():
    rule = editing_rule(steps=3, threshold=None)
    block = torch.tensor([[7, MASK, MASK, MASK]])  # an editable decided token at entry is not a mask to fill
    rule.start_block(block, torch.ones(1, 4, dtype=torch.bool))
    block, _ = step(rule, block, [7, 1, 2, 3], [0.9, 0.8, 0.7, 0.6])
    assert block.tolist() == [[7, 1, MASK, MASK]]  # quota 3 / 3 = 1, by confidence; no threshold


def test_threshold_none_fills_by_quota_alone():
    """threshold=None: the reference with a threshold no confidence passes."""
    for seed in (0, 1):
        fn = script(seed)
        ids = prompt(3 + seed, seed)
        torch.manual_seed(seed)
        want, _ = reference(fn, ids, 10, float("inf"), 0.1, 2, 2, None)
        model = scripted_model(fn)
        torch.manual_seed(seed)
        out = model.generate(ids, max_new_tokens=10, block_length=BLOCK, steps=2, threshold=None, editing_threshold=0.1,
                             max_post_steps=2, eos_token_id=None)
        assert out[0].tolist() == want.tolist(), seed


def test_max_steps_per_block_ends_the_block_with_a_warning_counting_the_masks_left(caplog):
    import logging

    rule = editing_rule(steps=4, threshold=None, max_steps_per_block=2)
    block = torch.full((1, 4), MASK)
    rule.start_block(block, torch.ones(1, 4, dtype=torch.bool))
    block, over = step(rule, block, [1, 2, 3, 4], [0.1, 0.1, 0.9, 0.1])
    assert not over.any() and block.tolist() == [[MASK, MASK, 3, MASK]]
    with caplog.at_level(logging.WARNING):
        block, over = step(rule, block, [1, 5, 3, 4], [0.1, 0.8, 0.9, 0.1])
    assert over.all() and block.tolist() == [[MASK, 5, 3, MASK]]  # quota 1 a step; the budget of 2 steps is spent
    messages = [r.getMessage() for r in caplog.records]
    assert any("max_steps_per_block=2 reached; 2 masks left in the block." in m for m in messages), messages
    assert rule.step == 2


def test_the_budget_warning_counts_masks_not_tokens(caplog):
    import logging

    rule = editing_rule(steps=4, threshold=None, max_steps_per_block=1)
    block = torch.full((1, 4), MASK)
    rule.start_block(block, torch.ones(1, 4, dtype=torch.bool))
    with caplog.at_level(logging.WARNING):
        block, over = step(rule, block, [1, 2, 3, 4], [0.1, 0.1, 0.9, 0.1])
    assert over.all() and block.tolist() == [[MASK, MASK, 3, MASK]]
    assert any("3 masks left in the block." in r.getMessage() for r in caplog.records)


def rows_step(rule, block, tokens, confidence):
    """One step of a batch of rows; scores all zero, so a banned DELETE / SPLIT becomes token 0."""
    rule.before_step(block)
    scores = torch.zeros(*block.shape, V)
    return rule.update(block, torch.tensor(tokens), torch.tensor(confidence), scores)


def test_a_row_that_settles_ends_while_the_other_rows_go_on():
    """Stability is per row: a row whose step starts without masks and changes nothing ends,
    whatever the other rows' masks (a batch-wide mask count or `all` would keep it running)."""
    rule = editing_rule(steps=2, threshold=0.5, editing_threshold=0.9, max_post_steps=4)
    block = torch.full((2, 4), MASK)
    rule.start_block(block, torch.ones(2, 4, dtype=torch.bool))
    block, over = rows_step(rule, block, [[1, 2, 3, 4]] * 2, [[0.9] * 4, [0.3, 0.2, 0.1, 0.1]])
    assert block.tolist() == [[1, 2, 3, 4], [1, 2, MASK, MASK]] and not over.any()
    block, over = rows_step(rule, block, [[1, 2, 3, 4]] * 2, [[0.1] * 4] * 2)
    assert block.tolist() == [[1, 2, 3, 4]] * 2
    assert over.tolist() == [True, False]  # row 1 filled its last masks: it changed, so it goes on


def test_the_final_round_and_the_quota_are_each_rows_own():
    """max_post_steps=0: a row whose block-entry masks a SPLIT pushed out of the block is not in
    the final round because another row still has entry masks, so its DELETE stands; and the
    masks a row's edits created raise only that row's quota."""
    rule = editing_rule(steps=4, threshold=0.5, editing_threshold=0.5, max_post_steps=0)
    block = torch.full((2, 4), MASK)
    rule.start_block(block, torch.ones(2, 4, dtype=torch.bool))
    block, _ = rows_step(rule, block, [[1, 2, 3, 4]] * 2, [[0.9, 0.9, 0.1, 0.1], [0.1, 0.2, 0.3, 0.4]])
    assert block.tolist() == [[1, 2, MASK, MASK], [MASK, MASK, MASK, 4]]
    # row 0: SPLIT at 0 (an edit) and a fill at 2 (quota 1) push the last entry mask out
    block, over = rows_step(rule, block, [[SPLIT, 2, 5, 4], [1, 2, 3, 4]], [[0.9, 0.1, 0.4, 0.1], [0.1, 0.2, 0.3, 0.1]])
    assert block.tolist() == [[MASK, 1, 2, 5], [MASK, MASK, 3, 4]] and not over.any()
    # row 0 holds only a mask its edit created (quota 1 + 1): it fills it with DELETE, padded by a new mask;
    # row 1 (quota 1) fills one mask
    block, over = rows_step(rule, block, [[DELETE, 1, 2, 5], [1, 2, 3, 4]], [[0.4, 0.1, 0.1, 0.1], [0.2, 0.1, 0.1, 0.1]])
    assert block.tolist() == [[1, 2, 5, MASK], [1, MASK, 3, 4]]
    assert not over.any()


def test_each_row_fills_its_own_quota_when_quotas_differ():
    """Quotas of 2 and 1 in one batch: the row with the smaller quota fills exactly its own."""
    rule = editing_rule(steps=2, threshold=None)
    block = torch.tensor([[MASK, MASK, MASK, MASK], [7, 7, MASK, MASK]])
    rule.start_block(block, torch.ones(2, 4, dtype=torch.bool))
    block, _ = rows_step(rule, block, [[1, 2, 3, 4]] * 2, [[0.9, 0.8, 0.1, 0.1], [0.1, 0.1, 0.9, 0.8]])
    assert block.tolist() == [[1, 2, MASK, MASK], [7, 7, 3, MASK]]
