"""EC-DLM's routed-output scaling (`--enable-scaling-factor`, used by every published run).

A token's routed output is a mix of its experts with gates summing to 1, so its norm falls
as more experts share the token, while the shared experts' output does not. EC-DLM scales
the gates by the mean of sqrt(num_shared) / ||gates||_2 over gates drawn as softmax(randn(E))
(renormalised over the first k): per chooser count k = 1..E for expert choice
(`compute_ec_scaling_factors`), one constant for token choice's top-k
(`compute_tc_scaling_factor`), both in EC-DLM's megatron/core/transformer/moe/moe_utils.py.
These reproduce its numbers exactly: the same legacy NumPy stream (seed 42, the draws in the
same order), vectorised per k; the global NumPy RNG is left untouched. Expert choice's table
costs O(E^2 * num_samples) Gaussian draws (about 1 s for 64 experts, minutes for 512), once
per process and (E, shared) pair.
"""

import functools

import numpy as np
import torch

NUM_SAMPLES = 10_000
SEED = 42


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    e_x = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e_x / e_x.sum(axis=1, keepdims=True)


def _mean_factor(selected: np.ndarray, shared_norm: float) -> float:
    """EC-DLM's average of sqrt(shared) / ||renormalised selected probs||_2 (rows of `selected`)."""
    sums = selected.sum(axis=1, keepdims=True)
    selected = np.where(sums > 0, selected / np.where(sums > 0, sums, 1.0), selected)
    norms = np.sqrt((selected**2).sum(axis=1))
    kept = norms > 1e-9
    return float(np.mean(shared_norm / norms[kept])) if kept.any() else 1.0


@functools.lru_cache(maxsize=None)
def ec_scaling_factors(num_experts: int, num_shared_experts: int, num_samples: int = NUM_SAMPLES) -> torch.Tensor:
    """[E + 1] float32: the gate multiplier of a token chosen by k experts (index 0: unused, 1.0)."""
    stream = np.random.RandomState(SEED)
    shared_norm = np.sqrt(num_shared_experts)
    factors = [1.0]
    for k in range(1, num_experts + 1):
        probs = _softmax_rows(stream.randn(num_samples, num_experts))
        factors.append(_mean_factor(probs[:, :k], shared_norm))
    return torch.tensor(factors, dtype=torch.float32)


@functools.lru_cache(maxsize=None)
def ec_scaling_factors_on(num_experts: int, num_shared_experts: int, device: torch.device) -> torch.Tensor:
    """`ec_scaling_factors` on `device`, copied there once (not in every MoE layer of every forward)."""
    return ec_scaling_factors(num_experts, num_shared_experts).to(device)


@functools.lru_cache(maxsize=None)
def tc_scaling_factor(num_experts: int, top_k: int, num_shared_experts: int, score_function: str = "softmax",
                      renormalize: bool = True, num_samples: int = NUM_SAMPLES) -> float:
    """Token choice's constant gate multiplier for top-k of `score_function` scores."""
    logits = np.random.RandomState(SEED).randn(num_samples, num_experts)
    if score_function == "softmax":
        probs = _softmax_rows(logits)
    elif score_function == "sigmoid":
        probs = 1 / (1 + np.exp(-logits))
    else:
        raise ValueError(f"`router_score_function` must be 'softmax' or 'sigmoid'; got {score_function!r}")
    top = -np.sort(-probs, axis=1)[:, :top_k]
    if not renormalize:
        norms = np.sqrt((top**2).sum(axis=1))
        kept = norms > 1e-9
        return float(np.mean(np.sqrt(num_shared_experts) / norms[kept])) if kept.any() else 1.0
    return _mean_factor(top, np.sqrt(num_shared_experts))
