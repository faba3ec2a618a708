"""The remote code a save writes next to the weights: which files (derived, closed), atomic
saves that never overwrite what the library did not write, uploads through the public
`push_to_hub`, which code runs (installed package or checkpoint) and its version record,
the Transformers check, `diffusion-moe upgrade-code`, and loading across Transformers versions.

Tests named `..._fresh_interpreter` spawn a Python that cannot import diffusion_moe
(`sys.modules["diffusion_moe"] = None`), as a user without the package."""

import ast
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoModelForMaskedLM
from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

import diffusion_moe
from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeConfig, DiffusionMoeForMaskedLM
from diffusion_moe.cli import main as cli
from diffusion_moe.configuration import remote_code
from diffusion_moe.configuration.remote_code import (
    AUTO_MAP,
    CODE_MARK,
    VERSION_KEY,
    RemoteCodeError,
    checkpoint_code_problem,
    export_texts,
    exported_files,
    walk_modules,
)

pytestmark = pytest.mark.smoke

PACKAGE_ROOT = Path(diffusion_moe.__file__).resolve().parent
BREAKS_HERE = checkpoint_code_problem(None) is not None  # 0.1.x code cannot run under this Transformers
REMOTE_LOGGER = "diffusion_moe.configuration.remote_code"


def tiny_model(**overrides):
    config = tiny_config(num_shared_experts=1, first_k_dense_replace=1, **overrides)
    return DiffusionMoeForMaskedLM(config).eval()


def run_fresh(script, *args, tmp_path, python=sys.executable, block_package=True, timeout=300):
    """Run `script` in a new interpreter (no PYTHONPATH, a fresh HF module cache, offline)."""
    prelude = 'import sys\nsys.modules["diffusion_moe"] = None\n' if block_package else ""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [python, "-c", prelude + textwrap.dedent(script), *map(str, args)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout,
    )


def digest(folder, pattern="*.safetensors"):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).glob(pattern))}


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def hidden_leftovers(parent):
    return [p.name for p in Path(parent).iterdir() if ".diffusion-moe-tmp-" in p.name]


# ---------------------------------------------------------------------------------------------
# The export set


def independent_walk():
    """The package modules the AUTO_MAP modules reach, found with importlib's own resolution."""
    entries = {"configuration_diffusion_moe": "diffusion_moe.configuration.configuration_diffusion_moe",
               "modeling_diffusion_moe": "diffusion_moe.modeling.modeling_diffusion_moe"}
    assert set(entries) == {target.split(".")[0] for target in AUTO_MAP.values()}
    seen, queue = {}, list(entries.values())
    while queue:
        name = queue.pop()
        if name in seen:
            continue
        origin = Path(importlib.util.find_spec(name).origin)
        seen[name] = origin
        package = name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(origin.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                queue.append(importlib.util.resolve_name("." * node.level + node.module, package))
    return {path.name: path for path in seen.values()}


def test_exported_set_equals_an_independent_walk_and_is_closed_in_the_saved_folder(tmp_path):
    expected = independent_walk()
    assert remote_code.exported_modules() == expected
    assert "capacity_schedules.py" in expected and "remote_code.py" in expected  # reached only indirectly
    tiny_model().save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.glob("*.py")}
    assert saved == set(expected) == set(exported_files())
    for name in saved:
        text = (tmp_path / name).read_text()
        assert text.startswith(f"{CODE_MARK} {diffusion_moe.__version__}\n"), name
        # Transformers' regex view and the AST view of the flat file name only exported files
        assert {f"{m}.py" for m in get_relative_imports(tmp_path / name)} <= saved, name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in saved, (name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)) and not getattr(node, "level", 0):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m.split(".")[0] == "diffusion_moe" for m in modules), name
    # a config-only remote load copies what the config module reaches: that must be everything
    reached = {Path(f).name for f in get_relative_import_files(tmp_path / "configuration_diffusion_moe.py")}
    assert reached | {"configuration_diffusion_moe.py"} == saved
    # the walk works the same in the flat folder
    flat = walk_modules([tmp_path / "configuration_diffusion_moe.py", tmp_path / "modeling_diffusion_moe.py"])
    assert set(flat) == saved and all(path.parent == tmp_path.resolve() for path in flat.values())


