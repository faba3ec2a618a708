"""The exact prefix cache's storage: every layer's keys/values in one buffer sized up front.

Each denoising step appends the current block's keys/values and crops them off again, so
`DynamicCache`'s append-by-concatenation would copy the whole prefix at every step of
every layer. Here appending copies only the new tokens and cropping only moves the end;
attention reads a view of the buffer. Otherwise it behaves as a `DynamicCache`.
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


def prefix_buffer_cache(num_layers: int, max_length: int) -> Cache:
    return Cache(layers=[PrefixBufferLayer(max_length) for _ in range(num_layers)])
