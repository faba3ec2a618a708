"""Convert LLaDA2-MoE checkpoints (LLaDA2.0-mini, LLaDA2.1, dMoE-16B, LLaDA2.2) to diffusion-moe and back.

The router follows the config: plain LLaDA2 is sigmoid group-limited token choice, dMoE's
`mode` / `core_threshold` is `router_type="block"`, and LLaDA2.2's `expert_capacity` is its
block expert pool (`router_type="block_pool"`, pool per `block_size` block); LLaDA2.2's
edit-operation ids (`delete_token_id`, `split_token_id`) and every EOS id carry over.

Configs are mapped as dicts and tensors one at a time, so no model is ever built: a
converted 16B checkpoint needs about one shard of memory, not the model. The only
tensors that need more than a rename are attention's fused `query_key_value` (split into
q/k/v) and the routed experts (E separate SwiGLU experts <-> one fused [E, 2I, H]
`gate_up_proj` and [E, H, I] `down_proj` per layer, buffered one layer at a time).

    LLaDA2 (model.layers.{i}.)           diffusion-moe (model.layers.{i}.)
    attention.query_key_value            self_attn.{q,k,v}_proj   (rows [Q heads | K heads | V heads])
    attention.dense                      self_attn.o_proj
    attention.{query,key}_layernorm      self_attn.{q,k}_norm
    mlp.experts.{e}.{gate,up}_proj       mlp.experts.gate_up_proj[e] = [gate; up]
    mlp.experts.{e}.down_proj            mlp.experts.down_proj[e]
    model.word_embeddings                model.embed_tokens
    (norms, dense mlp, mlp.gate.weight, mlp.gate.expert_bias, mlp.shared_experts, lm_head: same names)
"""

import re
from pathlib import Path

import torch
from transformers.utils import logging

from ..configuration.configuration_diffusion_moe import DiffusionMoeConfig
from ..configuration.remote_code import AUTO_MAP, save_remote_code
from .checkpoint_io import (
    ShardWriter,
    atomic_output_dir,
    check_destination,
    copy_other_files,
    iter_tensors,
    read_json,
    parse_size,
    shard_files,
    tensor_shapes,
    write_json,
)

logger = logging.get_logger(__name__)

LLADA2_MASK_TOKEN_ID = 156895
LLADA2_EOS_TOKEN_ID = 156892
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LLaDA2's own config defaults (LLaDA2MoeConfig.__init__), used when config.json omits a field.
_LLADA2_DEFAULTS = {
    "hidden_act": "silu",
    "use_qkv_bias": False,
    "use_qk_norm": True,
    "use_bias": True,
    "rms_norm_eps": 1e-5,
    "norm_head": False,
    "tie_word_embeddings": False,
    "max_position_embeddings": 16384,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "num_shared_experts": 0,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "first_k_dense_replace": 0,
    "partial_rotary_factor": 0.5,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
}
_LLADA2_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
)
# LLaDA2 fields that carry over unchanged (same name and meaning in DiffusionMoeConfig).
_SHARED_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "partial_rotary_factor",
    "use_qk_norm", "max_position_embeddings", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size", "num_shared_experts", "first_k_dense_replace", "n_group", "topk_group",
    "routed_scaling_factor", "norm_topk_prob",
)
# LLaDA2.2's additions (its block pool and edit operations), same names and meanings here
_LLADA22_FIELDS = ("expert_capacity", "block_size", "delete_token_id", "split_token_id")
# Every LLaDA2 field that decides the computation: a round trip must preserve these.
LLADA2_MODEL_FIELDS = (*_SHARED_FIELDS, *_LLADA22_FIELDS, "model_type", "score_function", "use_bias", "use_qkv_bias",
                       "norm_head", "rope_scaling", "pad_token_id")
_DMOE_BLOCK_SIZE = 32  # dMoE's gate votes over fixed 32-token chunks
_EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def llada2_field(config: dict, name: str):
    """A field of a LLaDA2 config dict, with LLaDA2's default when absent."""
    if name == "head_dim" and config.get("head_dim") is None:
        return config["hidden_size"] // config["num_attention_heads"]
    return config.get(name, _LLADA2_DEFAULTS.get(name))


