"""How the model runs for the current block: one class per way of reusing work.

Every runner's `block_logits(s, e, columns)` returns the logits [B, e - s, V] of canvas
positions [s, e) (only at the block positions `columns` when given: [B, len(columns), V]) and,
when asked for routing statistics, which routed experts each MoE layer used for each sample's
block tokens ([layers, B, E] bool, from all of the block's tokens). `prefill(end)` and `finish_block(s, e)`
are the cache bookkeeping around it. The model is called through its `forward` with
`logits_to_keep`, so only the block's logits are projected onto the vocabulary.

* `UncachedRunner` (block-causal, `use_cache=False`): prefix + block every step.
* `ExactCacheRunner` (block-causal): prefill the prompt's whole blocks once, run only the
  block each step (then crop the cache back), append each finished block once. Block-causal
  attention never lets a finished block see later ones, so this equals `UncachedRunner`.
* `StaticCacheRunner` (block-causal, `cache_implementation="static"`): the same with fixed
  shapes, for `torch.compile`: a `StaticCache` read at full length with later slots masked,
  the mask built once per block, routing with static sizes, no host sync in a step.
* `FullRunner` (bidirectional): the whole sequence every step (LLaDA).
* `PrefixCacheRunner` / `DualCacheRunner` (bidirectional, opt-in, approximate, Fast-dLLM):
  reuse the prefix (and suffix) keys/values computed at each block's first step.
"""

import torch
from transformers.cache_utils import DynamicCache, StaticCache

from ..modeling.attention_masks import build_attention_mask, positions_from_padding
from ..modeling.transformers_compat import install_output_recorders, rewind_static_cache
from .prefix_cache import prefix_buffer_cache


class BlockRunner:
    block_start = None  # the approximate caches' current block

    def __init__(self, model, x: torch.Tensor, real: torch.Tensor, collect_stats: bool):
        self.model, self.x, self.real, self.collect = model, x, real, collect_stats
        self.no_padding = bool(real.all())

    def prefill(self, end: int):
        pass

    def finish_block(self, s: int, e: int):
        pass

    def block_logits(self, s: int, e: int, columns: torch.Tensor | None = None):
        raise NotImplementedError

    def _mask(self, end=None):
        """The padding mask of canvas [0, end), or None when nothing is padded (SDPA's fast path)."""
        return None if self.no_padding else self.real[:, :end]

    def _forward(self, ids, mask, keep: slice, past=None, position_ids=None, stats=True, columns=None):
        """`keep`: the block's positions in `ids`; `columns` narrows the logits to those block positions."""
        logits_at = keep if columns is None else torch.arange(ids.shape[1], device=ids.device)[keep][columns]
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=position_ids, cache=past,
            use_cache=past is not None, logits_to_keep=logits_at, output_router_stats=self.collect and stats,
        )
        used = None
        if self.collect and stats and out.router_stats:
            used = torch.stack([layer.expert_mask[:, keep].any(1) for layer in out.router_stats])
        return out.logits, used


class UncachedRunner(BlockRunner):
    def block_logits(self, s, e, columns=None):
        return self._forward(self.x[:, :e], self._mask(e), slice(s, e), columns=columns)


class FullRunner(BlockRunner):
    def block_logits(self, s, e, columns=None):
        return self._forward(self.x, self._mask(), slice(s, e), columns=columns)


class ExactCacheRunner(BlockRunner):
    cache = None

    def prefill(self, end: int, reused=None):
        """Keys/values of canvas [0, end) (the prompt's whole blocks); `reused` = (cache, c0)
        holds [0, c0) already (an earlier turn's), so only [c0, end) runs."""
        self.cache, start = reused or (prefix_buffer_cache(self.model.config.num_hidden_layers, self.x.shape[1]), 0)
        if end > start:
            self._forward(self.x[:, start:end], self.real[:, :end], slice(0, 0), past=self.cache, stats=False)

    def block_logits(self, s, e, columns=None):
        result = self._forward(self.x[:, s:e], self._mask(e), slice(None), past=self.cache, columns=columns)
        self.cache.crop(s - self.cache.get_seq_length())  # crop takes minus the tokens to remove
        return result

    def finish_block(self, s, e):
        """Append the finished block's final keys/values."""
        self._forward(self.x[:, s:e], self._mask(e), slice(0, 0), past=self.cache, stats=False)


