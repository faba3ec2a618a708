"""Settings of block-parallel denoising, saved as `generation_config.json`.

A `transformers.GenerationConfig` subclass, so `model.generation_config`, `save_pretrained`
and keyword overrides in `generate(**kwargs)` work as for any Transformers model, with
Transformers' meaning: `do_sample=False` is greedy whatever the temperature (Transformers
warns when sampling settings are set without sampling), `max_new_tokens` wins over
`max_length`, logits processors and stopping criteria come from the usual fields.
Every other `GenerationConfig` field is rejected with a `ValueError` naming it when it is
set: block-parallel denoising has no beams, assistants or watermarks, and accepting them
silently would be a wrong answer. Checks run in `validate()`, which Transformers calls on
construction and on every `update()`, so a bad value fails before any compute.
"""

from transformers import GenerationConfig

REMASKING_STRATEGIES = ("low_confidence", "random", "margin", "entropy")
APPROXIMATE_CACHES = (None, "prefix", "dual")
CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
DEFAULT_MAX_NEW_TOKENS = 128

# defaults of the diffusion fields
_DIFFUSION_DEFAULTS = {
    "block_length": 32,
    "steps": 32,
    "remasking": "low_confidence",
    "threshold": None,
    "editing_threshold": None,
    "max_post_steps": 0,
    "max_steps_per_block": None,
    "eos_early_stop": False,
    "mask_token_id": None,
    "output_history": False,
    "approximate_cache": None,
}

# the GenerationConfig fields generate() honours; any other one must stay unset
SUPPORTED_FIELDS = frozenset({
    "max_length", "max_new_tokens", "min_length", "min_new_tokens", "max_time", "stop_strings",
    "do_sample", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff",
    "repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "renormalize_logits", "remove_invalid_values", "num_return_sequences",
    "use_cache", "cache_implementation", "disable_compile", "return_dict_in_generate",
    "pad_token_id", "bos_token_id", "eos_token_id", "transformers_version", *_DIFFUSION_DEFAULTS,
})

# Values of fields generate() does not support that do nothing, so they may appear in a
# generation_config.json (they are Transformers' defaults for these fields; None and False,
# the defaults of the others, are accepted too).
NO_OP_VALUES = {
    "early_stopping": False, "num_beams": 1, "num_beam_groups": 1, "length_penalty": 1.0, "diversity_penalty": 0.0,
    "encoder_no_repeat_ngram_size": 0, "encoder_repetition_penalty": 1.0, "output_scores": False,
    "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant", "assistant_confidence_threshold": 0.4,
    "assistant_lookbehind": 10, "target_lookbehind": 10,
}


