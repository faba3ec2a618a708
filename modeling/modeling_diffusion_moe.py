"""Mixture-of-experts masked-diffusion language model (LLaDA / LLaDA2 family).

Pre-norm decoder without a causal mask: attention is bidirectional or block-causal
(`config.attention_layout`), the first `first_k_dense_replace` layers use a dense SwiGLU
MLP and the rest a sparse MoE block whose routing policy is `config.router_type`.
The masked-LM head predicts token i at position i (no shift).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.utils import can_return_tuple, logging

from ..configuration.configuration_diffusion_moe import DiffusionMoeConfig
from ..configuration.remote_code import AtomicSavePretrained
from ..generation.generation_utils import DiffusionGenerationMixin
from .attention_masks import attended_keys, build_attention_mask, positions_from_padding
from .diffusion_loss import IGNORE_INDEX, chunked_cross_entropy, diffusion_loss_weights
from .experts import EXPERT_CHOICE_STATIC, DiffusionMoeExperts
from .input_checks import (
    check_fractions,
    check_input_shape,
    check_loss_noise_level,
    check_padding_mask,
    check_token_ids,
)
from .routing import DiffusionMoeRouter, build_router, routing_inputs_for
from .routing_decisions import RouterStats, RoutingDecision, router_losses
from .routing_inputs import RoutingInputs
from .transformers_compat import (
    CacheOutput,
    ExpertsImplementationSupport,
    OutputRecorder,
    accepts_past_key_values,
    capture_outputs,
)

logger = logging.get_logger(__name__)


@dataclass
class DiffusionMoeModelOutput(CacheOutput):
    """Base model output. `hidden_states`, `attentions`, `router_logits` (one [B*L, E] tensor
    per MoE layer) and `router_decisions` (one `RoutingDecision` per MoE layer: its
    `aux_loss()`, `z_loss()`, `stats()`) are recorded on request (`output_*=True`, or the
    config's flags), as Transformers records outputs."""

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_decisions: tuple[RoutingDecision, ...] | None = None


@dataclass
class DiffusionMoeMaskedLMOutput(CacheOutput):
    """`loss` is the diffusion loss plus the weighted router losses (in training mode).
    `aux_loss` / `z_loss` are averaged over MoE layers (training mode, when their
    coefficients are set); `router_stats` with `output_router_stats=True`."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    router_decisions: tuple[RoutingDecision, ...] | None = None
    diffusion_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    router_stats: tuple[RouterStats, ...] | None = None


class DiffusionMoeRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        hidden_states = hidden_states.float()
        hidden_states = hidden_states * torch.rsqrt(hidden_states.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * hidden_states.to(dtype)


class DiffusionMoeRotaryEmbedding(nn.Module):
    """cos/sin for the rotated slice of each head: the first head_dim * partial_rotary_factor dims."""

    def __init__(self, config):
        super().__init__()
        self.rotary_dim = int(config.head_dim * config.partial_rotary_factor)
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32) / self.rotary_dim
        self.register_buffer("inv_freq", 1.0 / (config.rope_theta**exponent), persistent=False)

    @torch.no_grad()
    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """Rotate-half rotary on the leading `cos.shape[-1]` dims of each head; the rest pass through."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :d], x[..., d:]
        return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    key, value = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    return torch.matmul(attn_weights, value).transpose(1, 2).contiguous(), attn_weights


class DiffusionMoeAttention(nn.Module):
    """GQA attention; optional per-head q/k RMSNorm before partial rotary; never causal."""

    def __init__(self, config: DiffusionMoeConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)
        if config.use_qk_norm:
            self.q_norm = DiffusionMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = DiffusionMoeRMSNorm(self.head_dim, eps=config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_norm(self.q_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        key = self.k_norm(self.k_proj(hidden_states).view(hidden_shape)).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
            **kwargs,
        )
        return self.o_proj(attn_output.reshape(*input_shape, -1).contiguous()), attn_weights


class DiffusionMoeMLP(nn.Module):
    """Dense SwiGLU MLP (the first dense layers, and the shared experts)."""

    def __init__(self, config, intermediate_size=None):
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DiffusionMoeSparseMoeBlock(nn.Module):
    """Router + fused routed experts + optional shared experts (always applied, unweighted)."""

    def __init__(self, config: DiffusionMoeConfig):
        super().__init__()
        self.config = config
        self.gate = build_router(config)
        self.experts = DiffusionMoeExperts(config)
        self.shared_experts = (
            DiffusionMoeMLP(config, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts > 0
            else None
        )

    def forward(self, hidden_states, routing_inputs: RoutingInputs, **kwargs):
        _, decision = self.gate(hidden_states, routing_inputs)
        routed = decision.dispatch(self.experts, hidden_states)
        if self.shared_experts is not None:
            routed = routed + self.shared_experts(hidden_states)
        return routed


class DiffusionMoeDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: DiffusionMoeConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DiffusionMoeAttention(config, layer_idx)
        self.is_moe = layer_idx >= config.first_k_dense_replace
        self.mlp = DiffusionMoeSparseMoeBlock(config) if self.is_moe else DiffusionMoeMLP(config)
        self.input_layernorm = DiffusionMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DiffusionMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None, **kwargs):
        """kwargs: `routing_inputs` (the forward's `RoutingInputs`, read by MoE layers)."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
        hidden_states = residual + hidden_states
        normed = self.post_attention_layernorm(hidden_states)
        return hidden_states + (self.mlp(normed, **kwargs) if self.is_moe else self.mlp(normed))


class DiffusionMoePreTrainedModel(AtomicSavePretrained, ExpertsImplementationSupport, PreTrainedModel):
    config_class = DiffusionMoeConfig
    config: DiffusionMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DiffusionMoeDecoderLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(DiffusionMoeRouter, index=0),
        "router_decisions": OutputRecorder(DiffusionMoeRouter, index=1),
        "hidden_states": DiffusionMoeDecoderLayer,
        "attentions": OutputRecorder(DiffusionMoeAttention, index=1),
    }

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Expert choice defaults to "expert_choice_static": its experts all hold the same
        number of tokens, and that dispatch is the fused static-shape kernel. Transformers'
        names ("batched_mm", "grouped_mm", "eager") mean Transformers' functions for every rule."""
        expert_choice = self.config.router_type == "expert_choice"
        if requested_experts is None and expert_choice:
            requested_experts = EXPERT_CHOICE_STATIC
        if requested_experts == EXPERT_CHOICE_STATIC and not expert_choice:
            raise ValueError(
                f'experts_implementation="{EXPERT_CHOICE_STATIC}" is expert choice\'s dispatch; router_type is '
                f'{self.config.router_type!r}: use "grouped_mm", "batched_mm" or "eager".'
            )
        return super().get_correct_experts_implementation(requested_experts)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DiffusionMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DiffusionMoeRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.expert_bias)
        elif isinstance(module, DiffusionMoeRotaryEmbedding):
            exponent = torch.arange(0, module.rotary_dim, 2, dtype=torch.float32) / module.rotary_dim
            init.copy_(module.inv_freq, 1.0 / (self.config.rope_theta**exponent))

def check_parallel_layout(config) -> None:
    """What `from_pretrained(..., distributed_config=...)` asks of this model, refused early and by name."""
    layout = getattr(config, "distributed_config", None)
    if layout is None:
        return
    if layout.pp_size > 1:
        raise ValueError(
            f"DistributedConfig(pp_size={layout.pp_size}): pipeline parallelism is not supported. Transformers' "
            "pipeline forward is inference-only, passes the LM head's arguments (`noise_level`, "
            "`num_items_in_batch`) to the base model and drops `input_ids` after the first stage, where routing "
            "reads the mask positions. Use tp_size, ep_size and fsdp_size."
        )
    if layout.enable_sequence_parallel:
        raise ValueError("DistributedConfig(enable_sequence_parallel=True): sequence parallelism is not supported "
                         "(Transformers reserves the flag and does not wire it up yet).")
    tp, ep = layout.tp_size, layout.ep_size  # resolved to ints by DistributedConfig
    needs = [("num_experts", config.num_experts, "ep_size", ep),
             ("num_attention_heads", config.num_attention_heads, "tp_size", tp),
             ("num_key_value_heads", config.num_key_value_heads, "tp_size", tp),
             ("moe_intermediate_size", config.moe_intermediate_size, "tp_size", tp)]
    if config.first_k_dense_replace > 0:  # dense MLP layers
        needs.append(("intermediate_size", config.intermediate_size, "tp_size", tp))
    for name, value, size_name, size in needs:
        if value % size:
            raise ValueError(f"DistributedConfig: {name} ({value}) must be a multiple of {size_name} ({size}).")


class DiffusionMoeModel(DiffusionMoePreTrainedModel):
    def __init__(self, config: DiffusionMoeConfig):
        check_parallel_layout(config)
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(DiffusionMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = DiffusionMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DiffusionMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @capture_outputs
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        mask_ratio: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
        static_routing: bool = False,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_decisions: bool | None = None,
    ) -> DiffusionMoeModelOutput:
        """
        attention_mask: 2-D [B, past + L] padding mask (1 = real token), or a 4-D mask
            [B, 1, L, past + L] (bool: True = attend, or additive float) used as-is.
        padding_mask: [B, L] (1 = real token) with a 4-D `attention_mask`: which tokens routing
            counts (padding takes no capacity and casts no vote). Default: the tokens some query
            may attend to (a key no query attends is padding). With a 2-D mask it is that mask.
        mask_ratio: [B] fraction of masked real tokens per sequence, for the capacity
            schedule; a block-causal model's blocks all use their sequence's value. When not
            given, each routing unit (a sequence; for block-causal models each attention
            block) reads its own ratio from `input_ids == mask_token_id`.
        cache: a `Cache` holding the keys/values before this forward (Transformers 5.24's name;
            `past_key_values=` is accepted as Transformers accepts it).
        use_cache: return (and fill) a `DynamicCache` with this forward's keys/values.
        output_hidden_states / output_attentions / output_router_logits /
            output_router_decisions: Transformers' output flags (default: the config's).
            Attention weights need `attn_implementation="eager"`: as in Transformers, other
            backends return none (a warning says so).
        static_routing: the rows are whole aligned attention blocks (as in static-shape
            decoding): routing groups are then fixed slices and expert-choice capacity is
            bounded from `capacity_max`, so the forward reads nothing back from the device.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("DiffusionMoeModel.forward: pass exactly one of `input_ids` or `inputs_embeds`.")
        check_input_shape(input_ids, inputs_embeds, self.config.hidden_size)
        wants_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if wants_attentions and self.config._attn_implementation != "eager":
            logger.warning_once(
                f"`output_attentions=True`: attn_implementation={self.config._attn_implementation!r} computes no "
                "attention weights, so none are returned. Load the model with attn_implementation='eager' for them."
            )
        if inputs_embeds is None:
            check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embed_tokens(input_ids)
        B, L = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        if self.config.attention_layout == "block_causal" and (attention_mask is None or attention_mask.dim() == 2):
            self._check_cached_blocks_are_whole(attention_mask, past_length)

        if (attention_mask is not None and attention_mask.dim() == 4) or (
            attention_mask is None and self._sees_every_key(L, past_length)
        ):
            mask = attention_mask  # as given, or None: no padding and nothing hidden (SDPA's fast path)
            padding_mask = routing_padding(padding_mask, mask, past_length, B, L, device)
            if position_ids is None:
                position_ids = torch.arange(past_length, past_length + L, device=device).expand(B, L)
        else:
            if padding_mask is not None:
                raise ValueError(
                    "`padding_mask` is for 4-D `attention_mask`s only: with a 2-D (or no) `attention_mask`, that mask "
                    "is the padding mask."
                )
            if attention_mask is None:
                attention_mask = torch.ones(B, past_length + L, dtype=torch.bool, device=device)
            if attention_mask.shape != (B, past_length + L):
                raise ValueError(
                    f"`attention_mask` must have shape (batch, past + length) = ({B}, {past_length + L}); "
                    f"got {tuple(attention_mask.shape)}."
                )
            check_padding_mask(attention_mask)
            full_padding = attention_mask.bool()
            key_positions = positions_from_padding(full_padding)
            padding_mask = full_padding[:, past_length:]
            if position_ids is None:
                position_ids = key_positions[:, past_length:]
            elif self.config.attention_layout == "block_causal":
                key_positions = self._block_positions(position_ids.expand(B, L), key_positions, padding_mask)
            mask = build_attention_mask(
                full_padding, position_ids.expand(B, L), key_positions, self.config.attention_layout,
                self.config.block_size,
            )
        position_ids = position_ids.expand(B, L)
        if mask is not None and mask.dtype == torch.bool and self.config._attn_implementation != "sdpa":
            mask = torch.zeros(mask.shape, dtype=inputs_embeds.dtype, device=device).masked_fill(
                ~mask, torch.finfo(inputs_embeds.dtype).min
            )
        masked = None
        if mask_ratio is not None:
            check_fractions("mask_ratio", mask_ratio, B)
        elif input_ids is not None and self.config.mask_token_id is not None:
            # each routing unit's mask ratio (the capacity schedule's input, the statistics by ratio); a
            # schedule with neither is refused by `routing_inputs_for`, which names what to pass
            masked = input_ids == self.config.mask_token_id
        config = self.config
        if static_routing and config.attention_layout == "block_causal" and L % config.block_size:
            raise ValueError(
                f"`static_routing=True` needs rows of whole aligned attention blocks: length {L} is not a multiple "
                f"of block_size ({config.block_size})."
            )
        routing_inputs = routing_inputs_for(config, padding_mask, position_ids, mask_ratio, masked, static_routing)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                routing_inputs=routing_inputs,
            )
        return DiffusionMoeModelOutput(
            last_hidden_state=self.norm(hidden_states),
            cache=cache if use_cache or past_length else None,
        )

    def _check_cached_blocks_are_whole(self, attention_mask, past_length) -> None:
        """A block's keys/values are final only once the whole block has been seen: a cached
        prefix that ends inside a block would give its tokens keys computed without the rest of
        their block (silently inexact). `generate` always caches whole blocks."""
        if not isinstance(past_length, int) or past_length == 0 or torch.compiler.is_compiling():
            return
        block = self.config.block_size
        cached = (attention_mask[:, :past_length].long().sum(-1) if attention_mask is not None
                  else torch.tensor([past_length]))
        partial = cached % block != 0
        if partial.any():
            row = int(partial.nonzero()[0])
            raise ValueError(
                f"`cache` ends inside an attention block: row {row} has {int(cached[row])} cached real tokens, not a "
                f"multiple of block_size ({block}). Cache whole blocks (as generate() does), or run without `cache`."
            )

    @staticmethod
    def _block_positions(position_ids, mask_positions, padding_mask) -> torch.Tensor:
        """Key positions for the block-causal mask when `position_ids` are given: one source of
        truth for which block a token is in, so queries and keys can never disagree. Without a
        cache the given positions are the keys' too; cached keys were placed by the padding mask,
        so the new tokens' positions must continue them (else a ValueError)."""
        past_length = mask_positions.shape[1] - position_ids.shape[1]
        if past_length == 0:
            return position_ids
        if not torch.compiler.is_compiling():
            differs = (position_ids != mask_positions[:, past_length:]) & padding_mask
            if differs.any():
                row, col = (int(i) for i in differs.nonzero()[0])
                raise ValueError(
                    f"`position_ids` disagree with `attention_mask` at row {row}, token {col}: "
                    f"{int(position_ids[row, col])} given, {int(mask_positions[row, past_length + col])} from the padding "
                    "mask (positions count real tokens from each sequence's first). With a cache they must agree, or "
                    "blocks of the cached and new tokens would be computed two ways."
                )
        return mask_positions

    def _sees_every_key(self, length: int, past_length) -> bool:
        """Without padding, does every query attend to every key? Always for bidirectional
        attention; for block-causal when the queries lie in one block (a cached decoding step)."""
        if self.config.attention_layout == "bidirectional":
            return True
        if not isinstance(past_length, int):
            return False
        block = self.config.block_size
        return past_length // block == (past_length + length - 1) // block


def routing_padding(padding_mask, mask, past_length, batch: int, length: int, device) -> torch.Tensor:
    """The real tokens routing counts under a 4-D (or no) attention mask: `padding_mask` when
    given, else the keys some query attends to (`attended_keys`), else (no mask) every token."""
    if padding_mask is not None:
        if padding_mask.shape != (batch, length):
            raise ValueError(f"`padding_mask` must have shape (batch, length) = ({batch}, {length}); got "
                             f"{tuple(padding_mask.shape)}.")
        check_padding_mask(padding_mask, "padding_mask")
        return padding_mask.bool()
    if mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    keys = torch.arange(length, device=mask.device) + past_length  # where this forward's keys sit in the cache
    return attended_keys(mask, keys).expand(batch, length)


def output_flags(hidden_states=None, attentions=None, router_logits=None) -> dict:
    """The `output_*` flags that were given: `capture_outputs` falls back to the config's
    flags only for those left out, so a None must not be passed on."""
    flags = dict(output_hidden_states=hidden_states, output_attentions=attentions, output_router_logits=router_logits)
    return {name: value for name, value in flags.items() if value is not None}


class DiffusionMoeForMaskedLM(DiffusionGenerationMixin, DiffusionMoePreTrainedModel):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    # forward takes `num_items_in_batch`: Trainer then neither rescales the loss for
    # gradient accumulation nor needs to (the loss is normalised by the step's items)
    accepts_loss_kwargs = True

    def __init__(self, config: DiffusionMoeConfig):
        super().__init__(config)
        self.model = DiffusionMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @accepts_past_key_values
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        mask_ratio: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        noise_level: torch.Tensor | None = None,
        output_router_stats: bool = False,
        static_routing: bool = False,
        padding_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        logits_to_keep: int | slice | torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        output_router_logits: bool | None = None,
        output_router_decisions: bool | None = None,
    ) -> DiffusionMoeMaskedLMOutput:
        """labels: [B, L] targets at masked positions, -100 elsewhere (no shift).
        noise_level: [B] the t_b each sequence was masked with, for the "elbo" weighting;
            defaults to `mask_ratio` when given, else the realised ratio (labelled / real tokens).
        logits_to_keep: which positions get logits (Transformers' convention): an int N for
            the last N (0 = all), a slice, or an index tensor (1-D: the same positions in
            every row; 2-D: per row). The default, None, is all positions without `labels`
            and none with them: the loss never needs full logits (see below), so a training
            step does not build [B, L, V] fp32 logits unless asked to.

        The loss is the masked-diffusion loss (`config.loss_weighting`), plus
        `router_aux_loss_coef * aux + router_z_loss_coef * z` in training mode. Its
        cross-entropy projects only the labelled positions' hidden states, in chunks
        (`chunked_cross_entropy`), in fp32 also under autocast.
        Router losses and `output_router_stats` (one `RouterStats` per MoE layer) are read
        from the routing decisions the base model records, as Qwen3-MoE reads its router logits.
        `return_dict=False` returns the output's non-None fields as a tuple.
        Other arguments: as `DiffusionMoeModel.forward`.
        """
        if noise_level is not None and labels is None:
            raise ValueError("`noise_level` weights the loss: pass it with `labels`.")
        config = self.config
        wants_losses = self.training and (config.router_aux_loss_coef > 0 or config.router_z_loss_coef > 0)
        wants_decisions = output_router_decisions if output_router_decisions is not None else (
            getattr(config, "output_router_decisions", False))
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            mask_ratio=mask_ratio,
            padding_mask=padding_mask,
            static_routing=static_routing,
            return_dict=True,
            output_router_decisions=bool(wants_decisions or wants_losses or output_router_stats),
            **output_flags(output_hidden_states, output_attentions, output_router_logits),
        )
        decisions = outputs.router_decisions or ()
        aux_loss, z_loss = router_losses(decisions, config) if wants_losses else (None, None)
        hidden_states = outputs.last_hidden_state
        if logits_to_keep is None:
            logits_to_keep = None if labels is not None else 0
        logits = None if logits_to_keep is None else self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
        loss = diffusion_loss = None
        if labels is not None:
            if attention_mask is not None and attention_mask.dim() == 2:
                padding_mask = attention_mask[:, -labels.shape[1] :].bool()
            else:
                padding_mask = torch.ones_like(labels, dtype=torch.bool)
            if self.config.loss_weighting == "elbo" and (noise_level is not None or mask_ratio is not None):
                named = ("noise_level", noise_level) if noise_level is not None else ("mask_ratio", mask_ratio)
                check_loss_noise_level(*named, labels, IGNORE_INDEX)
            weights = diffusion_loss_weights(
                labels, padding_mask, noise_level if noise_level is not None else mask_ratio,
                self.config.loss_weighting, num_items_in_batch, torch.promote_types(hidden_states.dtype, torch.float32),
            )
            labelled = labels != IGNORE_INDEX
            diffusion_loss = chunked_cross_entropy(
                hidden_states[labelled], self.lm_head, labels[labelled], weights[labelled], self.config.vocab_size
            )
            loss = diffusion_loss
            if aux_loss is not None:
                loss = loss + config.router_aux_loss_coef * aux_loss
            if z_loss is not None:
                loss = loss + config.router_z_loss_coef * z_loss
        return DiffusionMoeMaskedLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            router_decisions=outputs.router_decisions if wants_decisions else None,
            diffusion_loss=diffusion_loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_stats=tuple(d.stats() for d in decisions) if output_router_stats else None,
        )


__all__ = [
    "DiffusionMoePreTrainedModel",
    "DiffusionMoeModel",
    "DiffusionMoeForMaskedLM",
    "DiffusionMoeModelOutput",
    "DiffusionMoeMaskedLMOutput",
]
