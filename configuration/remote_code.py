"""The flat, self-contained `.py` files that `trust_remote_code=True` loading needs, and safe saves.

Transformers' remote-code loader only follows flat relative imports inside one folder, so
`save_pretrained` writes every module the model needs next to the weights, with
package-relative imports (`from ..generation.generation_utils import X`) rewritten to flat
ones (`from .generation_utils import X`).

Which modules: the ones the `AUTO_MAP` modules reach through their relative imports
(`exported_modules`). Nothing lists them by hand: each file is parsed, every relative
import (also inside functions) is resolved against the importing file's own folder, and
the walk repeats. The same walk works in the package layout and in an already-flattened
folder (the module cache Transformers loads remote code from), so a remote-loaded config or
model re-saves itself with the code it runs.

Every exported file starts with `CODE_MARK` and the version that wrote it; a save refuses to
overwrite a `.py` file without it (a user's own `routing.py`). Saves are atomic: everything
is produced in a hidden sibling folder first and only then moved into place.

This file is itself exported: it may import only the standard library and Transformers.
"""

import ast
import contextvars
import importlib
import inspect
import json
import os
import re
import secrets
import shutil
from pathlib import Path

import transformers
from packaging.version import Version
from transformers.utils import logging

logger = logging.get_logger(__name__)

# The library's version: one source of truth (setup.cfg reads it, the package re-exports it).
# Exported with the code, it is also the version of a checkpoint's remote code.
__version__ = "0.2.0"

# The oldest Transformers this code supports (the lock's oldest version).
MIN_TRANSFORMERS = "5.23.0"

# The key in config.json that records the version of the code written next to the weights.
VERSION_KEY = "diffusion_moe_version"

# First line of every exported `.py` file, followed by the version that wrote it.
CODE_MARK = "# diffusion-moe remote code"

AUTO_MAP = {
    "AutoConfig": "configuration_diffusion_moe.DiffusionMoeConfig",
    "AutoModel": "modeling_diffusion_moe.DiffusionMoeModel",
    "AutoModelForMaskedLM": "modeling_diffusion_moe.DiffusionMoeForMaskedLM",
}

# Code older than `fixed_in` does not run under Transformers `since` or newer. The installed
# package uses this to tell users of an old checkpoint that its own code no longer runs.
BREAKING_TRANSFORMERS_CHANGES = (
    ("0.2.0", "5.24.0", "Transformers 5.24 renamed `past_key_values` to `cache` in model outputs"),
)

# 0.1.x wrote these files without a mark; in a diffusion-moe folder whose config.json has no
# version record (written before 0.2.0) they are recognised as the library's. Frozen history.
UNMARKED_FILES_BEFORE_0_2 = frozenset({
    "configuration_diffusion_moe.py", "capacity_schedules.py", "routing_groups.py", "routing.py",
    "expert_choice_swiglu.py", "experts.py", "attention_masks.py", "input_checks.py", "diffusion_loss.py",
    "remote_code.py", "modeling_diffusion_moe.py", "generation_config_diffusion.py", "logits_processing.py",
    "denoising.py", "prefix_cache.py", "block_runners.py", "generation_utils.py",
})

FIX = "`pip install -U diffusion-moe`, then `diffusion-moe upgrade-code PATH`"

_HERE = Path(__file__).resolve().parent
_RELATIVE_IMPORT = re.compile(r"^(\s*)from \.+(?:\w+\.)*(\w+) import ", re.MULTILINE)
_MARK_LINE = re.compile(rf"^{re.escape(CODE_MARK)} (\S+)")


class RemoteCodeError(ValueError):
    """The exported module set cannot be built (an import that does not resolve, a name clash)."""


class IncompatibleTransformersError(ImportError):
    """The running Transformers lacks something this code needs."""


def flatten_imports(source: str) -> str:
    return _RELATIVE_IMPORT.sub(r"\1from .\2 import ", source)


def auto_map_classes() -> dict:
    """The classes `AUTO_MAP` names, imported.

    The relative imports below also locate the `AUTO_MAP` modules for `exported_modules`
    (in either layout), and make Transformers copy (or download) the model's files together
    with the config's when it loads only the config's remote code, so a remote-loaded config
    can re-save the whole set.
    """
    from ..modeling.modeling_diffusion_moe import DiffusionMoeForMaskedLM
    from .configuration_diffusion_moe import DiffusionMoeConfig

    modules = {cls.__module__.rsplit(".", 1)[-1]: inspect.getmodule(cls)
               for cls in (DiffusionMoeConfig, DiffusionMoeForMaskedLM)}
    return {auto: getattr(modules[target.split(".")[0]], target.split(".")[1]) for auto, target in AUTO_MAP.items()}


