"""LLaDA2.2's Levenshtein editing: LLaDA2.1's token editing plus two edit operations.

A prediction may be the model's DELETE token (the position is dropped) or its SPLIT token
(the position becomes [MASK, the token it held before this step]); after each step the
block is rebuilt left to right and truncated, or right-padded with masks, back to its
length, so the canvas never changes shape. One `LevenshteinEditing` decides a batch's
current blocks with the decoding-rule contract of `denoising.py`, per row:

* the step's writes: mask filling (floor(N / steps) + (t < N mod steps) masks, N the masks
  at block entry, plus the masks edits created; every mask above `threshold` when at least
  that many are; after `steps` steps every mask) and token edits (a decided answer
  position whose prediction differs, with probability above `editing_threshold`);
* `post_steps`: 0 while a mask of the block's entry remains, else counts up; the final
  round (post_steps >= max_post_steps; with max_post_steps 0, the step that fills the last
  original mask) fills every mask and re-argmaxes a DELETE / SPLIT prediction with those
  two tokens (and the mask) excluded;
* the loop guard: a block state seen before (outside the final round) has one randomly
  chosen changed position re-predicted without its current token, up to 5 tries, drawn
  with `torch.randint` from torch's global generator (as the reference, so
  `transformers.set_seed` makes runs reproducible);
* the block ends when a step that starts without masks changes nothing, before the
  forward once no mask is left and post_steps > max_post_steps, or after
  `max_steps_per_block` steps (a warning; masks may be left).

The reference is the checkpoint's `_joint_decode_block` as FluxServe's port documents it
(tests/llada2_2_editing_reference.py). Only the current block is edited, and only its
answer positions, so the exact prefix cache stays exact.
"""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)
LOOP_GUARD_TRIES = 5


def apply_edit_operations(written, old, original, mask_id, delete_id, split_id):
    """The block after DELETE / SPLIT, left to right, at its fixed width, and where the
    block-entry masks moved. written / old [B, W] (this step's writes / the block before
    it), original [B, W] bool; a row without edit tokens is unchanged."""
    B, W = written.shape
    delete, split = written == delete_id, written == split_id
    width = torch.where(delete, 0, torch.where(split, 2, 1))  # tokens each position becomes
    start = width.cumsum(-1) - width
    dump = 2 * W  # where positions that become nothing (and the overflow) write
    tokens = written.new_full((B, 2 * W + 1), mask_id)
    flags = torch.zeros(B, 2 * W + 1, dtype=torch.bool, device=written.device)
    first = torch.where(delete, dump, start)
    tokens.scatter_(1, first, torch.where(split, mask_id, written))  # a SPLIT's first token: a new mask
    flags.scatter_(1, first, original & ~split)
    second = torch.where(split, start + 1, dump)  # a SPLIT's second token: what stood there before
    tokens.scatter_(1, second, torch.where(split, old, mask_id))
    flags.scatter_(1, second, original & split)
    return tokens[:, :W], flags[:, :W]


