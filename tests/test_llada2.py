"""LLaDA2-MoE conversion: layout, parity with an independent reference, routing,
round trip, and the converter's safety guarantees, on a tiny random sharded checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.cli import main as cli_main
from diffusion_moe.conversion import checkpoint_io
from diffusion_moe.conversion.llada2 import (
    LLADA2_MODEL_FIELDS,
    convert_diffusion_moe_to_llada2,
    convert_llada2_to_diffusion_moe,
    diffusion_moe_config_from_llada2,
    llada2_field,
)
from diffusion_moe.configuration.remote_code import REMOTE_CODE_FILES


sys.path.insert(0, str(Path(__file__).parent))
from llada2_reference import (  # noqa: E402
    block_causal_allowed,
    reference_generate_llada21,
    reference_generate,
    full_allowed,
    random_llada2_weights,
    reference_forward,
    tiny_llada2_config,
    write_llada2_checkpoint,
)

MASK, EOS = 157, 156


pytestmark = pytest.mark.usefixtures("single_thread")


def read_weights(folder) -> dict:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture(scope="module")
def llada2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llada2")
    config = tiny_llada2_config()
    weights = random_llada2_weights(config, seed=0)
    shards = write_llada2_checkpoint(folder, config, weights, num_shards=3)
    return folder, config, weights, shards


@pytest.fixture(scope="module")
def converted(llada2, tmp_path_factory):
    src = llada2[0]
    dst = tmp_path_factory.mktemp("converted") / "ckpt"
    argv = ["convert", "llada2", str(src), str(dst), "--mask-token-id", str(MASK), "--eos-token-id", str(EOS),
            "--max-shard-size", "60KB"]
    assert cli_main(argv) == 0
    return dst


def test_tiny_checkpoint_has_a_layer_whose_experts_span_two_shards(llada2):
    folder, _, _, shards = llada2
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    files_per_layer = {}
    for key, file in weight_map.items():
        if ".mlp.experts." in key:
            files_per_layer.setdefault(key.split(".")[2], set()).add(file)
    assert len(shards) == 3 and any(len(files) == 2 for files in files_per_layer.values())


def test_converted_checkpoint_layout(converted, llada2):
    _, _, weights, _ = llada2
    config = json.loads((converted / "config.json").read_text())
    expected = {
        "model_type": "diffusion_moe", "attention_layout": "block_causal", "block_size": 32,
        "router_type": "token_choice", "router_score_function": "sigmoid", "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": True, "num_shared_experts": 1, "first_k_dense_replace": 1,
        "partial_rotary_factor": 0.5, "use_qk_norm": True, "mask_token_id": MASK, "eos_token_id": EOS,
        "pad_token_id": 155, "architectures": ["DiffusionMoeForMaskedLM"],
    }
    assert {k: config[k] for k in expected} == expected
    assert config["auto_map"]["AutoModelForMaskedLM"] == "modeling_diffusion_moe.DiffusionMoeForMaskedLM"
    assert all((converted / name).is_file() for name in REMOTE_CODE_FILES)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["block_length"] == 32 and generation["steps"] == 32 and generation["threshold"] == 0.95
    assert "do_sample" not in generation and generation["mask_token_id"] == MASK  # greedy
    assert generation["eos_token_id"] == EOS
    assert (converted / "tokenizer_config.json").is_file()
    # several output shards (60KB limit) with a consistent index
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    ours = read_weights(converted)
    assert set(index["weight_map"]) == set(ours) and len(set(index["weight_map"].values())) > 2
    assert all(not name.endswith(".tmp") for name in index["weight_map"].values())
    # exactly the tensors the model has, with the same shapes
    with torch.device("meta"):
        model = DiffusionMoeForMaskedLM(DiffusionMoeConfig.from_pretrained(converted))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}
    # fused experts: rows [gate; up] of expert e, and its down projection
    I = 32
    for e in (0, 5, 7):
        src = f"model.layers.2.mlp.experts.{e}"
        assert torch.equal(ours["model.layers.2.mlp.experts.gate_up_proj"][e, :I], weights[f"{src}.gate_proj.weight"])
        assert torch.equal(ours["model.layers.2.mlp.experts.gate_up_proj"][e, I:], weights[f"{src}.up_proj.weight"])
        assert torch.equal(ours["model.layers.2.mlp.experts.down_proj"][e], weights[f"{src}.down_proj.weight"])
    assert torch.equal(ours["model.layers.1.mlp.gate.expert_bias"], weights["model.layers.1.mlp.gate.expert_bias"])


def test_converted_checkpoint_loads_as_remote_code_without_the_package(converted, tmp_path):
    """auto_map and the flat .py files are the ones save_pretrained writes; generation_config.json
    loads as DiffusionGenerationConfig with LLaDA2's defaults."""
    model = _load(converted)
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert json.loads((converted / "config.json").read_text())["auto_map"] == saved["auto_map"]
    ids = torch.randint(0, 155, (1, 24)).tolist()
    with torch.no_grad():
        expected = model(torch.tensor(ids)).logits
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.modules["diffusion_moe"] = None  # the package must not be importable here
        import torch
        from transformers import AutoModelForMaskedLM
        model = AutoModelForMaskedLM.from_pretrained({str(converted)!r}, trust_remote_code=True, dtype=torch.float32)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        g = model.generation_config
        with torch.no_grad():
            logits = model.eval()(torch.tensor({ids})).logits
        print(json.dumps({{"config": type(g).__name__, "threshold": g.threshold, "block_length": g.block_length,
                          "steps": g.steps, "greedy": g.greedy, "logits": logits.tolist()}}))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert (loaded["config"], loaded["threshold"], loaded["block_length"], loaded["steps"], loaded["greedy"]) \
        == ("DiffusionGenerationConfig", 0.95, 32, 32, True)
    assert torch.allclose(torch.tensor(loaded["logits"]), expected, atol=1e-5)