def write_tree(root, files):
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_walk_follows_imports_inside_functions_and_rejects_what_cannot_be_flattened(tmp_path):
    root = write_tree(tmp_path / "ok", {
        "pkg/a/entry.py": "from .helper import x\ndef f():\n    from ..b.lazy import y\n",
        "pkg/a/helper.py": "x = 1\n",
        "pkg/b/lazy.py": "y = 2\n",
    })
    assert set(walk_modules([root / "pkg/a/entry.py"])) == {"entry.py", "helper.py", "lazy.py"}
    cases = {
        "clash": ({"a/entry.py": "from .x import v\nfrom ..b.x import w\n", "a/x.py": "", "b/x.py": ""},
                  r"both flatten to 'x\.py'"),
        "package": ({"a/entry.py": "from . import x\n", "a/x.py": ""}, r"imports from a package"),
        "folder": ({"a/entry.py": "from .sub import name\n", "a/sub/__init__.py": ""}, r"imports the package 'sub'"),
        "missing": ({"a/entry.py": "def f():\n    from .gone import z\n"}, r"entry\.py:2: `from \.gone import z` does not"),
    }
    for case, (files, message) in cases.items():
        root = write_tree(tmp_path / case, files)
        with pytest.raises(RemoteCodeError, match=message):
            walk_modules([root / "a/entry.py"])


def test_a_save_with_an_unresolvable_import_writes_nothing(tmp_path, monkeypatch):
    """The export is computed before anything is written (the old save wrote config.json,
    then failed on a missing module)."""
    def broken():
        raise RemoteCodeError("x.py:1: `from .gone import z` does not resolve to a file")

    monkeypatch.setattr(remote_code, "exported_modules", broken)
    for target in (tmp_path / "new", tmp_path / "config_only"):
        with pytest.raises(RemoteCodeError, match="gone"):
            (tiny_model() if target.name == "new" else tiny_config()).save_pretrained(target)
        assert not target.exists()
    assert hidden_leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# Atomic saves, never overwriting what the library did not write


def test_a_failed_save_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    tiny_model().save_pretrained(folder)
    (folder / "notes.txt").write_text("mine")
    before = snapshot(folder)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", disk_full)
    other = tiny_model(router_type="expert_choice")
    with pytest.raises(OSError, match="No space"):
        other.save_pretrained(folder)
    assert snapshot(folder) == before
    with pytest.raises(OSError, match="No space"):
        other.save_pretrained(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert hidden_leftovers(tmp_path) == []


def test_a_save_refuses_to_overwrite_a_py_file_it_did_not_write(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "routing.py").write_text("# my own routing experiments\n")
    (folder / "tokenizer.json").write_text("{}")
    before = snapshot(folder)
    for save in (tiny_model().save_pretrained, tiny_config().save_pretrained):
        with pytest.raises(ValueError, match=r"routing\.py exists and was not written by diffusion-moe"):
            save(folder)
        assert snapshot(folder) == before
    (folder / "routing.py").unlink()
    tiny_model().save_pretrained(folder)
    tiny_model().save_pretrained(folder)  # its own marked files are overwritten
    assert (folder / "tokenizer.json").read_text() == "{}"  # other files are kept
    assert (folder / "routing.py").read_text().startswith(CODE_MARK)


def test_unmarked_files_count_as_the_librarys_only_in_a_folder_written_before_0_2(tmp_path):
    """0.1.x wrote its files without a mark and config.json without a version record."""
    for recorded, refused in ((None, False), ("0.2.0", True)):
        folder = tmp_path / str(recorded)
        folder.mkdir()
        config = {"model_type": "diffusion_moe", **({VERSION_KEY: recorded} if recorded else {})}
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "routing.py").write_text("# 0.1.0's routing\n")
        if refused:
            with pytest.raises(ValueError, match="routing.py"):
                tiny_model().save_pretrained(folder)
        else:
            tiny_model().save_pretrained(folder)
            assert (folder / "routing.py").read_text().startswith(CODE_MARK)