class StaticCacheRunner(ExactCacheRunner):
    """The exact cache with fixed shapes. `step` is the (compiled) forward of one block."""

    def __init__(self, model, x, real, collect_stats, step):
        super().__init__(model, x, real, collect_stats)
        self.step = step
        install_output_recorders(model.base_model)  # before the compiled step is traced (router statistics)
        self.positions = positions_from_padding(real)
        self.cache = model._static_generation_cache(x.shape[0], x.shape[1])
        self.length = 0  # where the cache's next update writes (tracked here: reading it would sync)
        self.block_mask = None

    def prefill(self, end: int, reused=None):
        if reused is not None:
            raise ValueError("`cache` cannot be reused with cache_implementation='static'.")
        if end > 0:  # eager: prefill has its own shapes
            static_block_step(self.model, self.cache, self.x[:, :end], self.positions[:, :end], self._block_mask(0, end),
                              self.real[:, :end], False)
        self.length = end

    def block_logits(self, s, e, columns=None):
        if self.block_mask is None or self.block_mask[0] != (s, e):
            self.block_mask = ((s, e), self._block_mask(s, e))  # once per block
        self._rewind(s)
        logits, used = self.step(self.model, self.cache, self.x[:, s:e], self.positions[:, s:e], self.block_mask[1],
                                 self.real[:, s:e], self.collect)
        self.length = e
        # a compiled graph may reuse its output buffers; its shapes are fixed, so narrowing comes after
        return (logits.clone() if columns is None else logits[:, columns]), used

    def finish_block(self, s, e):
        self._rewind(s)
        self.step(self.model, self.cache, self.x[:, s:e], self.positions[:, s:e], self._block_mask(s, e),
                  self.real[:, s:e], False)
        self.length = e

    def _rewind(self, length: int):
        """The next update writes from `length` on: a step overwrites its block's slots."""
        rewind_static_cache(self.cache, length, self.length)
        self.length = length

    def _block_mask(self, s, e) -> torch.Tensor:
        """[B, 1, e - s, T] bool, the block-causal mask of queries [s, e) over the whole buffer:
        later slots (stale or empty) are hidden like any later block."""
        config = self.model.config
        return build_attention_mask(self.real, self.positions[:, s:e], self.positions, config.attention_layout,
                                    config.block_size)


def static_block_step(model, cache, ids, positions, mask, padding, collect):
    """One forward of whole aligned blocks on a `StaticCache`: the function torch.compile sees."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                padding_mask=padding, static_routing=True, output_router_stats=collect, logits_to_keep=0)
    used = torch.stack([layer.expert_mask.any(1) for layer in out.router_stats]) if collect else None
    return out.logits, used


def new_static_cache(model, batch_size: int, length: int) -> StaticCache:
    config = model.config
    cache = StaticCache(config=config, max_cache_len=length)
    dtype, device = model.dtype, model.device
    cache.early_initialization(batch_size, config.num_key_value_heads, config.head_dim, dtype, device)
    return cache


class PrefixCacheRunner(BlockRunner):
    """Fast-dLLM prefix cache: at a block's first step a full forward also records the prefix's
    keys/values; later steps run the block and everything after it on that stale prefix."""

    def block_logits(self, s, e, columns=None):
        if self.block_start != s:  # the block's first step
            self.block_start, self.cache = s, DynamicCache(config=self.model.config)
            result = self._forward(self.x, self._mask(), slice(s, e), past=self.cache, columns=columns)
            self.cache.crop(s - self.cache.get_seq_length())
            return result
        result = self._forward(self.x[:, s:], self._mask(), slice(0, e - s), past=self.cache, columns=columns)
        self.cache.crop(s - self.cache.get_seq_length())
        return result


class DualCacheRunner(BlockRunner):
    """Fast-dLLM dual cache: the block's first step records prefix and suffix keys/values;
    later steps run only the block on them. Bidirectional attention ignores key order, so the
    cache holds [prefix, suffix] and the block's positions are passed explicitly."""

    def block_logits(self, s, e, columns=None):
        x, real = self.x, self.real
        if self.block_start != s:  # the block's first step
            self.block_start, full = s, DynamicCache(config=self.model.config)
            result = self._forward(x, self._mask(), slice(s, e), past=full, columns=columns)
            self.cache = DynamicCache(config=self.model.config)
            for i, layer in enumerate(full.layers):
                keep = [layer.keys[..., :s, :], layer.keys[..., e:, :]], [layer.values[..., :s, :], layer.values[..., e:, :]]
                self.cache.update(torch.cat(keep[0], dim=-2), torch.cat(keep[1], dim=-2), i)
            return result
        past_length = self.cache.get_seq_length()
        mask = torch.cat([real[:, :s], real[:, e:], real[:, s:e]], dim=1)
        positions = positions_from_padding(real)[:, s:e]
        result = self._forward(x[:, s:e], mask, slice(None), past=self.cache, position_ids=positions, columns=columns)
        self.cache.crop(past_length - self.cache.get_seq_length())
        return result
