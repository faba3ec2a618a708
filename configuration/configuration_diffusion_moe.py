"""Configuration of a mixture-of-experts masked-diffusion language model.

Every value is checked when the config is built, so a bad field fails here, with the
field's name, the value and the allowed values, instead of deep inside a forward pass
(or, worse, giving a silently different model):

- Types are strict (`FIELD_TYPES`): a bool field takes only `True`/`False` (not `"no"`,
  which is truthy, nor 0/1), an int field only an int (not a bool, not `4.0`), a number
  field an int or a finite float, an enum one of its strings, `hidden_act` one of
  `transformers.activations.ACT2FN`'s names, token ids None or an int in [0, vocab_size).
- Unknown keys are refused, with the closest field suggested (difflib): keyword arguments
  (`DiffusionMoeConfig(num_expert_per_tok=4)`) and load-time overrides
  (`AutoConfig.from_pretrained(path, num_expert_per_tok=4)`, `from_dict(d, typo=...)`). Known
  without being fields: PreTrainedConfig's own attributes, keys Transformers and its tooling
  write into config.json (`transformers_version`, `auto_map`, `architectures`, `dtype`,
  `use_cache`, names starting with `_`, ...) and Transformers' loading arguments
  (`revision`, `trust_remote_code`, `device_map`, ...). With `return_unused_kwargs=True`
  (how `PreTrainedModel.from_pretrained` splits config overrides from model arguments) only
  keys that look like a misspelt field are refused; the rest are returned, as Transformers
  documents.
- Unknown keys in a config.json: a key that looks like a misspelt field, or any unknown key in
  a file written by a newer diffusion-moe (a field this version does not know would be
  ignored), is an error naming the key and the file. Any other unknown key is kept as an
  attribute, as Transformers does, with one warning naming it and the file: Transformers'
  tooling and users store their own keys in config.json (`model.config.foo = ...` before
  `save_pretrained`), and refusing them would make such checkpoints unloadable.
- Derived defaults follow the fields they derive from: `head_dim`, `capacity_min`,
  `capacity_max` and `block_router_min_experts` left unset (None) are computed when read,
  are saved as null and so are derived again after loading, also after a load-time override
  (`from_pretrained(path, num_experts_per_tok=4)`). A value set explicitly stays as set.
  config.json files written before this (every field concrete) load with the same values; a
  derived field there whose value equals what derivation gives from the same file is read as
  derived (so an override updates it); a different value is explicit.

Transformers' own validation (huggingface_hub's `@strict` dataclasses, which
PreTrainedConfig uses in both supported releases) is not used for the fields: it raises
`StrictDataclassFieldValidationError`, which is not a ValueError, rejects an int for a float
field (`"rope_theta": 600000` in LLaDA2 configs) and needs dataclass fields instead of this
config's `__init__`, whose derived defaults must survive save/load. Its hook is used: the
`validate()` that `save_pretrained` calls runs the same checks, so a field assigned a bad
value after construction cannot be saved.
"""

import contextvars
import dataclasses
import difflib
import inspect
import json
import functools
import math

from packaging.version import InvalidVersion, Version
from transformers import GenerationConfig, PretrainedConfig
from transformers.utils import logging

from .remote_code import VERSION_KEY, SavesRemoteCode, __version__, log_code_origin

logger = logging.get_logger(__name__)

# The checkpoint `from_pretrained` is loading (its `from_dict` logs which code builds it).
_LOADING = contextvars.ContextVar("diffusion_moe_config_loading", default=None)
# True while `from_dict` builds a config from a file's keys (checked there, not in `__init__`).
_FROM_FILE = contextvars.ContextVar("diffusion_moe_config_from_file", default=False)

ROUTER_TYPES = ("token_choice", "expert_choice", "block", "block_pool")
ROUTER_SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTED_SCALING_MODES = ("constant", "ec_dlm")
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
LOSS_WEIGHTINGS = ("elbo", "none")

# Fields whose default is derived from other fields (None = derived, computed when read).
DERIVED_FIELDS = ("head_dim", "capacity_min", "capacity_max", "block_router_min_experts")