def diffusion_moe_config_from_llada2(
    llada2: dict, mask_token_id: int = LLADA2_MASK_TOKEN_ID, eos_token_id: int | list[int] = LLADA2_EOS_TOKEN_ID
) -> DiffusionMoeConfig:
    """Map a LLaDA2 (dMoE, LLaDA2.2) `config.json` dict to a validated DiffusionMoeConfig.

    A dMoE config (`mode="aggregate"`, `core_threshold`) becomes `router_type="block"` with
    `block_router_top_p=core_threshold`; a LLaDA2.2 config (`expert_capacity`) becomes
    `router_type="block_pool"` over its `block_size`; plain LLaDA2 becomes sigmoid token
    choice. `eos_token_id` may be a list (LLaDA2.2 stops on two ids): every id is kept.
    """
    if llada2.get("model_type") != "llada2_moe":
        raise ValueError(f"config.json: `model_type` must be 'llada2_moe'; got {llada2.get('model_type')!r}")
    missing = [name for name in _LLADA2_REQUIRED if llada2.get(name) is None]
    if missing:
        raise ValueError(f"config.json: LLaDA2 config lacks required fields {missing}")
    for flag in ("use_bias", "use_qkv_bias", "norm_head"):
        if llada2_field(llada2, flag):
            raise ValueError(
                f"config.json: `{flag}` must be false; got {llada2_field(llada2, flag)!r} "
                "(diffusion-moe models have no linear biases and an unnormalised lm_head)"
            )
    if llada2_field(llada2, "rope_scaling"):
        raise ValueError(f"config.json: `rope_scaling` must be null; got {llada2['rope_scaling']!r} (not supported)")
    if llada2.get("use_rmsnorm", True) is not True:
        raise ValueError(f"config.json: `use_rmsnorm` must be true; got {llada2['use_rmsnorm']!r} (RMSNorm only)")
    ids = [("mask_token_id", mask_token_id)]
    ids += [("eos_token_id", value) for value in (eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])]
    for name, value in ids:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < llada2["vocab_size"]:
            raise ValueError(f"`{name}` must be a token id in [0, vocab_size={llada2['vocab_size']}); got {value!r}")
    first_eos = ids[1][1]
    fields = {name: llada2_field(llada2, name) for name in _SHARED_FIELDS}
    if not fields["norm_topk_prob"]:
        logger.warning(
            "config.json: `norm_topk_prob` is false, but LLaDA2's gate renormalises the top-k weights whenever "
            "num_experts_per_tok > 1 regardless; the converted config sets norm_topk_prob=True to route as it does."
        )
    fields.update(
        norm_topk_prob=True,
        router_score_function=llada2_field(llada2, "score_function"),
        attention_layout="block_causal",
        block_size=llada2.get("block_size", 32),
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=llada2.get("pad_token_id", first_eos),
        bos_token_id=llada2.get("bos_token_id"),
        delete_token_id=llada2.get("delete_token_id"),
        split_token_id=llada2.get("split_token_id"),
    )
    pooled = llada2.get("expert_capacity") is not None
    if pooled and ("mode" in llada2 or "core_threshold" in llada2):
        raise ValueError("config.json: both LLaDA2.2's `expert_capacity` and dMoE's `mode` / `core_threshold` are set: "
                         "one block router only")
    if pooled:  # LLaDA2.2: n_group / topk_group stay in its config, unused by its router
        fields.update(router_type="block_pool", expert_capacity=llada2["expert_capacity"])
    if "mode" in llada2 or "core_threshold" in llada2:
        if llada2.get("mode", "aggregate") != "aggregate":
            raise ValueError(f"config.json: dMoE `mode` must be 'aggregate'; got {llada2['mode']!r}")
        top_p = llada2.get("core_threshold", 0.6)
        fields.update(router_type="block", block_router_size=_DMOE_BLOCK_SIZE, block_router_top_p=top_p)
    config = DiffusionMoeConfig(**fields)
    config.architectures = ["DiffusionMoeForMaskedLM"]
    config.auto_map = dict(AUTO_MAP)
    return config


