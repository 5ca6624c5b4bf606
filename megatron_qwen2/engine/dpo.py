"""Direct preference optimisation: the per-response log-probabilities and the DPO / IPO objective
(docs/architecture.md, "DPO"); the frozen reference model is engine/reference.py.

A preference row holds one pair: the prompt with the chosen response, then the prompt with the
rejected response, as two documents (data/preference.py). `Batch.pair_side` marks each label that
counts: 1 for a token of the chosen response, 2 for one of the rejected. The log-probability of a
response is minus the sum of its counted token losses; under context parallelism each cp rank sums
its share of the row and the shares are summed over cp (`sum_over_cp`: the gradient goes back to
each rank's own tokens once). Only the last pipeline stage sees token losses, and a micro-batch
holds whole rows, so the pair's loss is computed where both of its sums are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_qwen2.config import DpoConfig
from megatron_qwen2.parallel.cp import sum_over_cp

CHOSEN, REJECTED = 1, 2  # Batch.pair_side of a counted label


def response_logps(token_loss: torch.Tensor, pair_side: torch.Tensor,
                   cp_group: Optional[torch.distributed.ProcessGroup]) -> torch.Tensor:
    """[b, 2] float64: log-probability of each row's chosen (column 0) and rejected (column 1) response,
    from the token losses [b, s(/cp)] and pair sides of this rank's share of the rows."""
    loss = token_loss.double()
    sums = torch.stack([(loss * (pair_side == CHOSEN)).sum(dim=1), (loss * (pair_side == REJECTED)).sum(dim=1)], dim=1)
    return -sum_over_cp(sums, cp_group)


@dataclass
class PairTerms:
    """Per pair of a micro-batch ([b] each, float64)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi - log pi_ref) of the chosen response
    rejected_rewards: torch.Tensor

    def metric_sums(self) -> torch.Tensor:
        """[3]: summed chosen rewards, rejected rewards and pairs ranked right (chosen reward above rejected)."""
        return torch.stack([self.chosen_rewards.sum(), self.rejected_rewards.sum(),
                            (self.chosen_rewards > self.rejected_rewards).double().sum()]).detach()


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, cfg: DpoConfig) -> PairTerms:
    """The DPO (`sigmoid`, with label smoothing: cDPO) or IPO loss of each pair from the policy's and the
    reference's response log-probabilities [b, 2] (chosen, rejected)."""
    reference = reference.to(policy)
    ratios = policy - reference  # log pi / pi_ref of each response
    logits = ratios[:, 0] - ratios[:, 1]
    if cfg.loss == "sigmoid":
        eps = cfg.label_smoothing
        losses = -F.logsigmoid(cfg.beta * logits) * (1 - eps) - F.logsigmoid(-cfg.beta * logits) * eps
    else:  # ipo: the squared distance of the log-ratio margin from 1 / (2 beta)
        losses = (logits - 1 / (2 * cfg.beta)) ** 2
    rewards = cfg.beta * ratios.detach()
    return PairTerms(losses=losses, chosen_rewards=rewards[:, 0], rejected_rewards=rewards[:, 1])


@dataclass
class DpoMetrics:
    """Means over the pairs of a global batch."""

    chosen_reward: float
    rejected_reward: float
    accuracy: float  # share of pairs whose chosen reward is above the rejected one

    @classmethod
    def of(cls, sums: torch.Tensor, num_pairs: int) -> "DpoMetrics":
        chosen, rejected, right = (float(v) / num_pairs for v in sums.tolist())
        return cls(chosen, rejected, right)

    def as_metrics(self) -> dict[str, float]:
        """The names of metrics.jsonl and wandb."""
        return {"dpo_chosen_reward": self.chosen_reward, "dpo_rejected_reward": self.rejected_reward,
                "dpo_margin": self.chosen_reward - self.rejected_reward, "dpo_accuracy": self.accuracy}
