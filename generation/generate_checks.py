"""What `generate()` checks before it computes anything: bad input is an error naming it.

* Prompts: `input_ids` a 2-D integer tensor with at least one row and one column;
  `attention_mask` (when given) a tensor of its shape holding only 0 and 1, left padding
  only, at least one real token per row. Without `attention_mask`, padding is inferred as
  Transformers' generate infers it (`input_ids != pad_token_id`, unless the pad id is also
  an EOS or BOS id), with a one-time warning.
* Empty prompts are an error. With nothing before it, every position of the first block
  holds the mask token and sees the same keys and values, so the model's outputs there are
  equal up to float rounding: which positions commit first (and, for expert choice, which
  of the identical tokens each expert takes) would be decided by rounding, which differs
  between a batched, a cached and a single run. Unconditional generation starts from a
  start token (`[[bos_token_id]]`), as in Transformers.
* Length: the canvas (prompt + answer, rounded up to whole blocks for block-causal models)
  must fit the model's `max_position_embeddings`: later positions were never trained.
* Memory: what generate() allocates up front must fit the device (see `canvas_bytes`).
"""

import os

import torch
from transformers.utils import logging

from ..modeling.input_checks import check_padding_mask

logger = logging.get_logger(__name__)

_GIB = 2**30


def check_prompts(model, input_ids, attention_mask, config) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids as int64, the boolean padding mask), or a ValueError naming what is wrong."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"`input_ids` must be a 2-D LongTensor [batch, prompt_length]; got {got}.")
    if input_ids.dtype == torch.bool or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex:
        raise ValueError(f"`input_ids` must hold integer token ids; got dtype {input_ids.dtype}.")
    if input_ids.shape[0] == 0:
        raise ValueError("`input_ids` has no rows (batch size 0).")
    if input_ids.shape[1] == 0:
        raise ValueError(
            f"`input_ids` has no tokens (shape {tuple(input_ids.shape)}): generate() needs at least one prompt "
            f"token per row. {_EMPTY_PROMPT}"
        )
    input_ids = input_ids.long()  # the canvas holds the mask id, which a narrower dtype may not
    inferred = attention_mask is None
    if inferred:
        attention_mask = _infer_padding(model, input_ids, config)
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(
                f"`attention_mask` must be a tensor like `input_ids`; got {type(attention_mask).__name__}."
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"`attention_mask` must have the shape of `input_ids` {tuple(input_ids.shape)}; got "
                f"{tuple(attention_mask.shape)}."
            )
        check_padding_mask(attention_mask)
        attention_mask = attention_mask.bool()
    late = ~attention_mask[:, 1:] & attention_mask[:, :-1]  # padding after a real token
    if late.any():
        row = int(late.any(-1).nonzero()[0])
        if inferred:
            raise ValueError(
                f"Row {row} of `input_ids` holds pad_token_id={config.pad_token_id} after a real token and no "
                "`attention_mask` was passed: generate() cannot tell padding from text. Pass `attention_mask`."
            )
        raise ValueError(
            "generate() needs left-padded prompts (padding before the prompt, as with "
            f"tokenizer.padding_side = 'left'); `attention_mask` row {row} has padding after a real token."
        )
    empty = ~attention_mask.any(-1)
    if empty.any():
        row = int(empty.nonzero()[0])
        what = (f"row {row} of `input_ids` is all pad_token_id={config.pad_token_id}" if inferred
                else f"row {row} of `attention_mask` is all 0")
        raise ValueError(
            f"An empty prompt: {what}. generate() needs at least one prompt token per row. {_EMPTY_PROMPT}"
        )
    return input_ids, attention_mask


_EMPTY_PROMPT = (
    "With nothing before it, every position of the first block sees the same input, so which positions are "
    "decided first would depend on float rounding (batched, cached and single runs would disagree). For "
    "unconditional generation pass a start token, e.g. [[bos_token_id]], as Transformers' generate starts from it."
)


def _infer_padding(model, input_ids, config) -> torch.Tensor:
    """Transformers' generate without `attention_mask`: positions holding `pad_token_id` are
    padding, unless the pad id is also an EOS (or BOS) id, when nothing can be told apart.
    Either way it warns once, since a padded batch without its mask is a likely mistake."""
    pad = config.pad_token_id
    ones = torch.ones_like(input_ids, dtype=torch.bool)
    if pad is None or not bool((input_ids == pad).any()):
        return ones
    bos = config.bos_token_id if config.bos_token_id is not None else model.config.bos_token_id
    if pad in config.eos_token_ids or pad == bos:
        logger.warning_once(
            f"generate(): `input_ids` contains pad_token_id={pad} and no `attention_mask` was passed. The pad id is "
            "also the EOS or BOS id, so padding cannot be told from text and every token is read as prompt text; "
            "pass the tokenizer's `attention_mask` for a padded batch."
        )
        return ones
    logger.warning_once(
        f"generate(): `input_ids` contains pad_token_id={pad} and no `attention_mask` was passed; those positions "
        "are treated as left padding (as Transformers' generate does). Pass the tokenizer's `attention_mask` to "
        "be explicit."
    )
    return input_ids != pad


