"""Block-parallel denoising `generate()` for masked-diffusion language models.

The answer starts as mask tokens and is decoded block by block; each block gets denoising
forwards, each of which commits some masked positions (the confident ones).

* Block-causal models follow the LLaDA2 / dMoE reference: blocks are aligned to absolute
  position 0, so decoding starts at block floor(P / block_length) and the first block may
  hold the prompt's tail. With the exact prefix cache only the current block runs at each
  step (`block_runners.py`); cached, uncached and static-shape runs give the same tokens.
* Bidirectional models use LLaDA's semi-autoregressive scheme: blocks start right after
  the prompt and every step re-runs the whole sequence, or (opt-in, approximate) reuses
  the prefix / prefix+suffix keys/values computed at each block's first step (Fast-dLLM).

Each step: the block's logits, Transformers' logits processors (`logits_processing.py`, on
the full vocabulary), a prediction (`denoising.predict`: the best non-mask token, with its
probability under the softmax over the full vocabulary as confidence, as LLaDA2's and
dMoE's generate compute it) and a decoding rule (`denoising.py`).
After each block: EOS and the stopping criteria. Settings follow Transformers' meaning
(`generation_config_diffusion.py`).

Before anything runs, `generate_checks.py` rejects bad input with a ValueError naming it
(malformed or empty prompts and masks, an answer past `max_position_embeddings`, a canvas
larger than the device's memory) and reads a padded batch without `attention_mask` as
Transformers does; a `cache` from another model is rejected by `PrefixCache.check_made_by`.

Batches are left-padded. For block-causal models every sample is re-padded on the left by
a multiple of `block_length`, so all samples' blocks share tensor indices while staying
aligned to their own position 0; a sample whose current block holds no masks idles.
Routing: expert choice and capacity-limited token choice select tokens within capacity
groups, which for block-causal models are the attention blocks, and capacity schedules
read each block's own mask ratio, so a block's routing never depends on what else a
forward holds: cached, uncached and batched runs give the same tokens for every router.
"""

from collections import deque
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers.utils import logging

from ..modeling.input_checks import check_token_ids
from ..modeling.transformers_compat import CacheOutput, accepts_past_key_values
from .block_runners import (
    DualCacheRunner,
    ExactCacheRunner,
    FullRunner,
    PrefixCacheRunner,
    StaticCacheRunner,
    UncachedRunner,
    new_static_cache,
    static_block_step,
)
from .denoising import MaskFilling, TokenEditing, only_mask_left, predict
from .levenshtein_editing import LevenshteinEditing
from .generate_checks import canvas_length, check_length, check_memory, check_prompts
from .generation_config_diffusion import DEFAULT_MAX_NEW_TOKENS, DiffusionGenerationConfig
from .logits_processing import BlockOffsets, build_logits_processors, build_stopping_criteria
from .prefix_cache import PrefixCache, model_signature

logger = logging.get_logger(__name__)
_LOADING_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


@dataclass
class DiffusionGenerateOutput(CacheOutput):
    """What `generate(..., return_dict_in_generate=True)` returns.

    sequences: [B, prompt_len + max_new_tokens], the prompt as given then the answer
        (pad after the first EOS, after a stop, and wherever decoding stopped early).
    history: with `output_history=True`, the sequences after every denoising step
        (undecided positions hold the mask token).
    num_forward_passes: denoising forwards (prefill and cache-extension forwards excluded).
    tokens_per_forward: [B] answer tokens (up to EOS / stop) per denoising forward the
        sample took part in (DiffusionGemma's statistic).
    edits: with editing (`editing_threshold`), [B] counts per row over the whole call:
        `substitutions` (a decided token replaced by another), and under LLaDA2.2's editing
        `deletions` and `insertions` (splits); None without editing. They count every slot
        decoded, including a last block's slots past `max_new_tokens`: blocks are decoded
        whole, and those slots are cut from `sequences`.
    router_stats: dMoE's routing metric over the denoising forwards:
        `unique_experts_per_layer` (distinct routed experts chosen by the current block's
        tokens, averaged over MoE layers, samples, then forwards), `unique_experts_per_forward`,
        `bytes_per_expert` and `expert_bytes_per_forward` (unique experts x bytes of one expert).
    cache: block-causal models with the dynamic exact cache: a `PrefixCache` of
        every sample's whole blocks up to its EOS / stop; pass it back with a prompt that
        extends the returned sequence and only the new tokens are prefilled.
    """

    sequences: torch.LongTensor | None = None
    history: tuple[torch.LongTensor, ...] | None = None
    num_forward_passes: int | None = None
    tokens_per_forward: torch.FloatTensor | None = None
    router_stats: dict | None = None
    edits: dict | None = None
    cache: PrefixCache | None = None