# field -> kind. "int>0": a positive int; "int>=0"; "num>0" / "num>=0": an int or a finite
# float; "unit": a number in [0, 1]; "bool"; "id": None or a token id in [0, vocab_size);
# "?int>0": None or a positive int; "?num>0": None or a number > 0; a tuple: one of its values.
# `hidden_act` (ACT2FN's names), `partial_rotary_factor`, `block_router_top_p`,
# `eos_token_id` (also a list of ids) and the cross-field rules are checked in `_check_values`.
FIELD_TYPES = {
    "vocab_size": "int>0",
    "hidden_size": "int>0",
    "intermediate_size": "int>0",
    "num_hidden_layers": "int>0",
    "num_attention_heads": "int>0",
    "num_key_value_heads": "int>0",
    "max_position_embeddings": "int>0",
    "block_size": "int>0",
    "num_experts": "int>0",
    "num_experts_per_tok": "int>0",
    "moe_intermediate_size": "int>0",
    "block_router_size": "int>0",
    "num_shared_experts": "int>=0",
    "first_k_dense_replace": "int>=0",
    "rms_norm_eps": "num>0",
    "rope_theta": "num>0",
    "routed_scaling_factor": "num>0",
    "capacity_sigma": "num>0",
    "initializer_range": "num>=0",
    "router_aux_loss_coef": "num>=0",
    "router_z_loss_coef": "num>=0",
    "expert_bias_update_rate": "num>=0",
    "attention_dropout": "unit",
    "use_qk_norm": "bool",
    "norm_topk_prob": "bool",
    "batch_level_expert_choice": "bool",
    "tie_word_embeddings": "bool",
    "router_type": ROUTER_TYPES,
    "router_score_function": ROUTER_SCORE_FUNCTIONS,
    "routed_scaling_mode": ROUTED_SCALING_MODES,
    "attention_layout": ATTENTION_LAYOUTS,
    "capacity_schedule": CAPACITY_SCHEDULES,
    "loss_weighting": LOSS_WEIGHTINGS,
    "n_group": "?int>0",
    "topk_group": "?int>0",
    "capacity_factor": "?num>0",
    "expert_capacity": "?int>0",
    "mask_token_id": "id",
    "pad_token_id": "id",
    "bos_token_id": "id",
    "delete_token_id": "id",
    "split_token_id": "id",
    # derived when None; checked after the fields they derive from
    "head_dim": "int>0",
    "capacity_min": "int>0",
    "capacity_max": "int>0",
    "block_router_min_experts": "int>0",
}

_KIND_TEXT = {
    "int>0": "a positive integer",
    "int>=0": "an integer >= 0",
    "num>0": "a finite number > 0",
    "num>=0": "a finite number >= 0",
    "unit": "a number in [0, 1]",
    "bool": "a bool (true or false)",
    "?int>0": "None or a positive integer",
    "?num>0": "None or a finite number > 0",
}

