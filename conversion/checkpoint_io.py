"""Streaming access to sharded safetensors checkpoints, and a crash-safe output folder.

Converting a 16B checkpoint must not need the model in memory: tensors are read one at a
time with `safe_open`, and written in bounded output shards with `save_file`, so the
peak stays near one shard. The output is built in a temporary folder next to the
destination and renamed into place only once it is complete.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from transformers.utils.hub import convert_file_size_to_int

# Files a converter writes itself; everything else in the source folder (tokenizer files,
# README, ...) is copied over unchanged. Source `.py` files belong to the source format.
_NOT_COPIED = {"config.json", "generation_config.json", SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME}


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def parse_size(size) -> int:
    """Bytes from an int, a digit string, or a size like "5GB" / "500MiB"."""
    if isinstance(size, str) and size.isdigit():
        size = int(size)
    try:
        value = convert_file_size_to_int(size)
    except (ValueError, AttributeError):
        value = None
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"`max_shard_size` must be a positive byte count or a size like '5GB'; got {size!r}")
    return value


def shard_files(src: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder (single file, or shards listed by the index)."""
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {src}")
    index_path = src / SAFE_WEIGHTS_INDEX_NAME
    if index_path.is_file():
        names = sorted(set(read_json(index_path, "safetensors index")["weight_map"].values()))
        files = [src / name for name in names]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} lists shard files that do not exist: {missing}")
        return files
    if (src / SAFE_WEIGHTS_NAME).is_file():
        return [src / SAFE_WEIGHTS_NAME]
    raise FileNotFoundError(
        f"no weights in {src}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} with its shards"
    )


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, read from the shard headers only (no tensor data)."""
    shapes = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, shard by shard; only the open shard is mapped."""
    for path in files:
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


class ShardWriter:
    """Buffers output tensors and writes a shard whenever the buffer would exceed `max_shard_size`.

    `close()` names the shards `model-0000i-of-0000n.safetensors` (or `model.safetensors` when
    there is one) and writes the index, as `save_pretrained` does.
    """

    def __init__(self, folder: Path, max_shard_size="5GB"):
        self.folder = Path(folder)
        self.max_bytes = parse_size(max_shard_size)
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self.flush()
        self.buffer[name] = tensor.contiguous()
        self.buffer_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.buffer:
            return
        path = self.folder / f"shard-{len(self.shards):05d}.tmp"
        save_file(self.buffer, path, metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the tensor names written."""
        self.flush()
        n = len(self.shards)
        weight_map = {}
        for i, (path, names) in enumerate(self.shards):
            final = SAFE_WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            write_json(
                self.folder / SAFE_WEIGHTS_INDEX_NAME,
                {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map},
            )
        return list(weight_map)


def copy_other_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer files and the like; skip weights, configs and source-format code."""
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and path.name not in _NOT_COPIED and path.suffix not in (".safetensors", ".py", ".bin"):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied


def check_destination(dst: Path, overwrite: bool, src: Path | None = None) -> None:
    """Refuse early, before anything is read or written: a file at `dst`, a non-empty folder
    without `overwrite`, a `dst` that is, contains or lies inside `src` (replacing it would
    delete the source, or the folder holding it), and leftovers of an interrupted run."""
    dst = Path(dst).resolve()
    if src is not None:
        src = Path(src).resolve()
        if dst == src or dst in src.parents or src in dst.parents:
            relation = "is" if dst == src else "contains" if dst in src.parents else "lies inside"
            raise ValueError(
                f"destination {dst} {relation} the source {src}: converting into it would replace or delete the "
                "source; choose a destination outside the source"
            )
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"destination {dst} exists and is not a folder")
    leftovers = sorted(str(p) for kind in ("partial", "old") for p in dst.parent.glob(f".{dst.name}.{kind}-*"))
    if leftovers:
        raise FileExistsError(
            f"an earlier conversion to {dst} was interrupted and left {leftovers}: a `.partial-*` folder holds "
            "incomplete output, an `.old-*` folder the previous destination it was replacing. Move back or delete "
            "them, then run again."
        )
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"destination {dst} is not empty; pass overwrite=True (--overwrite) to replace it")


@contextmanager
def atomic_output_dir(dst, overwrite: bool = False, src=None):
    """Yield a temporary folder next to `dst`; on success it replaces `dst` by renames.

    On any exception the temporary folder is removed and `dst` is untouched. With
    `overwrite`, the old `dst` is moved aside only after the new one is complete, and
    deleted only after the new one is in place.
    """
    dst = Path(dst).resolve()
    check_destination(dst, overwrite, src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent)) if dst.exists() else None
    try:
        if old is not None:
            os.rename(dst, old / dst.name)
        os.rename(tmp, dst)
    except BaseException:
        if old is not None and (old / dst.name).exists():
            os.rename(old / dst.name, dst)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None and dst.exists():  # never drop the old copy unless dst is in place
            shutil.rmtree(old, ignore_errors=True)
