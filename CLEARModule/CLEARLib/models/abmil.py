"""Attention-based MIL (Ilse et al.) as CLEAR specifies it (paper eq. 3, supplement A).

    h_k = ReLU(W_enc x_k)                                    Linear(D, 256) + ReLU
    a_k = softmax_k( w^T tanh(V h_k) )                       over the valid instances only
          (gated: w^T (tanh(V h_k) * sigmoid(U h_k)))
    z   = sum_k a_k h_k
    out = Linear(SiLU(Linear(LayerNorm(z))))                 LayerNorm(256) -> 256 -> SiLU -> n_out

Multi-label tasks read the logits through a sigmoid (BCE); multi-class tasks (staging) through a
softmax (cross-entropy). `binary` is a one-logit sigmoid task.
"""

from __future__ import annotations

import torch
from torch import nn

TASKS = ("multilabel", "multiclass", "binary")


class ABMIL(nn.Module):
    def __init__(
        self,
        in_dim: int,
        n_outputs: int,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        gated: bool = False,
        dropout: float = 0.0,
        dropout_before_activation: bool = False,
    ):
        super().__init__()
        if in_dim < 1 or n_outputs < 1:
            raise ValueError("in_dim and n_outputs must be positive")
        self.dropout_before_activation = dropout_before_activation
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Linear(hidden_dim, attention_dim)
        self.attention_U = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, 1)
        # The authors' code drops out between the Linear and the SiLU; the paper only says "dropout allowed".
        # Either order keeps the parameters at the same indices, so bundles load the same way.
        middle = [nn.Dropout(dropout), nn.SiLU()] if dropout_before_activation else [nn.SiLU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), *middle, nn.Linear(hidden_dim, n_outputs)
        )

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        gate = torch.tanh(self.attention_V(h))
        if self.attention_U is not None:
            gate = gate * torch.sigmoid(self.attention_U(h))
        return self.attention_w(gate).squeeze(-1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [B, N, D] (or [N, D]); mask: [B, N] bool, True for real instances.

        Returns logits [B, n_outputs] and attention [B, N] (zero on padding, summing to 1 per bag).
        """
        single = features.dim() == 2
        if single:
            features = features.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every bag needs at least one unmasked instance")
        h = self.encoder(features)
        scores = self.attention_scores(h).float().masked_fill(~mask, float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bn,bnd->bd", attention.to(h.dtype), h)
        logits = self.head(pooled)
        if single:
            return logits[0], attention[0]
        return logits, attention


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    if task in ("multilabel", "binary"):
        return torch.sigmoid(logits)
    if task == "multiclass":
        return torch.softmax(logits, dim=-1)
    raise ValueError(f"unknown task {task!r}; one of {TASKS}")


class ABMILEnsemble(nn.Module):
    """The models of a cross-validation, as one head. Its forward returns probabilities (the members' mean;
    sigmoid or softmax as the task says), not logits, and the mean attention; `head_probabilities` reads
    an ensemble and a single ABMIL alike."""

    def __init__(self, in_dim: int, n_outputs: int, n_members: int, task: str, **member_kwargs):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; one of {TASKS}")
        self.in_dim, self.n_outputs, self.task = in_dim, n_outputs, task
        self.members = nn.ModuleList(ABMIL(in_dim, n_outputs, **member_kwargs) for _ in range(n_members))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        outputs = [member(features, mask) for member in self.members]
        probs = torch.stack([probabilities(logits.float(), self.task) for logits, _ in outputs]).mean(0)
        attention = torch.stack([a for _, a in outputs]).mean(0)
        return probs, attention


def head_probabilities(head: nn.Module, features: torch.Tensor, task: str, mask: torch.Tensor | None = None):
    """(probabilities, attention) of a case head: an ABMIL's logits through its task's link, or an
    ensemble's averaged probabilities as they are."""
    if isinstance(head, ABMILEnsemble):
        return head(features, mask)
    logits, attention = head(features, mask)
    return probabilities(logits.float(), task), attention


class LinearHead(nn.Module):
    """The lesion model's head: one linear layer on the 4096-d features."""

    def __init__(self, in_dim: int, n_outputs: int):
        super().__init__()
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.fc = nn.Linear(in_dim, n_outputs)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)
