"""Every place the model relies on a Transformers internal, in one module.

Transformers renames things between minor releases (5.24 renamed `past_key_values` to
`cache`). What the library needs that has no public API lives here, each behind a function
or class with a test (`tests/test_transformers_compat.py`) that fails with a message naming
the installed Transformers version when the internal it wraps changes. Supported range:
the `transformers` requirement in setup.cfg (the oldest and newest versions CI runs).
"""

import functools
import re

import torch
import transformers
from transformers.utils import ModelOutput


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "5.24.0" or "5.25.0.dev0"."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


TRANSFORMERS_VERSION = release(transformers.__version__)
# Transformers 5.24 renamed `past_key_values` to `cache` (forward arguments and outputs)
CACHE_RENAME_VERSION = (5, 24)
# when Transformers removes `past_key_values` from its own models (its deprecation schedule)
CACHE_ALIAS_REMOVAL = "5.40.0"
CACHE_IS_THE_NAME = TRANSFORMERS_VERSION >= CACHE_RENAME_VERSION


class TransformersCompatibilityError(RuntimeError):
    """A Transformers internal this code relies on has changed."""


def incompatible(what: str) -> TransformersCompatibilityError:
    return TransformersCompatibilityError(
        f"{what} is not what diffusion-moe expects under transformers {transformers.__version__}. Install a "
        "diffusion-moe release that supports it (`pip install -U diffusion-moe`); for a saved checkpoint, then run "
        "`diffusion-moe upgrade-code PATH` so its remote code is the new one."
    )


try:  # Transformers' output recording (`_can_record_outputs`): no public module yet
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs, maybe_install_capturing_hooks
except ImportError as error:  # pragma: no cover - only on an unsupported Transformers
    raise incompatible("transformers.utils.output_capturing (OutputRecorder, capture_outputs, "
                       "maybe_install_capturing_hooks)") from error


def install_output_recorders(model) -> None:
    """Install the hooks of `_can_record_outputs` now. Transformers installs them on the first
    forward that records anything, under a thread lock torch.compile cannot trace: a compiled
    step that records (router statistics) needs them in place before it is traced."""
    maybe_install_capturing_hooks(model)
    if not getattr(model, "_output_capturing_hooks_installed", False):
        raise incompatible("maybe_install_capturing_hooks (no `_output_capturing_hooks_installed` mark)")


def accepts_past_key_values(function):
    """`cache` is the argument's name; `past_key_values=` is still accepted as Transformers does.

    From 5.24 on this is Transformers' own `deprecate_kwarg` (a FutureWarning until it
    removes the old name); before 5.24 `past_key_values` was the name, so it is renamed
    without a warning.
    """
    if CACHE_IS_THE_NAME:
        from transformers.utils.deprecation import deprecate_kwarg

        return deprecate_kwarg("past_key_values", CACHE_ALIAS_REMOVAL, new_name="cache", raise_if_both_names=True)(
            function
        )

    @functools.wraps(function)
    def renamed(*args, **kwargs):
        if "past_key_values" in kwargs:
            if "cache" in kwargs:
                raise ValueError(f"Both `past_key_values` and `cache` are set for `{function.__qualname__}`: pass `cache`.")
            kwargs["cache"] = kwargs.pop("past_key_values")
        return function(*args, **kwargs)

    return renamed


if hasattr(ModelOutput, "past_key_values"):  # 5.24+: ModelOutput maps the old name to `cache` itself
    CacheOutput = ModelOutput
else:

    class CacheOutput(ModelOutput):
        """Outputs name their cache `cache` (Transformers 5.24's name); `.past_key_values`,
        the name before 5.24, reads the same field."""

        @property
        def past_key_values(self):
            return self.cache


class ExpertsImplementationSupport:
    """Model mixin: `set_experts_implementation` / `experts_implementation=` work for this model.

    Transformers decides it by looking for `@use_experts_implementation` in the model
    class's own module (`_can_set_experts_implementation`); the decorated experts live in
    `experts.py`, so the answer is given here.
    """

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True


def register_experts_function(name: str, function) -> None:
    """Register `function` under `name` in Transformers' experts interface (what
    `set_experts_implementation(name)` looks up), as `AttentionInterface.register` does for
    attention; `ExpertsInterface` is not exported at Transformers' top level."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
    except ImportError as error:  # pragma: no cover - only on an unsupported Transformers
        raise incompatible("transformers.integrations.moe.ExpertsInterface") from error
    ExpertsInterface.register(name, function)
    if name not in ALL_EXPERTS_FUNCTIONS:
        raise incompatible("ExpertsInterface.register")


def experts_function(name: str):
    """Transformers' registered experts function `name` (e.g. "grouped_mm")."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS[name]


def is_expert_parallel(experts) -> bool:
    """Whether Transformers' expert parallelism sharded this experts module (and replaced its
    forward with its token-layout dispatch): the `_is_expert_parallel` flag its experts
    wrapper sets to False and its `grouped_gemm` parameter style sets to True."""
    return bool(getattr(experts, "_is_expert_parallel", False))


def check_experts_implementation_hooks(model_class) -> None:
    """Fail clearly if Transformers no longer consults the hooks `ExpertsImplementationSupport` overrides."""
    for name in ("_can_set_experts_implementation", "get_correct_experts_implementation"):
        if not callable(getattr(transformers.PreTrainedModel, name, None)):
            raise incompatible(f"PreTrainedModel.{name}")


def rewind_static_cache(cache, length: int, current_length: int) -> None:
    """Make the next `update` of every `StaticCache` layer write from slot `length` on.

    Transformers 5.24 gives static layers a public `crop(-n)`; before it, the layer's write
    position is its `cumulative_length` tensor. Either way nothing is synced to the host.
    """
    if length == current_length:
        return
    for layer in cache.layers:
        if getattr(layer, "is_croppable", False) and length < current_length:
            layer.crop(length - current_length)
        elif isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(length)
        else:
            raise incompatible(f"{type(layer).__name__} (no public crop(), no cumulative_length tensor)")

