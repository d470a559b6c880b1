"""Group relative policy optimisation: sample completions, score them, push up the better ones.

Each micro-batch holds `train.batch_size` prompts. For each, `grpo.num_generations` completions
are sampled from the current policy (`training.rollout`: the live weights, batched, with the KV
cache, seeded by the micro-batch index so resume is exact), scored by the reward functions
(`training.rewards`), and turned into advantages within each prompt's group. Then one packed,
padding-free forward over every prompt + completion gives the per-token log-probs of the
completion tokens (at the sampling temperature, as TRL), and `grpo_loss` (clipped ratio, k3 KL
to the reference when beta > 0) gives one loss per completion. One update per generation: the
"old" log-probs are the detached current ones. The unit is the completion, so the loop's
division by the step's completion count is TRL's mean over sequences, and accumulation and
several processes are exact.

Evaluation samples completions for the eval prompts the same way and reports minus their mean
reward as the eval loss (no gradient pass). The reference costs no copy with LoRA (the adapter
switched off) and is a frozen copy for full and freeze tuning, made only when beta > 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from tunesmith.config.schema import GRPOConfig, LoraAdapter, RunConfig
from tunesmith.data.packing import collate_packed
from tunesmith.data.prompts import TokenizedPrompt, build_prompt_data, prompts_fingerprint
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import MicroBatch, epoch_order
from tunesmith.training.losses import CausalLMWithLoss, head_logits
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.methods.preference_losses import group_advantages, grpo_loss
from tunesmith.training.methods.reference import follow_batch
from tunesmith.training.rewards import Reward, load_rewards, required_columns, score
from tunesmith.training.rollout import Completions, rollout_seed, sample_completions, stop_ids_of
from tunesmith.training.sequence_logps import sequence_ids

COMPLETIONS_FILE = "completions.jsonl"
LOGGED_PROMPTS = 2
"""Prompts (each with all its completions) written to completions.jsonl per logged micro-batch."""


# ------------------------------------------------------------------------------ batches of prompts


class PromptStream:
    """Micro-batches of prompt indices over epochs, each epoch in a permutation seeded by (seed, epoch).

    The prompts stay with the method; a micro-batch carries their indices and its own index (which
    seeds the sampling), as tensors, since that is what reaches `compute_loss`.
    """

    fill = None

    def __init__(
        self,
        prompts: Sequence[TokenizedPrompt],
        batch_size: int,
        num_generations: int,
        seed: int,
        evaluation: bool = False,
    ) -> None:
        self.prompts, self.batch_size, self.num_generations = prompts, batch_size, num_generations
        self.seed, self.evaluation = seed, evaluation
        self.per_epoch = math.ceil(len(prompts) / batch_size)

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        order = epoch_order(len(self.prompts), self.seed, epoch, not self.evaluation)
        chosen = order[position * self.batch_size : (position + 1) * self.batch_size]
        prompts = [self.prompts[i] for i in chosen]
        return MicroBatch(
            tensors={
                "prompt_index": torch.tensor(chosen, dtype=torch.long),
                "batch_index": torch.tensor([index], dtype=torch.long),
                "evaluation": torch.tensor([int(self.evaluation)], dtype=torch.long),
            },
            sources=[str(p.source) for p in prompts],
            trained_tokens=0,  # completion tokens are only known once they are sampled
            real_tokens=sum(len(p.prompt_ids) for p in prompts) * self.num_generations,
            units=len(prompts) * self.num_generations,
        )

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {}  # the micro-batch index alone determines every batch and its sampling seed

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


# ------------------------------------------------------------------ per-token log-probs, packed


def _token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    temperature: float,
) -> torch.Tensor:
    logits = head_logits(hidden, weight, bias, softcap) / temperature
    return torch.gather(logits.log_softmax(-1), 1, targets[:, None])[:, 0]


def completion_token_logps(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    lm_head: nn.Linear,
    chunk_size: int,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every labelled target of a packed batch (at `temperature`) and the sequence
    each belongs to: two (n,) tensors in order. The LM head runs over labelled positions only, in
    chunks recomputed in the backward, so the (tokens x vocab) logits never exist at once."""
    seq = sequence_ids(position_ids)
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    flat_hidden = hidden[:, :-1][selected]
    flat_targets = targets[selected]
    owner = seq[:, 1:][selected]
    weight, bias = lm_head.weight, lm_head.bias
    parts = []
    for start in range(0, flat_targets.numel(), chunk_size):
        h, t = flat_hidden[start : start + chunk_size], flat_targets[start : start + chunk_size]
        if torch.is_grad_enabled() and flat_targets.numel() > chunk_size:
            parts.append(
                checkpoint(_token_logps, h, t, weight, bias, softcap, temperature, use_reentrant=False)
            )
        else:
            parts.append(_token_logps(h, t, weight, bias, softcap, temperature))
    logps = torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)
    return logps + 0.0 * hidden.sum(), owner  # connected for DDP even without labelled tokens