def canvas_length(model, attention_mask, config, answer_length) -> int:
    """Positions of the longest row: prompt + answer, rounded up to whole blocks for block-causal models."""
    longest = int(attention_mask.sum(-1).max())
    if model.config.attention_layout == "block_causal":
        bl = config.block_length
        return -(-(longest + answer_length) // bl) * bl
    return longest + answer_length


def check_length(model, attention_mask, config, answer_length, length_name: str):
    """ValueError when the canvas needs positions beyond `max_position_embeddings`."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is None:
        return
    needed = canvas_length(model, attention_mask, config, answer_length)
    if needed <= limit:
        return
    longest = int(attention_mask.sum(-1).max())
    block_causal = model.config.attention_layout == "block_causal"
    fit = (limit // config.block_length * config.block_length if block_causal else limit) - longest
    value = config.max_new_tokens if length_name == "max_new_tokens" else config.max_length
    rounded = f", rounded up to whole blocks of block_length={config.block_length}," if block_causal else ""
    advice = (f"at most {fit} new tokens fit after this prompt" if fit > 0
              else "the prompt alone leaves no room for an answer")
    raise ValueError(
        f"`{length_name}`={value} is too long: the longest prompt ({longest} tokens) plus {answer_length} new "
        f"tokens{rounded} needs {needed} positions, beyond the model's max_position_embeddings={limit} "
        f"(positions it never saw in training); {advice}. (If you know the model extrapolates, raise "
        "`model.config.max_position_embeddings`.)"
    )


def canvas_bytes(model, batch_size: int, length: int, config) -> dict:
    """Bytes generate() allocates up front for `batch_size` rows of `length` positions:
    * canvas: the [B, T] int64 / bool bookkeeping tensors (about 32 bytes a position), plus
      with `output_history` the history, a [B, T] int64 tensor per denoising step (at most
      `steps` per block, or block_length + max_post_steps with editing);
    * kv_cache: layers x 2 x B x kv_heads x T x head_dim x dtype bytes (one layer's worth
      for runs that keep no cache: the keys/values of a full-length forward);
    * logits: a block's [B, block_length, vocab] fp32 logits and probabilities.
    The model's other activations come on top, so this is a lower bound."""
    c = model.config
    cached = (c.attention_layout == "block_causal" and config.use_cache) or config.approximate_cache is not None
    layers = c.num_hidden_layers if cached else 1
    itemsize = model.dtype.itemsize
    canvas = batch_size * length * 32
    if config.output_history and config.return_dict_in_generate:
        per_block = config.steps if config.editing_threshold is None else config.block_length + config.max_post_steps
        canvas += (length // config.block_length + 1) * per_block * batch_size * length * 8
    kv = layers * 2 * batch_size * c.num_key_value_heads * length * c.head_dim * itemsize
    logits = batch_size * config.block_length * c.vocab_size * 4 * 2
    return {"canvas": canvas, "kv_cache": kv, "logits": logits, "kv_layers": layers}


def available_bytes(device: torch.device) -> int | None:
    """Memory a generate() call may use on `device`: the physical RAM (or the cgroup limit, when
    lower) on CPU; free plus reserved-but-unused memory on CUDA; None (no check) elsewhere."""
    if device.type == "cpu":
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
        for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
            try:
                with open(path) as f:
                    limit = f.read().strip()
            except OSError:
                continue
            if limit.isdigit():
                total = min(total, int(limit))
        return total
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return None


def check_memory(model, batch_size: int, length: int, config, length_name: str):
    """ValueError, before anything is allocated, when `canvas_bytes` exceeds `available_bytes`."""
    available = available_bytes(model.device)
    if available is None:
        return
    need = canvas_bytes(model, batch_size, length, config)
    total = need["canvas"] + need["kv_cache"] + need["logits"]
    if total <= available:
        return
    c = model.config
    raise ValueError(
        f"generate() would need at least {total / _GIB:.1f} GiB on {model.device} for {batch_size} rows of {length} "
        f"positions (KV cache {need['kv_cache'] / _GIB:.1f} GiB = {need['kv_layers']} layers x 2 x {batch_size} x "
        f"{c.num_key_value_heads} kv heads x {length} x head_dim {c.head_dim} x {model.dtype.itemsize} bytes; "
        f"canvas {need['canvas'] / _GIB:.1f} GiB; logits {need['logits'] / _GIB:.1f} GiB), more than the "
        f"{available / _GIB:.1f} GiB available. Lower `{length_name}`, the batch size or `num_return_sequences`."
    )
