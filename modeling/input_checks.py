"""Input checks shared by `forward` and `generate`: bad input fails early, naming what is wrong."""

import torch


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, where: torch.Tensor | None = None) -> None:
    """ValueError naming the first token id outside [0, vocab_size) (instead of the embedding's
    IndexError); `where` limits the check (e.g. to real tokens). Skipped under torch.compile,
    whose static decoding step only sees ids that generate() made or checked."""
    if torch.compiler.is_compiling():
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if where is not None:
        bad &= where
    if bad.any():
        raise ValueError(
            f"`input_ids` holds token id {int(input_ids[bad][0])}, outside the vocabulary "
            f"[0, vocab_size={vocab_size})."
        )


def check_fractions(name: str, values: torch.Tensor, batch: int) -> None:
    """`mask_ratio` / `noise_level`: shape [batch], finite, in [0, 1]."""
    if values.shape != (batch,):
        raise ValueError(f"`{name}` must have shape (batch,) = ({batch},); got {tuple(values.shape)}.")
    if torch.compiler.is_compiling():
        return
    values = values.detach().float()
    bad = ~((values >= 0) & (values <= 1))  # NaN fails both comparisons
    if bad.any():
        raise ValueError(f"`{name}` must hold fractions in [0, 1]; got {values[bad][0].item()} (row "
                         f"{int(bad.nonzero()[0])}).")


def check_loss_noise_level(name: str, values: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """The ELBO divides a sequence's loss by its t: a sequence with labels needs t > 0 (a
    clamp would silently scale its loss by 10^6). Sequences without labels may have t = 0."""
    check_fractions(name, values, labels.shape[0])
    bad = (values <= 0) & (labels != ignore_index).any(-1)
    if bad.any():
        raise ValueError(
            f"`{name}` is 0 for row {int(bad.nonzero()[0])}, which has labelled tokens: the ELBO weighting divides "
            "by it. Pass each sequence's masking probability t in (0, 1]."
        )


def check_padding_mask(attention_mask: torch.Tensor, name: str = "attention_mask") -> None:
    """A 2-D `attention_mask` (or `padding_mask`) is a padding mask of 0s and 1s (bool or any numeric dtype)."""
    if attention_mask.dtype == torch.bool or torch.compiler.is_compiling():
        return
    bad = (attention_mask != 0) & (attention_mask != 1)
    if bad.any():
        what = "a 2-D `attention_mask`" if name == "attention_mask" else f"`{name}`"
        raise ValueError(
            f"{what} is a padding mask of 0 (padding) and 1 (real token); got "
            f"{attention_mask[bad][0].item()}." + (" Pass a 4-D mask for anything else." if name == "attention_mask"
                                                   else "")
        )


def check_input_shape(input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, hidden_size: int) -> None:
    """`input_ids` [B, L] or `inputs_embeds` [B, L, hidden_size], with B, L >= 1."""
    name, tensor = ("input_ids", input_ids) if input_ids is not None else ("inputs_embeds", inputs_embeds)
    want = "[batch, length]" if input_ids is not None else f"[batch, length, hidden_size={hidden_size}]"
    dims = 2 if input_ids is not None else 3
    if tensor.dim() != dims or (dims == 3 and tensor.shape[-1] != hidden_size):
        raise ValueError(f"`{name}` must have shape {want}; got {tuple(tensor.shape)}.")
    if tensor.shape[0] == 0 or tensor.shape[1] == 0:
        raise ValueError(f"`{name}` must hold at least one sequence of at least one token; got shape "
                         f"{tuple(tensor.shape)}.")
    if input_ids is not None and (input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool):
        raise ValueError(f"`input_ids` must be integer token ids; got dtype {input_ids.dtype}.")