# ---------------------------------------------------------------------------------------------
# The export set


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _statement(node: ast.ImportFrom) -> str:
    return f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"


def resolve_relative_import(importer: Path, node: ast.ImportFrom) -> Path:
    """The file a relative `from ... import` in `importer` names, relative to `importer`'s folder."""
    where = f"{importer}:{node.lineno}: `{_statement(node)}`"
    if node.module is None:
        raise RemoteCodeError(
            f"{where} imports from a package; Transformers' remote-code loader only follows "
            f"`from .module import name`, so import the names from the module itself"
        )
    base = importer.parent
    for _ in range(node.level - 1):
        base = base.parent
    target = base.joinpath(*node.module.split("."))
    if (target.parent / f"{target.name}.py").is_file():
        return (target.parent / f"{target.name}.py").resolve()
    if target.is_dir():
        raise RemoteCodeError(
            f"{where} imports the package {node.module!r} (the folder {target}); the exported code is one flat "
            f"folder, so import from one of its modules instead"
        )
    raise RemoteCodeError(f"{where} does not resolve to a file ({target}.py does not exist)")


def relative_imports(path: Path, tree: ast.Module | None = None) -> list[ast.ImportFrom]:
    """Every relative `from ... import` in the file, at any depth (functions, classes, branches)."""
    tree = _parse(path) if tree is None else tree
    return [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level >= 1]


def _entry_files() -> list[Path]:
    """The `AUTO_MAP` modules' files, found where `auto_map_classes` imports them."""
    me = Path(__file__).resolve()
    function = next(node for node in ast.walk(_parse(me))
                    if isinstance(node, ast.FunctionDef) and node.name == "auto_map_classes")
    wanted = {target.split(".")[0] for target in AUTO_MAP.values()}
    entries = {}
    for node in relative_imports(me, function):
        path = resolve_relative_import(me, node)
        if path.stem in wanted:
            entries[path.stem] = path
    missing = wanted - set(entries)
    if missing:
        raise RemoteCodeError(f"AUTO_MAP names {sorted(missing)} but `auto_map_classes` in {me} does not import them")
    return [entries[name] for name in sorted(entries)]


def walk_modules(entries, strict: bool = True) -> dict[str, Path]:
    """Flat file name -> source file of every module the entry files reach by relative imports.

    Raises RemoteCodeError if an import does not resolve or two modules flatten to the same
    name. With `strict=False`, unresolvable imports are skipped instead.
    """
    found: dict[str, Path] = {}
    queue = [Path(entry).resolve() for entry in entries]
    while queue:
        path = queue.pop(0)
        if found.get(path.name) == path:
            continue
        if path.name in found:
            raise RemoteCodeError(
                f"{found[path.name]} and {path} both flatten to {path.name!r}; rename one, the exported code is one "
                "flat folder"
            )
        found[path.name] = path
        for node in relative_imports(path):
            try:
                queue.append(resolve_relative_import(path, node))
            except RemoteCodeError:
                if strict:
                    raise
    return found


def exported_modules() -> dict[str, Path]:
    """Flat file name -> source file of every module `save_pretrained` writes next to the weights."""
    modules = walk_modules(_entry_files())
    for target in AUTO_MAP.values():
        module, name = target.split(".")
        tree = _parse(modules[f"{module}.py"])
        if not any(isinstance(node, ast.ClassDef) and node.name == name for node in tree.body):
            raise RemoteCodeError(f"AUTO_MAP names {target!r}, but {modules[f'{module}.py']} defines no class {name}")
    return modules


def exported_files() -> list[str]:
    return list(exported_modules())


def __getattr__(name):
    if name == "REMOTE_CODE_FILES":  # the pre-0.2 constant, now derived
        return tuple(exported_files())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def code_mark_version(text_or_path) -> str | None:
    """The version in an exported file's first line, or None if it lacks the mark."""
    if isinstance(text_or_path, Path):
        try:
            with open(text_or_path, encoding="utf-8", errors="replace") as f:
                text_or_path = f.readline()
        except (OSError, IsADirectoryError):
            return None
    match = _MARK_LINE.match(text_or_path)
    return match.group(1) if match else None