def llada2_config_from_diffusion_moe(config: DiffusionMoeConfig) -> dict:
    """The LLaDA2 `config.json` dict of a diffusion-moe config (block routing -> dMoE fields)."""
    if config.router_score_function != "sigmoid":
        raise ValueError(
            f"`router_score_function` must be 'sigmoid' to convert to LLaDA2; got {config.router_score_function!r}"
        )
    if not config.norm_topk_prob and config.num_experts_per_tok > 1:
        logger.warning(
            "`norm_topk_prob=False`, but LLaDA2's gate always renormalises the top-k weights: the converted "
            "checkpoint will weight its experts differently."
        )
    if config.router_type == "block_pool" and config.attention_layout != "block_causal":
        logger.warning("LLaDA2.2's block pool runs block-causal attention: the converted checkpoint keeps the pool "
                       "but not attention_layout='bidirectional'.")
    if config.router_type == "expert_choice" or config.capacity_factor is not None:
        logger.warning(
            "LLaDA2 routes by dropless token choice: the converted checkpoint keeps the weights, but not "
            f"router_type={config.router_type!r} / capacity_factor={config.capacity_factor!r}."
        )
    out = {name: getattr(config, name) for name in _SHARED_FIELDS}
    out.update(
        model_type="llada2_moe",
        architectures=["LLaDA2MoeModelLM"],
        score_function="sigmoid",
        use_bias=False,
        use_qkv_bias=False,
        norm_head=False,
        rope_scaling=None,
        pad_token_id=config.pad_token_id,
        eos_token_id=config.eos_token_id,
    )
    if config.bos_token_id is not None:
        out["bos_token_id"] = config.bos_token_id
    if config.router_type == "block":
        out.update(mode="aggregate", core_threshold=config.block_router_top_p)
    if config.router_type == "block_pool":  # a LLaDA2.2 checkpoint
        out.update(expert_capacity=config.expert_capacity, block_size=config.block_size)
    if config.delete_token_id is not None:
        out.update(delete_token_id=config.delete_token_id, split_token_id=config.split_token_id)
    return out


