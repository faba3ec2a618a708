import logging
import re
import warnings

import pytest
import torch

from diffusion_moe import DiffusionMoeConfig

MASK_ID = 63

# Deprecations that Transformers' or PEFT's own code triggers, whatever our code does.
THIRD_PARTY_DEPRECATIONS = (
    r"`gradient_checkpointing_enable` is deprecated",  # Trainer(gradient_checkpointing=True) calls it
    r"`is_gradient_checkpointing` is deprecated",  # PEFT's get_peft_model reads it
)


def tiny_config(**overrides) -> DiffusionMoeConfig:
    """A 2-layer model small enough that every test runs in milliseconds."""
    values = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        mask_token_id=MASK_ID,
        pad_token_id=0,
        max_position_embeddings=256,
    )
    if overrides.get("router_type") == "block_pool":
        values["expert_capacity"] = 4  # LLaDA2.2's pool of 48 of 256 experts, at 8 experts
    values.update(overrides)
    return DiffusionMoeConfig(**values)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def single_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("single_thread")`):
    extra threads only contend (14x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_warning_once():
    """Transformers' `logger.warning_once` remembers messages process-wide; each test sees
    its own, so whether a warning is checked does not depend on test order."""
    clear = getattr(getattr(logging.Logger, "warning_once", None), "cache_clear", None)
    if clear is not None:
        clear()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _ours_to_fix(message: str) -> bool:
    return not any(re.search(pattern, message) for pattern in THIRD_PARTY_DEPRECATIONS)


@pytest.fixture(autouse=True)
def _no_transformers_deprecations(request):
    """Every test fails if the code under test makes Transformers warn of a deprecation
    (a FutureWarning, or its logger's "deprecated" warnings): under the newest release our
    calls must already use the new names. Tests that pass an old name on purpose are marked
    `uses_deprecated_names`."""
    if request.node.get_closest_marker("uses_deprecated_names"):
        yield
        return
    records = _Records()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", FutureWarning)
            yield
    finally:
        transformers_logger.removeHandler(records)
    found = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    found += [m for m in records.messages if "deprecat" in m.lower()]
    found = [message for message in found if _ours_to_fix(message)]
    assert not found, f"deprecation warnings from our calls: {found}"