def export_texts() -> dict[str, str]:
    """Flat file name -> text of every exported module, marked with this code's version."""
    texts = {}
    for name, path in exported_modules().items():
        source = path.read_text(encoding="utf-8")
        if code_mark_version(source) is not None:
            source = source.split("\n", 1)[1] if "\n" in source else ""
        text = f"{CODE_MARK} {__version__}\n{flatten_imports(source)}"
        for node in ast.walk(ast.parse(text)):
            absolute = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            if any(module.split(".")[0] == "diffusion_moe" for module in absolute):
                raise RemoteCodeError(f"{path}:{node.lineno} imports diffusion_moe absolutely; use a relative import")
        texts[name] = text
    return texts


# ---------------------------------------------------------------------------------------------
# Which code runs, and whether Transformers provides what it needs


def running_as_package() -> bool:
    """True for the installed package's code, False for a checkpoint's code loaded by trust_remote_code."""
    return __name__.split(".")[0] == "diffusion_moe"


def _release(version: str) -> Version:
    return Version(Version(str(version)).base_version)


def checkpoint_code_problem(code_version: str | None, transformers_version: str | None = None) -> str | None:
    """Why a checkpoint's code of `code_version` (None: unrecorded, written before 0.2.0) cannot run
    under `transformers_version` (default: the running one), or None if nothing known stops it."""
    running = _release(transformers_version or transformers.__version__)
    code = _release(code_version) if code_version else Version("0.1.0")
    for fixed_in, since, change in BREAKING_TRANSFORMERS_CHANGES:
        if code < Version(fixed_in) and running >= Version(since):
            return f"code older than {fixed_in} does not run under Transformers >= {since} ({change})"
    return None


def _module_level_transformers_imports():
    """(module, names) of the unconditional module-level Transformers imports of the exported code.

    Imports inside try/if blocks or functions are optional or lazy and are not checked.
    """
    files = walk_modules(_entry_files(), strict=False).values()
    for path in files:
        for node in _parse(path).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "transformers":
                yield node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "transformers":
                        yield alias.name, []


def transformers_problems() -> list[str]:
    """What this code needs that the running Transformers does not provide."""
    problems = []
    if _release(transformers.__version__) < Version(MIN_TRANSFORMERS):
        problems.append(f"Transformers >= {MIN_TRANSFORMERS}")
    for module_name, names in _module_level_transformers_imports():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            problems.append(f"the module `{module_name}`")
            continue
        for name in names:
            try:
                getattr(module, name)
            except AttributeError:
                try:
                    importlib.import_module(f"{module_name}.{name}")
                except ImportError:
                    problems.append(f"`{module_name}.{name}`")
    return list(dict.fromkeys(problems))


def check_transformers():
    """Raise IncompatibleTransformersError naming both versions and the fix if Transformers lacks what
    this code needs. Runs when this module is imported (the config's code is imported first)."""
    problems = transformers_problems()
    if not problems:
        return
    running = transformers.__version__
    if running_as_package():
        raise IncompatibleTransformersError(
            f"diffusion-moe {__version__} needs {', '.join(problems)}, which the installed Transformers {running} "
            f"does not provide. Fix: `pip install -U diffusion-moe` (a release that supports Transformers {running}), "
            f"or install a Transformers this release supports (>= {MIN_TRANSFORMERS})."
        )
    raise IncompatibleTransformersError(
        f"This checkpoint's code (diffusion-moe {__version__}, written next to its weights by save_pretrained) needs "
        f"{', '.join(problems)}, which the running Transformers {running} does not provide. Fix: {FIX} (PATH: the "
        f"checkpoint's folder) rewrites its code with the installed release's; or run a Transformers this code "
        f"supports (>= {MIN_TRANSFORMERS})."
    )