# LLaDA2.1's token editing, as its model card recommends: "quality" and "speed" modes; LLaDA2.2's
# Levenshtein editing with its published defaults (block 32, 32 steps, threshold 0.5, editing 0.0,
# 16 post steps), which needs the checkpoint's delete / split ids
DECODING_PRESETS = {
    "llada2.0": {"threshold": 0.95},
    "llada2.1-quality": {"threshold": 0.7, "editing_threshold": 0.5, "max_post_steps": 16},
    "llada2.1-speed": {"threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 16},
    "llada2.2": {"threshold": 0.5, "editing_threshold": 0.0, "max_post_steps": 16},
}
_EDITING_FIELDS = ("threshold", "editing_threshold", "max_post_steps")


def llada2_generation_config(mask_token_id: int, eos_token_id, pad_token_id: int, decoding: str = "llada2.0",
                             source: dict | None = None) -> dict:
    """LLaDA2's `generate` defaults under DiffusionGenerationConfig's field names: block 32,
    32 steps (one token per step at least), greedy, the `decoding` preset's thresholds. A
    source `generation_config.json` that sets LLaDA2.1's editing fields (`editing_threshold`,
    `max_post_steps`, with `threshold`) overrides the preset."""
    if decoding not in DECODING_PRESETS:
        raise ValueError(f"`decoding` must be one of {tuple(DECODING_PRESETS)}; got {decoding!r}")
    settings = dict(DECODING_PRESETS[decoding])
    if source and any(source.get(name) is not None for name in _EDITING_FIELDS[1:]):
        settings.update({name: source[name] for name in _EDITING_FIELDS if source.get(name) is not None})
    return {
        "max_new_tokens": 2048,
        "block_length": 32,
        "steps": 32,
        "remasking": "low_confidence",
        "eos_early_stop": False,
        "mask_token_id": mask_token_id,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "use_cache": True,
        **settings,
    }


class _Group:
    """Source tensors that together make some output tensors; `build` runs once all have arrived."""

    def __init__(self, keys, build):
        self.pending = set(keys)
        self.pieces = {}
        self.build = build

    def add(self, key, tensor) -> dict:
        self.pieces[key] = tensor
        self.pending.discard(key)
        if self.pending:
            return {}
        out, self.pieces = self.build(self.pieces), {}
        return out


class _FusedExperts(_Group):
    """One layer's E LLaDA2 experts, copied into [E, 2I, H] gate_up / [E, H, I] down as they
    arrive, so a layer is held once, and only until its last expert has been read."""

    def __init__(self, theirs, ours, num_experts, intermediate, hidden):
        super().__init__([f"{theirs}.{e}.{p}.weight" for e in range(num_experts) for p in _EXPERT_PROJS], None)
        self.ours, self.shape = ours, (num_experts, intermediate, hidden)
        self.pattern = re.compile(re.escape(theirs) + r"\.(\d+)\.(\w+)\.weight")
        self.gate_up = self.down = None

    def add(self, key, tensor) -> dict:
        E, I, H = self.shape
        if self.gate_up is None:
            self.gate_up, self.down = tensor.new_empty(E, 2 * I, H), tensor.new_empty(E, H, I)
        e, proj = self.pattern.fullmatch(key).groups()
        e = int(e)
        if proj == "gate_proj":  # rows [gate; up]: transformers' `_apply_gate` activates the first half
            self.gate_up[e, :I] = tensor
        elif proj == "up_proj":
            self.gate_up[e, I:] = tensor
        else:
            self.down[e] = tensor
        self.pending.discard(key)
        if self.pending:
            return {}
        out = {f"{self.ours}.gate_up_proj": self.gate_up, f"{self.ours}.down_proj": self.down}
        self.gate_up = self.down = None
        return out


def _rename(src, dst):
    return _Group([src], lambda pieces: {dst: pieces[src]})


def _layout(llada2: dict) -> tuple[list, list, list, dict]:
    """The correspondence of the two layouts, for a LLaDA2 config:
    renames [(theirs, ours, shape)], attention [(qkv key, our self_attn prefix)],
    experts [(their experts prefix, our experts prefix)], and the sizes."""
    c = {name: llada2_field(llada2, name) for name in (*_SHARED_FIELDS, "head_dim")}
    H, hd = c["hidden_size"], c["head_dim"]
    sizes = {"H": H, "E": c["num_experts"], "I": c["moe_intermediate_size"], "q": c["num_attention_heads"] * hd,
             "kv": c["num_key_value_heads"] * hd}

    def mlp(theirs, ours, size):
        return [(f"{theirs}.{p}.weight", f"{ours}.{p}.weight", (H, size) if p == "down_proj" else (size, H))
                for p in _EXPERT_PROJS]

    renames = [("model.word_embeddings.weight", "model.embed_tokens.weight", (c["vocab_size"], H)),
               ("model.norm.weight", "model.norm.weight", (H,))]
    if not c["tie_word_embeddings"]:
        renames.append(("lm_head.weight", "lm_head.weight", (c["vocab_size"], H)))
    attention, experts = [], []
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}"
        renames += [(f"{layer}.{n}.weight", f"{layer}.{n}.weight", (H,))
                    for n in ("input_layernorm", "post_attention_layernorm")]
        renames.append((f"{layer}.attention.dense.weight", f"{layer}.self_attn.o_proj.weight", (H, sizes["q"])))
        if c["use_qk_norm"]:
            renames += [(f"{layer}.attention.query_layernorm.weight", f"{layer}.self_attn.q_norm.weight", (hd,)),
                        (f"{layer}.attention.key_layernorm.weight", f"{layer}.self_attn.k_norm.weight", (hd,))]
        attention.append((f"{layer}.attention.query_key_value.weight", f"{layer}.self_attn"))
        if i < c["first_k_dense_replace"]:
            renames += mlp(f"{layer}.mlp", f"{layer}.mlp", c["intermediate_size"])
            continue
        renames += [(f"{layer}.mlp.gate.weight", f"{layer}.mlp.gate.weight", (sizes["E"], H)),
                    (f"{layer}.mlp.gate.expert_bias", f"{layer}.mlp.gate.expert_bias", (sizes["E"],))]
        if c["num_shared_experts"] > 0:
            shared = c["moe_intermediate_size"] * c["num_shared_experts"]
            renames += mlp(f"{layer}.mlp.shared_experts", f"{layer}.mlp.shared_experts", shared)
        experts.append((f"{layer}.mlp.experts", f"{layer}.mlp.experts"))
    return renames, attention, experts, sizes


def _llada2_plan(llada2: dict) -> tuple[dict, dict]:
    """LLaDA2 -> diffusion-moe: (source key -> its _Group, source key -> expected shape)."""
    renames, attention, experts, s = _layout(llada2)
    plan, shapes = {}, {}
    for theirs, ours, shape in renames:
        plan[theirs], shapes[theirs] = _rename(theirs, ours), shape
    for qkv, attn in attention:

        def split(pieces, qkv=qkv, attn=attn):  # rows [Q heads | K heads | V heads]
            q, k, v = pieces[qkv].split([s["q"], s["kv"], s["kv"]])
            return {f"{attn}.q_proj.weight": q.clone(), f"{attn}.k_proj.weight": k.clone(),
                    f"{attn}.v_proj.weight": v.clone()}

        plan[qkv], shapes[qkv] = _Group([qkv], split), (s["q"] + 2 * s["kv"], s["H"])
    for theirs, ours in experts:
        group = _FusedExperts(theirs, ours, s["E"], s["I"], s["H"])
        for e in range(s["E"]):
            for p in _EXPERT_PROJS:
                key = f"{theirs}.{e}.{p}.weight"
                plan[key], shapes[key] = group, (s["H"], s["I"]) if p == "down_proj" else (s["I"], s["H"])
    return plan, shapes