# Keys of PreTrainedConfig, of Transformers' serialisation and of its tooling that a config
# (or its config.json) may carry besides this config's fields. Most are also computed from
# PreTrainedConfig itself (`_pretrained_config_keys`); these are the ones it cannot list:
# `__post_init__` keyword arguments, serialisation keys, keys Trainer / Transformers set on a
# model's config, and PretrainedConfig attributes of Transformers 4.x (LLaDA2's era).
_TRANSFORMERS_CONFIG_KEYS = frozenset({
    "model_type", "transformers_version", VERSION_KEY, "auto_map", "architectures", "name_or_path",
    "dtype", "torch_dtype", "num_labels", "output_attentions", "attn_implementation", "experts_implementation",
    "per_layer_config", "rope_scaling", "rope_parameters", "use_cache", "output_router_logits",
    "quantization_config", "fusion_config", "distributed_config", "transformers_weights",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "pruned_heads", "is_decoder", "cross_attention_hidden_size",
    "add_cross_attention", "tie_encoder_decoder", "finetuning_task", "task_specific_params", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "gradient_checkpointing",
})
# Arguments of Transformers' loading functions that reach a config's `from_dict`
# (`AutoConfig.from_pretrained`, and `PreTrainedModel.from_pretrained`, which passes its own
# arguments on with `return_unused_kwargs=True`).
_LOADING_KWARGS = frozenset({
    "return_unused_kwargs", "cache_dir", "force_download", "local_files_only", "proxies", "token", "revision",
    "subfolder", "trust_remote_code", "code_revision", "gguf_file", "adapter_kwargs", "adapter_name", "device_map",
    "device_mesh", "generation_config", "kernel_config", "key_mapping", "max_memory", "offload_buffers",
    "offload_folder", "offload_state_dict", "output_loading_info", "state_dict", "tp_plan", "tp_size", "tqdm_class",
    "use_kernels", "allow_all_kernels", "variant", "use_safetensors", "weights_only", "ignore_mismatched_sizes",
    "disable_mmap", "low_cpu_mem_usage", "use_auth_token", "resume_download", "from_tf", "from_flax", "mirror",
    "config",
})
# How close (difflib ratio) an unknown key must be to a field to be taken for a misspelling of
# it where unknown keys are otherwise tolerated (a config.json; return_unused_kwargs=True).
_TYPO_CUTOFF = 0.85


@functools.cache
def _pretrained_config_keys() -> frozenset:
    """PreTrainedConfig's own attribute names: its dataclass fields and its properties."""
    names = set()
    if dataclasses.is_dataclass(PretrainedConfig):
        names = {f.name for f in dataclasses.fields(PretrainedConfig)}
    names |= {name for name in dir(PretrainedConfig)
              if isinstance(inspect.getattr_static(PretrainedConfig, name, None), property)}
    return frozenset(names)


_GENERATION_KEYS = None


def _generation_keys() -> frozenset:
    """GenerationConfig's settings: Transformers drops them from a model config (config.json BC)."""
    global _GENERATION_KEYS
    if _GENERATION_KEYS is None:
        _GENERATION_KEYS = frozenset(GenerationConfig().to_dict())
    return _GENERATION_KEYS


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and (isinstance(x, int) or math.isfinite(x))


