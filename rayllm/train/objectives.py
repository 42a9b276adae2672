"""What a run minimises, given the model's logits and a batch: next-token cross-entropy
(pretraining and supervised fine-tuning), DPO's loss on preference pairs (Rafailov et al.,
2023), whose reference log-probabilities are computed once, before the first step, with the
starting weights, so no second model is held, or knowledge distillation's (Hinton et al.,
2015): the cross-entropy mixed with the KL divergence from a frozen teacher's softened
next-token distribution, the teacher's logits computed on the fly from the same batch.

A DPO batch is ``(inputs, targets, segments, reference)``: each row packs whole pairs, the
chosen answer of pair ``k`` as segment ``2k + 1`` and the rejected one as ``2k + 2``;
``reference`` holds the starting weights' log-probability of each segment's trained tokens
(NaN where a row has fewer pairs)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from rayllm.model.config import IGNORED
from rayllm.model.model import next_token_loss

Objective = Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]


def language_modelling(logits: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return next_token_loss(logits, batch[1])


def loss_units(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """What a batch's loss is the mean over: its DPO pairs (a batch with a reference), else its
    trained targets."""
    if len(batch) > 3:
        return (~torch.isnan(batch[3][:, 0::2])).sum()
    return (batch[1] != IGNORED).sum()


def segment_logprobs(
    logits: torch.Tensor, batch: tuple[torch.Tensor, ...], count: int
) -> torch.Tensor:
    """``[rows, count]``: the summed log-probability of each segment's trained targets
    (segments ``1 .. count``)."""
    targets, segments = batch[1], batch[2]
    trained = targets != IGNORED
    logps = torch.log_softmax(logits.float(), dim=-1)
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * trained
    owner = F.one_hot(segments.long(), count + 1)[..., 1:].to(picked.dtype)  # [rows, seq, count]
    return torch.einsum("rs,rsc->rc", picked, owner)


def preference_margins(
    logits: torch.Tensor, batch: tuple[torch.Tensor, ...], beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO's implicit reward margins ``beta * (log-ratio chosen - log-ratio rejected)`` of the
    batch's pairs, and the raw log-probability margins (chosen - rejected) of the policy."""
    reference = batch[3]
    logps = segment_logprobs(logits, batch, reference.shape[1])
    present = ~torch.isnan(reference[:, 0::2])
    policy = logps[:, 0::2] - logps[:, 1::2]
    ratios = policy - (reference[:, 0::2] - reference[:, 1::2]).nan_to_num()
    return beta * ratios[present], policy[present]


def dpo(beta: float) -> Objective:
    def loss(logits: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        margins, _ = preference_margins(logits, batch, beta)
        return -F.logsigmoid(margins).mean()

    return loss


def distillation(
    teacher_logits: Callable[[tuple[torch.Tensor, ...]], torch.Tensor],
    alpha: float,
    temperature: float,
) -> Objective:
    """``(1 - alpha) x cross-entropy + alpha x T^2 x KL(teacher || student)`` at temperature
    ``T``, over the positions that have a target; ``T^2`` keeps the KL term's gradients the
    size of the cross-entropy's whatever ``T`` is. ``alpha = 0`` is the student alone."""

    def loss(logits: torch.Tensor, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        language = next_token_loss(logits, batch[1])
        if alpha == 0:
            return language
        with torch.no_grad():
            teacher = teacher_logits(batch)
        return (1 - alpha) * language + alpha * softened_kl(
            logits, teacher, batch[1] != IGNORED, temperature
        )

    return loss


def softened_kl(
    student: torch.Tensor, teacher: torch.Tensor, trained: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over the ``trained`` positions of ``T^2 x KL(softmax(teacher / T) || softmax(student
    / T))``."""
    student_logps = torch.log_softmax(student.float() / temperature, dim=-1)
    teacher_logps = torch.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(student_logps, teacher_logps, log_target=True, reduction="none").sum(-1)
    return temperature**2 * (kl * trained).sum() / trained.sum().clamp(min=1)