def log_code_origin(source, recorded_version: str | None):
    """Log (once per process and message) which code builds the checkpoint at `source`.

    Transformers prefers a class registered from outside Transformers over a checkpoint's
    remote code (`explicit_local_code`), and importing diffusion_moe registers its classes:
    with the package imported, the installed code runs; without it, the checkpoint's.
    """
    running = transformers.__version__
    recorded = recorded_version or "unrecorded: written before 0.2.0"
    if running_as_package():
        message = (
            f"diffusion-moe: {source} runs the installed diffusion_moe package's code ({__version__}), not the "
            f"checkpoint's own code ({recorded}): Transformers prefers registered classes over remote code, and "
            "importing diffusion_moe registers them."
        )
        problem = checkpoint_code_problem(recorded_version, running)
        if problem:
            message += (
                f" The checkpoint's own code does not run under the installed Transformers {running}: {problem}; "
                f"where diffusion_moe is not installed, trust_remote_code=True loading fails. Fix: "
                f"`diffusion-moe upgrade-code {source}` rewrites its code with this version's."
            )
    else:
        message = (
            f"diffusion-moe: {source} runs the checkpoint's own code (diffusion-moe {__version__}, trust_remote_code) "
            f"under Transformers {running}; import diffusion_moe before loading to run an installed package's code "
            "instead."
        )
    if recorded_version != __version__:
        logger.warning_once(message)
    else:
        logger.info_once(message)


# ---------------------------------------------------------------------------------------------
# Atomic saves

# The temporary folder an atomic save is producing: a nested save into it writes directly.
_PRODUCING: contextvars.ContextVar = contextvars.ContextVar("diffusion_moe_producing", default=None)
# The settings of a model save whose `push_to_hub` is running: its inner save reuses them.
_PUSH_SAVE: contextvars.ContextVar = contextvars.ContextVar("diffusion_moe_push_save", default=None)

HUB_KWARGS = ("commit_message", "commit_description", "private", "token", "revision", "create_pr", "tags")


def _key(path) -> str:
    return os.path.realpath(os.fspath(path))


def producing(path) -> bool:
    """True while an atomic save is producing exactly this (temporary) folder."""
    return _PRODUCING.get() == _key(path)


def _unmarked_files_are_legacy(folder: Path) -> bool:
    """True for a diffusion-moe folder written before 0.2.0 (its code files carry no mark)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("model_type") == "diffusion_moe" and VERSION_KEY not in config


def check_overwrites(folder, names):
    """Raise ValueError naming the first `.py` file among `names` in `folder` the library did not write."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    legacy = None
    for name in names:
        path = folder / name
        if not name.endswith(".py") or not os.path.lexists(path):
            continue
        if path.is_file() and not path.is_symlink() and code_mark_version(path) is not None:
            continue
        if legacy is None:
            legacy = _unmarked_files_are_legacy(folder)
        if legacy and path.is_file() and not path.is_symlink() and name in UNMARKED_FILES_BEFORE_0_2:
            continue
        raise ValueError(
            f"{path} exists and was not written by diffusion-moe (its first line is not `{CODE_MARK} <version>`); "
            "refusing to overwrite it. Move it away or save to another folder."
        )


_WEIGHT_EXTENSIONS = (".safetensors", ".bin")


def stale_weight_files(folder: Path, written, weights_name: str) -> list[Path]:
    """Weight files in `folder` that a new save of `weights_name` (which wrote `written`) leaves stale.

    Transformers' rule (PreTrainedModel.save_pretrained): a file the new save did not write
    whose name starts with the weights name without extension and, without its extension,
    is `<anything>-XXXXX-of-YYYYY` -- restricted here to weight extensions (.safetensors,
    .bin). Also the index and the unsharded file of the same family when the new save did not
    write them (a stale `model.safetensors` next to new shards would be loaded instead of them).
    """
    stem = weights_name.rsplit(".", 1)[0]  # model / model.fp16 / adapter_model
    base, *variant = stem.split(".")
    index = ".".join([base, "safetensors", "index", *variant, "json"])  # Transformers' _add_variant
    written = set(written)
    if not written & {weights_name, index}:
        return []  # the new save wrote no weights of this family: leave the old ones alone
    stale = []
    for entry in sorted(os.listdir(folder)):
        path = folder / entry
        if entry in written or not path.is_file():
            continue
        extension = next((ext for ext in _WEIGHT_EXTENSIONS if entry.endswith(ext)), None)
        shard = (extension is not None and entry.startswith(stem)
                 and re.fullmatch(r"(.*?)-\d{5}-of-\d{5}", entry[: -len(extension)]) is not None)
        if shard or entry in (weights_name, index):
            stale.append(path)
    return stale