def test_stale_weight_files_are_removed_and_nothing_else(tmp_path):
    folder = tmp_path / "ckpt"
    model = tiny_model()
    model.save_pretrained(folder, max_shard_size="40KB")
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    keep = ["model-card-00001-of-00002.txt", "other-00001-of-00002.safetensors", "model.fp16.safetensors"]
    for name in keep:
        (folder / name).write_text("not ours to delete")
    (folder / "model-00003-of-00009.bin").write_bytes(b"an old PyTorch shard")  # Transformers removes these too
    model.save_pretrained(folder)  # unsharded now
    names = set(os.listdir(folder))
    assert "model.safetensors" in names
    assert not names & {*shards, "model.safetensors.index.json", "model-00003-of-00009.bin"}
    assert set(keep) <= names
    changed = tiny_model(router_type="expert_choice")
    with torch.no_grad():
        changed.lm_head.weight.add_(1)
    changed.save_pretrained(folder, max_shard_size="40KB")  # sharded again: the unsharded file goes
    assert "model.safetensors" not in os.listdir(folder)
    loaded = DiffusionMoeForMaskedLM.from_pretrained(folder)
    assert torch.equal(loaded.lm_head.weight, changed.lm_head.weight)
    assert set(keep) <= set(os.listdir(folder))


def test_save_pretrained_keeps_every_transformers_argument(tmp_path):
    model = tiny_model()
    state = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    expected = state["lm_head.weight"].clone()  # Transformers' save consumes the dict it is given
    model.save_pretrained(tmp_path / "sd", state_dict=state, safe_serialization=True)  # Trainer-era kwarg
    loaded = DiffusionMoeForMaskedLM.from_pretrained(tmp_path / "sd")
    assert torch.equal(loaded.lm_head.weight, expected)
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)  # writes nothing, as Transformers
    assert list((tmp_path / "not_main").iterdir()) == []
    model.save_pretrained(tmp_path / "variant", variant="v2")
    assert (tmp_path / "variant" / "model.v2.safetensors").is_file()
    assert set(exported_files()) <= set(os.listdir(tmp_path / "variant"))
    new = tmp_path / "a" / "b" / "new"
    model.save_pretrained(new)
    reference = tmp_path / "reference"
    reference.mkdir()
    assert new.stat().st_mode == reference.stat().st_mode  # the umask's mode, not mkdtemp's 0700


# ---------------------------------------------------------------------------------------------
# Uploads through the public push_to_hub


class FakeHub:
    def __init__(self):
        self.commits = []

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, **kwargs):
        pass

    def create_commit(self, repo_id, operations, **kwargs):
        files = {op.path_in_repo: Path(op.path_or_fileobj).read_bytes() for op in operations}
        self.commits.append(dict(repo_id=repo_id, files=files, **kwargs))


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()

    class Card:
        def save(self, path):
            Path(path).write_text("card")

    monkeypatch.setattr("transformers.utils.hub.hf_api", lambda: fake)
    monkeypatch.setattr("transformers.utils.hub.create_and_tag_model_card", lambda *a, **k: Card())
    # the private paths Transformers' own save_pretrained(push_to_hub=True) would take: must stay unused
    monkeypatch.setattr("transformers.modeling_utils.hf_api", lambda: pytest.fail("private upload path used"))
    monkeypatch.setattr("transformers.configuration_utils.hf_api", lambda: pytest.fail("private upload path used"))
    return fake


