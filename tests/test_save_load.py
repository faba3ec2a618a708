import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM, DiffusionMoeModel

pytestmark = pytest.mark.smoke


def saved_model(tmp_path, **overrides):
    model = DiffusionMoeForMaskedLM(tiny_config(num_shared_experts=1, first_k_dense_replace=1, **overrides)).eval()
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.mlp.gate.expert_bias.normal_()
    model.save_pretrained(tmp_path)
    return model


def test_save_pretrained_writes_safetensors_auto_map_and_flat_remote_code(tmp_path):
    saved_model(tmp_path)
    files = set(os.listdir(tmp_path))
    assert "model.safetensors" in files and "config.json" in files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for target in auto_map.values():
        module = target.split(".")[0]
        assert f"{module}.py" in files
    for name in files:
        if name.endswith(".py"):
            imports = [line for line in (tmp_path / name).read_text().splitlines() if line.startswith(("from", "import"))]
            assert not any(line.startswith("from ..") for line in imports), f"{name} keeps a package import"
            assert not any(line.startswith(("from diffusion_moe", "import diffusion_moe")) for line in imports), name


def test_auto_classes_round_trip_with_identical_logits(tmp_path):
    model = saved_model(tmp_path, router_type="expert_choice")
    ids = torch.randint(1, MASK_ID, (2, 9))
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DiffusionMoeConfig)
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DiffusionMoeForMaskedLM
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert type(AutoModel.from_pretrained(tmp_path)) is DiffusionMoeModel


FRESH_PROCESS = """
import sys, torch
sys.modules["diffusion_moe"] = None  # importing the package must be impossible here
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert "diffusion_moe" not in type(model).__module__.split(".")[0]
ids, expected = torch.load(sys.argv[2])
assert torch.equal(model(ids).logits, expected), "logits differ"
print("OK", type(model).__name__)
"""


@pytest.mark.parametrize("router", ["token_choice", "expert_choice", "block"])
def test_remote_code_loads_in_a_fresh_interpreter_without_the_package(tmp_path, router):
    overrides = dict(router_type=router, attention_layout="block_causal", block_size=4)
    if router == "block":
        overrides.update(router_score_function="sigmoid", n_group=4, topk_group=2, block_router_size=4)
    model = saved_model(tmp_path / "model", **overrides)
    ids = torch.randint(1, MASK_ID, (2, 9))
    torch.save((ids, model(ids).logits), tmp_path / "expected.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # a fresh remote-code module cache
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "model"), str(tmp_path / "expected.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK DiffusionMoeForMaskedLM" in result.stdout


@pytest.mark.parametrize(
    "source, target",
    [
        (dict(router_type="token_choice"), dict(router_type="expert_choice", capacity_schedule="linear_reverse")),
        (dict(router_type="token_choice", router_score_function="sigmoid"),
         dict(router_type="block", block_router_min_experts=2, block_router_top_p=0.2, block_router_size=8)),
        (dict(router_type="expert_choice", capacity_schedule="linear"),
         dict(router_type="token_choice", capacity_schedule="constant")),
    ],
)
def test_retrofit_by_config_keeps_every_weight_bit_identical(tmp_path, source, target):
    model = saved_model(tmp_path, **source)
    retrofitted = DiffusionMoeForMaskedLM.from_pretrained(tmp_path, **target).eval()
    assert retrofitted.config.router_type == target["router_type"]
    original, loaded = model.state_dict(), retrofitted.state_dict()
    assert original.keys() == loaded.keys()
    for name in original:
        assert torch.equal(original[name], loaded[name]), name  # the expert bias included
    ids = torch.randint(1, MASK_ID, (1, 8))
    assert not torch.equal(model(ids).logits, retrofitted(ids).logits)  # only the routing changed