def _move_into(tmp: Path, dst: Path) -> list[str]:
    """Move every file of `tmp` into the existing folder `dst` (os.replace), configs last."""
    names = sorted(os.listdir(tmp), key=lambda n: (n.endswith(".json") and "config" in n, n.endswith(".py"), n))
    for name in names:
        source, target = tmp / name, dst / name
        if source.is_dir() and not source.is_symlink():
            target.mkdir(exist_ok=True)
            _move_into(source, target)
        else:
            os.replace(source, target)
    return names


def atomic_save(save_directory, produce, code_texts: dict[str, str] | None = None, weights_name: str | None = None):
    """Run `produce(tmp)`, write `code_texts` into tmp, then move tmp's files into `save_directory`.

    tmp is a hidden sibling of `save_directory`; on any failure it is removed and
    `save_directory` is left as it was. A new folder appears by one `os.rename`; an existing
    one gets the new files by `os.replace`, file by file, once everything was produced; then
    stale weight files of `weights_name` and stale marked `.py` files are removed. A `.py`
    file the library did not write is never overwritten (ValueError before anything is done).
    """
    code_texts = export_texts() if code_texts is None else code_texts
    dst = Path(os.path.realpath(os.fspath(save_directory)))
    check_overwrites(dst, code_texts)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.diffusion-moe-tmp-{secrets.token_hex(4)}"
    try:
        os.mkdir(tmp)
    except PermissionError:  # a writable folder in a read-only parent: produce inside it instead
        if not dst.is_dir():
            raise
        tmp = dst / tmp.name
        os.mkdir(tmp)
    try:
        token = _PRODUCING.set(_key(tmp))
        try:
            produce(tmp)
        finally:
            _PRODUCING.reset(token)
        for name, text in code_texts.items():
            (tmp / name).write_text(text, encoding="utf-8")
        written = os.listdir(tmp)
        if not dst.exists() and tmp.parent == dst.parent:
            try:
                os.rename(tmp, dst)
                return written
            except OSError:  # created meanwhile: fall through to the file-by-file move
                dst.mkdir(exist_ok=True)
        check_overwrites(dst, code_texts)
        _move_into(tmp, dst)
        stale = stale_weight_files(dst, written, weights_name) if weights_name else []
        if code_texts:  # marked .py files this code no longer exports
            stale += [dst / name for name in os.listdir(dst)
                      if name.endswith(".py") and name not in code_texts and (dst / name).is_file()
                      and code_mark_version(dst / name) is not None]
        for path in stale:
            os.remove(path)
        return written
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_remote_code(save_directory) -> list[str]:
    """Write the exported modules into `save_directory` (created if needed); returns their names.

    Refuses (ValueError) to overwrite a `.py` file the library did not write.
    """
    texts = export_texts()
    folder = Path(save_directory)
    folder.mkdir(parents=True, exist_ok=True)
    check_overwrites(folder, texts)
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    return list(texts)


def read_checkpoint_config(path) -> dict:
    """config.json of a saved diffusion-moe checkpoint folder; ValueError for anything else."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder} has no config.json: it is not a saved diffusion-moe checkpoint")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "diffusion_moe":
        raise ValueError(f"{config_file} has model_type {model_type!r}, not 'diffusion_moe': not a diffusion-moe checkpoint")
    return config


def upgrade_code(path) -> dict:
    """Rewrite a saved checkpoint's remote code with this code: the exported `.py` files and
    config.json's `auto_map` and version record. Nothing else in config.json changes and no
    weight file is opened. Atomic (see `atomic_save`). Raises ValueError for a folder that is
    not a diffusion-moe checkpoint, or that holds a `.py` file the library did not write.
    Returns {"from": the recorded version or None, "to": this version, "files": [...]}.
    """
    config = read_checkpoint_config(path)
    upgraded = {**config, "auto_map": {**(config.get("auto_map") or {}), **AUTO_MAP}, VERSION_KEY: __version__}
    texts = export_texts()
    text = json.dumps(upgraded, indent=2, sort_keys=True) + "\n"  # Transformers' to_json_string layout
    atomic_save(path, lambda tmp: (tmp / "config.json").write_text(text, encoding="utf-8"), texts)
    return {"from": config.get(VERSION_KEY), "to": __version__, "files": sorted(texts)}


def _pop_hub_kwargs(save_directory, kwargs) -> tuple[str, dict]:
    """repo_id (default: the folder's name, as Transformers) and the public push_to_hub kwargs."""
    repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.normpath(os.fspath(save_directory)))
    return repo_id, {name: kwargs.pop(name) for name in HUB_KWARGS if name in kwargs}


