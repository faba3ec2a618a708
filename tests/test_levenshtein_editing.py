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


def test_edit_application_is_the_references_left_to_right_scan():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        old = torch.randint(1, 6, (3, 6), generator=g)
        old[torch.rand(3, 6, generator=g) < 0.3] = MASK
        written = torch.where(torch.rand(3, 6, generator=g) < 0.5,
                              torch.tensor(LIKELY)[torch.randint(0, len(LIKELY), (3, 6), generator=g)], old)
        original = torch.rand(3, 6, generator=g) < 0.5
        tokens, flags = ours_apply(written, old, original, MASK, DELETE, SPLIT)
        for b in range(3):
            want_tokens, want_flags = apply_edit_operations(written[b].tolist(), old[b].tolist(),
                                                            original[b].tolist(), MASK, 6, DELETE, SPLIT)
            assert tokens[b].tolist() == want_tokens and flags[b].tolist() == want_flags


def test_today_editing_is_unchanged_without_edit_ids_and_edit_ids_in_prompts_are_refused():
    fn = script(3)
    model = scripted_model(fn)
    settings = dict(max_new_tokens=8, block_length=BLOCK, steps=4, threshold=0.5, editing_threshold=0.0,
                    max_post_steps=4, eos_token_id=None, return_dict_in_generate=True)
    ids = prompt(3, 1)
    plain = scripted_model(fn, edit_ids=False)  # LLaDA2.1's editing: DELETE is just a token there
    assert set(plain.generate(ids, **settings).edits) == {"substitutions"}
    with pytest.raises(ValueError, match="delete_token_id"):
        model.generate(torch.tensor([[1, DELETE, 2]]), **settings)
    with pytest.raises(ValueError, match="max_steps_per_block"):
        plain.generate(ids, max_new_tokens=4, block_length=BLOCK, steps=4, editing_threshold=0.0, max_steps_per_block=9)
    assert model.generate(ids, max_new_tokens=4, block_length=BLOCK, steps=4, return_dict_in_generate=True).edits \
        is None  # no editing asked for: LLaDA2.0's rule


# --- named scenarios (FluxServe's parity harness style: a block's tokens -> per-position probabilities)


def rows(dists):
    """Logits [len(dists), V] giving each position the probabilities `dists[i]` (the rest uniform)."""
    out = torch.empty(len(dists), V)
    for i, dist in enumerate(dists):
        rest = (1 - sum(dist.values())) / (V - len(dist))
        out[i] = torch.log(torch.tensor(rest))
        for token, p in dist.items():
            out[i, token] = torch.log(torch.tensor(p))
    return out


def scenario(block_to_dists):
    table = {}

    def fn(block, slot):
        if block not in table:
            table[block] = rows(block_to_dists(list(block)))
        return table[block][slot]
    return fn


def fill(tokens, p=0.95):
    return [{t: p} for t in tokens]


A = [3, 4, 5, 6]


def delete_at_the_end(b):  # [3,4,5,6] -> DELETE at the last slot -> [3,4,5,M(new)] -> 9
    if b == A:
        return fill([3, 4, 5, DELETE])
    if b == [3, 4, 5, MASK]:
        return fill([3, 4, 5, 9])
    return fill([t if t != MASK else A[i] for i, t in enumerate(b)])


def split_pushes_out(b):  # SPLIT at slot 1 -> [3,M,4,5]: 6 falls off the block -> 9
    if b == A:
        return fill([3, SPLIT, 5, 6])
    if b == [3, MASK, 4, 5]:
        return fill([3, 9, 4, 5])
    return fill([t if t != MASK else A[i] for i, t in enumerate(b)]) if MASK in b else fill(b)


def final_round(b):  # DELETE keeps being proposed at slot 0 (second choice 17); the final round takes 17
    if b.count(MASK) == 4:
        return fill(A)
    dists = [{DELETE: 0.6, 17: 0.3}] + [{t: 0.9} for t in b[1:]]
    if b[-1] == MASK:
        dists[-1] = {7: 0.3}
    return dists


def toggles(b):  # slots 0 and 1 flip 3 <-> 7 and 4 <-> 8 (second choices 10, 11): the loop guard ends it
    if MASK in b:
        return fill(A)
    d0 = {3: {7: .8, 10: .15}, 7: {3: .8, 10: .15}}.get(b[0], {b[0]: .9})
    d1 = {4: {8: .8, 11: .15}, 8: {4: .8, 11: .15}}.get(b[1], {b[1]: .9})
    return [d0, d1, {b[2]: .9}, {b[3]: .9}]


@pytest.mark.parametrize("name, dists, post, answer", [
    ("delete at the block end", delete_at_the_end, 16, [3, 4, 5, 9]),
    ("a split pushes a token out", split_pushes_out, 16, [3, 9, 4, 5]),
    ("the final round forbids DELETE", final_round, 2, [17, 5, 6, 7]),
    ("no post steps: the filling step is the final round",
     lambda b: [{3: .9}, {DELETE: .6, 9: .3}, {5: .9}, {6: .9}], 0, [3, 9, 5, 6]),
    ("the loop guard", toggles, 16, [10, 11, 5, 6]),
])
def test_named_edit_scenarios(name, dists, post, answer):
    fn = scenario(dists)
    model = scripted_model(fn)
    ids = torch.tensor([[1, 2, 3, 4]])
    for seed in range(3):
        torch.manual_seed(seed)
        want, _ = reference(fn, ids, 4, 0.5, 0.0, post, 4, None)
        torch.manual_seed(seed)
        got = model.generate(ids, max_new_tokens=4, block_length=BLOCK, steps=4, threshold=0.5, editing_threshold=0.0,
                             max_post_steps=post, eos_token_id=None)
        assert got[0].tolist() == want.tolist() == [1, 2, 3, 4] + answer, name
