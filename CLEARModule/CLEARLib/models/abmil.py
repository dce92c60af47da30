"""Attention-based MIL (Ilse et al.) as CLEAR specifies it (paper eq. 3, supplement A).

    h_k = ReLU(W_enc x_k)                                    Linear(D, 256) + ReLU
    a_k = softmax_k( w^T tanh(V h_k) )                       over the valid instances only
          (gated: w^T (tanh(V h_k) * sigmoid(U h_k)))
    z   = sum_k a_k h_k
    out = Linear(SiLU(Linear(LayerNorm(z))))                 LayerNorm(256) -> 256 -> SiLU -> n_out

Multi-label tasks read the logits through a sigmoid (BCE); multi-class tasks (staging) through a
softmax (cross-entropy). `binary` is a one-logit sigmoid task.

`per_label_attention` is CLAM's multi-branch form (Lu et al. 2021): w gives one score per output, each output
pools its own z_l with its own attention, and output l's logit is the head's l-th output on z_l (the head's
weights are shared, as are h and V). One attention cannot look at liver lesions in the abdomen window and at
lung nodules in the lung window at once; measured on the demo cohort, per-label attention took the lung label's
test AUROC from 0.62 to 0.73-0.80 (two initialisations) with the same features.
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
        per_label_attention: bool = False,
    ):
        super().__init__()
        if in_dim < 1 or n_outputs < 1:
            raise ValueError("in_dim and n_outputs must be positive")
        self.dropout_before_activation = dropout_before_activation
        self.in_dim, self.n_outputs = in_dim, n_outputs
        self.encoder = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.attention_V = nn.Linear(hidden_dim, attention_dim)
        self.attention_U = nn.Linear(hidden_dim, attention_dim) if gated else None
        self.attention_w = nn.Linear(attention_dim, n_outputs if per_label_attention else 1)
        # The authors' code drops out between the Linear and the SiLU; the paper only says "dropout allowed".
        # Either order keeps the parameters at the same indices, so bundles load the same way.
        middle = [nn.Dropout(dropout), nn.SiLU()] if dropout_before_activation else [nn.SiLU(), nn.Dropout(dropout)]
        self.head = nn.Sequential(
            nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim), *middle, nn.Linear(hidden_dim, n_outputs)
        )

    @property
    def attention_branches(self) -> int:
        return self.attention_w.out_features

    def attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        """[B, N, branches] unnormalised scores."""
        gate = torch.tanh(self.attention_V(h))
        if self.attention_U is not None:
            gate = gate * torch.sigmoid(self.attention_U(h))
        return self.attention_w(gate)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """features: [B, N, D] (or [N, D]); mask: [B, N] bool, True for real instances.

        Returns logits [B, n_outputs] and attention [B, N] (zero on padding, summing to 1 per bag), or with
        per-label attention [B, N, n_outputs], each output's attention summing to 1 per bag.
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
        scores = self.attention_scores(h).float().masked_fill(~mask.unsqueeze(-1), float("-inf"))
        attention = torch.softmax(scores, dim=1)
        pooled = torch.einsum("bna,bnd->bad", attention.to(h.dtype), h)
        outputs = self.head(pooled)  # [B, branches, n_outputs]
        if self.attention_branches == 1:
            logits, attention = outputs[:, 0], attention[..., 0]
        else:  # output l read from the vector its own attention pooled
            logits = torch.diagonal(outputs, dim1=1, dim2=2)
        if single:
            return logits[0], attention[0]
        return logits, attention


def attention_columns(attention, labels) -> dict:
    """One case's attention ([N] or, per label, [N, n_labels]; numpy) as table columns: `attention` (with
    per-label attention, the labels' mean, which still sums to 1) and `attention:<label>` for each label."""
    if attention.ndim == 1:
        return {"attention": attention}
    if attention.shape[1] != len(labels):
        raise ValueError(f"attention has {attention.shape[1]} branches for {len(labels)} labels")
    return {"attention": attention.mean(axis=1), **{f"attention:{l}": attention[:, i] for i, l in enumerate(labels)}}


def label_attention(table, label: str):
    """The attention column of a table for one label: its own branch where the head has per-label attention,
    otherwise the one shared attention."""
    return table[f"attention:{label}"] if f"attention:{label}" in table else table["attention"]


def attention_of_labels(table, labels):
    """The table with its `attention` column replaced by the mean of these labels' attention: what a plot, an
    overlay or a ranking of one label (or of a case's positive labels) shows."""
    return table.assign(attention=sum(label_attention(table, label) for label in labels) / len(labels))


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