def _load(folder, **overrides):
    return DiffusionMoeForMaskedLM.from_pretrained(folder, dtype=torch.float32, **overrides).eval()


def _routes_as_the_reference(model, weights, config, input_ids, allowed, *router):
    """Our forward's chosen experts equal the reference's, logits within 1e-4; returns our
    RouterStats and the reference's routing."""
    ref_logits, ref_routing = reference_forward(weights, config, input_ids, allowed, *router)
    with torch.no_grad():
        out = model(input_ids, output_router_stats=True)
    assert _chosen_experts(out.router_stats) == ref_routing
    assert (out.logits.double() - ref_logits).abs().max().item() < 1e-4
    return out.router_stats, ref_routing


def _most_experts_per_chunk(stats, chunk=32) -> int:
    """The most distinct experts any `chunk`-token chunk used, over layers and sequences."""
    return max(piece.any(1).sum(-1).max().item() for layer in stats for piece in layer.expert_mask.split(chunk, dim=1))


def _chosen_experts(stats) -> list:
    """Per MoE layer, [B][L] sorted expert lists from RouterStats.expert_mask."""
    return [
        [[torch.nonzero(row).flatten().tolist() for row in seq] for seq in layer.expert_mask] for layer in stats
    ]


@pytest.mark.parametrize(
    "layout, block", [("block_causal", 32), ("block_causal", 16), ("bidirectional", 32)], ids=["bc32", "bc16", "full"]
)
def test_logits_and_routing_match_llada2_reference(converted, llada2, layout, block):
    _, config, weights, _ = llada2
    model = _load(converted, attention_layout=layout, block_size=block)
    input_ids = torch.randint(0, 155, (2, 40), generator=torch.Generator().manual_seed(1))
    input_ids[:, 25:] = MASK
    allowed = block_causal_allowed(40, block) if layout == "block_causal" else full_allowed(40)
    ref_logits, ref_routing = reference_forward(weights, config, input_ids, allowed)
    with torch.no_grad():
        out = model(input_ids, output_router_stats=True)
    diff = (out.logits.double() - ref_logits).abs().max().item()
    assert diff < 1e-4, diff
    assert _chosen_experts(out.router_stats) == ref_routing
    # the expert bias matters: without it, some token would pick differently
    unbiased = {k: (torch.zeros_like(v) if k.endswith("expert_bias") else v) for k, v in weights.items()}
    assert reference_forward(unbiased, config, input_ids, allowed)[1] != ref_routing


