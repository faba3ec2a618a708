"""The exact prefix cache's storage, and its reuse across turns.

Each denoising step appends the current block's keys/values and crops them off again, so
`DynamicCache`'s append-by-concatenation would copy the whole prefix at every step of
every layer. `PrefixBufferLayer` keeps every layer's keys/values in one buffer sized up
front: appending copies only the new tokens and cropping only moves the end; attention
reads a view of the buffer. Otherwise it behaves as a `DynamicLayer`.

`PrefixCache` is what `generate(..., return_dict_in_generate=True)` returns for
block-causal models: the keys/values of every sample's finished whole blocks, with the
tokens they were computed from and the signature of the model that computed them
(`model_signature`: the config fields that shape its keys/values, dtype, device and a
fingerprint of the weights). Passed back as `cache` with a prompt that extends those
tokens (a chat's next turn), `check_made_by` and `check_extended_by` reject a cache of
another model or another sequence, and `reuse_for` lays it out for the new batch, so only
the new tokens are prefilled.
"""

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PrefixBufferLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys` / `values` are views of preallocated `max_length` buffers."""

    def __init__(self, max_length: int):
        super().__init__()
        self.max_length = max_length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        (B, kv_heads, _, k_dim), v_dim = key_states.shape, value_states.shape[-1]
        self.key_buffer = key_states.new_empty(B, kv_heads, self.max_length, k_dim)
        self.value_buffer = value_states.new_empty(B, kv_heads, self.max_length, v_dim)
        self.keys, self.values = self.key_buffer[..., :0, :], self.value_buffer[..., :0, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.keys.shape[-2]
        end = start + key_states.shape[-2]
        if end > self.max_length:
            raise ValueError(f"PrefixBufferLayer: {end} tokens exceed the buffer's max_length {self.max_length}.")
        self.key_buffer[..., start:end, :].copy_(key_states)
        self.value_buffer[..., start:end, :].copy_(value_states)
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


def prefix_buffer_cache(num_layers: int, max_length: int, signature: dict | None = None) -> "PrefixCache":
    cache = PrefixCache(layers=[PrefixBufferLayer(max_length) for _ in range(num_layers)])
    cache.signature = signature
    return cache


# the config fields that decide a model's keys/values (and so whether a cache fits it)
SIGNATURE_FIELDS = (
    "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "hidden_act", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "use_qk_norm",
    "attention_layout", "block_size", "first_k_dense_replace", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_shared_experts", "router_type", "router_score_function", "norm_topk_prob",
    "routed_scaling_factor", "n_group", "topk_group", "capacity_factor", "capacity_schedule", "capacity_min",
    "capacity_max", "capacity_sigma", "block_router_size", "block_router_top_p", "block_router_min_experts",
    "mask_token_id",
)


def model_signature(model) -> dict:
    """What a cache must agree with to be reused by `model`: the config fields that shape
    its keys/values, dtype, device, and a fingerprint of the weights (so another checkpoint
    of the same architecture, or weights changed since, are caught too)."""
    signature = {name: getattr(model.config, name, None) for name in SIGNATURE_FIELDS}
    signature["dtype"] = str(model.dtype)
    signature["device"] = str(model.device)
    signature["weights"] = _weights_fingerprint(model)
    return signature


def _weights_fingerprint(model) -> tuple:
    """Sums (fp64, on the CPU) of up to 4096 evenly strided entries of the embedding and of
    every attention layer's key/value projections: cheap, and different for another checkpoint.
    A quantized weight (a tensor subclass, e.g. torchao's) is read through `dequantize()`."""
    tensors = [model.get_input_embeddings().weight]
    for module in model.modules():
        for name in ("k_proj", "v_proj"):
            weight = getattr(getattr(module, name, None), "weight", None)
            if isinstance(weight, torch.Tensor):
                tensors.append(weight)
    sums = []
    for tensor in tensors:
        if tensor.device.type == "meta":  # offloaded: nothing to read
            sums.append(None)
            continue
        if hasattr(tensor, "to_local"):  # a DTensor (tensor parallelism): this rank's shard
            tensor = tensor.to_local()
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):  # a quantized subclass (torchao's
            tensor = tensor.dequantize()  # Int8Tensor implements no view): its values
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(flat.numel() // 4096, 1)][:4096]
        sums.append(float(sample.cpu().double().sum()))  # on the CPU: some devices have no fp64
    return tuple(sums)


class PrefixCache(Cache):
    """Keys/values of a left-padded canvas of whole blocks, plus what they were computed from:
    `canvas` [B, K] token ids, `pad` [B] the left padding of each row and `cached` [B] how
    many of each row's real tokens (whole blocks) are valid for reuse."""

    canvas: torch.Tensor | None = None
    pad: torch.Tensor | None = None
    cached: torch.Tensor | None = None
    signature: dict | None = None  # `model_signature` of the model that computed it

    def record(self, canvas: torch.Tensor, pad: torch.Tensor, cached: torch.Tensor, signature: dict):
        self.canvas, self.pad, self.cached, self.signature = canvas, pad, cached, signature

    def check_made_by(self, model):
        """ValueError naming every difference between the model that computed this cache and `model`."""
        if self.canvas is None or self.signature is None:
            raise ValueError("`cache` must be the cache a previous generate() returned "
                             "(return_dict_in_generate=True).")
        current = model_signature(model)
        differ = [name for name in current if current[name] != self.signature.get(name)]
        if differ:
            details = "; ".join(
                "the weights differ (another checkpoint, or weights changed since)" if name == "weights"
                else f"{name}: {self.signature.get(name)!r} (this model: {current[name]!r})" for name in differ
            )
            raise ValueError(
                f"`cache` was computed by a different model ({details}); its keys/values do not fit this model. "
                "Pass the cache this model's generate() returned, or no cache."
            )

    def check_extended_by(self, prompts: list[torch.Tensor]):
        """ValueError unless every new prompt starts with the tokens cached for its row."""
        if self.canvas is None:
            raise ValueError("`cache` must be the cache a previous generate() returned "
                             "(return_dict_in_generate=True).")
        if len(prompts) != self.canvas.shape[0]:
            raise ValueError(f"`cache` holds {self.canvas.shape[0]} sequences; the prompt batch has "
                             f"{len(prompts)}.")
        for b, prompt in enumerate(prompts):
            start, length = int(self.pad[b]), int(self.cached[b])
            cached = self.canvas[b, start : start + length]
            same = prompt[:length] == cached[: len(prompt)] if len(prompt) >= length else None
            if same is None or not bool(same.all()):
                where = len(prompt) if same is None else int((~same).nonzero()[0])
                raise ValueError(
                    f"The prompt of sample {b} does not extend the sequence `cache` was computed for "
                    f"(it differs at token {where} of the {length} cached ones): pass the previous output's tokens "
                    "followed by the new ones, or no cache."
                )

    def reuse_for(self, pad: torch.Tensor, max_length: int) -> tuple["PrefixCache", int]:
        """A new cache for a batch laid out with left padding `pad` [B], holding this cache's
        valid keys/values at their new indices; and the common length c0 up to which every row
        is filled (the caller prefills from there)."""
        c0 = int((pad + self.cached).min())
        new = prefix_buffer_cache(len(self.layers), max_length, self.signature)
        index = torch.arange(c0, device=pad.device).unsqueeze(0) - pad.unsqueeze(1)  # [B, c0] real position
        valid = (index >= 0) & (index < self.cached.unsqueeze(1))
        source = (index + self.pad.unsqueeze(1)).clamp(min=0)
        for old, layer in zip(self.layers, new.layers):
            keys, values = (torch.where(valid[:, None, :, None], _take(t, source), 0.0) for t in (old.keys, old.values))
            layer.update(keys, values)
        return new, c0


def _take(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """states [B, heads, K, D] at per-row positions [B, n] -> [B, heads, n, D]."""
    positions = positions.clamp(max=states.shape[2] - 1)
    index = positions[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[-1])
    return states.gather(2, index)