def _derive(name, get):
    """The derived default of `name`, from `get(field)` (the stored values; None for derived
    fields). None when the fields it derives from are invalid (they are reported first)."""
    if name == "head_dim":
        hidden, heads = get("hidden_size"), get("num_attention_heads")
        return hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else None
    k, experts = get("num_experts_per_tok"), get("num_experts")
    if not (_is_int(k) and _is_int(experts)):
        return None
    if name == "capacity_min":
        return max(1, k // 2)
    if name == "capacity_max":
        low = get("capacity_min")
        low = max(1, k // 2) if low is None else low
        return min(max(2 * k - low, low), experts) if _is_int(low) else None  # never below capacity_min
    if name == "block_router_min_experts":
        return max(k, min(16, experts))
    raise KeyError(name)


def _derived_property(name):
    def read(self):
        value = self.__dict__.get(name)
        if value is not None:
            return value
        stored = self.__dict__
        return _derive(name, lambda field: stored.get(field) if field in DERIVED_FIELDS else getattr(self, field, None))

    def write(self, value):
        self.__dict__[name] = value

    return property(read, write, doc=f"`{name}`: set explicitly, or (stored as None) derived when read.")


@functools.cache
def _init_fields(cls) -> frozenset:
    return frozenset(
        name for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    )


def _closest(key, candidates, cutoff=0.6):
    match = difflib.get_close_matches(key, sorted(candidates), n=1, cutoff=cutoff)
    return match[0] if match else None


class DiffusionMoeConfig(SavesRemoteCode, PretrainedConfig):
    r"""Config of [`DiffusionMoeModel`] / [`DiffusionMoeForMaskedLM`].

    Transformer fields follow Llama/Qwen3-MoE naming. Diffusion fields:
        mask_token_id: id of the `[MASK]` token (needed to derive the mask ratio; may be None
            if every forward gets an explicit `mask_ratio`).
        delete_token_id / split_token_id: LLaDA2.2's edit-operation tokens (names as in its
            config.json): with both set, `generate(..., editing_threshold=...)` runs LLaDA2.2's
            Levenshtein editing, where a position may be deleted or split in two.
        attention_layout: `"bidirectional"` (full attention, LLaDA) or `"block_causal"`
            (bidirectional inside aligned blocks of `block_size`, causal across, LLaDA2).
    MoE fields (README, "Routing"):
        router_type: `"token_choice"`, `"expert_choice"`, `"block"` (dMoE coreset routing) or
            `"block_pool"` (LLaDA2.2's block expert pool).
        num_experts_per_tok: k; for expert choice the *average* experts per token.
        capacity_factor: token choice only; None = dropless, else each expert keeps at most
            ceil(L_real * k / E * capacity_factor) tokens per sequence (highest weights win).
        capacity_schedule / capacity_min / capacity_max / capacity_sigma: k as a function of
            the mask ratio of each routing unit (a sequence; for block-causal models each
            attention block, so a block never depends on later ones). Expert choice: the
            capacity; token choice and block routing: each token's number of experts (a
            dynamic top-k). When not given, capacity_min and capacity_max default to
            max(1, k // 2) and min(max(2k - capacity_min, capacity_min), num_experts), so the
            linear and cosine schedules keep the average k (and FLOPs) equal to
            `num_experts_per_tok` (unless 2k - capacity_min exceeds num_experts or falls below
            capacity_min).
        n_group / topk_group: group-limited top-k (token choice and block routers; expert
            choice ignores groups because experts pick tokens).
        batch_level_expert_choice: expert choice only (EC-DLM's `moe_batch_level_expert_choice`):
            each expert picks its C = max(floor(T_real * k / E), 1) tokens among all real tokens
            of the batch (k: the largest of its sequences' scheduled k) instead of per sequence,
            so a sequence's routing depends on the rest of its batch. Bidirectional models only
            (a block-causal model's capacity must stay within an attention block).
        routed_scaling_mode: `"constant"` (gates x `routed_scaling_factor`) or `"ec_dlm"`
            (EC-DLM's `--enable-scaling-factor`: expert choice multiplies a token's gates by
            EC-DLM's factor for its number of choosing experts, token choice by EC-DLM's
            top-k constant; needs shared experts and `routed_scaling_factor=1.0`).
        block_router_*: dMoE coreset per aligned chunk of `block_router_size` tokens;
            `block_router_min_experts` defaults to max(k, min(16, num_experts)).
        expert_capacity: `"block_pool"` only (LLaDA2.2's name): experts each aligned block of
            `block_size` tokens admits, from k (capacity_max under a schedule) to num_experts;
            no group-limited step inside the pool (n_group / topk_group are unused there).
        expert_bias_update_rate: step of the auxiliary-loss-free bias update (0 = off); the
            `expert_bias` buffer exists for every router so checkpoints stay swappable.
    Derived defaults (`DERIVED_FIELDS`: head_dim = hidden_size // num_attention_heads and the
    three above) are computed when read while left None, so they follow later changes of the
    fields they derive from (also load-time overrides); see the module docstring.
    """

    model_type = "diffusion_moe"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    # Transformers' distributed engine (`from_pretrained(..., distributed_config=DistributedConfig(...))`),
    # as Qwen3-MoE declares it: tensor parallel attention, dense MLP, shared and routed experts
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.q_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.k_norm": "replicated_with_grad_allreduce",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # expert parallel: whole experts per rank, the token layouts' (index, weight) pairs dispatched by Transformers
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }

    head_dim = _derived_property("head_dim")
    capacity_min = _derived_property("capacity_min")
    capacity_max = _derived_property("capacity_max")
    block_router_min_experts = _derived_property("block_router_min_experts")

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
        delete_token_id=None,
        split_token_id=None,
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
        routed_scaling_mode="constant",
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
        expert_capacity=None,
        batch_level_expert_choice=False,
        loss_weighting="elbo",
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        **kwargs,
    ):
        if not _FROM_FILE.get():
            type(self)._reject_unknown_keys(kwargs, "keyword argument")
        self._reject_unsupported_transformers_settings(kwargs, rope_theta)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.use_qk_norm = use_qk_norm
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention_dropout = attention_dropout
        self.mask_token_id = mask_token_id
        self.delete_token_id = delete_token_id
        self.split_token_id = split_token_id
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
        self.routed_scaling_mode = routed_scaling_mode
        self.n_group = n_group
        self.topk_group = topk_group
        self.capacity_factor = capacity_factor
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_z_loss_coef = router_z_loss_coef
        self.expert_bias_update_rate = expert_bias_update_rate
        self.capacity_schedule = capacity_schedule
        self.capacity_min = capacity_min
        self.capacity_max = capacity_max
        self.capacity_sigma = capacity_sigma
        self.block_router_size = block_router_size
        self.block_router_top_p = block_router_top_p
        self.block_router_min_experts = block_router_min_experts
        self.expert_capacity = expert_capacity
        self.batch_level_expert_choice = batch_level_expert_choice
        self.loss_weighting = loss_weighting
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.check()

    # ------------------------------------------------------------------ known keys

    @classmethod
    def config_fields(cls) -> frozenset:
        """The names of this config's own fields (its `__init__` parameters)."""
        return _init_fields(cls)

    @classmethod
    def _known_keys(cls) -> frozenset:
        """Keys a config may carry: its fields, PreTrainedConfig's attributes and the keys
        Transformers and its tooling write (names starting with `_` are Transformers' too)."""
        return cls.config_fields() | _pretrained_config_keys() | _TRANSFORMERS_CONFIG_KEYS

    @classmethod
    def _unknown_key_message(cls, key, where) -> str:
        close = _closest(key, cls.config_fields())
        hint = f"; did you mean `{close}`?" if close else (
            f": not a field of {cls.__name__}, an attribute of PreTrainedConfig or an argument of Transformers' "
            "loading functions")
        if key in _generation_keys():
            hint = (": it is a generation setting, which Transformers drops from a model config; pass it to "
                    "`generate()` or a DiffusionGenerationConfig instead")
            hint += f" (or did you mean `{close}`?)" if close else ""
        return f"{cls.__name__}: unknown {where} `{key}`{hint}"

    @classmethod
    def _reject_unknown_keys(cls, keys, where, allowed=frozenset()):
        known = cls._known_keys() | allowed
        for key in keys:
            if not key.startswith("_") and key not in known:
                raise ValueError(cls._unknown_key_message(key, where))

    @classmethod
    def _looks_misspelt(cls, key, allowed=frozenset()):
        """The field `key` looks like a misspelling of, if it is not a known key itself."""
        if key.startswith("_") or key in cls._known_keys() or key in allowed or key in _generation_keys():
            return None
        return _closest(key, cls.config_fields(), cutoff=_TYPO_CUTOFF)

    def _reject_unsupported_transformers_settings(self, kwargs, rope_theta):
        """PreTrainedConfig settings this model would ignore: refused instead of dropped."""
        name = type(self).__name__
        if kwargs.get("per_layer_config") is not None:
            raise ValueError(
                f"{name}: `per_layer_config` must be None; got {kwargs['per_layer_config']!r}. Every layer of a "
                "diffusion-moe model has the same shape and routing (use `first_k_dense_replace` for dense layers)."
            )
        for key in ("rope_scaling", "rope_parameters"):
            value = kwargs.pop(key, None)
            if value is None:
                continue
            default = (isinstance(value, dict) and value.get("rope_type", value.get("type")) == "default"
                       and set(value) <= {"rope_type", "type", "rope_theta"}
                       and value.get("rope_theta", rope_theta) == rope_theta)
            if not default:
                raise ValueError(
                    f"{name}: `{key}` must be None (plain RoPE with `rope_theta`; scaled RoPE is not supported) or "
                    f"{{'rope_type': 'default'}}; got {value!r}."
                )

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        token = _LOADING.set(str(pretrained_model_name_or_path))
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        finally:
            _LOADING.reset(token)

    @classmethod
    def from_json_file(cls, json_file):
        """As Transformers', with a file's checks (unknown keys, derived fields; see `from_dict`)."""
        with open(json_file, encoding="utf-8") as f:
            config_dict = json.load(f)
        return cls._build_from_file_dict(config_dict, {}, f"{json_file}")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """Also validates overrides, e.g. `from_pretrained(path, router_type="expert_choice")`,
        which Transformers applies after construction, and refuses unknown override keys and
        misspelt keys in the file (module docstring). Loading a checkpoint logs, once, which
        code builds it (the installed package's or the checkpoint's own) and the version of the
        checkpoint's code (`diffusion_moe_version` in its config.json)."""
        source = kwargs.get("name_or_path") or _LOADING.get()
        where = f"config.json of {source}" if source else "the config dict"
        result = cls._build_from_file_dict(config_dict, kwargs, where)
        if source:
            log_code_origin(source, config_dict.get(VERSION_KEY))
        return result

    @classmethod
    def _build_from_file_dict(cls, config_dict, kwargs, where):
        if kwargs.get("return_unused_kwargs"):
            for key in kwargs:
                close = cls._looks_misspelt(key, _LOADING_KWARGS)
                if close:
                    raise ValueError(f"{cls.__name__}: unknown override `{key}`; did you mean `{close}`?")
        else:
            cls._reject_unknown_keys(kwargs, "override", _LOADING_KWARGS)
        config_dict = cls._check_file_keys(dict(config_dict), where)
        token = _FROM_FILE.set(True)
        try:
            result = super().from_dict(config_dict, **kwargs)
        finally:
            _FROM_FILE.reset(token)
        config = result[0] if isinstance(result, tuple) else result
        config.check()
        return result

    @classmethod
    def _check_file_keys(cls, config_dict, where) -> dict:
        """Refuse misspelt keys (and unknown keys written by a newer diffusion-moe), warn about
        other unknown keys, and read a legacy file's derived values as derived."""
        recorded = config_dict.get(VERSION_KEY)
        try:
            newer = recorded is not None and Version(str(recorded)) > Version(__version__)
        except InvalidVersion:
            newer = False
        unknown = []
        for key in config_dict:
            if key.startswith("_") or key in cls._known_keys() or key in _generation_keys():
                continue
            close = _closest(key, cls.config_fields(), cutoff=_TYPO_CUTOFF)
            if close:
                raise ValueError(
                    f"{cls.__name__}: {where} has an unknown key `{key}`; did you mean `{close}`? Fix the file "
                    "(loaded as it is, the setting would have no effect)."
                )
            if newer:
                raise ValueError(
                    f"{cls.__name__}: {where} has the key `{key}`, which diffusion-moe {__version__} does not "
                    f"know; the file was written by diffusion-moe {recorded}. Upgrade (`pip install -U "
                    "diffusion-moe`) to load it: this version would ignore the setting."
                )
            unknown.append(key)
        if unknown:
            logger.warning_once(
                f"{cls.__name__}: {where} has keys that are not diffusion-moe or Transformers settings: "
                f"{', '.join(f'`{key}`' for key in unknown)}. They are kept as attributes but have no effect."
            )
        if all(config_dict.get(name) is not None for name in DERIVED_FIELDS):
            # every derived field concrete: written before derived fields were saved as null
            defaults = inspect.signature(cls.__init__).parameters

            def get(field):
                if field in config_dict:
                    return config_dict[field]
                return defaults[field].default if field in defaults else None

            derived = {name: _derive(name, get) for name in DERIVED_FIELDS}
            for name, value in derived.items():
                if value is not None and config_dict[name] == value and _is_int(config_dict[name]):
                    config_dict[name] = None
        return config_dict

    # ------------------------------------------------------------------ checks

    def validate(self):
        """Transformers' save-time validation hook (`save_pretrained` calls it): also runs
        this config's checks, so a field assigned a bad value after construction is not saved."""
        parent = getattr(super(), "validate", None)
        if parent is not None:
            parent()
        self._check_values()

    def check(self):
        """Raise ValueError naming the first invalid field (called at construction)."""
        self._check_values()
        ignored = self.ignored_settings()
        if ignored:
            logger.warning_once(
                f"DiffusionMoeConfig: router_type={self.router_type!r} ignores {', '.join(ignored)}. They are kept in "
                "the config (a later switch of `router_type` uses them again) but have no effect now."
            )

    def _check_values(self):
        for name, kind in FIELD_TYPES.items():
            _check_kind(self, name, kind)
        from transformers.activations import ACT2FN

        if self.routed_scaling_mode == "ec_dlm":
            _require(self.router_type in ("token_choice", "expert_choice"), "routed_scaling_mode",
                     "'constant' unless router_type is 'token_choice' or 'expert_choice' (EC-DLM's scaling is defined "
                     "for those two)", self)
            _require(self.num_shared_experts > 0, "routed_scaling_mode",
                     "'constant' without shared experts: EC-DLM's scaling balances the routed output against the shared "
                     "experts' (set num_shared_experts > 0)", self)
            _require(self.routed_scaling_factor == 1.0, "routed_scaling_factor",
                     "1.0 with routed_scaling_mode='ec_dlm' (EC-DLM's factors replace it)", self)
            if self.router_type == "expert_choice":  # EC-DLM's factors assume its softmax gates over the choosers
                _require(self.router_score_function == "softmax" and self.norm_topk_prob is True,
                         "routed_scaling_mode", "'ec_dlm' for expert choice only with router_score_function='softmax' "
                         "and norm_topk_prob=True (EC-DLM's gates: a softmax over the experts that chose the token)",
                         self)
        _require(isinstance(self.hidden_act, str) and self.hidden_act in ACT2FN, "hidden_act",
                 f"one of transformers' activations {sorted(ACT2FN)}", self)
        eos = self.eos_token_id
        _require(
            eos is None or _is_id(eos, self.vocab_size)
            or (isinstance(eos, (list, tuple)) and len(eos) > 0 and all(_is_id(i, self.vocab_size) for i in eos)),
            "eos_token_id", f"None, a token id in [0, vocab_size={self.vocab_size}) or a non-empty list of them", self,
        )
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
            f"a divisor of num_attention_heads ({self.num_attention_heads})", self,
        )
        rotary = self.head_dim * self.partial_rotary_factor if _is_number(self.partial_rotary_factor) else 0.5
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
        if self.n_group is not None or self.topk_group is not None:
            _require(self.n_group is not None and self.topk_group is not None, "topk_group" if self.n_group is None
                     else "n_group", "set together with `n_group` / `topk_group` (group-limited routing needs both)",
                     self)
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
        if (self.delete_token_id is None) != (self.split_token_id is None):
            missing = "delete_token_id" if self.delete_token_id is None else "split_token_id"
            _require(False, missing, "set together with `delete_token_id` / `split_token_id` (LLaDA2.2's edit "
                     "operations come as a pair)", self)
        if self.delete_token_id is not None:
            _require(len({self.delete_token_id, self.split_token_id, self.mask_token_id}) == 3, "split_token_id",
                     "an id different from `delete_token_id` and `mask_token_id`", self)
        if self.batch_level_expert_choice:
            _require(self.attention_layout == "bidirectional", "batch_level_expert_choice",
                     "False for block-causal models: batch-level capacity would let later blocks (and other "
                     "sequences' blocks) take an earlier block's experts, breaking block causality and the exact cache",
                     self)
        if self.router_type == "block_pool":
            most = k if self.capacity_schedule == "constant" else self.capacity_max
            _require(isinstance(self.expert_capacity, int) and most <= self.expert_capacity <= E, "expert_capacity",
                     f"an integer in [{most}, num_experts={E}] with router_type='block_pool' (the experts each block "
                     "admits; at least num_experts_per_tok, or capacity_max under a capacity schedule)", self)
        _require(
            k <= self.block_router_min_experts <= E, "block_router_min_experts",
            f"an integer in [num_experts_per_tok={k}, num_experts={E}]", self,
        )
        if getattr(self, "is_heterogeneous", False):  # set after construction (construction refuses it)
            raise ValueError("DiffusionMoeConfig: `per_layer_config` must be None (every layer has the same shape and "
                             "routing).")

    def ignored_settings(self) -> list[str]:
        """Settings that differ from their defaults but that this `router_type` does not use.

        Retrofitting swaps `router_type` on a trained config, so such settings are legal;
        they are named in one logged warning instead of being dropped silently.
        """
        ignored = []
        if self.router_type == "block_pool" and self.n_group is not None:
            ignored.append(f"n_group={self.n_group} / topk_group={self.topk_group} (the pool takes a plain top-k)")
        if self.router_type != "expert_choice" and self.batch_level_expert_choice:
            ignored.append("batch_level_expert_choice=True (router_type='expert_choice' only)")
        if self.router_type != "block_pool" and self.expert_capacity is not None:
            ignored.append(f"expert_capacity={self.expert_capacity} (router_type='block_pool' only)")
        if self.router_type == "expert_choice":
            if self.n_group is not None:
                ignored.append(f"n_group={self.n_group} / topk_group={self.topk_group} (experts pick tokens)")
            if self.expert_bias_update_rate > 0:
                ignored.append(f"expert_bias_update_rate={self.expert_bias_update_rate} (balanced by construction)")
            if self.router_aux_loss_coef > 0:
                ignored.append(f"router_aux_loss_coef={self.router_aux_loss_coef} (balanced by construction)")
        if self.router_type != "block":
            defaults = {"block_router_size": 32, "block_router_top_p": 0.6,
                        "block_router_min_experts": self._derived_default("block_router_min_experts")}
            ignored += [f"{name}={getattr(self, name)}" for name, value in defaults.items()
                        if getattr(self, name) != value]
        if self.capacity_schedule == "constant":
            ignored += [f"{name}={getattr(self, name)} (capacity_schedule='constant')"
                        for name in ("capacity_min", "capacity_max")
                        if getattr(self, name) != self._derived_default(name, explicit_min=False)]
        if not self.capacity_schedule.startswith("bell_gaussian") and self.capacity_sigma != 0.22:
            ignored.append(f"capacity_sigma={self.capacity_sigma} (only the bell_gaussian schedules use it)")
        return ignored

    def _derived_default(self, name, explicit_min=True):
        """What `name` is when derived (from the current fields; `explicit_min=False`: with
        capacity_min derived too)."""
        def get(field):
            if field in DERIVED_FIELDS:
                return self.__dict__.get(field) if explicit_min else None
            return getattr(self, field, None)

        return _derive(name, get)

    def explicit_fields(self) -> dict:
        """The derived fields (`DERIVED_FIELDS`) that were set explicitly, with their values."""
        return {name: self.__dict__[name] for name in DERIVED_FIELDS if self.__dict__.get(name) is not None}


