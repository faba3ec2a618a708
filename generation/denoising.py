"""One step of block-parallel denoising: predict, then decide which positions change.

`predict` turns a block's processed scores into a predicted token and a confidence per
position: the best non-mask token (the mask token is never committed) and its probability
under the softmax over the full vocabulary, the published references' confidence. A
decoding rule then updates the block from them; each rule is a small object with one
contract, `update(block, tokens, confidence) -> (block, done)`, so the generation loop does
not care which one runs:

* `MaskFilling` (LLaDA2.0 / dMoE): `steps` steps per block, step j commits quota[j] masked
  positions (the most confident), or every one above `threshold` when at least the quota
  are. Committed tokens are final.
* `TokenEditing` (LLaDA2.1, `editing_threshold` set): the same mask filling with a fixed
  minimum per step, plus edits of the block's decided tokens, until the block settles.
* `LevenshteinEditing` (LLaDA2.2, `editing_threshold` set on a model with delete / split
  ids; levenshtein_editing.py): edits may also delete a position or split it in two.

Both also answer `start_block(block, editable)` and `before_step(block)` with the [B]
samples that have nothing (more) to do, so the loop can stop when every sample is done, and
`positions_to_predict(block)`: the [B, W] positions whose prediction the step can use (None:
all), so that the loop projects only those onto the vocabulary.
"""

import torch

from .generation_config_diffusion import DiffusionGenerationConfig


def step_quota(block_length: int, steps: int) -> list[int]:
    """Tokens to commit at each step: floor(block_length / steps), +1 for the first block_length % steps steps."""
    base, extra = divmod(block_length, steps)
    return [base + (1 if j < extra else 0) for j in range(steps)]


def select_commits(scores: torch.Tensor, candidates: torch.Tensor, quota: int, threshold: float | None) -> torch.Tensor:
    """Which candidate positions ([B, L] bool) to commit this step, per row.

    threshold None: the `quota` highest-scoring candidates (all of them if fewer). Otherwise
    every candidate scoring above `threshold` when at least `quota` do, else the quota best.
    """
    scores = scores.masked_fill(~candidates, float("-inf"))
    k = min(quota, scores.shape[-1])
    best = scores.topk(k, dim=-1).indices  # sorted, best first
    take = torch.arange(k, device=scores.device) < candidates.sum(-1, keepdim=True).clamp(max=quota)
    commit = torch.zeros_like(candidates).scatter(-1, best, take)
    if threshold is not None:
        confident = (scores > threshold) & candidates
        commit = torch.where(confident.sum(-1, keepdim=True) >= quota, confident, commit)
    return commit & candidates


