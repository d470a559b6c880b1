"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024): single completions labelled good or bad.

Each example's reward is r = log pi(y|x) - log ref(y|x), summed over the completion's tokens. A
desirable completion is pushed above the reference point z0, an undesirable one below it
(`preference_losses.kto_loss`). z0 estimates KL(pi || ref) from mismatched pairs, as the paper and
TRL do: in a micro-batch of n examples, example i's prompt is followed by example (i-1)'s
completion (TRL's rotation by one); z0 = max(0, mean over the n pairs of the policy's minus the
reference's log-prob), averaged over processes before the clamp, with no gradient.

A micro-batch is one padding-free packed row: the n matched sequences, then the n mismatched ones.
The policy scores the matched part with gradients and the mismatched part in a second pass without
(z0 carries no gradient, so it needs no graph: a backward through it would cost about half again
the step's compute and double its activation memory); the reference scores the whole row in one
pass. The reference is the base with the LoRA adapter switched off, or a frozen copy made before
training for full and freeze tuning.

Loss unit: the example. The loss is summed over examples and the loop divides by the step's
examples on all processes, so a step's loss is the mean over all its examples (TRL's mean over the
batch), whatever the accumulation. z0 is a property of each micro-batch (its `train.batch_size`
examples on each process, averaged over processes), as in TRL, so accumulating k micro-batches of
B is exactly k micro-batches of B with their own z0, not one batch of kB with one z0 (the two agree
exactly when the estimates do, e.g. at the first step where policy == reference).

Metrics: rewards/chosen, rewards/rejected, logps/chosen and logps/rejected are class means over
the step's desirable or undesirable examples on all processes, whatever the accumulation (each
comes with its class count, see `LossOutput.metric_counts`; a class the step lacks is not
logged); rewards/margins is their difference (`finish_metrics`), as TRL computes it at log time;
kl is each micro-batch's z0, averaged over the step's examples. The policy's KL pass and the reference pass run without dropout.
`kto.precompute_ref` is refused: the mismatched pairs change with every epoch's micro-batches.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from tunesmith.config.schema import LoraAdapter, RunConfig
from tunesmith.data.errors import DataError
from tunesmith.data.kto import build_kto_data
from tunesmith.data.kto_tokenize import TokenizedKTO, fit_prompt
from tunesmith.data.packing import collate_packed
from tunesmith.data.tokenize import IGNORE_INDEX, TokenizedSample
from tunesmith.models.attention import packed_mask_kind
from tunesmith.training.batching import MicroBatch, epoch_order
from tunesmith.training.methods.base import BatchSource, LossOutput, PreparedData
from tunesmith.training.methods.pairs import PairScorer, Scores, evaluating, unwrapped
from tunesmith.training.methods.preference_losses import kto_loss
from tunesmith.training.resume_policy import samples_fingerprint

DESIRABLE, SPLIT = "kto_desirable", "kto_split"
"""Batch keys the method reads itself: each example's label, and where the mismatched part starts."""

PRECOMPUTE_REFUSED = (
    "kto.precompute_ref is not supported: KTO's reference point pairs each completion with another "
    "example's prompt in its micro-batch, and micro-batches are drawn afresh every epoch, so the "
    "reference's log-probs of those pairs cannot be computed once before training. Set "
    "kto.precompute_ref: false (with LoRA the reference costs no memory: it is the base with the "
    "adapter switched off)"
)


def matched_sample(example: TokenizedKTO) -> TokenizedSample:
    """The example's own sequence: its prompt (not scored), then its completion (scored)."""
    return _scored(example.prompt_ids, example.completion_ids, example)


def mismatched_sample(example: TokenizedKTO, partner: TokenizedKTO, seq_len: int) -> TokenizedSample:
    """The example's prompt followed by `partner`'s completion: one term of the KL estimate.

    The prompt loses tokens from its start when the pair exceeds `seq_len`, as a long row does.
    """
    prompt = fit_prompt(example.prompt_ids, len(partner.completion_ids), seq_len)
    return _scored(prompt, partner.completion_ids, example)


def _scored(prompt: list[int], completion: list[int], example: TokenizedKTO) -> TokenizedSample:
    return TokenizedSample(
        [*prompt, *completion], [IGNORE_INDEX] * len(prompt) + list(completion), example.source
    )


def kl_partners(examples: Sequence[TokenizedKTO], borrowed: TokenizedKTO | None = None) -> list[TokenizedKTO]:
    """Whose completion follows each example's prompt: the previous one's, the first taking the last's.

    TRL's rotation (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). A micro-batch of one example has
    no other completion, so it borrows `borrowed`'s (the example before it in the epoch).
    """
    if len(examples) == 1:
        if borrowed is None:
            raise ValueError("a KTO micro-batch of one example needs another example's completion")
        return [borrowed]
    return [examples[-1], *examples[:-1]]


