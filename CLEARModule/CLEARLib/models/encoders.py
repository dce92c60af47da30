"""The slice-encoder and lesion-encoder registry: each named variant is one small builder function.

A slice encoder maps [B, 3, H, W] instances to [B, num_features] embeddings; a lesion encoder maps
[B, 1, 50, 50, 50] patches to [B, num_features]. The input an encoder expects travels with it as
data (`input_spec`), into the bundle manifest.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import timm
import torch
from monai.networks.nets.resnet import ResNet, ResNetBottleneck
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..preprocess.slices import InputSpec
from .vmamba import VSSM

IMAGENET_SPEC = InputSpec()  # 224 px, 3 channels, ImageNet mean and std (InputSpec's defaults)


@dataclass(frozen=True)
class EncoderEntry:
    """Everything a consumer (bundles, converters, inference, training) needs to know about an encoder."""

    name: str
    kind: str  # "slice" or "lesion"
    build: Callable[..., nn.Module]
    input_spec: InputSpec | None  # slice encoders: size, channels, normalisation
    description: str
    family: str  # "mambaout", "vit", "vmamba", "resnet3d": MoCo v3's ViT initialisation applies to "vit"
    fixed_input_size: bool = False  # built for one input size (ViT's position grid): img_size is a build argument
    projector_layers: int = 2  # MoCo v3's projector depth: 3 for ViT, 2 otherwise
    # None when the encoder runs on ONNX Runtime; otherwise why it stays on torch.
    onnx_unsupported: str | None = None

    def build_kwargs(self, kwargs: dict | None, input_size: int) -> dict:
        """Build arguments for `input_size`: encoders with a fixed input size are built for it."""
        kwargs = dict(kwargs or {})
        if self.fixed_input_size:
            kwargs.setdefault("img_size", input_size)
        return kwargs

    def spec_at(self, input_size: int) -> InputSpec:
        """This encoder's input spec (normalisation) at another input size."""
        spec = self.input_spec or IMAGENET_SPEC
        return InputSpec(size=input_size, channels=spec.channels, mean=spec.mean, std=spec.std)


_REGISTRY: dict[str, EncoderEntry] = {}


def register_encoder(
    name: str,
    family: str,
    kind: str = "slice",
    input_spec: InputSpec | None = IMAGENET_SPEC,
    description="",
    fixed_input_size: bool = False,
    projector_layers: int = 2,
    onnx_unsupported: str | None = None,
):
    def decorator(build):
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        spec = input_spec if kind == "slice" else None
        _REGISTRY[name] = EncoderEntry(
            name, kind, build, spec, description, family, fixed_input_size, projector_layers, onnx_unsupported
        )
        return build

    return decorator


