"""Data collators for the masked-diffusion objective, usable by `transformers.Trainer`.

Each batch is noised in the collator, so the model's forward stays a plain masked-LM
forward. Per sequence b a noise level t_b ~ U(eps, 1) is drawn (or stratified,
"low_discrepancy": t_b = eps + (1 - eps) * ((u + b / B) mod 1) with one shared u, which
lowers the variance of the loss estimate), and every noisable token is replaced by
`mask_token_id` with probability t_b. A batch holds:

    input_ids       noisy tokens
    attention_mask  [B, L] padding mask (bidirectional), or the two-stream [B, 1, 2L, 2L]
                    bool mask (block_causal, see below)
    labels          original tokens at masked positions, -100 elsewhere (no shift)
    noise_level     [B] realised fraction of masked real tokens: the t_b of the "elbo"
                    weighting (the realised ratio rather than the drawn t, which has lower
                    variance). The capacity schedule needs nothing extra: the model reads each
                    routing unit's own mask ratio from `input_ids` (for block-causal models each
                    attention block's, so the clean stream's blocks have ratio 0), the same
                    quantity it reads at generation time.
    num_items_in_batch  the loss normaliser of this batch: real (noisy-stream) tokens for
                    loss_weighting="elbo", labelled tokens for "none". A plain forward uses it
                    as is; `DiffusionTrainer` sums it over the micro-batches of an optimizer
                    step (and over ranks), so gradient accumulation equals the large batch.

Noise comes from the global torch RNG, or, with `seed`, from a generator seeded by the
seed and the batch content (reproducible across checkpoint resumption; see `generator`).

Bad data fails with the row and position instead of training on something else: a real
token equal to `mask_token_id` (it would be read as a masked position, and become a target
where it is noised), a pre-tokenised SFT `prompt_length` outside [0, len(input_ids)) (no
answer token left), an empty answer, a conversation that does not end with the assistant's
message. Truncation to `max_length` is logged once per collator. An SFT example cut there
keeps no EOS: in the LLaDA recipes EOS marks where an answer really ends (and its padding
teaches the model to stop), so an EOS at an arbitrary cut would teach it to stop
mid-answer; a cut row simply fills the window. A pretraining sequence loses its tail
(pack the corpus with `pack_documents` instead).

Block-causal models train on the two-stream input [x_t ; x_0] (length 2L): positions
0..L-1 twice, labels only on the noisy half, the mask from `two_stream_attention_mask`.
With a 4-D mask the model routes every token as real, so padding is best avoided there
(pack pretraining text; SFT pads with EOS, which is a real token anyway). Routing never
mixes the streams: capacity groups and dMoE chunks are runs of consecutive positions, so
the noisy and the clean copy of a block are separate routing units.
"""

import hashlib
import numbers
import operator
from dataclasses import dataclass

import torch
from transformers.utils import logging

from ..modeling.attention_masks import positions_from_padding, two_stream_attention_mask
from ..modeling.diffusion_loss import IGNORE_INDEX

logger = logging.get_logger(__name__)

LAYOUTS = ("bidirectional", "block_causal")
TIME_SAMPLING = ("uniform", "low_discrepancy")
WEIGHTINGS = ("elbo", "none")