@pytest.mark.parametrize("core_threshold", [0.6, 0.95])
def test_dmoe_config_converts_to_block_routing_matching_the_dmoe_gate(llada2, tmp_path, core_threshold):
    _, config, weights, _ = llada2
    dmoe = tiny_llada2_config(mode="aggregate", core_threshold=core_threshold)
    write_llada2_checkpoint(tmp_path / "dmoe", dmoe, weights, num_shards=2)
    dst = convert_llada2_to_diffusion_moe(tmp_path / "dmoe", tmp_path / "out", mask_token_id=MASK, eos_token_id=EOS)
    saved = json.loads((dst / "config.json").read_text())
    assert (saved["router_type"], saved["block_router_top_p"], saved["block_router_size"]) == (
        "block", core_threshold, 32)
    # dMoE keeps at least 16 experts; with 8 experts that is all of them, so use a smaller floor
    model = _load(dst, block_router_min_experts=6)
    input_ids = torch.randint(0, 155, (2, 64), generator=torch.Generator().manual_seed(2))
    block_router = {"size": 32, "top_p": core_threshold, "min_experts": 6}
    allowed = block_causal_allowed(64, 32)
    stats, ref_routing = _routes_as_the_reference(model, weights, config, input_ids, allowed, "block", block_router)
    # distinct experts per 32-token chunk: the floor of 6 governs at p=0.6; p=0.95 lets more in
    most = _most_experts_per_chunk(stats)
    assert most <= 6 if core_threshold == 0.6 else most > 6
    token_choice = reference_forward(weights, config, input_ids, allowed)[1]
    assert token_choice != ref_routing
    back = json.loads((convert_diffusion_moe_to_llada2(dst, tmp_path / "back") / "config.json").read_text())
    assert (back["mode"], back["core_threshold"]) == ("aggregate", core_threshold)


def test_round_trip_is_bit_identical(converted, llada2, tmp_path):
    src, config, weights, _ = llada2
    back = tmp_path / "back"
    assert cli_main(["convert", "to-llada2", str(converted), str(back)]) == 0
    restored = read_weights(back)
    assert set(restored) == set(weights)
    for key, tensor in weights.items():
        assert restored[key].dtype == tensor.dtype and torch.equal(restored[key], tensor), key
    round_tripped = json.loads((back / "config.json").read_text())
    for name in LLADA2_MODEL_FIELDS:
        assert llada2_field(round_tripped, name) == llada2_field(config, name), name
    assert (back / "tokenizer_config.json").is_file() and not list(back.glob("*.py"))


def test_tensor_order_and_sharding_do_not_change_the_result(converted, llada2, tmp_path):
    _, config, weights, _ = llada2
    backwards = dict(reversed(list(weights.items())))  # down_proj before up/gate, last expert first
    write_llada2_checkpoint(tmp_path / "src", config, backwards, num_shards=4)
    dst = convert_llada2_to_diffusion_moe(tmp_path / "src", tmp_path / "dst", MASK, EOS)
    assert (dst / "model.safetensors").is_file() and not (dst / "model.safetensors.index.json").exists()
    expected, got = read_weights(converted), read_weights(dst)
    assert set(expected) == set(got) and all(torch.equal(expected[k], got[k]) for k in expected)


def test_dtype_option_casts_weights_but_keeps_the_router_bias_fp32(llada2, tmp_path):
    dst = convert_llada2_to_diffusion_moe(llada2[0], tmp_path / "bf16", MASK, EOS, dtype="bfloat16")
    ours = read_weights(dst)
    assert ours["model.layers.1.mlp.experts.gate_up_proj"].dtype == torch.bfloat16
    assert ours["model.layers.1.mlp.gate.expert_bias"].dtype == torch.float32
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        convert_llada2_to_diffusion_moe(llada2[0], tmp_path / "x", MASK, EOS, dtype="float64")


# ---------------------------------------------------------------------------------------- safety


def _broken_checkpoint(folder, llada2, config_overrides=None, edit=None):
    _, config, weights, _ = llada2
    weights = dict(weights)
    if edit:
        edit(weights)
    write_llada2_checkpoint(folder, tiny_llada2_config(**(config_overrides or {})), weights, num_shards=2)
    return folder