def per_sequence(
    values: torch.Tensor, owner: torch.Tensor, n_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-token values (in sequence order) -> (S, T) right-padded, and the (S, T) 0/1 mask."""
    counts = torch.bincount(owner, minlength=n_sequences)
    width = int(counts.max()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(owner.numel(), device=owner.device) - starts[owner]
    out = values.new_zeros(n_sequences, width).index_put((owner, position), values)
    mask = torch.zeros(n_sequences, width, device=values.device)
    mask[owner, position] = 1.0
    return out, mask


class CompletionScorer(CausalLMWithLoss):
    """One forward call: per-token log-probs of the completion tokens of a packed batch, and owners."""

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int,
        temperature: float,
        frozen_reference: nn.Module | None = None,
    ) -> None:
        super().__init__(model, chunk_size)
        self.temperature = temperature
        # A tuple, not an attribute: the reference is not trained, prepared or checkpointed.
        self._reference = (
            (CompletionScorer(frozen_reference, chunk_size, temperature),)
            if frozen_reference is not None
            else ()
        )

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor, **inputs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _, head, softcap = self._parts
        hidden = self.hidden_states(input_ids, position_ids=position_ids, **inputs)
        return completion_token_logps(
            hidden, labels, position_ids, head, self.chunk_size, softcap, self.temperature
        )

    @torch.no_grad()
    def reference_logps(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._reference:
            return follow_batch(self._reference[0], batch)(**batch)
        with _adapter_disabled(self.model):
            return self(**batch)


@contextlib.contextmanager
def _adapter_disabled(model: nn.Module) -> Iterator[None]:
    """The base model as it was before training: peft's adapter switch, which allocates nothing."""
    with model.disable_adapter():
        yield


# ------------------------------------------------------------------------------------ the method


@dataclass
class Rollout:
    """Scored completions of a micro-batch's prompts, each prompt's group side by side."""

    prompts: list[TokenizedPrompt]
    completions: Completions
    texts: list[str]
    rewards: torch.Tensor
    """(N,) the weighted sum over reward functions."""
    per_function: torch.Tensor
    """(N, F) each function's values (NaN where it does not apply)."""


class GRPO:
    name = "grpo"
    unit = "completion"
    zero_gradient_is_normal = True  # every group rewarded alike: all advantages 0, a zero gradient

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None
        self.tokenizer: Any = None
        self.rewards: list[Reward] = []
        self.train_prompts: list[TokenizedPrompt] = []
        self.eval_prompts: list[TokenizedPrompt] = []
        self.pad_id = 0
        self.block_mask = "none"
        self._stop_ids: list[int] | None = None

    @property
    def settings(self) -> GRPOConfig:
        assert self.cfg is not None and self.cfg.grpo is not None, "prepare_data sets the config"
        return self.cfg.grpo

    # -- the protocol ------------------------------------------------------------------------------

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData:
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rewards = load_rewards(self.settings.rewards)
        data = build_prompt_data(
            cfg.data, tokenizer, self.settings.max_completion_length, required_columns(self.rewards)
        )
        self.train_prompts, self.eval_prompts = data.train, data.eval  # type: ignore[assignment]
        return PreparedData(data, None, prompts_fingerprint(data.train))  # type: ignore[arg-type]

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        self.pad_id, self.block_mask = pad_id, packed_mask_kind(attention)
        t, g = cfg.train, self.settings.num_generations
        train = PromptStream(self.train_prompts, t.batch_size, g, t.seed)
        evaluation = (
            PromptStream(self.eval_prompts, t.batch_size, g, t.seed, evaluation=True)
            if self.eval_prompts
            else None
        )
        return train, evaluation

    def wrap_model(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        self.cfg = cfg
        reference = None
        if self.settings.beta > 0 and not isinstance(cfg.adapter, LoraAdapter):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return CompletionScorer(model, cfg.train.loss_chunk_size, self.settings.temperature, reference)

    def compute_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        evaluation = bool(batch["evaluation"].item())
        index = int(batch["batch_index"].item())
        pool = self.eval_prompts if evaluation else self.train_prompts
        prompts = [pool[i] for i in batch["prompt_index"].tolist()]
        rollout = self.rollout(model, prompts, index, "eval" if evaluation else "train")
        if evaluation:
            n = rollout.rewards.numel()
            return LossOutput(-rollout.rewards.sum(), torch.tensor(n), self._reward_metrics(rollout))
        self._maybe_log(rollout, index)
        return self.policy_loss(model, rollout)

    # -- the two halves: generate and score; the loss on scored completions -------------------------

    def rollout(self, model: nn.Module, prompts: list[TokenizedPrompt], index: int, split: str) -> Rollout:
        """Sample each prompt's group from the live policy and score it (no gradient)."""
        assert self.cfg is not None
        s = self.settings
        if self._stop_ids is None:
            self._stop_ids = stop_ids_of(model, self.tokenizer)
        with torch.no_grad():
            completions = sample_completions(
                model,
                [p.prompt_ids for p in prompts],
                num_generations=s.num_generations,
                max_new_tokens=s.max_completion_length,
                temperature=s.temperature,
                top_p=s.top_p,
                seed=rollout_seed(self.cfg.train.seed, split, index),
                stop_ids=self._stop_ids,
                pad_id=self.pad_id,
            )
        return self.score(prompts, completions)

    def score(self, prompts: list[TokenizedPrompt], completions: Completions) -> Rollout:
        """Decode and score given completions (each prompt's `num_generations` side by side)."""
        g = self.settings.num_generations
        text_ids = [
            ids[:-1] if stopped else ids
            for ids, stopped in zip(completions.completion_ids, completions.stopped, strict=True)
        ]
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in text_ids]
        repeated = [p for p in prompts for _ in range(g)]
        names = sorted({name for p in prompts for name in p.columns})
        columns = {name: [p.columns.get(name) for p in repeated] for name in names}
        total, per_function = score(self.rewards, [p.raw for p in repeated], texts, text_ids, columns)
        return Rollout(prompts, completions, texts, total, per_function)

    def policy_loss(self, model: nn.Module, rollout: Rollout) -> LossOutput:
        """GRPO's loss on scored completions, summed over them; metrics summed the same way."""
        s = self.settings
        done = rollout.completions
        n = len(done.completion_ids)
        samples = [
            TokenizedSample([*p, *c], [IGNORE_INDEX] * len(p) + c, prompt.source)
            for p, c, prompt in zip(
                done.prompt_ids,
                done.completion_ids,
                (q for q in rollout.prompts for _ in range(s.num_generations)),
                strict=True,
            )
        ]
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate_packed([samples], self.pad_id, self.block_mask).items()}
        flat, owner = model(**batch)
        logps, mask = per_sequence(flat, owner, n)
        ref = None
        if s.beta > 0:
            scorer = model.module if hasattr(model, "module") else model  # DDP keeps the wrapper as .module
            ref_flat, _ = scorer.reference_logps(**batch)
            ref, _ = per_sequence(ref_flat, owner, n)
        rewards = rollout.rewards.to(device)
        advantages = group_advantages(rewards, s.num_generations, s.scale_rewards)
        losses, loss_metrics = grpo_loss(
            logps,
            None,
            ref,
            advantages,
            mask,
            epsilon_low=s.epsilon,
            epsilon_high=s.epsilon_high,
            beta=s.beta,
            loss_type=s.loss_type,
            max_completion_length=s.max_completion_length,
        )
        tokens = loss_metrics["tokens"].clamp(min=1.0)
        metrics = self._reward_metrics(rollout)
        metrics["clip_ratio"] = (loss_metrics["clipped/region"] / tokens).sum()
        if s.beta > 0:
            metrics["kl"] = (loss_metrics["kl_sum"] / tokens).sum()
        return LossOutput(losses.sum(), torch.tensor(n), metrics)

    # -- metrics and logs --------------------------------------------------------------------------

    def _reward_metrics(self, rollout: Rollout) -> dict[str, torch.Tensor | float]:
        """Sums over completions, so the loop's mean over the step's completions is the mean."""
        g = self.settings.num_generations
        done = rollout.completions
        std = _group_std(rollout.rewards, g)
        metrics: dict[str, torch.Tensor | float] = {
            "reward": rollout.rewards.sum(),
            "reward_std": std.sum(),
            "frac_reward_zero_std": (std == 0).float().sum(),
            "completion_length": float(sum(len(c) for c in done.completion_ids)),
            "completions/clipped_ratio": float(sum(not stopped for stopped in done.stopped)),
        }
        for k, reward in enumerate(self.rewards):
            values = rollout.per_function[:, k]
            metrics[f"rewards/{reward.name}/mean"] = torch.nan_to_num(values, nan=0.0).sum()
            metrics[f"rewards/{reward.name}/std"] = _group_std(values, g).sum()
        return metrics

    def _maybe_log(self, rollout: Rollout, index: int) -> None:
        """Every `log_completions_every` steps' worth of micro-batches, a few groups to completions.jsonl."""
        assert self.cfg is not None
        every = self.settings.log_completions_every
        from accelerate import PartialState

        state = PartialState()
        local = index // state.num_processes
        if every is None or not state.is_main_process or local % (every * self.cfg.train.grad_accum):
            return
        g = self.settings.num_generations
        rows = []
        for k in range(min(LOGGED_PROMPTS, len(rollout.prompts)) * g):
            prompt = rollout.prompts[k // g]
            rows.append(
                {
                    "micro_batch": index,
                    "source": str(prompt.source),
                    "prompt": prompt.raw,
                    "completion": rollout.texts[k],
                    "reward": _finite(rollout.rewards[k]),
                    "rewards": {
                        r.name: _finite(rollout.per_function[k, j]) for j, r in enumerate(self.rewards)
                    },
                }
            )
        path = Path(self.cfg.output.dir) / COMPLETIONS_FILE
        with path.open("a", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


def _finite(value: torch.Tensor) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def _group_std(values: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each value's group's std (unbiased, NaNs left out; 0 where it is undefined), per value."""
    grouped = values.view(-1, group_size)
    present = ~torch.isnan(grouped)
    count = present.sum(1, keepdim=True)
    mean = torch.nansum(grouped, 1, keepdim=True) / count.clamp(min=1)
    squares = torch.where(present, (grouped - mean) ** 2, torch.zeros_like(grouped)).sum(1, keepdim=True)
    std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.zeros_like(mean))
    return std.expand_as(grouped).reshape(-1)
