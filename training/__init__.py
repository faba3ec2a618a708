"""Training side (not part of the saved remote code): collators, trainer, callbacks, default data.

Needs the `train` extra (datasets, matplotlib, peft) for `data` and the examples.
"""

from .callbacks import ExpertBiasUpdateCallback, RouterStatsCallback
from .collators import DiffusionPretrainCollator, DiffusionSFTCollator
from .data import pack_documents, train_validation_split
from .tokenizer import default_corpus, default_tokenizer, read_corpus, train_tokenizer
from .trainer import DiffusionTrainer

__all__ = [
    "DiffusionPretrainCollator",
    "DiffusionSFTCollator",
    "DiffusionTrainer",
    "ExpertBiasUpdateCallback",
    "RouterStatsCallback",
    "default_corpus",
    "default_tokenizer",
    "pack_documents",
    "read_corpus",
    "train_tokenizer",
    "train_validation_split",
]