def test_push_to_hub_goes_through_the_public_api_with_every_exported_file(tmp_path, hub):
    assert "_upload_modified_files" not in vars(remote_code.SavesRemoteCode)
    model = tiny_model()
    folder = tmp_path / "my-model"
    state = {k: v.clone() + 2 for k, v in model.state_dict().items()}
    model.save_pretrained(folder, push_to_hub=True, commit_message="first", create_pr=True, revision="dev",
                          token="hf_x", private=True, state_dict=state)
    [commit] = hub.commits
    assert commit["repo_id"] == "my-model"  # the folder's name, as Transformers
    assert (commit["commit_message"], commit["create_pr"], commit["revision"], commit["token"]) == (
        "first", True, "dev", "hf_x")
    assert {"config.json", "model.safetensors", "README.md", *exported_files()} <= set(commit["files"])
    texts = export_texts()
    assert all(commit["files"][name] == texts[name].encode() for name in texts)
    # the pushed weights are the local save's (same state_dict), byte for byte
    assert commit["files"]["model.safetensors"] == (folder / "model.safetensors").read_bytes()
    assert set(exported_files()) <= set(os.listdir(folder))
    hub.commits.clear()
    model.save_pretrained(folder, push_to_hub=True, repo_id="me/repo")  # files exist already
    assert hub.commits[0]["repo_id"] == "me/repo" and set(exported_files()) <= set(hub.commits[0]["files"])
    hub.commits.clear()
    model.config.save_pretrained(tmp_path / "config_only", push_to_hub=True, repo_id="me/config")
    assert {"config.json", *exported_files()} <= set(hub.commits[0]["files"])
    assert set(exported_files()) <= set(os.listdir(tmp_path / "config_only"))


# ---------------------------------------------------------------------------------------------
# Version record, which code runs, the Transformers check


def test_version_has_one_source_and_config_json_records_it(tmp_path):
    from setuptools.config.setupcfg import read_configuration

    assert diffusion_moe.__version__ == remote_code.__version__ == "0.2.0"
    assert read_configuration(PACKAGE_ROOT / "setup.cfg")["metadata"]["version"] == remote_code.__version__
    config = tiny_config()
    assert config.to_diff_dict()[VERSION_KEY] == remote_code.__version__
    config.save_pretrained(tmp_path / "a")
    assert json.loads((tmp_path / "a" / "config.json").read_text())[VERSION_KEY] == remote_code.__version__
    loaded = DiffusionMoeConfig.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    again = DiffusionMoeConfig.from_pretrained(tmp_path / "b")
    assert again == loaded and again.to_diff_dict() == loaded.to_diff_dict()
    assert DiffusionMoeConfig.from_dict(loaded.to_dict()) == loaded


def test_checkpoint_code_problem_knows_that_0_1_code_does_not_run_under_transformers_5_24():
    assert "past_key_values" in checkpoint_code_problem(None, "5.24.0")  # unrecorded: written before 0.2.0
    assert "past_key_values" in checkpoint_code_problem("0.1.0", "5.25.0.dev0")
    assert checkpoint_code_problem("0.1.0", "5.23.0") is None
    assert checkpoint_code_problem("0.2.0", "5.24.0") is None


def test_the_installed_package_logs_which_code_runs_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=REMOTE_LOGGER)
    model = tiny_model()
    model.save_pretrained(tmp_path / "new")
    for _ in range(2):
        assert type(AutoModelForMaskedLM.from_pretrained(tmp_path / "new", trust_remote_code=True)) is (
            DiffusionMoeForMaskedLM)
    [record] = [r for r in caplog.records if r.name == REMOTE_LOGGER and str(tmp_path / "new") in r.getMessage()]
    assert record.levelno == logging.INFO
    assert f"runs the installed diffusion_moe package's code ({remote_code.__version__})" in record.getMessage()
    assert f"checkpoint's own code ({remote_code.__version__})" in record.getMessage()

    old = tmp_path / "old"
    model.save_pretrained(old)
    config = json.loads((old / "config.json").read_text())
    del config[VERSION_KEY]
    (old / "config.json").write_text(json.dumps(config))
    AutoConfig.from_pretrained(old, trust_remote_code=True)
    [record] = [r for r in caplog.records if r.name == REMOTE_LOGGER and str(old) in r.getMessage()]
    assert record.levelno == logging.WARNING and "unrecorded: written before 0.2.0" in record.getMessage()
    assert (f"`diffusion-moe upgrade-code {old}`" in record.getMessage()) == BREAKS_HERE
    assert ("does not run under the installed Transformers" in record.getMessage()) == BREAKS_HERE