def collate_kto(
    examples: Sequence[TokenizedKTO],
    pad_id: int,
    block_mask: str,
    seq_len: int,
    borrowed: TokenizedKTO | None = None,
) -> MicroBatch:
    """One packed row: matched_0 .. matched_{n-1}, then mismatched_0 .. mismatched_{n-1}."""
    matched = [matched_sample(e) for e in examples]
    partners = kl_partners(examples, borrowed)
    mismatched = [mismatched_sample(e, p, seq_len) for e, p in zip(examples, partners, strict=True)]
    tensors = collate_packed([matched + mismatched], pad_id, block_mask)
    tensors[DESIRABLE] = torch.tensor([e.desirable for e in examples], dtype=torch.bool)
    tensors[SPLIT] = torch.tensor(sum(len(s.input_ids) for s in matched))
    return MicroBatch(
        tensors=tensors,
        sources=[str(e.source) for e in examples],
        trained_tokens=sum(len(e.completion_ids) for e in examples),
        real_tokens=sum(len(s.input_ids) for s in matched + mismatched),
        units=len(examples),
    )


class KTOStream:
    """Micro-batches of examples over epochs, each epoch in a permutation seeded by (seed, epoch)."""

    fill = None

    def __init__(
        self,
        examples: Sequence[TokenizedKTO],
        batch_size: int,
        pad_id: int,
        seed: int,
        block_mask: str,
        seq_len: int,
        shuffle: bool = True,
    ) -> None:
        if len(examples) < 2:
            raise DataError(
                f"KTO needs at least 2 examples in each set it batches (got {len(examples)}): the KL "
                "estimate pairs each completion with another example's prompt"
            )
        self.examples, self.batch_size, self.pad_id = examples, batch_size, pad_id
        self.seed, self.block_mask, self.seq_len, self.shuffle = seed, block_mask, seq_len, shuffle
        self.per_epoch = math.ceil(len(examples) / batch_size)

    def micro_batch(self, index: int) -> MicroBatch:
        epoch, position = divmod(index, self.per_epoch)
        order = epoch_order(len(self.examples), self.seed, epoch, self.shuffle)
        start = position * self.batch_size
        chosen = [self.examples[i] for i in order[start : start + self.batch_size]]
        borrowed = self.examples[order[start - 1]] if len(chosen) == 1 else None
        return collate_kto(chosen, self.pad_id, self.block_mask, self.seq_len, borrowed)

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {}  # the micro-batch index alone determines every batch

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None


def kto_fingerprint(examples: Sequence[TokenizedKTO]) -> str:
    """The tokens, masks and labels of the training examples, in order."""
    digest = hashlib.sha256(samples_fingerprint([matched_sample(e) for e in examples]).encode())
    digest.update(bytes(int(e.desirable) for e in examples))
    return digest.hexdigest()


class KTOScorer(PairScorer):
    """The policy's per-sequence log-probs (`forward`), the same without gradients, and the reference's."""

    @torch.no_grad()
    def detached_logps(self, **batch: torch.Tensor) -> Scores:
        """The policy's scores for the KL estimate: no graph, and no dropout (an estimate, not a sample)."""
        with evaluating(self.model):
            return self(**batch)