def test_refuses_a_non_empty_destination_unless_overwrite(llada2, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"):
        convert_llada2_to_diffusion_moe(llada2[0], dst, MASK, EOS)
    assert cli_main(["convert", "llada2", str(llada2[0]), str(dst), "--mask-token-id", str(MASK),
                     "--eos-token-id", str(EOS)]) == 2
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert_llada2_to_diffusion_moe(llada2[0], dst, MASK, EOS, overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert leftovers(dst) == []


def test_failure_midway_leaves_the_old_destination_intact(llada2, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real_save, calls = checkpoint_io.save_file, []

    def failing_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_llada2_to_diffusion_moe(llada2[0], dst, MASK, EOS, overwrite=True, max_shard_size="40KB")
    assert len(calls) == 3  # it failed after writing two shards
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and leftovers(dst) == []
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        calls.clear()
        convert_llada2_to_diffusion_moe(llada2[0], fresh, MASK, EOS, max_shard_size="40KB")
    assert not fresh.exists() and leftovers(fresh) == []


def test_failed_final_rename_restores_the_old_destination(llada2, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real_rename = os.rename

    def failing_rename(src, target):
        if Path(src).name.startswith(".dst.partial-"):
            raise OSError("rename failed")
        return real_rename(src, target)

    monkeypatch.setattr(checkpoint_io.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        convert_llada2_to_diffusion_moe(llada2[0], dst, MASK, EOS, overwrite=True)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and leftovers(dst) == []


def test_clear_errors_for_bad_sources(llada2, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        convert_llada2_to_diffusion_moe(tmp_path / "nowhere", tmp_path / "o1", MASK, EOS)
    bad = _broken_checkpoint(tmp_path / "type", llada2, {"model_type": "llama"})
    with pytest.raises(ValueError, match="model_type.*'llama'"):
        convert_llada2_to_diffusion_moe(bad, tmp_path / "o2", MASK, EOS)
    bad = _broken_checkpoint(tmp_path / "bias", llada2, {"use_qkv_bias": True})
    with pytest.raises(ValueError, match="use_qkv_bias"):
        convert_llada2_to_diffusion_moe(bad, tmp_path / "o3", MASK, EOS)
    with pytest.raises(ValueError, match="mask_token_id"):
        convert_llada2_to_diffusion_moe(llada2[0], tmp_path / "o4")  # LLaDA2's 156895 >= vocab 160
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    bad = _broken_checkpoint(tmp_path / "missing", llada2, edit=lambda w: w.pop(key))
    with pytest.raises(ValueError, match=f"missing tensor.*{key}"):
        convert_llada2_to_diffusion_moe(bad, tmp_path / "o5", MASK, EOS)
    qkv = "model.layers.1.attention.query_key_value.weight"
    bad = _broken_checkpoint(tmp_path / "shape", llada2, edit=lambda w: w.update({qkv: torch.zeros(100, 64)}))
    with pytest.raises(ValueError, match=r"query_key_value.*\(100, 64\).*expected \(128, 64\)"):
        convert_llada2_to_diffusion_moe(bad, tmp_path / "o6", MASK, EOS)
    bad = _broken_checkpoint(tmp_path / "shard", llada2)
    next(bad.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="model-00002"):
        convert_llada2_to_diffusion_moe(bad, tmp_path / "o7", MASK, EOS)
    for i in range(1, 8):
        assert not (tmp_path / f"o{i}").exists()
    with pytest.raises(ValueError, match="model_type.*'llada2_moe'"):
        convert_diffusion_moe_to_llada2(llada2[0], tmp_path / "o8")
    shutil.rmtree(tmp_path / "type")


# ---------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def confident(tmp_path_factory):
    """A tiny model with a large lm_head, so that some predictions pass the 0.95 threshold,
    and the reference sampler's answer for a 20-token prompt."""
    folder = tmp_path_factory.mktemp("confident")
    config = tiny_llada2_config()
    weights = random_llada2_weights(config, seed=3, lm_head_scale=6.0)
    write_llada2_checkpoint(folder / "src", config, weights, num_shards=2)
    convert_llada2_to_diffusion_moe(folder / "src", folder / "dst", MASK, EOS)
    prompt = torch.randint(0, 155, (1, 20), generator=torch.Generator().manual_seed(4))
    N = 44  # the first block holds the prompt's tail (positions 20..31), then one more block
    ref = reference_generate(weights, config, prompt, N, block_length=32, steps=32, threshold=0.95,
                             mask_id=MASK, eos_id=EOS)
    answer = ref[0, 20 : 20 + N].clone()
    eos = (answer == EOS).nonzero()
    if len(eos):  # generate pads after the first EOS, and where decoding stopped
        answer[eos[0, 0] + 1 :] = config["pad_token_id"]
    answer[answer == MASK] = config["pad_token_id"]
    return folder / "dst", prompt, answer


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "uncached"])
def test_greedy_generation_matches_the_reference_sampler(confident, use_cache):
    dst, prompt, answer = confident
    N = answer.shape[0]
    model = _load(dst)
    out = model.generate(prompt, max_new_tokens=N, use_cache=use_cache, return_dict_in_generate=True)
    # generation_config.json carries LLaDA2's defaults: block 32, 32 steps, threshold 0.95, greedy
    assert (model.generation_config.block_length, model.generation_config.threshold) == (32, 0.95)
    assert torch.equal(out.sequences[0, :20], prompt[0])
    assert out.sequences[0, 20:].tolist() == answer.tolist()
    # the threshold committed several tokens at some steps (fewer forwards than tokens)
    assert out.num_forward_passes < N


def test_llada21_editing_matches_its_generate_on_the_llada2_reference_model(confident):
    """The LLaDA2.1 loop transcription driven by the independent float64 LLaDA2 forward."""
    dst, prompt, _ = confident
    config = tiny_llada2_config()
    weights = random_llada2_weights(config, seed=3, lm_head_scale=6.0)
    logits_fn = lambda x: reference_forward(weights, config, x, block_causal_allowed(x.shape[1], 32))[0]  # noqa
    N = 12  # the prompt's tail block
    ref = reference_generate_llada21(logits_fn, prompt, N, 32, threshold=0.7, editing_threshold=0.5,
                                     max_post_steps=3, mask_id=MASK, eos_id=EOS)
    model = _load(dst)
    out = model.generate(prompt, max_new_tokens=N, steps=32, threshold=0.7, editing_threshold=0.5,
                         max_post_steps=3)
    assert out[0, 20 : 20 + ref.shape[1]].tolist() == ref[0].tolist()


def test_llada2_always_renormalises_so_the_converted_config_does_too():
    # LLaDA2's gate divides the top-k weights by their sum whenever k > 1, whatever its
    # config's `norm_topk_prob` says; the converted model must weight experts the same way
    config = diffusion_moe_config_from_llada2(tiny_llada2_config(norm_topk_prob=False), mask_token_id=159, eos_token_id=158)
    assert config.norm_topk_prob is True


def test_generation_defaults_follow_llada20_or_llada21(llada2, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(llada2[0], src)
    convert_llada2_to_diffusion_moe(src, tmp_path / "v20", MASK, EOS)
    saved = json.loads((tmp_path / "v20" / "generation_config.json").read_text())
    assert saved["threshold"] == 0.95 and "editing_threshold" not in saved
    (src / "generation_config.json").write_text(json.dumps({"threshold": 0.8, "editing_threshold": 0.6,
                                                             "max_post_steps": 8, "temperature": 0.0}))
    convert_llada2_to_diffusion_moe(src, tmp_path / "v21", MASK, EOS)
    saved = json.loads((tmp_path / "v21" / "generation_config.json").read_text())
    assert (saved["threshold"], saved["editing_threshold"], saved["max_post_steps"]) == (0.8, 0.6, 8)
    assert cli_main(["convert", "llada2", str(llada2[0]), str(tmp_path / "speed"), "--mask-token-id", str(MASK),
                     "--eos-token-id", str(EOS), "--decoding", "llada2.1-speed"]) == 0
    model = _load(tmp_path / "speed")
    config = model.generation_config
    assert (config.threshold, config.editing_threshold, config.max_post_steps) == (0.5, 0.0, 16)
    assert model.generate(torch.randint(0, 155, (1, 5)), max_new_tokens=8).shape == (1, 13)
    with pytest.raises(ValueError, match="decoding"):
        convert_llada2_to_diffusion_moe(src, tmp_path / "bad", MASK, EOS, decoding="fast")


# --- LLaDA2.2: block pool, edit-operation ids, two EOS ids ----------------------------------------

DELETE, SPLIT = 158, 159


@pytest.fixture(scope="module")
def llada22(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llada22")
    config = tiny_llada2_config(expert_capacity=4, block_size=32, delete_token_id=DELETE, split_token_id=SPLIT,
                                rope_theta=3000000, max_position_embeddings=1024)
    weights = random_llada2_weights(config, seed=3)
    write_llada2_checkpoint(folder, config, weights, num_shards=2)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 154], "pad_token_id": 155}))
    return folder, config, weights


def test_llada22_converts_to_the_block_pool_and_routes_as_its_gate(llada22, tmp_path):
    src, config, weights = llada22
    dst = convert_llada2_to_diffusion_moe(src, tmp_path / "out", mask_token_id=MASK)
    saved = json.loads((dst / "config.json").read_text())
    assert (saved["router_type"], saved["expert_capacity"], saved["block_size"]) == ("block_pool", 4, 32)
    assert (saved["delete_token_id"], saved["split_token_id"], saved["eos_token_id"]) == (DELETE, SPLIT, [EOS, 154])
    assert (saved["rope_theta"], saved["n_group"], saved["topk_group"]) == (3000000, 4, 2)  # groups kept, unused
    generation = json.loads((dst / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [EOS, 154]
    assert (generation["threshold"], generation["editing_threshold"], generation["max_post_steps"]) == (0.5, 0.0, 16)
    model = _load(dst)
    input_ids = torch.randint(0, 155, (2, 64), generator=torch.Generator().manual_seed(4))
    input_ids[:, 40:] = MASK
    allowed = block_causal_allowed(64, 32)
    stats, ref_routing = _routes_as_the_reference(model, weights, config, input_ids, allowed, "block_pool")
    assert _most_experts_per_chunk(stats) <= 4  # one pool of expert_capacity per block
    assert reference_forward(weights, config, input_ids, allowed)[1] != ref_routing  # not token choice
    # back to LLaDA2.2, bit for bit, with its fields
    back = convert_diffusion_moe_to_llada2(dst, tmp_path / "back")
    restored, round_tripped = read_weights(back), json.loads((back / "config.json").read_text())
    assert set(restored) == set(weights) and all(torch.equal(restored[k], v) for k, v in weights.items())
    for name in LLADA2_MODEL_FIELDS:
        assert llada2_field(round_tripped, name) == llada2_field(config, name), name


def test_a_retrofit_to_the_block_pool_converts_to_a_llada22_checkpoint(converted, tmp_path):
    model = _load(converted, router_type="block_pool", expert_capacity=4)
    model.save_pretrained(tmp_path / "pooled")
    back = json.loads((convert_diffusion_moe_to_llada2(tmp_path / "pooled", tmp_path / "back") / "config.json")
                      .read_text())
    assert (back["expert_capacity"], back["block_size"]) == (4, 32)
    again = convert_llada2_to_diffusion_moe(tmp_path / "back", tmp_path / "again", MASK, EOS, decoding="llada2.0")
    assert json.loads((again / "config.json").read_text())["router_type"] == "block_pool"


def test_llada22_ids_are_checked_by_name(llada2, tmp_path):
    with pytest.raises(ValueError, match="split_token_id"):
        diffusion_moe_config_from_llada2(tiny_llada2_config(delete_token_id=DELETE), MASK, EOS)
    with pytest.raises(ValueError, match="expert_capacity"):
        diffusion_moe_config_from_llada2(tiny_llada2_config(expert_capacity=9), MASK, EOS)  # more than 8 experts
    with pytest.raises(ValueError, match="one block router"):
        diffusion_moe_config_from_llada2(tiny_llada2_config(expert_capacity=4, mode="aggregate"), MASK, EOS)
    with pytest.raises(ValueError, match="eos_token_id"):
        diffusion_moe_config_from_llada2(tiny_llada2_config(), MASK, [EOS, 999])
    with pytest.raises(ValueError, match="delete_token_id"):  # LLaDA2.2's decoding needs its edit ids
        convert_llada2_to_diffusion_moe(llada2[0], tmp_path / "x", MASK, EOS, decoding="llada2.2")


def test_a_converted_llada22_checkpoint_decodes_with_levenshtein_editing_as_the_reference(llada22, tmp_path):
    """End to end on a real (random) model: the converted checkpoint's generation defaults are
    LLaDA2.2's, generate() runs its Levenshtein editing, and the tokens equal the transcribed
    reference loop on the model's own uncached forward."""
    from llada2_2_editing_reference import llada22_answer, reference_generate_llada22

    src, _, _ = llada22
    model = _load(convert_llada2_to_diffusion_moe(src, tmp_path / "out", mask_token_id=MASK))
    ids = torch.randint(0, 150, (1, 5), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)
    out = model.generate(ids, max_new_tokens=40, return_dict_in_generate=True)
    assert set(out.edits) == {"substitutions", "deletions", "insertions"}
    torch.manual_seed(0)
    x, _ = reference_generate_llada22(lambda x: model(x).logits, ids, 40, 32, 32, 0.5, 0.0, 16, MASK, DELETE, SPLIT,
                                      (EOS, 154))
    want = llada22_answer(x, 5, 40, (EOS, 154))[0].tolist()
    assert out.sequences[0, 5:5 + len(want)].tolist() == want
    torch.manual_seed(0)
    assert torch.equal(model.generate(ids, max_new_tokens=40, use_cache=False), out.sequences)
