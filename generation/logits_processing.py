"""Transformers' logits processors and stopping criteria for block-parallel denoising.

A processor sees what it would see in autoregressive generation: every masked position of
the current block is scored as the next token after the prompt (as given, left padding
included) and the answer positions before it; answer positions not decided yet hold the
mask token. So `min_new_tokens` suppresses EOS at the first answer positions, a repetition
penalty looks back at the prompt and the answer so far, `no_repeat_ngram_size` bans the
n-grams that would repeat, and custom processors written for `generate()` work unchanged.
A block's scores [B, W, V] are processed one answer offset at a time: rows [B, V] with
`input_ids` [B, P + offset].

Stopping criteria are checked after every block on the prompt plus the answer decided so
far ([B, P + answer length]); a sample that stops keeps its answer up to there and is padded
after it, as after an EOS. `StopStringCriteria` (from `stop_strings`) only matches at the end
of its input, so it is checked at every answer position of the block instead, and stops at
the first position that completes a stop string.
"""

import torch
from transformers.generation.logits_process import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    InfNanRemoveLogitsProcessor,
    LogitNormalization,
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)
from transformers.generation.stopping_criteria import (
    MaxTimeCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
)


def build_logits_processors(config, prompt_length: int, user_processors=None, device=None) -> LogitsProcessorList:
    """The processors a `DiffusionGenerationConfig` asks for (Transformers' order: penalties and
    constraints, then the user's, then the sampling warpers when sampling)."""
    eos = torch.tensor(config.eos_token_ids, device=device) if config.eos_token_ids else None
    processors = LogitsProcessorList()
    if config.sequence_bias is not None:
        processors.append(SequenceBiasLogitsProcessor(sequence_bias=config.sequence_bias))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        processors.append(NoBadWordsLogitsProcessor(config.bad_words_ids, eos))
    if config.min_length and eos is not None:
        processors.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens and eos is not None:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_length, config.min_new_tokens, eos, device=device))
    if config.remove_invalid_values:
        processors.append(InfNanRemoveLogitsProcessor())
    if config.suppress_tokens is not None:
        processors.append(SuppressTokensLogitsProcessor(config.suppress_tokens, device=device))
    if config.begin_suppress_tokens is not None:
        processors.append(SuppressTokensAtBeginLogitsProcessor(config.begin_suppress_tokens, prompt_length,
                                                               device=device))
    processors.extend(user_processors or [])
    if not config.greedy:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
        if config.min_p is not None:
            processors.append(MinPLogitsWarper(config.min_p))
        if config.typical_p is not None and config.typical_p < 1.0:
            processors.append(TypicalLogitsWarper(config.typical_p))
        if config.epsilon_cutoff:
            processors.append(EpsilonLogitsWarper(config.epsilon_cutoff))
        if config.eta_cutoff:
            processors.append(EtaLogitsWarper(config.eta_cutoff, device=device))
    if config.renormalize_logits:
        processors.append(LogitNormalization())
    return processors


def build_stopping_criteria(config, user_criteria=None, tokenizer=None) -> StoppingCriteriaList:
    criteria = StoppingCriteriaList(user_criteria or [])
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(config.max_time))
    if config.stop_strings is not None:
        if tokenizer is None:
            raise ValueError("`stop_strings` needs the model's tokenizer: pass generate(..., tokenizer=tokenizer).")
        try:
            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=config.stop_strings))
        except ValueError as error:  # e.g. word-level vocabularies: no token/space prefix to strip
            raise ValueError(
                f"`stop_strings`: Transformers' StopStringCriteria cannot index this tokenizer's vocabulary "
                f"({type(tokenizer).__name__}: {error}). Generate without `stop_strings` and cut the decoded text at "
                "the stop string instead (as the lm-eval adapter does)."
            ) from error
    return criteria


class BlockOffsets:
    """Where the answer's offsets lie in the current block, for processors and stopping criteria.

    Built once per block from `answer_offsets` [B, W] (the answer offset of each block
    position, -1 outside the answer): which (sample, position) has which offset depends only
    on the layout, so the index lists are read back from the device once per block.
    """

    def __init__(self, prompt_ids: torch.Tensor, answer_offsets: torch.Tensor):
        self.prompt_ids, self.width = prompt_ids, answer_offsets.shape[1]
        offsets = answer_offsets.cpu()
        self.groups = []  # (offset, rows, block positions), by increasing offset
        for offset in offsets[offsets >= 0].unique().tolist():
            rows, cols = (offsets == offset).nonzero(as_tuple=True)
            self.groups.append((offset, rows.to(prompt_ids.device), cols.to(prompt_ids.device)))
        last = offsets.max(-1).values  # each sample's last answer offset in the block (-1: none)
        self.decided = [(length + 1, (last == length).nonzero(as_tuple=True)[0].to(prompt_ids.device))
                        for length in last[last >= 0].unique().tolist()]

    def process(self, processors, scores: torch.Tensor, answer: torch.Tensor, columns=None) -> torch.Tensor:
        """Processed block scores [B, W, V] ([B, len(columns), V]: the scores of the block
        positions `columns` only); `answer` [B, N] holds the mask token where undecided."""
        if not processors:
            return scores
        out = scores.clone()
        if columns is not None:  # block position -> its index in `scores` (-1: not there)
            at = torch.full((self.width,), -1, dtype=torch.long, device=scores.device)
            at[columns] = torch.arange(len(columns), device=scores.device)
        for offset, rows, cols in self.groups:
            if columns is not None:
                cols = at[cols]
                rows, cols = rows[cols >= 0], cols[cols >= 0]
                if not len(rows):
                    continue
            ids = torch.cat([self.prompt_ids[rows], answer[rows, :offset]], dim=1)
            out[rows, cols] = processors(ids, scores[rows, cols])
        return out

    def stop_points(self, criteria, answer: torch.Tensor) -> torch.Tensor:
        """After the block is decided: per sample, the answer offset after which it stops ([B]
        long, -1 = it goes on). StopStringCriteria at the first offset of the block that
        completes a stop string; every other criterion at the end of the decided answer."""
        stop = torch.full((answer.shape[0],), -1, dtype=torch.long, device=answer.device)
        positional = StoppingCriteriaList([c for c in criteria if isinstance(c, StopStringCriteria)])
        at_end = StoppingCriteriaList([c for c in criteria if not isinstance(c, StopStringCriteria)])
        checks = []
        if positional:
            checks.append((positional, [(offset, rows) for offset, rows, _ in self.groups]))
        if at_end:
            checks.append((at_end, [(length - 1, rows) for length, rows in self.decided]))
        for check, points in checks:
            for offset, rows in points:
                ids = torch.cat([self.prompt_ids[rows], answer[rows, : offset + 1]], dim=1)
                hit = check(ids, None) & (stop[rows] < 0)
                stop[rows] = torch.where(hit, offset, stop[rows])
        return stop
