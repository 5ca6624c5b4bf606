"""Direct preference optimisation: the per-response log-probabilities and the DPO / IPO objective
(docs/architecture.md, "DPO"); the frozen reference model is engine/reference.py.

A preference row holds its pairs in slots (one, or several with data.preference_packing): slot k is
the prompt with the chosen response, then the prompt with the rejected response, as two documents
(data/preference.py). `Batch.pair_side` marks each label that counts: 2k+1 for a token of slot k's
chosen response, 2k+2 for one of its rejected. The log-probability of a response is minus the sum of
its counted token losses; under context parallelism each cp rank sums its share of the row and the
shares are summed over cp (`sum_over_cp`: the gradient goes back to each rank's own tokens once).
Only the last pipeline stage sees token losses, and a micro-batch holds whole rows, so a pair's loss
is computed where both of its sums are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_qwen2.config import DpoConfig
from megatron_qwen2.parallel.cp import sum_over_cp


def response_logps(token_loss: torch.Tensor, pair_side: torch.Tensor, slots: int,
                   cp_group: Optional[torch.distributed.ProcessGroup]) -> torch.Tensor:
    """[b, slots, 2] float64: log-probability of the chosen (0) and rejected (1) response of each pair
    slot of each row, from the token losses [b, s(/cp)] and pair sides of this rank's share of the rows."""
    b = token_loss.shape[0]
    sums = torch.zeros(b, 2 * slots + 1, dtype=torch.float64, device=token_loss.device)
    sums = sums.scatter_add(1, pair_side, token_loss.double())  # column 0 gathers the labels no response counts
    return -sum_over_cp(sums[:, 1:], cp_group).view(b, slots, 2)


@dataclass
class PairTerms:
    """Per pair slot of a micro-batch ([b, slots] each, float64; zero where a slot holds no pair)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor  # beta * (log pi - log pi_ref) of the chosen response
    rejected_rewards: torch.Tensor
    present: torch.Tensor  # bool: the slot holds a pair

    def metric_sums(self) -> torch.Tensor:
        """[3]: summed chosen rewards, rejected rewards and pairs ranked right (chosen reward above rejected)."""
        right = (self.chosen_rewards > self.rejected_rewards) & self.present
        return torch.stack([self.chosen_rewards.sum(), self.rejected_rewards.sum(), right.double().sum()]).detach()


def pair_terms(policy: torch.Tensor, reference: torch.Tensor, present: torch.Tensor, cfg: DpoConfig) -> PairTerms:
    """The DPO (`sigmoid`, with label smoothing: cDPO) or IPO loss of each pair from the policy's and the
    reference's response log-probabilities [b, slots, 2] (chosen, rejected); `present` [b, slots]."""
    present = present.to(policy.device)
    ratios = policy - reference.to(policy)  # log pi / pi_ref of each response
    logits = ratios[..., 0] - ratios[..., 1]
    if cfg.loss == "sigmoid":
        eps = cfg.label_smoothing
        losses = -F.logsigmoid(cfg.beta * logits) * (1 - eps) - F.logsigmoid(-cfg.beta * logits) * eps
    else:  # ipo: the squared distance of the log-ratio margin from 1 / (2 beta)
        losses = (logits - 1 / (2 * cfg.beta)) ** 2
    rewards = cfg.beta * ratios.detach() * present[..., None]
    return PairTerms(losses=losses * present, chosen_rewards=rewards[..., 0], rejected_rewards=rewards[..., 1],
                     present=present)


@dataclass
class DpoMetrics:
    """Means over the pairs of a global batch."""

    pairs: int
    chosen_reward: float
    rejected_reward: float
    accuracy: float  # share of pairs whose chosen reward is above the rejected one

    @classmethod
    def of(cls, sums: torch.Tensor, num_pairs: int) -> "DpoMetrics":
        chosen, rejected, right = (float(v) / max(num_pairs, 1) for v in sums.tolist())
        return cls(num_pairs, chosen, rejected, right)

    def as_metrics(self) -> dict[str, float]:
        """The names of metrics.jsonl and wandb."""
        return {"dpo_pairs": self.pairs, "dpo_chosen_reward": self.chosen_reward, "dpo_rejected_reward": self.rejected_reward,
                "dpo_margin": self.chosen_reward - self.rejected_reward, "dpo_accuracy": self.accuracy}
