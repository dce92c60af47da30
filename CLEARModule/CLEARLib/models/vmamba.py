"""VMamba (VSSM): a visual state-space model with 2D selective scan in four directions.

Written for CLEAR (VMamba is not in timm). Two designs of the reference implementation
(MzeroMiko/VMamba): v0, the first paper's tiny model (`vmamba_tiny`: patch merging between stages,
no MLP in the blocks, 22 M parameters), and v2, what `VSSM()` builds with its defaults and what the
CLEAR authors pretrain (`vmamba_v2`: an MLP of ratio 4 after each SS2D, 2x2 convolutions between
stages, LayerNorm eps 1e-5, about 43 M parameters). Both: 4x4 patch embedding, depths [2, 2, 9, 2],
widths [96, 192, 384, 768], SS2D with d_state 16 and ssm_ratio 2; the embedding is the
average-pooled, layer-normed last stage (768-d). Tensors are channels-last [B, H, W, C] inside.
"""

from __future__ import annotations

import math

import torch
from timm.layers import DropPath, Mlp
from torch import nn

from .selective_scan import selective_scan


class SS2D(nn.Module):
    """2D selective scan: the feature map is read in four orders (rows, columns, and both reversed)."""

    directions = 4

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        dt_rank: int | None = None,
        d_conv: int = 3,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.d_inner = d_inner = int(ssm_ratio * d_model)
        self.d_state = d_state
        self.dt_rank = dt_rank = dt_rank or math.ceil(d_model / 16)
        k = self.directions
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.act = nn.SiLU()
        # Per direction: x -> (dt, B, C) projection, and dt -> channels projection.
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_logs = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.Ds = nn.Parameter(torch.ones(k * d_inner))
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._reset_ssm_parameters(dt_min, dt_max, dt_init_floor)

    @torch.no_grad()
    def _reset_ssm_parameters(self, dt_min, dt_max, dt_init_floor):
        # Mamba's initialisation: S4D-real A, and dt log-uniform in [dt_min, dt_max] through softplus.
        bound = 1.0 / math.sqrt(self.d_inner)
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_projs_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(
            torch.rand(self.directions, self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_projs_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_logs.copy_(torch.log(a).repeat(self.directions * self.d_inner, 1))

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, D, H, W] -> y: [B, D, H, W], summed over the four scan orders."""
        b, d, h, w = x.shape
        length = h * w
        rows = x.flatten(2)
        cols = x.transpose(2, 3).flatten(2)
        xs = torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)  # [B, 4, D, L]
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs, self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight)
        ys = selective_scan(
            xs.reshape(b, -1, length),
            dts.reshape(b, -1, length),
            -torch.exp(self.A_logs.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            self.Ds.float(),
            delta_bias=self.dt_projs_bias.reshape(-1).float(),
            delta_softplus=True,
        ).view(b, self.directions, d, length)
        rows_y = ys[:, 0] + ys[:, 2].flip(-1)
        cols_y = ys[:, 1] + ys[:, 3].flip(-1)
        return rows_y.view(b, d, h, w) + cols_y.view(b, d, w, h).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, H, W, C]
        x, z = self.in_proj(x).chunk(2, dim=-1)
        x = self.act(self.conv2d(x.permute(0, 3, 1, 2).contiguous()))
        y = self._scan(x).permute(0, 2, 3, 1)
        y = self.out_norm(y) * nn.functional.silu(z)
        return self.dropout(self.out_proj(y))


class VSSBlock(nn.Module):
    """x + SS2D(norm(x)), then (v2, mlp_ratio > 0) x + MLP(norm2(x)) with a GELU MLP."""

    def __init__(self, dim: int, drop_path: float = 0.0, mlp_ratio: float = 0.0, norm_eps: float = 1e-6, **ss2d_kwargs):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.op = SS2D(dim, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        if mlp_ratio > 0:
            self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
            self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        else:
            self.norm2 = self.mlp = None

    def forward(self, x):
        x = x + self.drop_path(self.op(self.norm(x)))
        if self.mlp is not None:
            x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class ConvDownsample2D(nn.Module):
    """v2 downsampling: a 2x2 convolution of stride 2 to the next width, then LayerNorm (channels-last)."""

    def __init__(self, dim: int, out_dim: int, norm_eps: float = 1e-5):
        super().__init__()
        self.conv = nn.Conv2d(dim, out_dim, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(out_dim, eps=norm_eps)

    def forward(self, x):  # [B, H, W, C]
        return self.norm(self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))


class PatchMerging2D(nn.Module):
    """2x2 neighbourhoods concatenated, normalised and projected to twice the width."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):  # [B, H, W, C]
        if x.shape[1] % 2 or x.shape[2] % 2:
            x = nn.functional.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class VSSM(nn.Module):
    def __init__(
        self,
        in_chans: int = 3,
        patch_size: int = 4,
        depths=(2, 2, 9, 2),
        dims=(96, 192, 384, 768),
        d_state: int = 16,
        ssm_ratio: float = 2.0,
        drop_path_rate: float = 0.1,
        mlp_ratio: float = 0.0,
        downsample: str = "merge",
        norm_eps: float = 1e-6,
    ):
        """v0 (defaults): mlp_ratio 0, downsample "merge", norm_eps 1e-6 in the blocks.
        v2: mlp_ratio 4, downsample "conv", norm_eps 1e-5 everywhere (PyTorch's LayerNorm default)."""
        super().__init__()
        depths, dims = list(depths), list(dims)
        if len(depths) != len(dims):
            raise ValueError("depths and dims need one entry per stage")
        if downsample not in ("merge", "conv"):
            raise ValueError(f"downsample must be 'merge' (v0) or 'conv' (v2), got {downsample!r}")
        self.num_features = dims[-1]
        self.patch_embed = nn.Sequential(
            nn.Conv2d(in_chans, dims[0], kernel_size=patch_size, stride=patch_size, bias=True),
        )
        outer_eps = 1e-5  # patch, downsampling and final norms: PyTorch's default in both designs
        self.patch_norm = nn.LayerNorm(dims[0], eps=outer_eps)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            start = sum(depths[:i])
            self.stages.append(
                nn.Sequential(
                    *[
                        VSSBlock(
                            dim,
                            drop_path=rates[start + j],
                            mlp_ratio=mlp_ratio,
                            norm_eps=norm_eps,
                            d_state=d_state,
                            ssm_ratio=ssm_ratio,
                        )
                        for j in range(depth)
                    ]
                )
            )
            if i + 1 == len(dims):
                self.downsamples.append(nn.Identity())
            elif downsample == "conv":
                self.downsamples.append(ConvDownsample2D(dim, dims[i + 1], outer_eps))
            else:
                self.downsamples.append(PatchMerging2D(dim, dims[i + 1]))
        self.norm = nn.LayerNorm(self.num_features, eps=outer_eps)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_norm(self.patch_embed(x).permute(0, 2, 3, 1))
        for stage, down in zip(self.stages, self.downsamples, strict=True):
            x = down(stage(x))
        return x  # [B, H, W, C]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.forward_features(x)).mean(dim=(1, 2))