def split_row(
    batch: dict[str, torch.Tensor], split: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A packed row's tensors cut at `split`: the matched sequences, and the mismatched ones.

    Both halves start a sequence there, so a block-diagonal mask cut the same way is each half's own.
    """
    first, second = {}, {}
    for key, value in batch.items():
        if value.dim() == 4:  # (B, 1, L, L) packed attention mask
            first[key], second[key] = value[:, :, :split, :split], value[:, :, split:, split:]
        else:
            first[key], second[key] = value[:, :split], value[:, split:]
    return first, second


def _all_reduce_sum(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`values` summed over processes (unchanged on one), and the number of processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values, 1
    values = values.clone()
    dist.all_reduce(values)
    return values, dist.get_world_size()


class KTO:
    name = "kto"
    unit = "example"
    zero_gradient_is_normal = False

    def __init__(self) -> None:
        self.cfg: RunConfig | None = None

    def prepare_data(self, cfg: RunConfig, tokenizer: Any) -> PreparedData:
        self.cfg = cfg
        check_settings(cfg)
        weights = (cfg.kto.desirable_weight, cfg.kto.undesirable_weight)
        data = build_kto_data(cfg.data, tokenizer, weights)
        return PreparedData(data, None, kto_fingerprint(data.train))

    def batches(
        self, prepared: PreparedData, cfg: RunConfig, pad_id: int, attention: str
    ) -> tuple[BatchSource, BatchSource | None]:
        t, block_mask, seq_len = cfg.train, packed_mask_kind(attention), cfg.data.seq_len
        train = KTOStream(prepared.data.train, t.batch_size, pad_id, t.seed, block_mask, seq_len)
        evaluation = (
            KTOStream(prepared.data.eval, t.batch_size, pad_id, t.seed, block_mask, seq_len, shuffle=False)
            if prepared.data.eval
            else None
        )
        return train, evaluation

    def wrap_model(self, model: torch.nn.Module, cfg: RunConfig) -> torch.nn.Module:
        self.cfg = cfg
        check_settings(cfg)
        reference = None
        if not isinstance(cfg.adapter, LoraAdapter):
            reference = copy.deepcopy(model).eval().requires_grad_(False)
        return KTOScorer(model, cfg.train.loss_chunk_size, reference)

    def compute_loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        assert self.cfg is not None, "prepare_data or wrap_model sets the config"
        settings = self.cfg.kto
        inputs = dict(batch)
        desirable = inputs.pop(DESIRABLE).bool()
        n = desirable.numel()
        split = int(inputs.pop(SPLIT))
        matched, mismatched = split_row(inputs, split)
        scorer = unwrapped(model)
        policy = model(**matched)[0][:n]
        kl_policy = scorer.detached_logps(**mismatched)[0][:n]
        ref_sums = scorer.reference_logps(**inputs)[0]
        ref, kl_ref = ref_sums[:n], ref_sums[n : 2 * n]
        kl = _kl_estimate(kl_policy - kl_ref)
        losses, _ = kto_loss(
            policy,
            ref,
            desirable,
            kl,
            beta=settings.beta,
            desirable_weight=settings.desirable_weight,
            undesirable_weight=settings.undesirable_weight,
        )
        metrics, counts = _class_sums(policy.detach(), ref, desirable, settings.beta)
        metrics["kl"] = kl * n  # the loop's mean over the step's examples
        return LossOutput(losses.sum(), torch.tensor(n), metrics, counts)

    def finish_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """rewards/margins: the step's desirable minus its undesirable mean reward, as TRL logs it."""
        if "rewards/chosen" in means and "rewards/rejected" in means:
            means = {**means, "rewards/margins": means["rewards/chosen"] - means["rewards/rejected"]}
        return means


def _kl_estimate(kl_logratios: torch.Tensor) -> torch.Tensor:
    """z0: the mean KL log-ratio of the micro-batch, averaged over processes before the clamp (as TRL)."""
    total, world = _all_reduce_sum(kl_logratios.detach().float().mean().double().reshape(1))
    return (total[0] / world).clamp(min=0)


def _class_sums(
    policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, beta: float
) -> tuple[dict[str, torch.Tensor | float], dict[str, torch.Tensor | float]]:
    """This process's reward and log-prob sums per class, and the class counts they are means over.

    The loop adds both over the step's micro-batches and processes, so each logged value is the
    step's exact class mean, whatever the accumulation.
    """
    chosen = desirable.to(torch.float64)
    rejected = 1 - chosen
    logps, rewards = policy.double(), beta * (policy.double() - ref.double())
    sums: dict[str, torch.Tensor | float] = {
        "rewards/chosen": (rewards * chosen).sum(),
        "rewards/rejected": (rewards * rejected).sum(),
        "logps/chosen": (logps * chosen).sum(),
        "logps/rejected": (logps * rejected).sum(),
    }
    counts: dict[str, torch.Tensor | float] = {
        "rewards/chosen": chosen.sum(),
        "rewards/rejected": rejected.sum(),
        "logps/chosen": chosen.sum(),
        "logps/rejected": rejected.sum(),
    }
    return sums, counts


def check_settings(cfg: RunConfig) -> None:
    """Settings KTO cannot honour, refused before any work."""
    if cfg.kto.precompute_ref:
        raise ValueError(PRECOMPUTE_REFUSED)
    if cfg.train.batch_size < 2:
        raise ValueError(
            f"train.batch_size: KTO needs at least 2 examples per micro-batch (got {cfg.train.batch_size}): "
            "its KL estimate pairs each completion with another example's prompt of the same micro-batch, "
            "and with one example that is the example's own reward. Set train.batch_size: 2 or more"
        )