def encoder_entry(name: str) -> EncoderEntry:
    if name not in _REGISTRY:
        raise KeyError(f"unknown encoder {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_encoders(kind: str | None = None) -> list[str]:
    return sorted(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def create_encoder(name: str, **kwargs) -> nn.Module:
    """Build a registered encoder (random weights; bundles and converters load trained ones)."""
    model = encoder_entry(name).build(**kwargs)
    model.encoder_name = name
    model.encoder_kwargs = dict(kwargs)
    return model


# ----------------------------------------------------------------------------------- MambaOut
class MambaOutEncoder(nn.Module):
    """timm MambaOut; embedding = head LayerNorm of the average-pooled last stage (num_features wide).

    timm's `num_classes=0` would return the 4x wider hidden layer of its MLP head instead, so the
    head's MLP and classifier are removed and only its norm is kept.
    """

    # What a bundle may set: the architecture, never what makes timm load files (checkpoint_path, pretrained...).
    ALLOWED_KWARGS = frozenset(
        {"depths", "dims", "conv_ratio", "expansion_ratio", "kernel_size", "stem_mid_norm", "ls_init_value",
         "downsample", "drop_path_rate", "drop_rate"}
    )  # fmt: skip

    def __init__(self, timm_name: str, img_size: int = 224, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - self.ALLOWED_KWARGS)
        if unknown:
            raise ValueError(f"{timm_name} does not take {unknown}; allowed: {sorted(self.ALLOWED_KWARGS)}")
        self.model = timm.create_model(timm_name, pretrained=False, num_classes=0, **kwargs)
        self.model.head.pre_logits = nn.Identity()
        self.model.head.fc = nn.Identity()
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)  # channels-last [B, H, W, C]
        return self.model.head.norm(features.mean(dim=(1, 2)))


def _mambaout(timm_name):
    def build(**kwargs):
        return MambaOutEncoder(timm_name, **kwargs)

    return build


for _name in ("mambaout_femto", "mambaout_kobe", "mambaout_tiny", "mambaout_small", "mambaout_base"):
    register_encoder(_name, "mambaout", description=f"timm {_name}, pooled + normed features")(_mambaout(_name))


# --------------------------------------------------------------------- ViT with MoCo v3 conv stem
class ConvStem(PatchEmbed):
    """MoCo v3's convolutional stem in place of the 16x16 patch projection: four 3x3 stride-2
    convolutions (BN + ReLU; widths embed_dim/8 doubling) then a 1x1 convolution to embed_dim.
    Subclassing timm's PatchEmbed keeps its grid bookkeeping; `proj.0 ... proj.12` matches MoCo v3 keys.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, **kwargs):
        if patch_size != 16 or embed_dim % 8:
            raise ValueError("the conv stem needs patch_size 16 and embed_dim divisible by 8")
        kwargs.pop("bias", None)
        super().__init__(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **kwargs)
        layers, width, previous = [], embed_dim // 8, in_chans
        for _ in range(4):
            layers += [
                nn.Conv2d(previous, width, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous, width = width, width * 2
        layers.append(nn.Conv2d(previous, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)


def sincos_2d_position_embedding(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos embedding as MoCo v3 builds it: [1, 1 + h*w, dim], zeros for the class token.

    Features are sin/cos of the column then the row coordinate; tokens run row by row.
    """
    if dim % 4:
        raise ValueError("embed_dim must be divisible by 4 for 2D sin-cos position embeddings")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float32), torch.arange(grid_w, dtype=torch.float32), indexing="ij"
    )
    # MoCo v3 enumerates (w, h) with 'ij' meshgrid, i.e. the column index varies slowest; match that.
    w_angles = cols.t().reshape(-1)[:, None] * omega[None]
    h_angles = rows.t().reshape(-1)[:, None] * omega[None]
    table = torch.cat([w_angles.sin(), w_angles.cos(), h_angles.sin(), h_angles.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table], dim=0)[None]


