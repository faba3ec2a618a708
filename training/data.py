"""Turn a corpus into fixed-length training sequences (packing).

Documents are tokenised, joined with EOS and cut into `seq_len`-token chunks, so a batch
has no padding: every position is a real token, which keeps routing statistics and the
two-stream layout (where the model treats every token as real) exact.

A document whose text tokenises to the tokenizer's mask token is refused (naming the
document and position): the collators would otherwise train on [MASK] as data.
"""

import random

from datasets import Dataset


def pack_documents(tokenizer, documents: list[str], seq_len: int) -> list[list[int]]:
    """Concatenate tokenised documents (each followed by EOS) and split into full chunks."""
    if not (isinstance(seq_len, int) and not isinstance(seq_len, bool) and seq_len > 0):
        raise ValueError(f"pack_documents: `seq_len` must be a positive integer; got {seq_len!r}.")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("pack_documents: the tokenizer has no EOS token (`eos_token_id` is None); documents are "
                         "joined with EOS.")
    mask = getattr(tokenizer, "mask_token_id", None)
    stream = []
    for index, text in enumerate(documents):
        if not isinstance(text, str):
            raise ValueError(f"pack_documents: document {index} must be a string; got {type(text).__name__}.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if mask is not None and mask in ids:
            raise ValueError(
                f"pack_documents: document {index} holds the mask token (id {mask}) at token {ids.index(mask)}: its "
                "text spells the mask token. Remove it; it would be trained on as data."
            )
        stream.extend(ids)
        stream.append(eos)
    chunks = [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    if not chunks:
        raise ValueError(f"pack_documents: the corpus has {len(stream)} tokens, fewer than seq_len={seq_len}.")
    return chunks


def train_validation_split(
    tokenizer, documents: list[str], seq_len: int, validation_fraction: float = 0.05, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Packed `datasets.Dataset`s ("input_ids"), split by chunk after a seeded shuffle."""
    if isinstance(validation_fraction, bool) or not (isinstance(validation_fraction, (int, float))
                                                     and 0 < validation_fraction < 1):
        raise ValueError(f"`validation_fraction` must be in (0, 1); got {validation_fraction!r}.")
    chunks = pack_documents(tokenizer, documents, seq_len)
    if len(chunks) < 2:
        raise ValueError(
            f"train_validation_split: the corpus packs into {len(chunks)} chunk of seq_len={seq_len} tokens; at least "
            "2 are needed (one for validation, the rest for training). Add documents or lower `seq_len`."
        )
    random.Random(seed).shuffle(chunks)
    n_val = max(1, int(len(chunks) * validation_fraction))
    return Dataset.from_dict({"input_ids": chunks[n_val:]}), Dataset.from_dict({"input_ids": chunks[:n_val]})
