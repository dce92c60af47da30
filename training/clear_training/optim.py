"""Optimisers and schedules of MoCo v3: AdamW or LARS; lr warm-up then cosine decay; cosine momentum."""

from __future__ import annotations

import math

import torch


class LARS(torch.optim.Optimizer):
    """LARS (You et al.), as MoCo v3 uses it: 1-D tensors (biases, norms) get neither weight decay
    nor layer-wise adaptation. torch has no LARS, hence this small implementation."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    one = torch.ones_like(param_norm)
                    ratio = torch.where(
                        param_norm > 0,
                        torch.where(update_norm > 0, group["trust"] * param_norm / update_norm, one),
                        one,
                    )
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(update)
                p.add_(mu, alpha=-group["lr"])
        return loss


def learning_rate(epoch: float, lr: float, warmup_epochs: float, epochs: float) -> float:
    """Linear warm-up to lr over warmup_epochs, then half-cosine decay to 0 at `epochs` (fractional epochs)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def momentum(epoch: float, base_momentum: float, epochs: float) -> float:
    """Cosine increase of the momentum from base_momentum to 1 over training."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base_momentum)
