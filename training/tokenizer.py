"""Default corpus and tokenizer: no download is ever needed.

Every CPython ships its own reference documentation as `pydoc_data.topics` (the text of
`help("assert")` etc., about 470 KB of English prose and Python code), so it is the
default training corpus. A byte-level BPE tokenizer is trained on it with `tokenizers`
and wrapped as a Transformers fast tokenizer with the diffusion special tokens.
"""

import re
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, MASK = "<|pad|>", "<|endoftext|>", "<|mask|>"
SPECIAL_TOKENS = (PAD, EOS, MASK)
# A minimal chat template so SFT data given as `messages` works with the default tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def default_corpus() -> list[str]:
    """The Python reference documentation shipped with this interpreter, one string per topic.

    reST heading underlines ("*****", "=====") are dropped, blank-line runs collapsed and
    hard-wrapped prose paragraphs unwrapped (indented code blocks are kept as they are), so
    a small model spends its capacity on words rather than on line breaks.
    """
    from pydoc_data.topics import topics

    return [_tidy(topics[name]) for name in sorted(topics)]


def _tidy(text: str) -> str:
    lines = [line for line in text.splitlines() if not _UNDERLINE.fullmatch(line)]
    paragraphs = re.split(r"\n[ \t]*\n", "\n".join(lines))
    # unwrap prose paragraphs (hard-wrapped at ~70 columns); keep indented code as it is
    return "\n\n".join(
        p.rstrip() if p[:1].isspace() else " ".join(p.split("\n")) for p in paragraphs if p.strip()
    )


_UNDERLINE = re.compile(r"\s*([*=\-~^+#])\1{2,}\s*")


def read_corpus(paths: list[str] | None = None, text_column: str = "text") -> list[str]:
    """Documents from local text files (one document per file), a folder of them, or a
    `datasets` folder written by `save_to_disk`; the default corpus when `paths` is empty."""
    if not paths:
        return default_corpus()
    documents = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"read_corpus: `paths` entry {str(path)!r} does not exist.")
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            from datasets import DatasetDict, load_from_disk

            dataset = load_from_disk(str(path))
            if isinstance(dataset, DatasetDict):
                dataset = dataset["train"]
            if text_column not in dataset.column_names:
                raise ValueError(
                    f"read_corpus: `text_column` must be one of {dataset.column_names} for {str(path)!r}; "
                    f"got {text_column!r}."
                )
            documents.extend(dataset[text_column])
        elif path.is_dir():
            documents.extend(p.read_text(encoding="utf-8") for p in sorted(path.rglob("*.txt")))
        else:
            documents.append(path.read_text(encoding="utf-8"))
    return [d for d in documents if d.strip()]


def train_tokenizer(documents: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `documents`, with pad / EOS / mask special tokens and a chat template."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, mask_token=MASK, clean_up_tokenization_spaces=False
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def default_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """The BPE tokenizer of the default corpus (deterministic: same corpus, same merges)."""
    return train_tokenizer(default_corpus(), vocab_size)