def _diffusion_moe_plan(config: DiffusionMoeConfig) -> tuple[dict, dict]:
    """diffusion-moe -> LLaDA2, the inverse of `_llada2_plan`."""
    renames, attention, experts, s = _layout(llada2_config_from_diffusion_moe(config))
    plan, shapes = {}, {}
    for theirs, ours, shape in renames:
        plan[ours], shapes[ours] = _rename(ours, theirs), shape
    for qkv, attn in attention:
        parts = [f"{attn}.{p}_proj.weight" for p in "qkv"]
        group = _Group(parts, lambda pieces, parts=parts, qkv=qkv: {qkv: torch.cat([pieces[p] for p in parts])})
        for part, rows in zip(parts, (s["q"], s["kv"], s["kv"])):
            plan[part], shapes[part] = group, (rows, s["H"])
    for theirs, ours in experts:
        E, I = s["E"], s["I"]

        def split_gate_up(pieces, theirs=theirs, ours=ours):
            w = pieces[f"{ours}.gate_up_proj"]
            out = {f"{theirs}.{e}.gate_proj.weight": w[e, :I].clone() for e in range(E)}
            return out | {f"{theirs}.{e}.up_proj.weight": w[e, I:].clone() for e in range(E)}

        def split_down(pieces, theirs=theirs, ours=ours):
            return {f"{theirs}.{e}.down_proj.weight": pieces[f"{ours}.down_proj"][e].clone() for e in range(E)}

        gate_up, down = f"{ours}.gate_up_proj", f"{ours}.down_proj"
        plan[gate_up], shapes[gate_up] = _Group([gate_up], split_gate_up), (E, 2 * I, s["H"])
        plan[down], shapes[down] = _Group([down], split_down), (E, s["H"], I)
    return plan, shapes


