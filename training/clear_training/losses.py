"""Contrastive losses: CLEAR's slice-encoder pretraining (paper eqs. 1-4) and FMCIB's SimCLR lesion
pretraining (NT-Xent and FMCIB's background-negative InfoNCE).

Slice encoders: q: [B, D] predictor outputs of the base encoder; k: [B, D] momentum-projector outputs; neither
normalised yet. Keys are gathered from every rank (without gradient), so each query's denominator
runs over the global batch; positives sit at offset rank * B. Losses are scaled by 2 * tau as in
MoCo v3, and the trainer uses them symmetrically: loss(q1, k2) + loss(q2, k1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_no_grad, gather_with_grad, rank_and_world


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
    """The authors' code (`contrastive_loss_lesion`): each key-slice key adds exp(weight * s_j) to the
    denominator (the weight inside the exponent, not the paper's lam * exp(s_j)), the query's own key
    excluded from those extra terms; at weight 0, or with no key slice in the global batch, it is
    plain MoCo v3. Times 2 * tau, like the other losses."""
    if weight < 0:
        raise ValueError("weight must be non-negative")
    if weight == 0:
        return moco_v3_loss(q, k, tau)
    logits, labels = _logits(q, k, tau)
    key = gather_no_grad(is_key_slice.to(device=logits.device, dtype=torch.bool))
    if not key.any():
        return moco_v3_loss(q, k, tau)
    own = F.one_hot(labels, logits.shape[1]).bool()
    extra = (logits * weight).masked_fill(own | ~key[None, :], float("-inf"))
    log_denominator = torch.logsumexp(torch.cat([extra, logits], dim=1), dim=1)
    positive = logits.gather(1, labels[:, None])[:, 0]
    return (log_denominator - positive).mean() * (2 * tau)


# ----------------------------------------------------------------------------- lesion SimCLR
def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over the global batch: each view's positive is the other view of its item,
    negatives are all other views; the mean over this rank's 2B anchors."""
    rank, _ = rank_and_world()
    b = z1.shape[0]
    a1, a2 = gather_with_grad(F.normalize(z1, dim=1)), gather_with_grad(F.normalize(z2, dim=1))
    everything = torch.cat([a1, a2])  # [2N, d]
    n = a1.shape[0]
    anchors = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])  # local [2B, d]
    own = torch.cat([torch.arange(b) + rank * b, torch.arange(b) + rank * b + n]).to(z1.device)
    positive = torch.cat([own[b:], own[:b]])
    logits = anchors @ everything.t() / temperature
    logits = logits.masked_fill(F.one_hot(own, 2 * n).bool(), float("-inf"))
    return F.cross_entropy(logits, positive)


def fmcib_background_loss(
    z1: torch.Tensor, z2: torch.Tensor, bg1: torch.Tensor, bg2: torch.Tensor, temperature: float
) -> torch.Tensor:
    """FMCIB's InfoNCE with background negatives (its `NegativeMiningInfoNCECriterion`).

    z1, z2: [B, D] projections of the two views of each lesion; bg1, bg2: [B, D] projections of two
    views of a background patch from the same scan. Each lesion view is an anchor whose positive is
    the other view of its lesion and whose negatives are both views of every OTHER item's background
    (2(N - 1) per anchor over the global batch of N items; the item's own background is excluded):
    -mean log(e^{s+/t} / (e^{s+/t} + sum e^{s-/t})) over this rank's 2B anchors.
    """
    rank, _ = rank_and_world()
    b = z1.shape[0]
    anchors = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # [2B, D]
    positives = F.normalize(torch.cat([z2, z1]).float(), dim=1)
    negatives = torch.cat(
        [gather_with_grad(F.normalize(bg1.float(), dim=1)), gather_with_grad(F.normalize(bg2.float(), dim=1))]
    )  # [2N, D]: first view of every item, then the second
    n = negatives.shape[0] // 2
    positive = (anchors * positives).sum(1, keepdim=True) / temperature
    negative = anchors @ negatives.t() / temperature
    item = (torch.arange(2 * b, device=anchors.device) % b) + rank * b  # global item of each anchor
    own = F.one_hot(item, 2 * n).bool() | F.one_hot(item + n, 2 * n).bool()
    negative = negative.masked_fill(own, float("-inf"))
    logits = torch.cat([positive, negative], dim=1)
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


# ------------------------------------------------------------------------ the losses as modules
class SliceContrastiveLoss(nn.Module):
    """The slice-encoder pretraining loss a config asks for (MoCo v3; LeCL as the paper writes it or as
    the authors' code has it), used symmetrically: loss(q1, k2) + loss(q2, k1)."""

    def __init__(self, name: str, tau: float, lam: float = 0.0, variant: str = "paper"):
        super().__init__()
        if name not in ("moco", "lecl") or variant not in ("paper", "public"):
            raise ValueError(f"unknown slice loss {name!r} / variant {variant!r}")
        self.name, self.tau, self.lam, self.variant = name, tau, lam, variant

    @classmethod
    def from_config(cls, method) -> SliceContrastiveLoss:
        return cls(method.name, method.tau, method.lam, method.loss_variant)

    def pair(self, q: torch.Tensor, k: torch.Tensor, is_key: torch.Tensor) -> torch.Tensor:
        if self.name == "moco":
            return moco_v3_loss(q, k, self.tau)
        if self.variant == "public":
            return lecl_loss_public_variant(q, k, is_key, self.lam, self.tau)
        return lecl_loss(q, k, is_key, self.lam, self.tau)

    def forward(self, q1, q2, k1, k2, is_key) -> torch.Tensor:
        return self.pair(q1, k2, is_key) + self.pair(q2, k1, is_key)


class LesionContrastiveLoss(nn.Module):
    """The lesion SimCLR loss a config asks for: NT-Xent on two lesion views, or FMCIB's InfoNCE whose
    negatives are background views (then forward takes the two background views too)."""

    def __init__(self, name: str, temperature: float):
        super().__init__()
        if name not in ("ntxent", "fmcib"):
            raise ValueError(f"unknown lesion loss {name!r}")
        self.name, self.temperature = name, temperature

    @classmethod
    def from_config(cls, method) -> LesionContrastiveLoss:
        return cls(method.loss, method.temperature)

    @property
    def views_per_item(self) -> int:
        return 4 if self.name == "fmcib" else 2

    def forward(self, *views: torch.Tensor) -> torch.Tensor:
        if self.name == "fmcib":
            return fmcib_background_loss(*views, self.temperature)
        return nt_xent(*views, self.temperature)
