"""Attention masks for the two layouts and block-causal two-stream training.

Masks are boolean, True = may attend, shaped [B, 1, Lq, Lk]. Blocks are aligned to each
sequence's absolute position 0, so they are computed from position ids, not indices:
left padding and a KV cache then need no special case.
"""

import torch


def positions_from_padding(padding_mask: torch.Tensor) -> torch.Tensor:
    """Absolute positions of a (left-)padded batch: 0 at each sequence's first real token."""
    return (padding_mask.long().cumsum(-1) - 1).clamp(min=0)


def build_attention_mask(
    padding_mask: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    layout: str,
    block_size: int,
) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool mask: real keys only; under "block_causal" also block(key) <= block(query).

    padding_mask [B, Lk] (True = real) covers cached keys followed by the current queries.
    Query rows of padding tokens may attend everywhere: their outputs are never used, and an
    empty row would make softmax produce NaN.
    """
    allowed = padding_mask[:, None, :].bool()  # [B, 1, Lk]
    if layout == "block_causal":
        q_block = torch.div(query_positions, block_size, rounding_mode="floor")
        k_block = torch.div(key_positions, block_size, rounding_mode="floor")
        allowed = allowed & (k_block[:, None, :] <= q_block[:, :, None])
    else:
        allowed = allowed.expand(-1, query_positions.shape[1], -1)
    query_is_pad = ~padding_mask[:, -query_positions.shape[1] :].bool()
    return (allowed | query_is_pad[:, :, None]).unsqueeze(1)


def two_stream_attention_mask(padding_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mask for the block-causal two-stream input [x_t ; x_0] of length 2L.

    A noisy token attends to its own noisy block and to clean blocks strictly before it;
    clean tokens attend block-causally among themselves. Both halves use positions 0..L-1,
    and `padding_mask` [B, L] marks the real tokens of one half.
    """
    B, L = padding_mask.shape
    block = torch.div(positions_from_padding(padding_mask), block_size, rounding_mode="floor")
    q, k = block[:, :, None], block[:, None, :]
    real_k = padding_mask[:, None, :].bool()
    noisy_to_noisy = (k == q) & real_k
    noisy_to_clean = (k < q) & real_k
    clean_to_clean = (k <= q) & real_k
    no_access = torch.zeros_like(noisy_to_noisy)
    top = torch.cat([noisy_to_noisy, noisy_to_clean], dim=-1)
    bottom = torch.cat([no_access, clean_to_clean], dim=-1)
    mask = torch.cat([top, bottom], dim=1)  # [B, 2L, 2L]
    pad_rows = ~padding_mask.bool().repeat(1, 2)
    return (mask | pad_rows[:, :, None]).unsqueeze(1)



def attended_keys(mask: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: the keys at `key_index` [L] (this forward's tokens) of a 4-D mask
    [B, H or 1, Lq, Lk] that some query may attend to (bool True, or an additive value above
    half the dtype's minimum): a key no query attends to is padding. Query rows that attend
    every key say nothing (padding rows often do, so that softmax has a key); if every row
    does, every token is real."""
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    rows = allowed.flatten(1, 2)  # [B, H * Lq, Lk]
    informative = ~rows.all(-1, keepdim=True)
    attended = (rows.index_select(-1, key_index) & informative).any(1)
    return attended | ~informative.any(1)
