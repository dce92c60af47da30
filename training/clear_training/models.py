"""The training models: MoCo v3 for slice encoders (base encoder + projector + predictor, momentum encoder +
projector), and SimCLR and a classifier for the 3D lesion encoder.

Tensor names: `base_encoder.*` is exactly the engine encoder (so the engine's MoCo converter exports
it), `base_projector.*`, `predictor.*`, `momentum_encoder.*`, `momentum_projector.*`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from CLEARLib.models import LinearHead, create_encoder, encoder_entry


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool, norm: str) -> nn.Sequential:
    """MoCo v3's MLP: Linear (no bias) -> BN -> ReLU between layers; a last BN without affine if asked.

    norm="none" drops the batch norms (for CPU multi-process runs, where SyncBN is unavailable).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            if norm == "batchnorm":
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.ReLU(inplace=True))
        elif last_bn and norm == "batchnorm":
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


def moco_v3_vit_init(encoder: nn.Module) -> None:
    """MoCo v3's ViT initialisation for pretraining: qkv weights uniform in +-sqrt(6 / (dim + 3 * dim / 3)),
    treating q, k and v as separate matrices; every other Linear Xavier-uniform; biases 0; class token
    N(0, 1e-6). (The conv stem keeps PyTorch's default initialisation, as in MoCo v3.)"""
    vit = encoder.model
    for name, module in vit.named_modules():
        if isinstance(module, nn.Linear):
            if "qkv" in name:
                bound = math.sqrt(6.0 / float(module.weight.shape[0] // 3 + module.weight.shape[1]))
                nn.init.uniform_(module.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    nn.init.normal_(vit.cls_token, std=1e-6)


class MoCo(nn.Module):
    def __init__(
        self,
        encoder: str,
        encoder_kwargs: dict | None = None,
        dim: int = 256,
        mlp_dim: int = 4096,
        projector_layers: int | None = None,
        predictor_layers: int = 2,
        mlp_norm: str = "batchnorm",
        predictor_last_bn: bool = True,
    ):
        super().__init__()
        self.base_encoder = create_encoder(encoder, **(encoder_kwargs or {}))
        width = self.base_encoder.num_features
        entry = encoder_entry(encoder)
        if projector_layers is None:
            projector_layers = entry.projector_layers  # MoCo v3: 3 for ViT, 2 for CNNs
        self.base_projector = build_mlp(projector_layers, width, mlp_dim, dim, last_bn=True, norm=mlp_norm)
        # MoCo v3's ViT model and the authors' code (for every architecture) end the predictor in a
        # BatchNorm without affine parameters, like the projector.
        self.predictor = build_mlp(predictor_layers, dim, mlp_dim, dim, last_bn=predictor_last_bn, norm=mlp_norm)
        if entry.family == "vit":
            moco_v3_vit_init(self.base_encoder)
        self.momentum_encoder = copy.deepcopy(self.base_encoder)
        self.momentum_projector = copy.deepcopy(self.base_projector)
        for p in (*self.momentum_encoder.parameters(), *self.momentum_projector.parameters()):
            p.requires_grad = False

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        pairs = (
            (self.base_encoder, self.momentum_encoder),
            (self.base_projector, self.momentum_projector),
        )
        for base, momentum in pairs:
            for pb, pm in zip(base.parameters(), momentum.parameters(), strict=True):
                pm.mul_(m).add_(pb.detach(), alpha=1 - m)

    def forward(self, x1, x2, y1, y2, m: float):
        """Queries from the base branch on x1, x2; keys from the momentum branch on y1, y2.

        For MoCo y = x; for LeCL key slices, y are lesion-centred crops and x full slices.
        """
        q1 = self.predictor(self.base_projector(self.base_encoder(x1)))
        q2 = self.predictor(self.base_projector(self.base_encoder(x2)))
        with torch.no_grad():
            self.update_momentum(m)
            k1 = self.momentum_projector(self.momentum_encoder(y1))
            k2 = self.momentum_projector(self.momentum_encoder(y2))
        return q1, q2, k1, k2


# --------------------------------------------------------------------------- 3D lesion models
class SimCLRModel(nn.Module):
    """FMCIB's SimCLR: the lesion encoder and a two-layer projection head."""

    def __init__(self, encoder_kwargs: dict, hidden_dim: int, projection_dim: int):
        super().__init__()
        self.encoder = create_encoder("fmcib_resnet50", **encoder_kwargs)
        self.projector = nn.Sequential(
            nn.Linear(self.encoder.num_features, hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, projection_dim),
        )

    def forward(self, *views):
        return [self.projector(self.encoder(v)) for v in views]


class LesionClassifier(nn.Module):
    """The lesion encoder and a linear head, for fine-tuning."""

    def __init__(self, encoder_kwargs: dict, n_classes: int):
        super().__init__()
        self.encoder = create_encoder("fmcib_resnet50", **encoder_kwargs)
        self.head = LinearHead(self.encoder.num_features, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))