def test_transformers_check_names_what_is_missing_both_versions_and_the_fix(monkeypatch):
    assert remote_code.transformers_problems() == []
    # (Transformers swaps its top-level module object on some imports: patch the one the code holds)
    monkeypatch.setattr(remote_code.transformers, "__version__", "5.22.0")
    monkeypatch.delattr(transformers.cache_utils, "DynamicCache")
    problems = remote_code.transformers_problems()
    assert problems[0] == "Transformers >= 5.23.0" and "`transformers.cache_utils.DynamicCache`" in problems
    with pytest.raises(remote_code.IncompatibleTransformersError, match=r"diffusion-moe 0\.2\.0 needs .*5\.22\.0"):
        remote_code.check_transformers()
    monkeypatch.setattr(remote_code, "__name__", "transformers_modules.ckpt.remote_code")  # as a checkpoint's code
    with pytest.raises(remote_code.IncompatibleTransformersError) as error:
        remote_code.check_transformers()
    for part in ("checkpoint's code (diffusion-moe 0.2.0", "Transformers 5.22.0", "DynamicCache",
                 "pip install -U diffusion-moe", "diffusion-moe upgrade-code PATH"):
        assert part in str(error.value)


RESAVE = """
import json, logging, sys, torch
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
from transformers import AutoConfig, AutoModelForMaskedLM
src, dst = sys.argv[1], sys.argv[2]
config = AutoConfig.from_pretrained(src, trust_remote_code=True)
assert type(config).__module__.startswith("transformers_modules"), type(config).__module__
config.save_pretrained(dst + "/config_only")
model = AutoModelForMaskedLM.from_pretrained(src, trust_remote_code=True).eval()
model.save_pretrained(dst + "/model")
again = AutoModelForMaskedLM.from_pretrained(dst + "/model", trust_remote_code=True).eval()
ids = torch.load(src + "/ids.pt")
assert torch.equal(again(ids).logits, model(ids).logits)
torch.save(again(ids).logits, dst + "/logits.pt")
print("OK", type(config).__module__, type(model).__module__)
"""


