"""Nothing a user owns is lost by a conversion: `--overwrite` never replaces or deletes the
source or a folder holding it, and an interrupted run's leftovers are named, not buried."""

import hashlib
from pathlib import Path

import pytest

from diffusion_moe.cli import main as cli_main
from llada2_reference import random_llada2_weights, tiny_llada2_config, write_llada2_checkpoint

MASK, EOS = 157, 156


def digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (recursively) and the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def workspace(tmp_path):
    """models/llada2 (a LLaDA2 checkpoint), models/converted (ours), models/other (unrelated)."""
    models = tmp_path / "models"
    config = tiny_llada2_config()
    write_llada2_checkpoint(models / "llada2", config, random_llada2_weights(config, seed=0), num_shards=2)
    (models / "other").mkdir()
    (models / "other" / "weights.bin").write_bytes(b"a user's model")
    argv = ["convert", "llada2", str(models / "llada2"), str(models / "converted"), "--mask-token-id", str(MASK),
            "--eos-token-id", str(EOS)]
    assert cli_main(argv) == 0
    return models


def convert(direction, src, dst, *extra):
    ids = ["--mask-token-id", str(MASK), "--eos-token-id", str(EOS)] if direction == "llada2" else []
    return cli_main(["convert", direction, str(src), str(dst), *ids, "--overwrite", *extra])


@pytest.mark.parametrize("direction, source", [("llada2", "llada2"), ("to-llada2", "converted")])
@pytest.mark.parametrize("where", ["the source itself", "the folder holding it", "inside it", "a path spelled differently"])
def test_overwrite_refuses_a_destination_that_is_contains_or_lies_inside_the_source(workspace, capsys, direction,
                                                                                     source, where):
    src = workspace / source
    dst = {"the source itself": src, "the folder holding it": workspace, "inside it": src / "out",
           "a path spelled differently": src / ".." / source}[where]
    before = digest(workspace)
    assert convert(direction, src, dst) == 2
    message = capsys.readouterr().err
    assert "source" in message and str(src.resolve()) in message
    assert digest(workspace) == before  # nothing read-write touched: every file still there, byte for byte
    assert sorted(p.name for p in workspace.iterdir()) == ["converted", "llada2", "other"]


def test_a_destination_beside_the_source_is_fine(workspace):
    assert convert("to-llada2", workspace / "converted", workspace / "back") == 0
    assert (workspace / "back" / "config.json").is_file() and (workspace / "other" / "weights.bin").is_file()


@pytest.mark.parametrize("kind", ["partial", "old"])
def test_leftovers_of_an_interrupted_run_are_named_not_deleted(workspace, capsys, kind):
    leftover = workspace / f".back.{kind}-1234"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    assert convert("to-llada2", workspace / "converted", workspace / "back") == 2
    message = capsys.readouterr().err
    assert str(leftover) in message and "interrupted" in message
    assert (leftover / "config.json").read_text() == "{}" and not (workspace / "back").exists()
    leftover.joinpath("config.json").unlink()
    leftover.rmdir()
    assert convert("to-llada2", workspace / "converted", workspace / "back") == 0