def _require(ok, name, allowed, config):
    if not ok:
        raise ValueError(f"DiffusionMoeConfig: `{name}` must be {allowed}; got {getattr(config, name)!r}.")


def _is_id(value, vocab_size):
    return _is_int(value) and 0 <= value < vocab_size


def _check_kind(config, name, kind):
    value = getattr(config, name)
    if isinstance(kind, tuple):
        _require(isinstance(value, str) and value in kind, name, f"one of {kind}", config)
    elif kind == "id":
        vocab = config.vocab_size
        _require(value is None or _is_id(value, vocab), name, f"None or a token id in [0, vocab_size={vocab})", config)
    else:
        optional = kind.startswith("?")
        base = kind.lstrip("?")
        if optional and value is None:
            return
        ok = {
            "int>0": lambda v: _is_int(v) and v > 0,
            "int>=0": lambda v: _is_int(v) and v >= 0,
            "num>0": lambda v: _is_number(v) and v > 0,
            "num>=0": lambda v: _is_number(v) and v >= 0,
            "unit": lambda v: _is_number(v) and 0 <= v <= 1,
            "bool": lambda v: isinstance(v, bool),
        }[base](value)
        _require(ok, name, _KIND_TEXT[kind], config)


__all__ = ["DiffusionMoeConfig"]