def llada2_tensor_shapes(llada2: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor a LLaDA2 checkpoint with this config holds, with its shape."""
    return _llada2_plan(llada2)[1]


def _check_tensors(found: dict, expected: dict, where: Path) -> None:
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"{where}: missing tensor(s) {missing[:5]}{more}")
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        more = f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        raise ValueError(f"{where}: unexpected tensor(s) {unexpected[:5]}{more} (biases and extra modules are "
                         "not supported)")
    for key, shape in expected.items():
        if tuple(found[key]) != tuple(shape):
            raise ValueError(f"{where}: tensor {key!r} has shape {tuple(found[key])}, expected {tuple(shape)}")


def _stream(files, plan, out_dir: Path, dtype, max_shard_size) -> str:
    """Feed every source tensor to its group and write each finished output tensor.

    Returns the name of the weights' dtype (for `config.json`)."""
    writer = ShardWriter(out_dir, max_shard_size)
    weights_dtype = dtype
    for key, tensor in iter_tensors(files):
        for name, out in plan[key].add(key, tensor).items():
            if name.endswith("expert_bias"):
                out = out.float()  # a router bias: kept in fp32 like the router logits
            elif dtype is not None and out.is_floating_point():
                out = out.to(dtype)
            weights_dtype = weights_dtype or out.dtype
            writer.add(name, out)
    writer.close()
    return str(weights_dtype).removeprefix("torch.")


def _resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype) or dtype is None:
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {tuple(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def convert_llada2_to_diffusion_moe(
    src,
    dst,
    mask_token_id: int = LLADA2_MASK_TOKEN_ID,
    eos_token_id: int | list[int] | None = None,
    dtype=None,
    overwrite: bool = False,
    max_shard_size="5GB",
    decoding: str | None = None,
) -> Path:
    """Convert a local LLaDA2-MoE checkpoint folder into a diffusion-moe checkpoint folder.

    `dst` gets fused-expert safetensors shards with an index, `config.json` (block-causal,
    block 32, sigmoid group-limited token choice; block routing for dMoE), the flat
    remote-code files and LLaDA2's generation defaults. `eos_token_id`: one id or a list;
    None takes every id of the source's generation_config.json (LLaDA2.2 has two), else of
    its config.json, else 156892. `dtype`: "auto" / None keeps the
    source dtype, else "float32", "bfloat16" or "float16". `decoding`: the generation
    defaults, one of DECODING_PRESETS ("llada2.0", "llada2.1-quality", "llada2.1-speed",
    "llada2.2"); None takes "llada2.2" for a LLaDA2.2 source, else LLaDA2.1's editing
    settings from the source's generation_config.json when it has them, else LLaDA2.0's. (LLaDA2.1 checkpoints share LLaDA2.0's config.json fields,
    weights and token ids; only the router bias may be stored in fp32, which the converter
    keeps in fp32 anyway.) Nothing is written to `dst` unless the whole conversion succeeds.
    """
    src, dst = Path(src), Path(dst)
    dtype = _resolve_dtype(dtype)
    parse_size(max_shard_size)
    if decoding is not None and decoding not in DECODING_PRESETS:
        raise ValueError(f"`decoding` must be one of {tuple(DECODING_PRESETS)}; got {decoding!r}")
    check_destination(dst, overwrite, src)
    llada2 = read_json(src / "config.json", "LLaDA2 config.json")
    source = src / "generation_config.json"
    source = read_json(source, "LLaDA2 generation_config.json") if source.is_file() else None
    if eos_token_id is None:
        eos_token_id = next((found for found in ((source or {}).get("eos_token_id"), llada2.get("eos_token_id"))
                             if found is not None), LLADA2_EOS_TOKEN_ID)
    config = diffusion_moe_config_from_llada2(llada2, mask_token_id, eos_token_id)
    if decoding is None and config.router_type == "block_pool":
        decoding = "llada2.2"
    if decoding == "llada2.2" and config.delete_token_id is None:
        raise ValueError("`decoding='llada2.2'` is LLaDA2.2's Levenshtein editing: the source config.json has no "
                         "`delete_token_id` / `split_token_id` (use 'llada2.1-speed' for LLaDA2.1's token editing)")
    files = shard_files(src)
    plan, expected = _llada2_plan(llada2)
    _check_tensors(tensor_shapes(files), expected, src)
    with atomic_output_dir(dst, overwrite, src) as out:
        config.dtype = _stream(files, plan, out, dtype, max_shard_size)
        config.save_pretrained(out)
        write_json(out / "generation_config.json", llada2_generation_config(
            mask_token_id, eos_token_id, config.pad_token_id, decoding or "llada2.0", source))
        save_remote_code(out)
        copy_other_files(src, out)
    return dst


def convert_diffusion_moe_to_llada2(src, dst, dtype=None, overwrite: bool = False, max_shard_size="5GB") -> Path:
    """Convert a diffusion-moe checkpoint folder back into the LLaDA2-MoE layout (split experts, fused qkv).

    The weights convert exactly (bit-identical when `dtype` is kept); LLaDA2's own modeling
    code is not included, so copy it (and its `auto_map`) from the original checkpoint.
    """
    src, dst = Path(src), Path(dst)
    dtype = _resolve_dtype(dtype)
    parse_size(max_shard_size)
    check_destination(dst, overwrite, src)
    ours = read_json(src / "config.json", "diffusion-moe config.json")
    if ours.get("model_type") != "diffusion_moe":
        raise ValueError(f"config.json: `model_type` must be 'diffusion_moe'; got {ours.get('model_type')!r}")
    config = DiffusionMoeConfig.from_dict(ours)
    files = shard_files(src)
    plan, expected = _diffusion_moe_plan(config)
    _check_tensors(tensor_shapes(files), expected, src)
    llada2 = llada2_config_from_diffusion_moe(config)
    with atomic_output_dir(dst, overwrite, src) as out:
        llada2["torch_dtype"] = _stream(files, plan, out, dtype, max_shard_size)
        write_json(out / "config.json", llada2)
        copy_other_files(src, out)
    return dst


__all__ = [
    "LLADA2_EOS_TOKEN_ID",
    "LLADA2_MASK_TOKEN_ID",
    "LLADA2_MODEL_FIELDS",
    "convert_diffusion_moe_to_llada2",
    "convert_llada2_to_diffusion_moe",
    "diffusion_moe_config_from_llada2",
    "llada2_config_from_diffusion_moe",
    "llada2_field",
    "llada2_generation_config",
    "DECODING_PRESETS",
    "llada2_tensor_shapes",
]
