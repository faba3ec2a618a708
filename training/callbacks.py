"""Trainer callbacks that watch the routers through forward hooks (no change to the model).

Both attach a forward hook to every `DiffusionMoeRouter` of the model (found by class
name, so PEFT-wrapped and remote-code models work too) and read its decision (see
routing_decisions): `assignment` [B, L, E] (which expert processes which token),
`stats()`, and the `inputs` it was routed with (padding, routing units, mask ratios). Only
training-mode forwards count. Under gradient checkpointing the recomputed forward is counted
again, which scales every count by the same factor.
"""

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..modeling.routing import DiffusionMoeRouter
from ..modeling.routing_inputs import capacity_groups, unit_mask_ratio


def find_routers(model) -> list[DiffusionMoeRouter]:
    """Routers by class name (of the rule's base class), so a model loaded from remote code
    (a copy of the classes) works too."""
    routers = [m for m in model.modules()
               if any(cls.__name__ == DiffusionMoeRouter.__name__ for cls in type(m).__mro__)]
    if not routers:
        raise ValueError("the model has no DiffusionMoeRouter modules (is any layer a MoE layer?)")
    return routers


class _RouterHooks(TrainerCallback):
    """Attach `self.record(layer, router, decision)` to every router for the run."""

    def __init__(self):
        self._handles = []

    def attach(self, model):
        self.detach()
        self.routers = find_routers(model)
        for layer, router in enumerate(self.routers):
            def hook(module, args, output, layer=layer):
                if module.training:  # the router returns (router_logits, decision)
                    with torch.no_grad():
                        self.record(layer, module, output[1])
            self._handles.append(router.register_forward_hook(hook))

    def detach(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.attach(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()


class ExpertBiasUpdateCallback(_RouterHooks):
    """Auxiliary-loss-free balancing: after each optimizer step,
    b_e += u * sign(mean_load - load_e) for every MoE layer.

    Loads are the assignments counted over all micro-batches of the step and summed over
    data-parallel ranks (all-reduce) before the update, so every rank applies the same
    update and keeps the same bias. `update_rate` defaults to the model's
    `config.expert_bias_update_rate`; 0 turns the update off. The bias is a buffer of the
    model, so checkpoints carry it.
    """

    def __init__(self, update_rate: float | None = None):
        super().__init__()
        if update_rate is not None and not (isinstance(update_rate, (int, float)) and update_rate >= 0):
            raise ValueError(f"ExpertBiasUpdateCallback: `update_rate` must be a number >= 0; got {update_rate!r}.")
        self.update_rate = update_rate
        self.loads = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        super().on_train_begin(args, state, control, model=model, **kwargs)
        if self.update_rate is None:
            self.update_rate = getattr(self.routers[0].config, "expert_bias_update_rate", 0.0)
        self.loads = torch.zeros(len(self.routers), self.routers[0].num_experts, device=self.routers[0].expert_bias.device)

    def record(self, layer, router, decision):
        self.loads[layer] += decision.assignment.sum((0, 1)).to(self.loads)

    def on_step_end(self, args, state, control, **kwargs):
        loads, self.loads = self.loads, torch.zeros_like(self.loads)
        if not self.update_rate:
            return
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(loads, op=dist.ReduceOp.SUM)
        step = self.update_rate * torch.sign(loads.mean(-1, keepdim=True) - loads)
        for router, delta in zip(self.routers, step):
            router.expert_bias.add_(delta.to(router.expert_bias))


class RouterStatsCallback(_RouterHooks):
    """Adds routing statistics of the training forwards since the last log to the Trainer's logs:

    router/load_imbalance   max / mean expert load, per layer, averaged over layers (1 = balanced)
    router/dropped_fraction token-choice assignments dropped by `capacity_factor`
    router/experts_per_token@r=a-b  mean experts per real token of the routing units (a
                            sequence, or an attention block of a block-causal model) whose
                            mask ratio falls in [a, b): the capacity schedule as trained
    The same numbers go into `state.log_history`. `history` keeps them for plots.
    """

    def __init__(self, num_buckets: int = 5):
        super().__init__()
        if not (isinstance(num_buckets, int) and num_buckets > 0):
            raise ValueError(f"RouterStatsCallback: `num_buckets` must be a positive integer; got {num_buckets!r}.")
        self.num_buckets = num_buckets
        self.history = []
        self._reset()

    def _reset(self):
        self.loads = {}
        self.proposed = self.kept = 0.0
        self.bucket_sum = torch.zeros(self.num_buckets, dtype=torch.float64)
        self.bucket_count = torch.zeros(self.num_buckets, dtype=torch.float64)

    def record(self, layer, router, decision):
        inputs = decision.inputs
        padding_mask = inputs.padding_mask
        assignment = decision.assignment & padding_mask.unsqueeze(-1)
        load = assignment.sum((0, 1)).double().cpu()
        self.loads[layer] = self.loads.get(layer, 0) + load
        if getattr(decision, "expert_index", None) is not None:
            self.proposed += float(padding_mask.sum()) * decision.expert_index.shape[-1]
            self.kept += float(assignment.sum())
        groups, ratio, real = self._routing_units(router, inputs)
        if ratio is None:
            return  # no mask ratio to bucket by (inputs_embeds, or no mask_token_id)
        per_group = groups.scatter(assignment.sum(-1), 0).sum(1).double() / real.clamp(min=1).double()
        bucket = (ratio * self.num_buckets).long().clamp(0, self.num_buckets - 1)
        used = (real > 0).double()
        self.bucket_sum.index_add_(0, bucket.cpu(), (per_group * used).cpu())
        self.bucket_count.index_add_(0, bucket.cpu(), used.cpu())

    def _routing_units(self, router, inputs):
        """(groups, mask ratio [G] or None, real tokens [G]) of the routing units (a sequence; each
        attention block of a block-causal model), also where expert choice's capacity group is the
        whole batch (`batch_level_expert_choice`): computed once per forward, as every MoE layer
        of a forward shares its `RoutingInputs`."""
        if getattr(self, "_units_of", None) is not inputs:
            groups = capacity_groups(router.config, inputs.position_ids, inputs.static)
            ratio = unit_mask_ratio(groups, inputs.padding_mask, inputs.mask_ratio, inputs.masked)
            real = groups.scatter(inputs.padding_mask, False).sum(1)
            self._units_of, self._units = inputs, (groups, None if ratio is None else ratio.detach().double(), real)
        return self._units

    def summary(self) -> dict:
        if not self.loads:
            return {}
        imbalance = [float(l.max() / l.mean().clamp(min=1e-12)) for l in self.loads.values()]
        out = {
            "router/load_imbalance": sum(imbalance) / len(imbalance),
            "router/dropped_fraction": 1.0 - self.kept / self.proposed if self.proposed else 0.0,
        }
        for i in range(self.num_buckets):
            if self.bucket_count[i] > 0:
                lo, hi = i / self.num_buckets, (i + 1) / self.num_buckets
                out[f"router/experts_per_token@r={lo:.1f}-{hi:.1f}"] = float(self.bucket_sum[i] / self.bucket_count[i])
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:
            return  # evaluation logs: keep accumulating until the next training log
        stats = self.summary()
        self._reset()
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)
        self.history.append({"step": state.global_step, **stats})


__all__ = ["ExpertBiasUpdateCallback", "RouterStatsCallback", "find_routers"]