class DiffusionGenerationConfig(GenerationConfig):
    r"""Generation config of [`DiffusionMoeForMaskedLM`].

    Args:
        max_new_tokens / max_length: answer length, as in Transformers (`max_new_tokens` wins;
            `max_length` counts the prompt); neither set: 128 new tokens.
        block_length: tokens decoded together; block-causal models decode blocks aligned to
            position 0, so with the exact cache `block_length` must be a multiple of the
            model's attention `block_size` (and of `block_router_size` for block routing).
        steps: denoising steps per block, at most `block_length`. Step j commits
            floor(block_length / steps) tokens, plus one for the first block_length % steps steps.
        do_sample / temperature / top_k / top_p / min_p / typical_p / epsilon_cutoff /
            eta_cutoff: Transformers' sampling. `do_sample=False` (the default) is greedy;
            `temperature=0` is greedy too (LLaDA's convention), even with `do_sample=True`.
        repetition_penalty, no_repeat_ngram_size, bad_words_ids, suppress_tokens,
            begin_suppress_tokens, sequence_bias, min_length, min_new_tokens, remove_invalid_values,
            renormalize_logits: Transformers' logits processors, applied at every denoising step
            (see `generate`).
        stop_strings / max_time: stopping criteria, checked after every block.
        num_return_sequences: samples per prompt (needs sampling).
        remasking: how committed positions are chosen among the still-masked ones, by score:
            `"low_confidence"` (probability of the predicted token), `"margin"` (top-1 minus
            top-2 probability), `"entropy"` (exp(-entropy), in (0, 1]) or `"random"` (uniform).
        threshold: None = commit exactly the step's quota. Otherwise commit every masked
            position whose score exceeds it when at least the quota do, else the quota best.
        editing_threshold / max_post_steps: LLaDA2.1's token editing (block-causal models);
            None = off. Every step also replaces a decided answer token of the current block
            whose prediction differs with probability above `editing_threshold`; a block ends
            after a mask-free step without edits, or after `max_post_steps` mask-free steps.
            Each step fills at least floor(block_length / steps) masks (LLaDA2.1's
            `num_to_transfer`; steps = block_length gives its 1), and `threshold` (None =
            never) fills all masks above it. LLaDA2.1's model card recommends threshold 0.7
            / editing 0.5 ("quality") or 0.5 / 0.0 ("speed"), max_post_steps 16.
            On a model whose config sets LLaDA2.2's `delete_token_id` / `split_token_id`, the
            same settings run LLaDA2.2's Levenshtein editing (levenshtein_editing.py): an
            edit may also delete a position or split it in two, the block keeping its length;
            `max_steps_per_block` (None = 1000) bounds its steps per block. LLaDA2.2's
            defaults: threshold 0.5, editing 0.0, max_post_steps 16, block 32, steps 32.
        eos_early_stop: stop a sequence as soon as it has committed an EOS with everything
            before it decided (by default it stops after the block in which EOS appeared).
            With editing an EOS may still be edited away, so a sequence stops after the
            block holding it either way (LLaDA2.1 checks it after the block, too).
        mask_token_id: id of the mask token (defaults to the model config's).
        use_cache: block-causal models: the exact prefix KV cache (same output as without).
        cache_implementation: None / "dynamic" (the exact cache's growing prefix buffer) or
            "static": fixed shapes for every denoising step, compiled with `torch.compile`
            unless `disable_compile=True` (block-causal models with the cache).
        approximate_cache: bidirectional models only, opt-in Fast-dLLM caches that change
            the output: `"prefix"` (reuse the prefix keys/values computed at the start of
            each block) or `"dual"` (also reuse the suffix's); None = re-run everything.
        output_history: with `return_dict_in_generate`, return the sequences after every step.
    """

    def __init__(self, **kwargs):
        for name, default in _DIFFUSION_DEFAULTS.items():
            setattr(self, name, kwargs.pop(name, default))
        for name, default in (("use_cache", True), ("return_dict_in_generate", False), ("do_sample", False)):
            if kwargs.get(name) is None:  # unset in a plain GenerationConfig's dict
                kwargs[name] = default
        super().__init__(**kwargs)

    @classmethod
    def from_model_config(cls, model_config) -> "DiffusionGenerationConfig":
        """Defaults for a model: its mask / EOS / pad / BOS ids; block-causal models decode blocks of `block_size`."""
        get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
        kwargs = {name: get(name) for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")}
        if get("attention_layout") == "block_causal" and get("block_size"):
            kwargs["block_length"] = kwargs["steps"] = get("block_size")
        return cls(**kwargs)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def validate(self, strict=False, user_set_attributes=None):
        """Reject unsupported or bad settings with a ValueError naming the field, then run the base checks."""
        unsupported = sorted(name for name in self.unsupported_fields())
        if unsupported:
            raise ValueError(
                f"DiffusionGenerationConfig: {unsupported} are not supported by block-parallel denoising (set "
                f"only: {sorted(SUPPORTED_FIELDS)})."
            )
        for name in ("block_length", "steps"):
            _require(_positive_int(getattr(self, name)), name, "a positive integer", self)
        for name in ("max_new_tokens", "max_length"):
            _require(getattr(self, name) is None or _positive_int(getattr(self, name)), name,
                     "None or a positive integer", self)
        _require(
            self.steps <= self.block_length, "steps",
            f"at most block_length ({self.block_length}): each step commits at least one token", self,
        )
        _require(self.temperature is None or (_number(self.temperature) and self.temperature >= 0), "temperature",
                 "None or a number >= 0 (0 = greedy)", self)
        _require(self.top_k is None or _positive_int(self.top_k), "top_k", "None or a positive integer", self)
        _require(
            self.top_p is None or (_number(self.top_p) and 0 < self.top_p <= 1), "top_p", "None or in (0, 1]", self
        )
        _require(self.min_p is None or (_number(self.min_p) and 0 <= self.min_p <= 1), "min_p", "None or in [0, 1]",
                 self)
        _require(
            self.num_return_sequences is None or _positive_int(self.num_return_sequences), "num_return_sequences",
            "a positive integer", self,
        )
        _require(
            self.threshold is None or (_number(self.threshold) and 0 < self.threshold <= 1), "threshold",
            "None (off) or a number in (0, 1]", self,
        )
        _require(
            self.editing_threshold is None or (_number(self.editing_threshold) and self.editing_threshold >= 0),
            "editing_threshold", "None (no editing) or a number >= 0", self,
        )
        _require(isinstance(self.max_post_steps, int) and self.max_post_steps >= 0, "max_post_steps",
                 "an integer >= 0", self)
        _require(self.max_steps_per_block is None or _positive_int(self.max_steps_per_block), "max_steps_per_block",
                 "None (LLaDA2.2's 1000) or a positive integer", self)
        _require(self.max_steps_per_block is None or self.editing_threshold is not None, "max_steps_per_block",
                 "None unless `editing_threshold` is set (it bounds LLaDA2.2's editing)", self)
        _require(self.max_post_steps == 0 or self.editing_threshold is not None, "max_post_steps",
                 "0 unless `editing_threshold` is set (post steps only edit)", self)
        _require(self.remasking in REMASKING_STRATEGIES, "remasking", f"one of {REMASKING_STRATEGIES}", self)
        _require(self.editing_threshold is None or self.remasking == "low_confidence", "remasking",
                 "'low_confidence' with `editing_threshold` (edits compare the new token's probability)", self)
        _require(
            self.approximate_cache in APPROXIMATE_CACHES, "approximate_cache", f"one of {APPROXIMATE_CACHES}", self
        )
        _require(self.cache_implementation in CACHE_IMPLEMENTATIONS, "cache_implementation",
                 f"one of {CACHE_IMPLEMENTATIONS}", self)
        _require(
            self.mask_token_id is None or (isinstance(self.mask_token_id, int) and self.mask_token_id >= 0),
            "mask_token_id", "None or a token id >= 0", self,
        )
        if self.temperature != 0:
            return super().validate(strict=strict, user_set_attributes=user_set_attributes)
        # temperature 0 is greedy (LLaDA's convention), a setting generate() honours: Transformers'
        # base checks would report it as an ignored sampling flag, so they do not see it
        temperature, self.temperature = self.temperature, None
        try:
            super().validate(strict=strict, user_set_attributes=user_set_attributes)
        finally:
            self.temperature = temperature

    def unsupported_fields(self):
        """Fields generate() does not honour that are set to something that would do something."""
        for name, value in vars(self).items():
            if name.startswith("_") or name in SUPPORTED_FIELDS:
                continue
            if value is not None and value is not False and value != NO_OP_VALUES.get(name):
                yield name

    @property
    def eos_token_ids(self) -> list[int]:
        """`eos_token_id` as a list (Transformers allows an int or a list)."""
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _require(ok, name, allowed, config):
    if not ok:
        raise ValueError(f"DiffusionGenerationConfig: `{name}` must be {allowed}; got {getattr(config, name)!r}.")


def _positive_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


__all__ = ["DiffusionGenerationConfig", "REMASKING_STRATEGIES", "APPROXIMATE_CACHES"]
