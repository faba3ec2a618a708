"""Configuration of a mixture-of-experts masked-diffusion language model.

Every value is checked when the config is built, so a bad field fails here, with the
field's name and the allowed values, instead of deep inside a forward pass.
"""

import contextvars

from transformers import PretrainedConfig
from transformers.utils import logging

from .remote_code import VERSION_KEY, SavesRemoteCode, log_code_origin

logger = logging.get_logger(__name__)

# The checkpoint `from_pretrained` is loading (its `from_dict` logs which code builds it).
_LOADING = contextvars.ContextVar("diffusion_moe_config_loading", default=None)

ROUTER_TYPES = ("token_choice", "expert_choice", "block")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
ATTENTION_LAYOUTS = ("bidirectional", "block_causal")
CAPACITY_SCHEDULES = (
    "constant",
    "linear",
    "linear_reverse",
    "cosine",
    "cosine_reverse",
    "bell",
    "bell_gaussian",
    "bell_gaussian_reverse",
)


class DiffusionMoeConfig(SavesRemoteCode, PretrainedConfig):
    r"""Config of [`DiffusionMoeModel`] / [`DiffusionMoeForMaskedLM`].

    Transformer fields follow Llama/Qwen3-MoE naming. Diffusion fields:
        mask_token_id: id of the `[MASK]` token (needed to derive the mask ratio; may be None
            if every forward gets an explicit `mask_ratio`).
        attention_layout: `"bidirectional"` (full attention, LLaDA) or `"block_causal"`
            (bidirectional inside aligned blocks of `block_size`, causal across, LLaDA2).
    MoE fields (README, "Routing"):
        router_type: `"token_choice"`, `"expert_choice"` or `"block"` (dMoE coreset routing).
        num_experts_per_tok: k; for expert choice the *average* experts per token.
        capacity_factor: token choice only; None = dropless, else each expert keeps at most
            ceil(L_real * k / E * capacity_factor) tokens per sequence (highest weights win).
        capacity_schedule / capacity_min / capacity_max / capacity_sigma: k as a function of
            the mask ratio of each routing unit (a sequence; for block-causal models each
            attention block, so a block never depends on later ones). Expert choice: the
            capacity; token choice and block routing: each token's number of experts (a
            dynamic top-k). When not given, capacity_min and capacity_max default to
            max(1, k // 2) and min(2k - capacity_min, num_experts), so the linear and cosine
            schedules keep the average k (and FLOPs) equal to `num_experts_per_tok`
            (unless 2k - capacity_min exceeds num_experts).
        n_group / topk_group: group-limited top-k (token choice and block routers; expert
            choice ignores groups because experts pick tokens).
        block_router_*: dMoE coreset per aligned chunk of `block_router_size` tokens;
            `block_router_min_experts` defaults to max(k, min(16, num_experts)).
        expert_bias_update_rate: step of the auxiliary-loss-free bias update (0 = off); the
            `expert_bias` buffer exists for every router so checkpoints stay swappable.
    """

    model_type = "diffusion_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    def __init__(
        self,
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=None,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        partial_rotary_factor=1.0,
        use_qk_norm=True,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        initializer_range=0.02,
        attention_dropout=0.0,
        mask_token_id=None,
        attention_layout="bidirectional",
        block_size=32,
        num_experts=64,
        num_experts_per_tok=8,
        moe_intermediate_size=256,
        num_shared_experts=0,
        first_k_dense_replace=0,
        router_type="token_choice",
        router_score_function="softmax",
        norm_topk_prob=True,
        routed_scaling_factor=1.0,
        n_group=None,
        topk_group=None,
        capacity_factor=None,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        expert_bias_update_rate=0.0,
        capacity_schedule="constant",
        capacity_min=None,
        capacity_max=None,
        capacity_sigma=0.22,
        block_router_size=32,
        block_router_top_p=0.6,
        block_router_min_experts=None,
        loss_weighting="elbo",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim if head_dim is not None else _div_or_none(hidden_size, num_attention_heads)
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.use_qk_norm = use_qk_norm
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.attention_layout = attention_layout
        self.block_size = block_size
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.num_shared_experts = num_shared_experts
        self.first_k_dense_replace = first_k_dense_replace
        self.router_type = router_type
        self.router_score_function = router_score_function
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.n_group = n_group
        self.topk_group = topk_group
        self.capacity_factor = capacity_factor
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.expert_bias_update_rate = expert_bias_update_rate
        self.capacity_schedule = capacity_schedule
        k = num_experts_per_tok if isinstance(num_experts_per_tok, int) else 1
        self.capacity_min = capacity_min if capacity_min is not None else max(1, k // 2)
        if capacity_max is None:
            capacity_max = 2 * k - self.capacity_min
            capacity_max = min(capacity_max, num_experts) if isinstance(num_experts, int) else capacity_max
        self.capacity_max = capacity_max
        self.capacity_sigma = capacity_sigma
        self.block_router_size = block_router_size
        self.block_router_top_p = block_router_top_p
        if block_router_min_experts is None and isinstance(num_experts, int):
            block_router_min_experts = max(k, min(16, num_experts))
        self.block_router_min_experts = block_router_min_experts
        self.loss_weighting = loss_weighting
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.check()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        token = _LOADING.set(str(pretrained_model_name_or_path))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        finally:
            _LOADING.reset(token)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Also validates overrides, e.g. `from_pretrained(path, router_type="expert_choice")`,
        which Transformers applies after construction. Loading a checkpoint logs, once, which
        code builds it (the installed package's or the checkpoint's own) and the version of the
        checkpoint's code (`diffusion_moe_version` in its config.json)."""
        source = kwargs.get("name_or_path") or _LOADING.get()
        recorded = config_dict.get(VERSION_KEY)
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.check()
        if source:
            log_code_origin(source, recorded)
        return result

    def check(self):
        """Raise ValueError naming the first invalid field (called at construction)."""
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "max_position_embeddings", "block_size", "num_experts",
            "num_experts_per_tok", "moe_intermediate_size", "block_router_size", "capacity_min", "capacity_max",
            "block_router_min_experts",
        ):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "a positive integer", self)
        for name in ("num_shared_experts", "first_k_dense_replace"):
            _require(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0", self)
        for name in ("rms_norm_eps", "rope_theta", "routed_scaling_factor", "capacity_sigma"):
            _require(_is_number(getattr(self, name)) and getattr(self, name) > 0, name, "a number > 0", self)
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "expert_bias_update_rate", "attention_dropout"):
            _require(_is_number(getattr(self, name)) and getattr(self, name) >= 0, name, "a number >= 0", self)
        _require(self.router_type in ROUTER_TYPES, "router_type", f"one of {ROUTER_TYPES}", self)
        _require(
            self.router_score_function in ROUTER_SCORE_FUNCTIONS, "router_score_function",
            f"one of {ROUTER_SCORE_FUNCTIONS}", self,
        )
        _require(self.attention_layout in ATTENTION_LAYOUTS, "attention_layout", f"one of {ATTENTION_LAYOUTS}", self)
        _require(self.capacity_schedule in CAPACITY_SCHEDULES, "capacity_schedule", f"one of {CAPACITY_SCHEDULES}", self)
        _require(self.loss_weighting in ("elbo", "none"), "loss_weighting", "one of ('elbo', 'none')", self)
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})", self,
        )
        rotary = self.head_dim * self.partial_rotary_factor
        _require(
            _is_number(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1
            and rotary == int(rotary) and int(rotary) % 2 == 0,
            "partial_rotary_factor", "a number in (0, 1] with head_dim * factor an even integer", self,
        )
        E, k = self.num_experts, self.num_experts_per_tok
        _require(k <= E, "num_experts_per_tok", f"at most num_experts ({E})", self)
        _require(
            self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
            f"at most num_hidden_layers ({self.num_hidden_layers})", self,
        )
        if self.mask_token_id is not None:
            _require(
                isinstance(self.mask_token_id, int) and 0 <= self.mask_token_id < self.vocab_size, "mask_token_id",
                f"None or an id in [0, vocab_size={self.vocab_size})", self,
            )
        if self.n_group is not None or self.topk_group is not None:
            _require(
                isinstance(self.n_group, int) and self.n_group > 0 and E % self.n_group == 0, "n_group",
                f"a positive divisor of num_experts ({E}) when group-limited routing is used", self,
            )
            _require(
                isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group, "topk_group",
                f"an integer in [1, n_group={self.n_group}]", self,
            )
            most = k if self.capacity_schedule == "constant" else self.capacity_max
            _require(
                self.topk_group * (E // self.n_group) >= most, "topk_group",
                f"large enough that the kept groups hold {most} experts (num_experts_per_tok, or capacity_max "
                "under a capacity schedule)", self,
            )
            _require(
                E // self.n_group >= 2, "n_group", "at most num_experts / 2 (a group's score sums its two best)", self
            )
        if self.capacity_factor is not None:
            _require(
                self.router_type == "token_choice", "capacity_factor",
                "None unless router_type='token_choice' (expert choice sets capacity from k; block routing is dropless)",
                self,
            )
            _require(_is_number(self.capacity_factor) and self.capacity_factor > 0, "capacity_factor",
                     "None (dropless) or a number > 0", self)
        _require(
            self.capacity_min <= self.capacity_max, "capacity_min", f"at most capacity_max ({self.capacity_max})", self
        )
        _require(self.capacity_max <= E, "capacity_max", f"at most num_experts ({E})", self)
        _require(
            _is_number(self.block_router_top_p) and 0 < self.block_router_top_p <= 1, "block_router_top_p",
            "a number in (0, 1]", self,
        )
        if self.router_type == "block" and self.attention_layout == "block_causal":
            _require(
                self.block_size % self.block_router_size == 0, "block_router_size",
                f"a divisor of block_size ({self.block_size}) for block-causal models, so that a coreset never "
                "depends on a later attention block", self,
            )
        _require(
            k <= self.block_router_min_experts <= E, "block_router_min_experts",
            f"an integer in [num_experts_per_tok={k}, num_experts={E}]", self,
        )
        ignored = self.ignored_settings()
        if ignored:
            logger.warning_once(
                f"DiffusionMoeConfig: router_type={self.router_type!r} ignores {', '.join(ignored)}. They are kept in "
                "the config (a later switch of `router_type` uses them again) but have no effect now."
            )

    def ignored_settings(self) -> list[str]:
        """Settings that differ from their defaults but that this `router_type` does not use.

        Retrofitting swaps `router_type` on a trained config, so such settings are legal;
        they are named in one logged warning instead of being dropped silently.
        """
        k = self.num_experts_per_tok
        ignored = []
        if self.router_type == "expert_choice":
            if self.n_group is not None:
                ignored.append(f"n_group={self.n_group} / topk_group={self.topk_group} (experts pick tokens)")
            if self.expert_bias_update_rate > 0:
                ignored.append(f"expert_bias_update_rate={self.expert_bias_update_rate} (balanced by construction)")
            if self.router_aux_loss_coef > 0:
                ignored.append(f"router_aux_loss_coef={self.router_aux_loss_coef} (balanced by construction)")
        if self.router_type != "block":
            defaults = {"block_router_size": 32, "block_router_top_p": 0.6,
                        "block_router_min_experts": max(k, min(16, self.num_experts))}
            ignored += [f"{name}={getattr(self, name)}" for name, value in defaults.items()
                        if getattr(self, name) != value]
        if self.capacity_schedule == "constant":
            defaults = {"capacity_min": max(1, k // 2)}
            defaults["capacity_max"] = min(2 * k - defaults["capacity_min"], self.num_experts)
            ignored += [f"{name}={getattr(self, name)} (capacity_schedule='constant')"
                        for name, value in defaults.items() if getattr(self, name) != value]
        if not self.capacity_schedule.startswith("bell_gaussian") and self.capacity_sigma != 0.22:
            ignored.append(f"capacity_sigma={self.capacity_sigma} (only the bell_gaussian schedules use it)")
        return ignored


def _require(ok, name, allowed, config):
    if not ok:
        raise ValueError(f"DiffusionMoeConfig: `{name}` must be {allowed}; got {getattr(config, name)!r}.")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _div_or_none(a, b):
    return a // b if isinstance(a, int) and isinstance(b, int) and b > 0 else None


__all__ = ["DiffusionMoeConfig"]