@dataclass
class _DiffusionCollator:
    """Shared noising and output layout; see the module docstring."""

    tokenizer: object = None
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    max_length: int | None = None
    eps: float = 1e-3
    time_sampling: str = "uniform"
    attention_layout: str = "bidirectional"
    block_size: int = 32
    loss_weighting: str = "elbo"
    max_position_embeddings: int | None = None
    seed: int | None = None

    @classmethod
    def from_config(cls, config, tokenizer=None, **kwargs):
        """Take mask/pad ids, layout, block size, weighting and the length limit from a model config."""
        defaults = dict(
            mask_token_id=config.mask_token_id,
            pad_token_id=config.pad_token_id,
            attention_layout=config.attention_layout,
            block_size=config.block_size,
            loss_weighting=config.loss_weighting,
            max_position_embeddings=config.max_position_embeddings,
        )
        return cls(tokenizer=tokenizer, **{**defaults, **kwargs})

    def __post_init__(self):
        name = type(self).__name__
        if self.mask_token_id is None and self.tokenizer is not None:
            self.mask_token_id = self.tokenizer.mask_token_id
        if self.mask_token_id is None:
            raise ValueError(
                f"{name}: `mask_token_id` must be set: pass it, or a tokenizer with a mask token "
                "(tokenizer.mask_token), or a config whose `mask_token_id` is not None."
            )
        if self.pad_token_id is None and self.tokenizer is not None:
            self.pad_token_id = self.tokenizer.pad_token_id
        _check_optional_int(name, "mask_token_id", self.mask_token_id, 0, "a token id (an integer >= 0)")
        _check_optional_int(name, "pad_token_id", self.pad_token_id, 0, "None or a token id (an integer >= 0)")
        _check_optional_int(name, "max_length", self.max_length, 1, "None or a positive integer")
        _check_optional_int(name, "max_position_embeddings", self.max_position_embeddings, 1,
                            "None or a positive integer")
        _check_optional_int(name, "seed", self.seed, None, "None or an integer")
        if not (_is_number(self.eps) and 0 < self.eps < 1):
            raise ValueError(f"{name}: `eps` must be a number in (0, 1); got {self.eps!r}.")
        if self.time_sampling not in TIME_SAMPLING:
            raise ValueError(f"{name}: `time_sampling` must be one of {TIME_SAMPLING}; got {self.time_sampling!r}.")
        if self.attention_layout not in LAYOUTS:
            raise ValueError(
                f"{name}: `attention_layout` must be one of {LAYOUTS} (bidirectional: plain masked input; "
                f"block_causal: two-stream [x_t ; x_0]); got {self.attention_layout!r}."
            )
        if self.loss_weighting not in WEIGHTINGS:
            raise ValueError(f"{name}: `loss_weighting` must be one of {WEIGHTINGS}; got {self.loss_weighting!r}.")
        if not (_is_int(self.block_size) and self.block_size > 0):
            raise ValueError(f"{name}: `block_size` must be a positive integer; got {self.block_size!r}.")
        limit = self.max_position_embeddings
        if self.max_length is not None and limit is not None and self.max_length > limit:
            raise ValueError(
                f"{name}: `max_length` must be at most max_position_embeddings ({limit}); got {self.max_length}."
            )

    def _reject_mask_tokens(self, clean: torch.Tensor, real: torch.Tensor):
        """ValueError naming the first real position of the batch that holds `mask_token_id`."""
        found = (clean == self.mask_token_id) & real
        if found.any():
            row, position = (int(i) for i in found.nonzero()[0])
            raise ValueError(
                f"{type(self).__name__}: row {row} of the batch holds mask_token_id={self.mask_token_id} at position "
                f"{position} ({int(found.sum())} such tokens in the batch). The model would read it as a masked "
                "position, and where it is noised it would become a training target; remove it from the data (text "
                "that spells the mask token is tokenised to it)."
            )

    def _warn_truncation_once(self, lengths: list[int], what: str):
        """Log once per collator that sequences were cut to `max_length`."""
        cut = [n for n in lengths if n > self.max_length]
        if not cut or getattr(self, "_warned_truncation", False):
            return
        self._warned_truncation = True
        logger.warning(
            f"{type(self).__name__}: {len(cut)} of {len(lengths)} sequences in this batch are longer than "
            f"max_length={self.max_length} (the longest has {max(cut)} tokens) and are cut to it: {what} "
            "(logged once per collator)."
        )

    def _check_length(self, length: int):
        limit = self.max_position_embeddings
        if limit is not None and length > limit:
            raise ValueError(
                f"{type(self).__name__}: a sequence of {length} tokens is longer than max_position_embeddings "
                f"({limit}); set `max_length` to truncate, or shorten the data."
            )

    def generator(self, clean: torch.Tensor) -> torch.Generator | None:
        """With `seed`, a generator seeded by (seed, batch content): the noise of a batch is
        then reproducible whatever ran before it. Trainer prefetches the next batch before
        saving a checkpoint and restores its RNG only after collating the first batch on
        resume, so only this makes a resumed run draw exactly the same noise."""
        if self.seed is None:
            return None
        digest = hashlib.blake2b(clean.numpy().tobytes(), digest_size=8, key=str(self.seed).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def sample_t(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise levels t_b in [eps, 1) (global torch RNG unless a generator is given)."""
        if self.time_sampling == "low_discrepancy":
            u = (torch.rand(1, generator=generator) + torch.arange(batch_size) / batch_size) % 1.0
        else:
            u = torch.rand(batch_size, generator=generator)
        return self.eps + (1.0 - self.eps) * u

    def noise(self, clean: torch.Tensor, padding_mask: torch.Tensor, noisable: torch.Tensor) -> dict:
        """Mask each noisable token with its sequence's probability t_b and lay out the batch."""
        generator = self.generator(clean)
        t = self.sample_t(clean.shape[0], generator)
        masked = (torch.rand(clean.shape, generator=generator) < t[:, None]) & noisable
        noisy = clean.masked_fill(masked, self.mask_token_id)
        labels = clean.masked_fill(~masked, IGNORE_INDEX)
        real = padding_mask.sum(-1).clamp(min=1)
        noise_level = masked.sum(-1).float() / real.float()
        items = padding_mask.sum() if self.loss_weighting == "elbo" else masked.sum()
        if self.attention_layout == "bidirectional":
            return {
                "input_ids": noisy,
                "attention_mask": padding_mask.long(),
                "labels": labels,
                "noise_level": noise_level,
                "num_items_in_batch": items,
            }
        positions = positions_from_padding(padding_mask)
        return {
            "input_ids": torch.cat([noisy, clean], dim=1),
            "attention_mask": two_stream_attention_mask(padding_mask, self.block_size),
            "position_ids": torch.cat([positions, positions], dim=1),
            "labels": torch.cat([labels, torch.full_like(labels, IGNORE_INDEX)], dim=1),
            "noise_level": noise_level,
            "num_items_in_batch": items,
        }


def _ids(feature) -> list[int]:
    if isinstance(feature, dict):
        if "input_ids" not in feature:
            raise ValueError(f"a feature must be a token-id list or have `input_ids`; got keys {sorted(feature)}.")
        feature = feature["input_ids"]
    ids = feature.tolist() if torch.is_tensor(feature) else list(feature)
    bad = next((i for i, token in enumerate(ids)
                if not (isinstance(token, numbers.Integral) and not isinstance(token, bool) and token >= 0)), None)
    if bad is not None:
        raise ValueError(f"`input_ids` must be token ids (integers >= 0); got {ids[bad]!r} at position {bad}.")
    return [int(token) for token in ids]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_optional_int(owner: str, name: str, value, minimum, allowed: str):
    if value is None and name != "mask_token_id":
        return
    if not (_is_int(value) and (minimum is None or value >= minimum)):
        raise ValueError(f"{owner}: `{name}` must be {allowed}; got {value!r}.")


@dataclass
class DiffusionPretrainCollator(_DiffusionCollator):
    """Pretraining: every real token is noisable. Features are token-id lists (or dicts with
    `input_ids`); longer ones are cut to `max_length`, shorter ones right-padded with pad."""

    def __call__(self, features) -> dict:
        if not features:
            raise ValueError("DiffusionPretrainCollator: got an empty batch.")
        sequences = [_ids(f) for f in features]
        if self.max_length is not None:
            self._warn_truncation_once(
                [len(s) for s in sequences],
                "their tokens past max_length are not trained on; pack the corpus into max_length chunks "
                "(`pack_documents`) to train on all of it",
            )
            sequences = [s[: self.max_length] for s in sequences]
        length = max(len(s) for s in sequences)
        self._check_length(length)
        if any(len(s) < length for s in sequences) and self.pad_token_id is None:
            raise ValueError(
                "DiffusionPretrainCollator: `pad_token_id` must be set to batch sequences of different lengths."
            )
        clean = torch.full((len(sequences), length), self.pad_token_id or 0, dtype=torch.long)
        padding_mask = torch.zeros(len(sequences), length, dtype=torch.bool)
        for i, s in enumerate(sequences):
            clean[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            padding_mask[i, : len(s)] = True
        self._reject_mask_tokens(clean, padding_mask)
        return self.noise(clean, padding_mask, noisable=padding_mask)


@dataclass
class DiffusionSFTCollator(_DiffusionCollator):
    """SFT: the prompt is never masked; the answer, its EOS and the EOS padding are.

    Following the LLaDA recipes, each answer ends with EOS and the batch is padded with
    more EOS (real, noisable tokens the model learns to predict), so there is no attention
    padding. Features: {"prompt": str, "answer": str}, {"messages": [...]} (the last
    message is the answer, the rest go through the tokenizer's chat template), or
    pre-tokenised {"input_ids": [...], "prompt_length": int} (EOS appended if missing;
    `prompt_length` in [0, len(input_ids)), so at least one answer token remains).

    Examples longer than `max_length` are cut to it, without EOS: the answer goes on past the
    window, and an EOS at the cut would teach the model to stop mid-answer. This is logged
    once per collator; a prompt that fills `max_length` is an error.
    """

    eos_token_id: int | None = None
    pad_to_max_length: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.eos_token_id is None and self.tokenizer is not None:
            self.eos_token_id = self.tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("DiffusionSFTCollator: `eos_token_id` must be set (or pass a tokenizer with an EOS token).")
        _check_optional_int("DiffusionSFTCollator", "eos_token_id", self.eos_token_id, 0,
                            "a token id (an integer >= 0)")
        if self.eos_token_id == self.mask_token_id:
            raise ValueError(
                f"DiffusionSFTCollator: `eos_token_id` must differ from mask_token_id ({self.mask_token_id}): EOS ends "
                "and pads every answer and is a training target, so it cannot also be the mask token."
            )
        if not isinstance(self.pad_to_max_length, bool):
            raise ValueError(
                f"DiffusionSFTCollator: `pad_to_max_length` must be a bool; got {self.pad_to_max_length!r}."
            )
        if self.pad_to_max_length and self.max_length is None:
            raise ValueError("DiffusionSFTCollator: `pad_to_max_length=True` needs `max_length`.")

    def encode(self, feature) -> tuple[list[int], int]:
        """(token ids ending with EOS, prompt length) of one example."""
        if not isinstance(feature, dict):
            raise ValueError(f"DiffusionSFTCollator: each feature must be a dict; got {type(feature).__name__}.")
        if "input_ids" in feature:
            ids = _ids(feature)
            if "prompt_length" not in feature:
                raise ValueError("DiffusionSFTCollator: a feature with `input_ids` needs `prompt_length`.")
            prompt_length = feature["prompt_length"]
            try:
                prompt_length = operator.index(prompt_length) if not isinstance(prompt_length, bool) else None
            except TypeError:
                prompt_length = None
            if prompt_length is None or not 0 <= prompt_length < len(ids):
                raise ValueError(
                    f"DiffusionSFTCollator: `prompt_length` must be an integer in [0, {len(ids)}) for input_ids of "
                    f"{len(ids)} tokens, so that at least one answer token remains; got {feature['prompt_length']!r}."
                )
            if ids[-1] != self.eos_token_id:
                ids.append(self.eos_token_id)
            return ids, prompt_length
        if self.tokenizer is None:
            raise ValueError("DiffusionSFTCollator: text features need `tokenizer`; or pass input_ids + prompt_length.")
        if "messages" in feature:
            messages = feature["messages"]
            last = messages[-1] if isinstance(messages, (list, tuple)) and messages else None
            if not isinstance(last, dict) or last.get("role") != "assistant" or "content" not in last:
                raise ValueError(
                    "DiffusionSFTCollator: `messages` must end with the answer, a message with role 'assistant' and "
                    f"`content`; the last one is {last!r}."
                )
            prompt_text = self.tokenizer.apply_chat_template(
                feature["messages"][:-1], tokenize=False, add_generation_prompt=True
            )
            answer_text = feature["messages"][-1]["content"]
        elif "prompt" in feature and "answer" in feature:
            prompt_text, answer_text = feature["prompt"], feature["answer"]
        else:
            raise ValueError(
                "DiffusionSFTCollator: each feature must have `prompt` + `answer`, `messages`, or "
                f"`input_ids` + `prompt_length`; got keys {sorted(feature)}."
            )
        prompt = self.tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        answer = self.tokenizer(answer_text, add_special_tokens=False)["input_ids"]
        if not answer:
            raise ValueError(f"DiffusionSFTCollator: the answer is empty (no token to train on); got {answer_text!r}.")
        return prompt + answer + [self.eos_token_id], len(prompt)

    def __call__(self, features) -> dict:
        if not features:
            raise ValueError("DiffusionSFTCollator: got an empty batch.")
        encoded = [self.encode(f) for f in features]
        for ids, prompt_length in encoded:
            if self.max_length is not None and prompt_length >= self.max_length:
                raise ValueError(
                    f"DiffusionSFTCollator: a prompt of {prompt_length} tokens fills max_length={self.max_length}, "
                    "leaving no answer token to train on; raise `max_length` or shorten the prompt."
                )
        if self.max_length is not None:
            self._warn_truncation_once(
                [len(ids) for ids, _ in encoded],
                "their answers end at the cut without EOS, so they teach the model nothing about where answers end; "
                "raise `max_length` or drop the long examples to keep every answer whole",
            )
            encoded = [(ids[: self.max_length], p) for ids, p in encoded]
        length = self.max_length if self.pad_to_max_length else max(len(ids) for ids, _ in encoded)
        self._check_length(length)
        clean = torch.full((len(encoded), length), self.eos_token_id, dtype=torch.long)
        noisable = torch.ones(len(encoded), length, dtype=torch.bool)
        for i, (ids, prompt_length) in enumerate(encoded):
            clean[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            noisable[i, :prompt_length] = False
        padding_mask = torch.ones_like(noisable)
        self._reject_mask_tokens(clean, padding_mask)
        return self.noise(clean, padding_mask, noisable)


__all__ = ["DiffusionPretrainCollator", "DiffusionSFTCollator"]