def test_remote_loaded_config_and_model_resave_in_a_fresh_interpreter(tmp_path):
    """Without the package, a remote-loaded config (the old bug: FileNotFoundError for
    capacity_schedules.py after config.json was written) and model re-save the code they run."""
    model = tiny_model(router_type="expert_choice")
    src = tmp_path / "src"
    model.save_pretrained(src)
    ids = torch.randint(1, MASK_ID, (2, 9))
    torch.save(ids, src / "ids.pt")
    result = run_fresh(RESAVE, src, tmp_path / "out", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{src} runs the checkpoint's own code (diffusion-moe {remote_code.__version__}" in result.stderr
    code = digest(src, "*.py")
    assert digest(tmp_path / "out" / "config_only", "*.py") == code == digest(tmp_path / "out" / "model", "*.py")
    assert digest(tmp_path / "out" / "model") == digest(src)  # the same weights, byte for byte
    assert torch.equal(torch.load(tmp_path / "out" / "logits.pt"), model(ids).logits)
    saved = json.loads((tmp_path / "out" / "config_only" / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and saved[VERSION_KEY] == remote_code.__version__


TRAINER = """
import sys, torch
from transformers import AutoModelForMaskedLM, Trainer, TrainingArguments
src, out = sys.argv[1], sys.argv[2]
model = AutoModelForMaskedLM.from_pretrained(src, trust_remote_code=True)
torch.manual_seed(0)
ids = torch.randint(1, 63, (8, 8))
labels = torch.where(torch.rand(8, 8) < 0.5, ids, -100)
ids = torch.where(labels != -100, 63, ids)
data = [dict(input_ids=i, labels=l) for i, l in zip(ids, labels)]
args = TrainingArguments(out, max_steps=2, save_steps=2, per_device_train_batch_size=4, report_to=[],
                         use_cpu=True, learning_rate=1e-2, logging_steps=1, save_only_model=True)
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
again = AutoModelForMaskedLM.from_pretrained(out + "/checkpoint-2", trust_remote_code=True)
for (name, a), b in zip(trainer.model.state_dict().items(), again.state_dict().values()):
    assert torch.equal(a, b), name
print("OK")
"""


def test_a_trainer_checkpoint_of_a_remote_loaded_model_holds_its_weights_fresh_interpreter(tmp_path):
    tiny_model().save_pretrained(tmp_path / "src")
    result = run_fresh(TRAINER, tmp_path / "src", tmp_path / "out", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert {"config.json", "model.safetensors", *exported_files()} <= set(os.listdir(checkpoint))
    assert digest(checkpoint) != digest(tmp_path / "src")  # the trained weights, not the loaded ones
    assert hidden_leftovers(tmp_path / "out") == []


TRANSFORMERS_CHECK = """
import sys
import transformers.cache_utils
del transformers.cache_utils.DynamicCache  # as a future Transformers that dropped it
from transformers import AutoModelForMaskedLM
try:
    AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)
except ImportError as error:
    print(type(error).__name__, error)
"""


def test_an_unsupported_transformers_gets_a_clear_error_at_load_fresh_interpreter(tmp_path):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    result = run_fresh(TRANSFORMERS_CHECK, tmp_path / "ckpt", tmp_path=tmp_path)
    assert result.stdout.startswith("IncompatibleTransformersError"), result.stdout + result.stderr[-2000:]
    for part in ("checkpoint's code (diffusion-moe 0.2.0", f"Transformers {transformers.__version__}",
                 "`transformers.cache_utils.DynamicCache`", "diffusion-moe upgrade-code PATH"):
        assert part in result.stdout


# ---------------------------------------------------------------------------------------------
# diffusion-moe upgrade-code


def make_0_1_checkpoint(model, folder):
    """A checkpoint as diffusion-moe 0.1.0 wrote it, built from the current export.

    0.1.0 wrote its modules without the `# diffusion-moe remote code <version>` mark and
    config.json without `diffusion_moe_version`; its output dataclasses had a
    `past_key_values` field, which is why its code fails under Transformers >= 5.24 (that
    release renames the `past_key_values=` argument of every ModelOutput to `cache=`, so the
    old dataclass gets an unexpected `cache` argument: a TypeError at the first forward).
    So: save with the current code, strip the marks and the record, and give the output
    dataclasses 0.1.0's field name. Modules 0.1.0 did not have (transformers_compat.py) keep
    their mark: an unmarked file 0.1.0 never wrote would rightly be refused as the user's.
    """
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    del config[VERSION_KEY]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for path in folder.glob("*.py"):
        text = path.read_text()
        if path.name in remote_code.UNMARKED_FILES_BEFORE_0_2:
            text = text.split("\n", 1)[1]
        if path.name == "modeling_diffusion_moe.py":
            text, count = re.subn(r"(?m)^    cache: Cache \| None = None$", "    past_key_values: Cache | None = None",
                                  text)
            assert count == 2, "the output dataclasses no longer declare `cache: Cache | None = None`"
        path.write_text(text)
    return folder


LOAD = """
import sys, torch
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids, expected = torch.load(sys.argv[2])
assert torch.equal(model(ids).logits, expected), "logits differ"
print("OK", type(model).__module__)
"""


def test_upgrade_code_makes_an_old_checkpoint_load_without_the_package_fresh_interpreter(tmp_path, caplog):
    model = tiny_model(router_type="expert_choice")
    folder = make_0_1_checkpoint(model, tmp_path / "old")
    ids = torch.randint(1, MASK_ID, (2, 9))
    torch.save((ids, model(ids).logits), tmp_path / "expected.pt")
    weights, config_before = digest(folder), json.loads((folder / "config.json").read_text())
    if BREAKS_HERE:
        before = run_fresh(LOAD, folder, tmp_path / "expected.pt", tmp_path=tmp_path)
        assert before.returncode != 0 and "TypeError" in before.stderr and "cache" in before.stderr, before.stderr
    caplog.set_level(logging.INFO, logger=REMOTE_LOGGER)
    loaded = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True).eval()  # the installed code
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert any("unrecorded: written before 0.2.0" in r.getMessage() for r in caplog.records)

    assert cli(["upgrade-code", str(folder)]) == 0
    assert digest(folder) == weights  # weights byte-identical
    config_after = json.loads((folder / "config.json").read_text())
    assert config_after.pop(VERSION_KEY) == remote_code.__version__ and config_after["auto_map"] == AUTO_MAP
    assert config_after == config_before  # nothing else changed
    texts = export_texts()
    assert {p.name: p.read_text() for p in folder.glob("*.py")} == texts
    after = run_fresh(LOAD, folder, tmp_path / "expected.pt", tmp_path=tmp_path)
    assert after.returncode == 0 and "OK transformers_modules" in after.stdout, after.stderr[-3000:]
    snapshot_after = snapshot(folder)
    assert cli(["upgrade-code", str(folder)]) == 0 and snapshot(folder) == snapshot_after  # idempotent
    assert hidden_leftovers(tmp_path) == []


def test_upgrade_code_refuses_what_is_not_a_diffusion_moe_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cases = {"empty": "has no config.json", "llama": "model_type 'llama', not 'diffusion_moe'",
             "missing": "is not a folder", "broken": "is not valid JSON"}
    for name, message in cases.items():
        before = snapshot(tmp_path / name) if (tmp_path / name).exists() else None
        assert cli(["upgrade-code", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err
        assert (snapshot(tmp_path / name) if (tmp_path / name).exists() else None) == before
    users = tmp_path / "users"
    tiny_model().save_pretrained(users)
    (users / "routing.py").write_text("# my routing\n")
    before = snapshot(users)
    assert cli(["upgrade-code", str(users)]) == 2
    assert "routing.py exists and was not written by diffusion-moe" in capsys.readouterr().err
    assert snapshot(users) == before


# ---------------------------------------------------------------------------------------------
# Across Transformers versions (DIFFUSION_MOE_OTHER_PYTHON: another venv's python)

OTHER_PYTHON = os.environ.get("DIFFUSION_MOE_OTHER_PYTHON")
needs_other = pytest.mark.skipif(not OTHER_PYTHON, reason="DIFFUSION_MOE_OTHER_PYTHON names no other interpreter")

SAVE_THERE = """
import sys, torch
sys.path.insert(0, sys.argv[3])  # the tests folder, for conftest.tiny_config
import transformers, diffusion_moe
from conftest import MASK_ID, tiny_config
from diffusion_moe import DiffusionMoeForMaskedLM
torch.manual_seed(0)
model = DiffusionMoeForMaskedLM(tiny_config(num_shared_experts=1, first_k_dense_replace=1,
                                            router_type="block", router_score_function="sigmoid",
                                            attention_layout="block_causal", block_size=4,
                                            block_router_size=4)).eval()
model.save_pretrained(sys.argv[1])
ids = torch.randint(1, MASK_ID, (2, 9))
torch.save((ids, model(ids).logits), sys.argv[2])
print("SAVED", transformers.__version__)
"""


def other_version():
    command = [OTHER_PYTHON, "-c", "import transformers; print(transformers.__version__)"]
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout.strip()


@needs_other
def test_saved_here_loads_there_without_the_package(tmp_path):
    model = tiny_model(router_type="token_choice", attention_layout="block_causal", block_size=4)
    model.save_pretrained(tmp_path / "here")
    ids = torch.randint(1, MASK_ID, (2, 9))
    torch.save((ids, model(ids).logits), tmp_path / "expected.pt")
    result = run_fresh(LOAD, tmp_path / "here", tmp_path / "expected.pt", tmp_path=tmp_path, python=OTHER_PYTHON)
    assert result.returncode == 0, f"Transformers {other_version()}: " + result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout


@needs_other
def test_saved_there_loads_here_without_the_package(tmp_path):
    saved = run_fresh(SAVE_THERE, tmp_path / "there", tmp_path / "expected.pt", Path(__file__).parent,
                      tmp_path=tmp_path, python=OTHER_PYTHON, block_package=False)
    assert saved.returncode == 0 and "SAVED" in saved.stdout, saved.stderr[-3000:]
    result = run_fresh(LOAD, tmp_path / "there", tmp_path / "expected.pt", tmp_path=tmp_path)
    assert result.returncode == 0, f"saved under Transformers {saved.stdout.split()[-1]}: " + result.stderr[-3000:]
    assert "OK transformers_modules" in result.stdout
