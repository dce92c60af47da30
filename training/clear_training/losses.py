"""Contrastive losses of CLEAR's slice-encoder pretraining (paper eqs. 1-4).

q: [B, D] predictor outputs of the base encoder; k: [B, D] momentum-projector outputs; neither
normalised yet. Keys are gathered from every rank (without gradient), so each query's denominator
runs over the global batch; positives sit at offset rank * B. Losses are scaled by 2 * tau as in
MoCo v3, and the trainer uses them symmetrically: loss(q1, k2) + loss(q2, k1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import gather_no_grad, rank_and_world


def _logits(q: torch.Tensor, k: torch.Tensor, tau: float):
    q = F.normalize(q.float(), dim=1)
    k = gather_no_grad(F.normalize(k.float(), dim=1))
    logits = q @ k.t() / tau
    rank, _ = rank_and_world()
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return logits, labels


def moco_v3_loss(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE over the global batch: -log( psi(q, k+) / sum_i psi(q, k_i) ), times 2 * tau."""
    logits, labels = _logits(q, k, tau)
    return F.cross_entropy(logits, labels) * (2 * tau)


def lecl_loss(q: torch.Tensor, k: torch.Tensor, is_key_slice: torch.Tensor, lam: float, tau: float) -> torch.Tensor:
    """Paper eq. (4): the denominator gains lam * sum_j psi(q, l_j) over the key-slice keys l_j.

    Adding lam * exp(s_j) for key-slice columns equals adding log(1 + lam) to those logits, so the
    loss stays one numerically stable cross-entropy; lam = 0 is exactly `moco_v3_loss`.
    """
    if lam < 0:
        raise ValueError("lam must be non-negative")
    logits, labels = _logits(q, k, tau)
    key = gather_no_grad(is_key_slice.to(device=logits.device, dtype=torch.bool))
    logits = logits + key.to(logits.dtype)[None, :] * torch.log1p(torch.as_tensor(lam, dtype=logits.dtype))
    # The positive's own term keeps its weight 1 in the numerator: correct the target logit back.
    target_boost = key[labels].to(logits.dtype) * torch.log1p(torch.as_tensor(lam, dtype=logits.dtype))
    log_denominator = torch.logsumexp(logits, dim=1)
    positive = logits.gather(1, labels[:, None])[:, 0] - target_boost
    return (log_denominator - positive).mean() * (2 * tau)


def lecl_loss_public_variant(
    q: torch.Tensor, k: torch.Tensor, is_key_slice: torch.Tensor, weight: float, tau: float
) -> torch.Tensor:
    """The public code's variant: the extra key-slice term is exp(weight * s_j) rather than lam * exp(s_j),
    i.e. the weight sits inside the exponent. Kept for comparison; weight = 0 adds the number of key
    slices to the denominator, so it does not reduce to MoCo v3.
    """
    logits, labels = _logits(q, k, tau)
    key = gather_no_grad(is_key_slice.to(device=logits.device, dtype=torch.bool))
    extra = torch.where(key[None, :], logits * weight, torch.full_like(logits, float("-inf")))
    log_denominator = torch.logsumexp(torch.cat([logits, extra], dim=1), dim=1)
    positive = logits.gather(1, labels[:, None])[:, 0]
    return (log_denominator - positive).mean() * (2 * tau)