class SavesRemoteCode:
    """Config mixin: a saved config's folder carries the remote code its `auto_map` names, and
    its config.json records that code's version (`diffusion_moe_version`).

    `save_pretrained` is atomic (see `atomic_save`). With `push_to_hub=True` it saves locally,
    then calls the public `push_to_hub`, which saves again into a temporary folder (code
    files included) and uploads that.
    """

    def to_dict(self):
        output = super().to_dict()
        output[VERSION_KEY] = __version__  # the version of the code a save writes (as transformers_version)
        return output

    def save_pretrained(self, save_directory, push_to_hub=False, **kwargs):
        self.auto_map = {**(getattr(self, "auto_map", None) or {}), **AUTO_MAP}
        parent = super().save_pretrained
        if producing(save_directory) or os.path.isfile(save_directory):
            # inside an atomic save of this very folder (a model's), or Transformers' own error for a file
            return parent(save_directory, push_to_hub=push_to_hub, **kwargs)
        hub = _pop_hub_kwargs(save_directory, kwargs) if push_to_hub else None
        atomic_save(save_directory, lambda tmp: parent(tmp, **kwargs))
        if hub is not None:
            repo_id, hub_kwargs = hub
            self.push_to_hub(repo_id, **hub_kwargs)


class AtomicSavePretrained:
    """Model mixin: `save_pretrained` produces everything in a hidden sibling folder, then moves it
    into place (see `atomic_save`), removes stale weight files as Transformers does, and never
    overwrites a `.py` file the library did not write. Every Transformers argument keeps working.

    Non-writing ranks, distributed checkpoints and models sharded by Transformers' distributed
    config save through Transformers directly (every rank takes part there); their config's
    save is still atomic. With `push_to_hub=True` the folder is saved locally, then the
    public `push_to_hub` uploads a fresh save made with the same settings.
    """

    def save_pretrained(self, save_directory, is_main_process=True, state_dict=None, push_to_hub=False,
                        max_shard_size="50GB", variant=None, token=None, *args, **kwargs):
        parent = super().save_pretrained
        pushed = _PUSH_SAVE.get()
        if pushed is not None:  # the inner save of our own push_to_hub: same settings as the local save
            reset = _PUSH_SAVE.set(None)
            try:
                settings = {**pushed, "max_shard_size": max_shard_size}
                state = settings.pop("state_dict")
                return self.save_pretrained(
                    save_directory, state_dict=None if state is None else dict(state), token=token, **settings
                )
            finally:
                _PUSH_SAVE.reset(reset)

        saves_here = getattr(self, "should_save_on_this_rank", lambda main: main)(is_main_process)
        direct = (
            not saves_here
            or kwargs.get("distributed_checkpoint", len(args) > 2 and args[2])
            or getattr(self.config, "distributed_config", None) is not None
            or os.path.isfile(save_directory)
            or producing(save_directory)
        )
        if direct:
            return parent(save_directory, is_main_process, state_dict, push_to_hub, max_shard_size, variant, token,
                          *args, **kwargs)

        hub = _pop_hub_kwargs(save_directory, kwargs) if push_to_hub else None
        local_state = None if state_dict is None or hub is None else dict(state_dict)  # the save consumes it
        adapters = getattr(self, "_hf_peft_config_loaded", False)  # Transformers saves only the adapters then
        weights_name = "adapter_model.safetensors" if adapters else "model.safetensors"
        if variant is not None:
            weights_name = weights_name.replace(".safetensors", f".{variant}.safetensors")
        atomic_save(
            save_directory,
            lambda tmp: parent(tmp, is_main_process, state_dict, False, max_shard_size, variant, token, *args, **kwargs),
            code_texts={} if adapters else None,
            weights_name=weights_name,
        )
        if hub is not None:
            repo_id, hub_kwargs = hub
            hub_kwargs.setdefault("token", token)
            settings = dict(is_main_process=is_main_process, state_dict=local_state, variant=variant, **kwargs)
            reset = _PUSH_SAVE.set(settings)
            try:
                self.push_to_hub(repo_id, max_shard_size=max_shard_size, **hub_kwargs)
            finally:
                _PUSH_SAVE.reset(reset)


check_transformers()