class DiffusionGenerationMixin:
    """Adds `generate()` (block-parallel denoising) to a masked-diffusion LM."""

    generation_config_class = DiffusionGenerationConfig

    def adjust_generation_fn(self, generation_config, from_auto_class, from_pipeline, pretrained_model_name_or_path,
                             *args, **kwargs):
        """Called by `from_pretrained`: load `generation_config.json` as a DiffusionGenerationConfig."""
        if generation_config is not None:
            self.generation_config = DiffusionGenerationConfig.from_dict(generation_config.to_dict())
        elif pretrained_model_name_or_path is not None:
            loading = {k: kwargs[k] for k in _LOADING_KWARGS if kwargs.get(k) is not None}
            try:
                self.generation_config = DiffusionGenerationConfig.from_pretrained(
                    pretrained_model_name_or_path, **loading
                )
            except OSError:  # no generation_config.json: keep the one built from the model config
                pass
            except ValueError as error:  # a bad file must not stop the weights from loading
                logger.warning(f"Ignoring generation_config.json of {pretrained_model_name_or_path}: {error}")

    def _diffusion_generation_config(self, generation_config, kwargs) -> tuple[DiffusionGenerationConfig, set]:
        """The call's config (kwargs > passed config > the model's) and the names the call set."""
        settings = self.generation_config.to_dict()
        user_set = set(kwargs)
        if generation_config is not None:  # as in Transformers: what it leaves at the defaults, the model's config sets
            user_set |= set(generation_config.to_diff_dict())
            settings.update(generation_config.to_diff_dict())
        if "max_length" in user_set and "max_new_tokens" not in user_set:
            settings["max_new_tokens"] = None  # the call's max_length wins over the model's default answer length
        config = DiffusionGenerationConfig.from_dict(settings)
        unknown = config.update(**kwargs)  # an explicit `eos_token_id=None` turns EOS stopping off
        if unknown:
            raise ValueError(f"generate() got arguments that are not generation settings: {sorted(unknown)}.")
        if config.mask_token_id is None:
            config.mask_token_id = self.config.mask_token_id
        if config.mask_token_id is None:
            raise ValueError(
                "generate() needs `mask_token_id`: set it in the model config, the generation config, "
                "or pass generate(..., mask_token_id=ID)."
            )
        return config, user_set

    @staticmethod
    def _answer_length(config, user_set: set, prompt_width: int) -> int:
        """Transformers' rule: `max_new_tokens` wins over `max_length` (which counts the prompt)."""
        if config.max_new_tokens is not None:
            if {"max_new_tokens", "max_length"} <= user_set and config.max_length is not None:
                logger.warning("Both `max_new_tokens` and `max_length` are set; `max_new_tokens` takes precedence.")
            return config.max_new_tokens
        if config.max_length is None:
            return DEFAULT_MAX_NEW_TOKENS
        if config.max_length <= prompt_width:
            raise ValueError(
                f"`max_length` ({config.max_length}) must exceed the prompt length ({prompt_width}); set "
                "`max_new_tokens` instead."
            )
        return config.max_length - prompt_width

    def _check_generate_inputs(self, input_ids, attention_mask, config, streamer, cache):
        """Raise ValueError for inputs generate() cannot handle (see `generate_checks.py`);
        returns (input_ids as int64, the boolean padding mask)."""
        input_ids, attention_mask = check_prompts(self, input_ids, attention_mask, config)
        check_token_ids(input_ids, self.config.vocab_size, where=attention_mask)
        if ((input_ids == config.mask_token_id) & attention_mask).any():
            raise ValueError(
                f"The prompt contains the mask token (mask_token_id={config.mask_token_id}); "
                "prompts must be clean text."
            )
        if self._levenshtein_editing(config):
            for name in ("delete_token_id", "split_token_id"):
                if ((input_ids == getattr(self.config, name)) & attention_mask).any():
                    raise ValueError(f"The prompt contains LLaDA2.2's edit token ({name}="
                                     f"{getattr(self.config, name)}); prompts must be clean text.")
        elif config.max_steps_per_block is not None:
            raise ValueError("`max_steps_per_block` bounds LLaDA2.2's Levenshtein editing: the model config sets no "
                             "`delete_token_id` / `split_token_id`.")
        if streamer is not None and input_ids.shape[0] * (config.num_return_sequences or 1) != 1:
            raise ValueError("Streaming (`streamer`) supports batch size 1 only, like Transformers' text streamers.")
        if (config.num_return_sequences or 1) > 1 and config.greedy:
            raise ValueError(
                f"`num_return_sequences={config.num_return_sequences}` needs sampling (do_sample=True and a "
                "temperature > 0): greedy decoding returns the same sequence every time."
            )
        block_causal = self.config.attention_layout == "block_causal"
        static = config.cache_implementation == "static"
        if not block_causal:
            for name, wrong in (("editing_threshold", config.editing_threshold is not None),
                                ("cache_implementation", config.cache_implementation is not None),
                                ("cache", cache is not None)):
                if wrong:
                    raise ValueError(f"`{name}` is for block-causal models (attention_layout='block_causal').")
        else:
            if config.approximate_cache is not None:
                raise ValueError(
                    "`approximate_cache` is for bidirectional models; block-causal models use the exact cache "
                    "(`use_cache=True`)."
                )
            if (static or cache is not None) and not config.use_cache:
                raise ValueError("`cache_implementation='static'` and `cache` need `use_cache=True`.")
            if static and cache is not None:
                raise ValueError("Pass either `cache` or `cache_implementation='static'`, not both.")
            if cache is not None and not isinstance(cache, PrefixCache):
                raise ValueError("`cache` must be the `PrefixCache` a previous generate() returned.")
            if cache is not None:
                cache.check_made_by(self)
            if config.use_cache and config.block_length % self.config.block_size != 0:
                raise ValueError(
                    f"With the exact cache, `block_length` ({config.block_length}) must be a multiple of the model's "
                    f"attention block_size ({self.config.block_size}) so finished blocks never change; "
                    "or pass use_cache=False."
                )
        return input_ids, attention_mask

    @torch.no_grad()
    @accepts_past_key_values
    def generate(self, input_ids, attention_mask=None, generation_config=None, logits_processor=None,
                 stopping_criteria=None, streamer=None, tokenizer=None, cache=None, show_progress=False,
                 **kwargs):
        """Block-parallel denoising. Keyword arguments override `generation_config` (see DiffusionGenerationConfig).

        input_ids / attention_mask: left-padded prompts [B, P] (integer ids; a mask of 0 and
            1). Returns [B, P + answer length] token ids, or a `DiffusionGenerateOutput` with
            `return_dict_in_generate=True`. Without `attention_mask`, positions holding
            `pad_token_id` are padding, as in Transformers' generate (unless the pad id is also
            an EOS or BOS id), and a warning says so once. Every row needs at least one prompt
            token: an empty prompt (P = 0, or a row of padding only) is a ValueError, because
            every position of its first block would see the same input and the positions
            committed first would be chosen by float rounding (batched, cached and single runs
            would disagree); for unconditional generation pass a start token ([[bos_token_id]]).
            The prompt plus the answer (rounded up to whole blocks for block-causal models)
            must fit `max_position_embeddings`, and the canvas, KV cache and logits must fit
            the device's memory (`generate_checks.py`): otherwise a ValueError names the length.
        logits_processor / stopping_criteria: Transformers' lists, applied as described in
            `logits_processing.py` (per answer position at every step; after every block).
        streamer: receives the prompt, then each finished block's new tokens, then `end()`;
            a streamer with `put_draft` (Transformers' `TextDiffusionStreamer`) also gets the
            current block's draft after every step.
        tokenizer: needed by `stop_strings`.
        cache: an earlier call's `PrefixCache` (block-causal models), reused when the
            prompt extends the sequence it was computed for (Transformers 5.24's name;
            `past_key_values=` is accepted as Transformers accepts it).
        show_progress: a tqdm bar over blocks.
        """
        config, user_set = self._diffusion_generation_config(generation_config, kwargs)
        input_ids, attention_mask = self._check_generate_inputs(input_ids, attention_mask, config, streamer, cache)
        N = self._answer_length(config, user_set, input_ids.shape[1])
        from_max_length = config.max_new_tokens is None and config.max_length is not None
        length_name = "max_length" if from_max_length else "max_new_tokens"
        check_length(self, attention_mask, config, N, length_name)
        rows = input_ids.shape[0] * (config.num_return_sequences or 1)
        width = canvas_length(self, attention_mask, config, N) if self.config.attention_layout == "block_causal" else (
            input_ids.shape[1] + N
        )
        check_memory(self, rows, width, config, length_name)
        if config.num_return_sequences and config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        block_causal = self.config.attention_layout == "block_causal"
        layout = _block_causal_layout if block_causal else _bidirectional_layout
        x, real, to_generate, pad, gen_start, blocks = layout(input_ids, attention_mask, config, N)
        processors = build_logits_processors(config, input_ids.shape[1], logits_processor, x.device)
        criteria = build_stopping_criteria(config, stopping_criteria, tokenizer)
        collect = bool(config.return_dict_in_generate)
        runner = self._block_runner(config, x, real, collect)
        static = isinstance(runner, StaticCacheRunner)
        returns_cache = collect and type(runner) is ExactCacheRunner
        signature = model_signature(self) if returns_cache else None
        if isinstance(runner, ExactCacheRunner):
            reused = None
            if cache is not None:
                cache.check_extended_by([ids[mask] for ids, mask in zip(input_ids, attention_mask)])
                reused = cache.reuse_for(pad, x.shape[1])
            runner.prefill(blocks[0][0], reused)

        B, mask_id = x.shape[0], config.mask_token_id
        gen_index = gen_start.unsqueeze(1) + torch.arange(N, device=x.device)  # [B, N] answer positions in x
        answer_offset = torch.arange(x.shape[1], device=x.device) - gen_start.unsqueeze(1)  # [B, T]
        eos_ids = torch.tensor(config.eos_token_ids, dtype=torch.long, device=x.device)
        pad_id = config.pad_token_id if config.pad_token_id is not None else (
            config.eos_token_ids[0] if config.eos_token_ids else mask_id
        )
        finished = torch.zeros(B, dtype=torch.bool, device=x.device)
        stop_after = torch.full((B,), N - 1, dtype=torch.long, device=x.device)  # last answer offset kept
        row_forwards = torch.zeros(B, dtype=torch.long, device=x.device)
        forwards = torch.zeros((), dtype=torch.long, device=x.device)
        history, routing = [], []
        if self._levenshtein_editing(config):
            rule = LevenshteinEditing(config, mask_id, self.config.delete_token_id, self.config.split_token_id)
        else:
            rule = (MaskFilling if config.editing_threshold is None else TokenEditing)(config, mask_id)
        drafts = streamer is not None and hasattr(streamer, "put_draft")

        if streamer is not None:
            streamer.put(input_ids.cpu())
        progress = tqdm(total=len(blocks), disable=not show_progress, desc="blocks")
        last_block = None
        for index, (s, e) in enumerate(blocks):
            if finished.all():
                break
            last_block = (s, e)
            offsets = torch.where(to_generate[:, s:e], answer_offset[:, s:e], -1)
            block_offsets = BlockOffsets(input_ids, offsets) if (processors or criteria) else None
            done = rule.start_block(x[:, s:e], to_generate[:, s:e] & ~finished.unsqueeze(1))
            pending = deque()
            for _ in range(rule.max_steps):
                done = done | rule.before_step(x[:, s:e])
                if _should_stop(done, pending, static):
                    break
                columns = None if static else _predicted_columns(rule.positions_to_predict(x[:, s:e]))
                logits, used = runner.block_logits(s, e, columns)
                scores, fallback = logits, None
                if processors:  # on the full vocabulary: confidences are the full softmax's (`predict`)
                    answer = x.gather(1, gen_index)
                    scores = block_offsets.process(processors, logits, answer, columns)
                    if only_mask_left(scores, mask_id).any():  # e.g. top_k=1 where the mask token is the top token
                        logits[..., mask_id] = float("-inf")
                        fallback = block_offsets.process(processors, logits, answer, columns)
                tokens, confidence = predict(scores, config.greedy, config.remasking, mask_id, fallback)
                if columns is not None:
                    tokens, confidence = _widen(tokens, confidence, x[:, s:e], columns)
                took_part = ~done
                block, done = rule.update(x[:, s:e], tokens, confidence, scores)
                x[:, s:e] = block
                row_forwards += took_part
                forwards += took_part.any()
                if used is not None:
                    routing.append((used.sum(-1), took_part))
                if config.output_history and collect:
                    history.append(torch.cat([input_ids, x.gather(1, gen_index)], dim=1))
                if drafts:
                    draft = torch.where(block == mask_id, tokens, block)[0][to_generate[0, s:e]]
                    streamer.put_draft(draft.unsqueeze(0).cpu())
                if config.eos_early_stop and len(eos_ids) and config.editing_threshold is None:
                    finished |= _eos_decided(x, to_generate, eos_ids, mask_id)
                    rule.editable = rule.editable & ~finished.unsqueeze(1)
                    done = done | finished
                if static:
                    pending.append(done.all())
            in_block = to_generate.clone()
            in_block[:, :s] = in_block[:, e:] = False
            if len(eos_ids):
                finished |= (torch.isin(x, eos_ids) & in_block).any(-1)
            if criteria:
                stops = block_offsets.stop_points(criteria, x.gather(1, gen_index))
                stop_after = torch.where(stops >= 0, torch.minimum(stop_after, stops), stop_after)
                finished |= stops >= 0
            if streamer is not None:
                answer = x.gather(1, gen_index)
                _stream_block(streamer, answer, gen_start, int(_answer_lengths(answer, eos_ids, mask_id, stop_after)[0]),
                              s, e)
            if (index + 1 < len(blocks) and not finished.all()) or returns_cache:
                runner.finish_block(s, e)
            progress.update(1)
        progress.close()
        if streamer is not None:
            streamer.end()

        answer = x.gather(1, gen_index)
        kept = _answer_lengths(answer, eos_ids, mask_id, stop_after)
        answer = answer.masked_fill(torch.arange(N, device=x.device) >= kept.unsqueeze(1), pad_id)
        sequences = torch.cat([input_ids, answer], dim=1)
        if not collect:
            return sequences
        prefix_cache = None
        if returns_cache:
            prefix_cache = runner.cache
            extent = last_block[1] if last_block is not None else blocks[0][0]
            prompt_lengths = attention_mask.sum(-1)
            bl = config.block_length
            cached = torch.minimum(prompt_lengths + kept, extent - pad).clamp(min=0) // bl * bl
            prefix_cache.record(x[:, :extent].clone(), pad, cached, signature)
        return DiffusionGenerateOutput(
            sequences=sequences,
            history=tuple(history) if config.output_history else None,
            num_forward_passes=int(forwards),
            tokens_per_forward=kept.float() / row_forwards.clamp(min=1).float(),
            router_stats=self._router_summary(routing),
            edits=_edit_counts(rule),
            cache=prefix_cache,
        )

    def _levenshtein_editing(self, config) -> bool:
        """LLaDA2.2's editing: editing asked for, on a model with its edit-operation ids."""
        return config.editing_threshold is not None and getattr(self.config, "delete_token_id", None) is not None

    def _block_runner(self, config, x, real, collect):
        if self.config.attention_layout == "bidirectional":
            runner = {None: FullRunner, "prefix": PrefixCacheRunner, "dual": DualCacheRunner}[config.approximate_cache]
            return runner(self, x, real, collect)
        if not config.use_cache:
            return UncachedRunner(self, x, real, collect)
        if config.cache_implementation == "static":
            return StaticCacheRunner(self, x, real, collect, self._static_block_step(config.disable_compile))
        return ExactCacheRunner(self, x, real, collect)

    def _static_block_step(self, disable_compile: bool):
        """The static-shape block forward, compiled once per model (`torch.compile(fullgraph=True)`)."""
        if disable_compile:
            return static_block_step
        if getattr(self, "_compiled_block_step", None) is None:
            self._compiled_block_step = torch.compile(static_block_step, fullgraph=True)
        return self._compiled_block_step

    def _static_generation_cache(self, batch_size: int, length: int):
        """A `StaticCache` for [batch_size, length], reused (reset) across calls of the same shape."""
        cache = getattr(self, "_static_cache", None)
        if cache is None or cache.layers[0].keys.shape[0] != batch_size or cache.get_max_length() != length:
            cache = self._static_cache = new_static_cache(self, batch_size, length)
        else:
            cache.reset()
        return cache

    def _router_summary(self, routing: list) -> dict | None:
        experts = next((m.mlp.experts for m in self.model.layers if getattr(m, "is_moe", False)), None)
        if experts is None or not routing:
            return None
        per_forward = []
        for unique, took_part in routing:  # [layers, B], [B]
            if took_part.any():
                per_forward.append(unique[:, took_part].float().mean().item())
        bytes_per_expert = sum(p[0].numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
        mean = sum(per_forward) / max(len(per_forward), 1)
        return {
            "unique_experts_per_layer": mean,
            "unique_experts_per_forward": per_forward,
            "bytes_per_expert": bytes_per_expert,
            "expert_bytes_per_forward": mean * bytes_per_expert,
        }


def _predicted_columns(positions: torch.Tensor | None) -> torch.Tensor | None:
    """The block positions some sample needs predicted, or None for all of them. Projecting
    only those onto the vocabulary (and only those through the processors and `predict`) is
    what a step at batch 1 saves: on average half of a block is still masked."""
    if positions is None:
        return None
    columns = positions.any(0).nonzero().squeeze(1)
    return None if len(columns) == positions.shape[1] else columns


def _widen(tokens, confidence, block, columns):
    """Predictions [B, K] at the block positions `columns` back to the block's [B, W]:
    elsewhere the block's own token, with confidence -inf (nothing there to commit)."""
    widened = confidence.new_full(block.shape, float("-inf")).index_copy(1, columns, confidence)
    return block.index_copy(1, columns, tokens), widened


def _should_stop(done: torch.Tensor, pending: deque, static: bool) -> bool:
    """Is every sample's block done? Eager runs read the flag every step. Static-shape runs
    read it two steps late, so the device never waits on the host; the extra steps find
    nothing to commit and change nothing."""
    if not static:
        return bool(done.all())
    return len(pending) >= 2 and bool(pending.popleft())


def _edit_counts(rule) -> dict | None:
    edits = getattr(rule, "edits", None)
    if edits is None:
        return None
    if edits.dim() == 1:  # LLaDA2.1's editing substitutes only
        return {"substitutions": edits}
    return dict(zip(("substitutions", "deletions", "insertions"), edits.unbind(-1)))


def _block_causal_layout(input_ids, attention_mask, config, N):
    """Re-pad each prompt on the left so that its length plus padding is a multiple of block_length.

    Sample b (P_b real tokens) occupies the last T_b = ceil((P_b + N) / bl) * bl slots of a
    [B, T] tensor, T = max T_b; its blocks then share tensor indices with every other sample's.
    Decoding starts at the first block holding a mask of any sample.
    """
    bl = config.block_length
    B, device = input_ids.shape[0], input_ids.device
    P = attention_mask.sum(-1)
    T_b = torch.div(P + N + bl - 1, bl, rounding_mode="floor") * bl
    T = int(T_b.max())
    pad = T - T_b
    idx = torch.arange(T, device=device).expand(B, T)
    real = idx >= pad.unsqueeze(1)
    prompt = real & (idx < (pad + P).unsqueeze(1))
    fill = config.pad_token_id if config.pad_token_id is not None else 0
    x = torch.full((B, T), fill, dtype=input_ids.dtype, device=device)
    x[prompt] = input_ids[attention_mask]
    to_generate = real & ~prompt
    x[to_generate] = config.mask_token_id
    first = int(((pad + torch.div(P, bl, rounding_mode="floor") * bl) // bl).min())
    blocks = [(j * bl, (j + 1) * bl) for j in range(first, T // bl)]
    return x, real, to_generate, pad, pad + P, blocks


def _bidirectional_layout(input_ids, attention_mask, config, N):
    """LLaDA: the answer's N masks follow the (left-padded) prompt; blocks start right after it."""
    bl = config.block_length
    B, P = input_ids.shape
    masks = torch.full((B, N), config.mask_token_id, dtype=input_ids.dtype, device=input_ids.device)
    x = torch.cat([input_ids, masks], dim=1)
    real = torch.cat([attention_mask, torch.ones_like(masks, dtype=torch.bool)], dim=1)
    to_generate = torch.zeros_like(real)
    to_generate[:, P:] = True
    blocks = [(s, min(s + bl, P + N)) for s in range(P, P + N, bl)]
    zeros = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    return x, real, to_generate, zeros, torch.full((B,), P, device=input_ids.device), blocks


def _eos_decided(x, to_generate, eos_ids, mask_id) -> torch.Tensor:
    """[B] True where an EOS was committed and every answer position before it is decided."""
    undecided = (x == mask_id) & to_generate
    is_eos = torch.isin(x, eos_ids) & to_generate
    first = is_eos.long().argmax(-1, keepdim=True)
    before = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < first
    return is_eos.any(-1) & ~(undecided & before).any(-1)


def _answer_lengths(answer, eos_ids, mask_id, stop_after) -> torch.Tensor:
    """[B] answer tokens kept: up to the first undecided position, the first EOS (included)
    or the stop point (included), whichever comes first."""
    N = answer.shape[1]
    length = torch.minimum(stop_after + 1, torch.full_like(stop_after, N))
    undecided = answer == mask_id
    length = torch.where(undecided.any(-1), torch.minimum(length, undecided.long().argmax(-1)), length)
    if len(eos_ids):
        is_eos = torch.isin(answer, eos_ids)
        length = torch.where(is_eos.any(-1), torch.minimum(length, is_eos.long().argmax(-1) + 1), length)
    return length


def _stream_block(streamer, answer, gen_start, kept, s, e):
    """Send sample 0's answer tokens of block [s, e) that are kept (up to its EOS or stop point)."""
    g0 = int(gen_start[0])
    a, b = max(s - g0, 0), min(e - g0, kept)
    if a < b:
        streamer.put(answer[0, a:b].unsqueeze(0).cpu())


__all__ = ["DiffusionGenerationMixin", "DiffusionGenerateOutput"]