def only_mask_left(scores: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """[B, W]: positions whose scores [B, W, V] leave no token but the mask token (every other at -inf)."""
    alive = ~torch.isneginf(scores)  # a bool pass: no copy of the [B, W, V] scores
    if mask_token_id is not None:
        alive[..., mask_token_id] = False
    return ~alive.any(-1)


def predict(scores: torch.Tensor, greedy: bool, remasking: str = "low_confidence", mask_token_id: int | None = None,
            fallback: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted tokens [B, W] and remasking scores [B, W] (higher = commit first) from the
    block's processed scores [B, W, V] (the logits processors, and the sampling warpers when
    sampling, have already run, on the full vocabulary).

    Confidences are those of LLaDA2's / dMoE's published generate: probabilities under the
    softmax over the FULL vocabulary, the mask token included. The mask token is never a
    prediction: the token is the best non-mask token (greedy: the argmax of the scores
    without the mask token; sampling: a sample of the softmax without it, i.e. the full
    softmax conditioned on not drawing the mask token), and its confidence is its
    full-softmax probability, not renormalised without the mask token (renormalising
    divides each position by a different 1 - p(mask) and reorders the positions). Wherever
    the reference's argmax is not the mask token, tokens and confidences are the
    reference's, and so are greedy outputs. Where it is, the reference "commits" the mask
    token (the position stays masked, yet takes a slot of the step's quota or passes the
    threshold); here the position takes the best non-mask token with that token's
    full-softmax probability (below p(mask)), so it ranks lower than in the reference and
    the two runs may differ from there on.

    remasking: "low_confidence" (the rule above); "margin": top-1 minus top-2 full-softmax
    probability among the non-mask tokens; "entropy": exp(-entropy) of the full
    distribution (the mask token's share included); "random": uniform.

    A position where no non-mask token is left (every one at -inf, e.g. top_k=1 sampling
    where the mask token is the top token) takes its token from `fallback` (the scores
    processed with the mask token's logit at -inf beforehand), or the first non-mask id
    without one, and scores 0 under every rule: it commits last.
    """
    B, W, V = scores.shape
    scores = scores.float()
    probs = scores.softmax(-1)  # the full vocabulary: the references' confidences
    stuck = only_mask_left(scores, mask_token_id)
    if fallback is None:
        candidates, hopeless = scores.clone(), stuck  # a copy: the mask column is overwritten below
    else:
        candidates = torch.where(stuck.unsqueeze(-1), fallback.float(), scores)
        hopeless = stuck & only_mask_left(fallback, mask_token_id)
    candidates.masked_fill_(hopeless.unsqueeze(-1), 0.0)
    if mask_token_id is not None:
        candidates[..., mask_token_id] = float("-inf")
    if greedy:
        tokens = candidates.argmax(-1)
    else:
        tokens = torch.multinomial(candidates.softmax(-1).view(B * W, V), 1).view(B, W)
    if remasking == "low_confidence":
        confidence = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    elif remasking == "margin":
        others = probs.clone()
        if mask_token_id is not None:
            others[..., mask_token_id] = 0.0
        top2 = others.topk(min(2, V), dim=-1).values
        confidence = top2[..., 0] - top2[..., 1] if V > 1 else top2[..., 0]
    elif remasking == "entropy":
        confidence = torch.exp(-torch.special.entr(probs).sum(-1))
    else:
        confidence = torch.rand(B, W, device=scores.device)
    return tokens, confidence.masked_fill(stuck, 0.0)


class MaskFilling:
    """LLaDA2.0's rule: `steps` steps per block, each commits its quota of masked positions."""

    def __init__(self, config: DiffusionGenerationConfig, mask_token_id: int):
        self.steps, self.threshold, self.mask_token_id = config.steps, config.threshold, mask_token_id

    def start_block(self, block: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        """`editable` [B, W]: the block's answer positions of samples still decoding. Returns
        [B]: the samples with nothing to do in this block."""
        self.quotas = step_quota(block.shape[-1], min(self.steps, block.shape[-1]))
        self.editable = editable
        self.step = 0
        return ~self.active(block).any(-1)

    def before_step(self, block: torch.Tensor) -> torch.Tensor:
        """[B] samples whose block ends before this step's forward (none: a step's quota does)."""
        return torch.zeros(block.shape[0], dtype=torch.bool, device=block.device)

    @property
    def max_steps(self) -> int:
        return len(self.quotas)

    def active(self, block: torch.Tensor) -> torch.Tensor:
        return (block == self.mask_token_id) & self.editable

    def positions_to_predict(self, block: torch.Tensor) -> torch.Tensor:
        """Only masked positions can commit; committed tokens are final."""
        return self.active(block)

    def update(self, block: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, scores=None):
        """(the block with this step's commits, [B] whether each sample's block is done).
        `scores` [B, W, V], the processed scores, for rules that re-predict (LLaDA2.2's)."""
        commit = select_commits(confidence, self.active(block), self.quotas[self.step], self.threshold)
        self.step += 1
        block = torch.where(commit, tokens, block)
        done = ~self.active(block).any(-1) | (self.step >= len(self.quotas))
        return block, done


class TokenEditing:
    """LLaDA2.1's rule: mask-to-token commits plus token-to-token edits of the current block.

    Every step, from one forward: (M2T) the masked positions whose confidence exceeds
    `threshold` are filled when at least `num_to_transfer` are, else the `num_to_transfer`
    most confident ones (`num_to_transfer` = floor(block_length / steps): `steps =
    block_length`, LLaDA2.1's setting, gives its default 1); (T2T) every already-decided
    answer position of the block (not a mask at the step's start, not the prompt) whose
    prediction differs from its token with probability above `editing_threshold` is
    replaced. A block ends after a step that starts with no mask and edits nothing, or when
    `max_post_steps` mask-free steps have run. Earlier blocks and the prompt are never
    edited, so the exact prefix cache stays exact: a step runs the block on the cached
    prefix, and the block's keys/values are appended once, from its final tokens.
    """

    def __init__(self, config: DiffusionGenerationConfig, mask_token_id: int):
        self.threshold = config.threshold
        self.editing_threshold = config.editing_threshold
        self.max_post_steps = config.max_post_steps
        self.num_to_transfer = max(config.block_length // config.steps, 1)
        self.mask_token_id = mask_token_id
        self.edits = None  # [B] substitutions over the whole call

    def start_block(self, block: torch.Tensor, editable: torch.Tensor) -> torch.Tensor:
        self.editable = editable
        if self.edits is None:
            self.edits = torch.zeros(editable.shape[0], dtype=torch.long, device=editable.device)
        self.post_steps = torch.zeros(editable.shape[0], dtype=torch.long, device=editable.device)
        self.over = ~editable.any(-1)
        self.max_steps = -(-block.shape[-1] // self.num_to_transfer) + self.max_post_steps
        return self.over

    def active(self, block: torch.Tensor) -> torch.Tensor:
        return (block == self.mask_token_id) & self.editable

    def positions_to_predict(self, block: torch.Tensor) -> None:
        """Every position: decided tokens can be edited."""
        return None

    def before_step(self, block: torch.Tensor) -> torch.Tensor:
        """A step that starts without masks is a post step; past `max_post_steps` of them the
        block ends before the forward."""
        running = ~self.over
        self.post_steps = self.post_steps + (running & ~self.active(block).any(-1))
        self.over = self.over | (self.post_steps > self.max_post_steps)
        return self.over

    def update(self, block: torch.Tensor, tokens: torch.Tensor, confidence: torch.Tensor, scores=None):
        skip = self.over
        active = self.active(block) & ~skip.unsqueeze(1)
        threshold = float("inf") if self.threshold is None else self.threshold
        masked_confidence = confidence.masked_fill(~active, float("-inf"))
        confident = (masked_confidence > threshold) & active
        k = min(self.num_to_transfer, block.shape[-1])
        best = torch.zeros_like(active).scatter(-1, masked_confidence.topk(k, dim=-1).indices, True) & active
        m2t = torch.where(confident.sum(-1, keepdim=True) >= self.num_to_transfer, confident, best)
        editable = ~active & self.editable & ~skip.unsqueeze(1)
        t2t = editable & (confidence > self.editing_threshold) & (tokens != block)
        new_block = torch.where(m2t | t2t, tokens, block)
        self.edits += t2t.sum(-1)
        self.over = skip | (~active.any(-1) & ~t2t.any(-1))
        return new_block, self.over
