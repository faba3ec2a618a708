"""`transformers.Trainer` with the diffusion loss normalised correctly under accumulation.

Trainer makes gradient accumulation match the large batch by summing a count over the
micro-batches of an optimizer step (and over ranks) and passing it to the model as
`num_items_in_batch`, the denominator of the loss. It counts `labels != -100`, which is
the right denominator for loss_weighting="none" but not for "elbo", whose denominator
is the number of real tokens. Our collators put each micro-batch's own denominator in
the batch (`num_items_in_batch`); this subclass sums those instead of counting labels.

It also keeps the router losses (aux, z) a per-token average: the model adds them to
every micro-batch's loss, so under accumulation they would be counted once per
micro-batch; here each micro-batch's router loss is weighted by its share of the
denominator.

`evaluate()` draws the evaluation noise from a fixed seed (`args.seed`) in a forked RNG,
so evaluations are comparable across steps and do not perturb training. Its `eval_loss`
is the diffusion loss alone (router losses are training-only); with loss_weighting="elbo"
it is the Monte-Carlo negative ELBO per token (nats), an upper bound on the model's
negative log-likelihood, and `eval_perplexity_bound` = exp(eval_loss).

Finally it adds `RouterStatsCallback` and `ExpertBiasUpdateCallback` (when the config's
`expert_bias_update_rate` > 0) unless the caller already passed them.
"""

import math

import torch
from transformers import Trainer

from .callbacks import ExpertBiasUpdateCallback, RouterStatsCallback


class DiffusionTrainer(Trainer):
    def __init__(self, *args, router_stats: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        config = self.model.config
        has_moe = config.first_k_dense_replace < config.num_hidden_layers

        def present(kind):
            return any(isinstance(cb, kind) for cb in self.callback_handler.callbacks)

        if has_moe and config.expert_bias_update_rate > 0 and not present(ExpertBiasUpdateCallback):
            self.add_callback(ExpertBiasUpdateCallback())
        if has_moe and router_stats and not present(RouterStatsCallback):
            # first in line, so that printers and loggers called after it see the statistics
            self.callback_handler.callbacks.insert(0, RouterStatsCallback())

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if not batch_samples or any("num_items_in_batch" not in batch for batch in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)
        count = sum(torch.as_tensor(batch["num_items_in_batch"]).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # ranks of one tensor/context/sequence-parallel group share a batch: count it once, as Trainer does
            shared_by = self.get_tp_size() * self.get_cp_size() * self.get_sp_size()
            count = self.accelerator.gather(count).sum() / shared_by
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        local = inputs.get("num_items_in_batch")
        if num_items_in_batch is None or local is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**{**inputs, "num_items_in_batch": num_items_in_batch})
        # diffusion_loss is already this micro-batch's share of the step's loss; weight the
        # router losses by the same share so that they, too, add up to one average per step
        share = torch.as_tensor(local, device=outputs.loss.device).sum() / num_items_in_batch
        loss = outputs.diffusion_loss + (outputs.loss - outputs.diffusion_loss) * share
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            # gradients are averaged over the data-parallel ranks (DDP, FSDP2); the count summed their items
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        loss_key = f"{metric_key_prefix}_loss"
        if loss_key in metrics and self.model.config.loss_weighting == "elbo":
            bound = math.exp(min(metrics[loss_key], 50.0))
            metrics[f"{metric_key_prefix}_perplexity_bound"] = bound
            self.log({f"{metric_key_prefix}_perplexity_bound": bound})
        return metrics