class LevenshteinEditing:
    """LLaDA2.2's joint decoding of one block per row (see the module docstring)."""

    def __init__(self, config, mask_token_id: int, delete_token_id: int, split_token_id: int):
        self.steps, self.threshold = config.steps, config.threshold
        self.editing_threshold, self.max_post_steps = config.editing_threshold, config.max_post_steps
        self.max_steps = config.max_steps_per_block or 1000
        self.mask_id, self.delete_id, self.split_id = mask_token_id, delete_token_id, split_token_id
        self.edits = None  # [B, 3] substitutions, deletions, insertions over the whole call

    def start_block(self, block: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        B = block.shape[0]
        self.original = (block == self.mask_id) & editable  # the masks of the block's entry (move with edits)
        self.answer = self.original.clone()  # editable positions: the answer part, which edits only shift
        self.entry_masks = self.original.sum(-1)
        self.post_steps = torch.zeros(B, dtype=torch.long, device=block.device)
        self.over = self.entry_masks == 0  # nothing to decode: the reference returns at once
        self.step, self.seen = 0, [set() for _ in range(B)]
        if self.edits is None:
            self.edits = torch.zeros(B, 3, dtype=torch.long, device=block.device)
        return self.over

    def positions_to_predict(self, block: torch.Tensor) -> None:
        """Every position: decided tokens can be edited, deleted or split."""
        return None

    def before_step(self, block: torch.Tensor) -> torch.Tensor:
        """post_steps from the block before the step; past the budget with no mask left, the
        block ends before the forward."""
        masks = block == self.mask_id
        running = ~self.over
        original_left = (masks & self.original).any(-1)
        self.post_steps = torch.where(running, torch.where(original_left, 0, self.post_steps + 1), self.post_steps)
        self.over = self.over | (running & ~masks.any(-1) & (self.post_steps > self.max_post_steps))
        return self.over

    def update(self, block, tokens, confidence, scores):
        running = ~self.over
        masks = (block == self.mask_id) & running.unsqueeze(1)
        mask_count = masks.sum(-1)
        fill = self._mask_filling(masks, confidence, mask_count)
        decided = ~(block == self.mask_id) & self.answer & running.unsqueeze(1)
        edit = decided & (confidence > self.editing_threshold) & (tokens != block)
        if self.max_post_steps > 0:
            final = running & (self.post_steps >= self.max_post_steps)
        else:
            original = masks & self.original
            final = running & original.any(-1) & ~(original & ~fill).any(-1)
        fill = torch.where(final.unsqueeze(1), masks, fill)
        operation = (tokens == self.delete_id) | (tokens == self.split_id)
        banned = (fill | edit) & operation & final.unsqueeze(1)
        if banned.any():
            tokens = torch.where(banned, self._best_without(scores, (self.delete_id, self.split_id)), tokens)
        written = torch.where(fill | edit, tokens, block)
        written = self._guard_loops(written, block, scores, running & ~final)
        self._count(written, block, running)
        new_block, self.original = apply_edit_operations(
            written, block, self.original, self.mask_id, self.delete_id, self.split_id)
        stable = running & (mask_count == 0) & (new_block == block).all(-1)
        self.over = self.over | stable
        self.step += 1
        if self.step >= self.max_steps and (~self.over).any():
            logger.warning(f"LLaDA2.2 editing: max_steps_per_block={self.max_steps} reached; "
                           f"{int((new_block == self.mask_id).sum())} masks left in the block.")
            self.over = torch.ones_like(self.over)
        return new_block, self.over

    def _mask_filling(self, masks, confidence, mask_count):
        """The masks this step fills ([B, W]): every one above `threshold` when at least the
        quota are, else the quota most confident; after `steps` steps, all of them."""
        if self.step >= self.steps:
            return masks
        base, extra = torch.div(self.entry_masks, self.steps, rounding_mode="floor"), self.entry_masks % self.steps
        created = (masks & ~self.original).sum(-1)  # masks edits created
        quota = base + (self.step < extra).long() + created
        scores = confidence.masked_fill(~masks, float("-inf"))
        threshold = float("inf") if self.threshold is None else self.threshold
        confident = (scores > threshold) & masks
        k = torch.minimum(quota, mask_count)
        most = int(k.max())
        best = torch.zeros_like(masks)
        if most > 0:
            ranked = scores.topk(most, dim=-1).indices
            best.scatter_(1, ranked, torch.arange(most, device=masks.device) < k.unsqueeze(1))
        return torch.where((confident.sum(-1) >= quota).unsqueeze(1), confident, best) & masks

    def _best_without(self, scores, excluded) -> torch.Tensor:
        scores = scores.float().clone()
        scores[..., [*excluded, self.mask_id]] = float("-inf")
        return scores.argmax(-1)

    def _guard_loops(self, written, block, scores, guarded):
        """A row whose block state was seen before re-predicts one random changed position
        without its current token, up to 5 tries; every row records its state."""
        rows = written.tolist()
        for b in range(written.shape[0]):
            if guarded[b] and tuple(rows[b]) in self.seen[b]:
                for _ in range(LOOP_GUARD_TRIES):
                    changed = (written[b] != block[b]).nonzero(as_tuple=True)[0]
                    if len(changed) == 0:
                        break
                    position = int(changed[torch.randint(len(changed), (1,))])
                    row = scores[b, position].float().clone()
                    row[[int(written[b, position]), self.mask_id]] = float("-inf")
                    written[b, position] = row.argmax()
                    if tuple(written[b].tolist()) not in self.seen[b]:
                        break
                rows[b] = written[b].tolist()
            if not self.over[b]:
                self.seen[b].add(tuple(rows[b]))
        return written

    def _count(self, written, block, running):
        """Substitutions (a decided token replaced by another), deletions, insertions."""
        operation = (written == self.delete_id) | (written == self.split_id)
        substituted = (written != block) & (block != self.mask_id) & (written != self.mask_id) & ~operation
        self.edits += torch.stack([
            substituted.sum(-1), (written == self.delete_id).sum(-1), (written == self.split_id).sum(-1)
        ], dim=-1) * running.unsqueeze(1)