class ViTConvEncoder(nn.Module):
    """ViT with MoCo v3's conv stem and fixed sin-cos positions; embedding = final-norm class token."""

    def __init__(self, img_size=224, embed_dim=768, depth=11, num_heads=12, drop_path_rate=0.0, **kwargs):
        super().__init__()
        self.model = VisionTransformer(
            img_size=img_size,
            patch_size=16,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            embed_layer=ConvStem,
            num_classes=0,
            global_pool="token",
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
        grid_h, grid_w = self.model.patch_embed.grid_size
        with torch.no_grad():
            self.model.pos_embed.copy_(sincos_2d_position_embedding(grid_h, grid_w, embed_dim))
        self.model.pos_embed.requires_grad = False
        self.num_features = embed_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


_VIT = {"family": "vit", "fixed_input_size": True, "projector_layers": 3}


@register_encoder("vit_conv_small", description="ViT-S/16 with MoCo v3 conv stem (384-d)", **_VIT)
def vit_conv_small(**kwargs):
    return ViTConvEncoder(**{"embed_dim": 384, "depth": 11, "num_heads": 12, **kwargs})


@register_encoder("vit_conv_base", description="ViT-B/16 with MoCo v3 conv stem (768-d)", **_VIT)
def vit_conv_base(**kwargs):
    return ViTConvEncoder(**{"embed_dim": 768, "depth": 11, "num_heads": 12, **kwargs})


# ------------------------------------------------------------------------------------- VMamba
class VMambaEncoder(nn.Module):
    def __init__(self, img_size: int = 224, **kwargs):
        super().__init__()
        self.model = VSSM(**kwargs)
        self.num_features = self.model.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


# Measured: the exported graph takes about a minute to build and its selective scan differs from torch
# by about 8e-4 (relative), above the 1e-4 that CLEAR accepts for identical features.
VMAMBA_ONNX = "its exported selective scan differs from torch by about 8e-4, above the 1e-4 limit"


@register_encoder(
    "vmamba_tiny",
    "vmamba",
    description="VSSM depths [2,2,9,2], dims [96..768], d_state 16, ssm_ratio 2",
    onnx_unsupported=VMAMBA_ONNX,
)
def vmamba_tiny(**kwargs):
    return VMambaEncoder(**{"depths": (2, 2, 9, 2), "dims": (96, 192, 384, 768), **kwargs})


# The CLEAR authors pretrain `VSSM()` with its defaults (KatherLab/CLEAR main_moco.py). The paper's
# supplement says 36 M parameters, which no VSSM configuration gives: this one has about 43 M.
@register_encoder(
    "vmamba_v2",
    "vmamba",
    description="VSSM() defaults (v2): depths [2,2,9,2], dims [96..768], MLP ratio 4, conv downsampling, ~43 M",
    onnx_unsupported=VMAMBA_ONNX,
)
def vmamba_v2(**kwargs):
    defaults = {"depths": (2, 2, 9, 2), "dims": (96, 192, 384, 768), "mlp_ratio": 4.0, "downsample": "conv"}
    return VMambaEncoder(**{**defaults, "norm_eps": 1e-5, **kwargs})


# ------------------------------------------------------------------------- FMCIB lesion encoder
class LesionEncoder(nn.Module):
    """MONAI's 3D ResNet as FMCIB builds it: 1 channel, first conv stride 2, no classifier, flattened pool."""

    def __init__(
        self,
        layers=(3, 4, 6, 3),
        block_inplanes=(64, 128, 256, 512),
        widen_factor=2.0,
        conv1_t_stride=2,
        norm="batch",
    ):
        super().__init__()
        # JSON (bundle manifests, configs) gives lists; MONAI wants ("group", {...}) tuples.
        norm = tuple(norm) if isinstance(norm, list) else norm
        self.trunk = ResNet(
            ResNetBottleneck,
            list(layers),
            list(block_inplanes),
            spatial_dims=3,
            n_input_channels=1,
            conv1_t_stride=conv1_t_stride,
            widen_factor=widen_factor,
            feed_forward=False,
            bias_downsample=True,
            norm=norm,
        )
        if norm != "batch":  # MONAI applies `norm` to the stem only; the blocks keep BatchNorm3d
            _replace_batch_norm(self.trunk, norm)
        self.num_features = int(block_inplanes[-1] * widen_factor) * ResNetBottleneck.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)


def _replace_batch_norm(module: nn.Module, norm) -> None:
    """Every BatchNorm3d below `module` becomes the given MONAI norm layer (e.g. ("group", {...}))."""
    from monai.networks.layers.utils import get_norm_layer

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            setattr(module, name, get_norm_layer(name=norm, spatial_dims=3, channels=child.num_features))
        else:
            _replace_batch_norm(child, norm)


@register_encoder("fmcib_resnet50", "resnet3d", kind="lesion", description="FMCIB 3D ResNet50, widen 2, 4096-d")
def fmcib_resnet50(**kwargs):
    return LesionEncoder(**kwargs)
