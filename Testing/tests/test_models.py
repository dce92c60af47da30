"""Encoders, selective scan, ABMIL and the lesion encoder: shapes and maths on small inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

from CLEARLib.models import (
    ABMIL,
    create_encoder,
    cuda_kernel_available,
    list_encoders,
    probabilities,
    selective_scan,
    selective_scan_torch,
    sincos_2d_position_embedding,
)
from CLEARLib.models.vmamba import SS2D


def _scan_inputs(batch=2, groups=4, per_group=3, n_state=5, length=150, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    u = torch.randn(batch, channels, length, generator=g)
    delta = torch.randn(batch, channels, length, generator=g) * 0.5
    A = -torch.rand(channels, n_state, generator=g) * 3 - 0.1
    B = torch.randn(batch, groups, n_state, length, generator=g)
    C = torch.randn(batch, groups, n_state, length, generator=g)
    D = torch.randn(channels, generator=g)
    bias = torch.randn(channels, generator=g) * 0.1
    return [t.to(device) for t in (u, delta, A, B, C, D, bias)]


def _naive_scan(u, delta, A, B, C, D, bias):
    """Step-by-step recurrence, one channel and one time step at a time, in float64."""
    u, delta, A, B, C, D, bias = (t.double() for t in (u, delta, A, B, C, D, bias))
    batch, channels, length = u.shape
    per_group = channels // B.shape[1]
    y = torch.zeros_like(u)
    for b in range(batch):
        for d in range(channels):
            g = d // per_group
            h = torch.zeros(A.shape[1], dtype=torch.float64)
            for t in range(length):
                dt = torch.nn.functional.softplus(delta[b, d, t] + bias[d])
                h = torch.exp(dt * A[d]) * h + dt * B[b, g, :, t] * u[b, d, t]
                y[b, d, t] = (C[b, g, :, t] * h).sum() + D[d] * u[b, d, t]
    return y


def test_torch_selective_scan_equals_the_recurrence():
    u, delta, A, B, C, D, bias = _scan_inputs()  # length 150 crosses the 64-step chunks
    fast = selective_scan_torch(u, delta, A, B, C, D, delta_bias=bias, delta_softplus=True)
    torch.testing.assert_close(fast.double(), _naive_scan(u, delta, A, B, C, D, bias), atol=1e-4, rtol=1e-4)
    assert selective_scan(u, delta, A, B, C, D, bias, backend="auto").equal(fast)  # CPU: PyTorch path


@pytest.mark.skipif(not cuda_kernel_available(), reason="needs a CUDA GPU and mamba-ssm with its CUDA extension")
def test_cuda_kernel_matches_torch_scan():
    args = _scan_inputs(device="cuda")
    u, delta, A, B, C, D, bias = args
    cuda = selective_scan(u, delta, A, B, C, D, bias, backend="cuda")
    torch_path = selective_scan(u, delta, A, B, C, D, bias, backend="torch")
    torch.testing.assert_close(cuda, torch_path, atol=1e-3, rtol=1e-3)


def test_ss2d_row_and_column_scans_swap_under_transpose():
    """With the same parameters for every direction, scanning x^T gives the transpose of scanning x."""
    torch.manual_seed(0)
    ss2d = SS2D(d_model=8, d_state=4, ssm_ratio=1.0).eval()
    with torch.no_grad():
        for p in (ss2d.x_proj_weight, ss2d.dt_projs_weight, ss2d.dt_projs_bias):
            p.copy_(p[:1].expand_as(p))
        d = ss2d.d_inner
        ss2d.A_logs.copy_(ss2d.A_logs[:d].repeat(4, 1))
        ss2d.Ds.copy_(torch.randn(d).repeat(4))
        x = torch.randn(2, d, 5, 7)
        torch.testing.assert_close(ss2d._scan(x.transpose(2, 3)), ss2d._scan(x).transpose(2, 3), atol=1e-5, rtol=1e-5)
        # Reversal symmetry too: flipping both spatial axes reverses every scan order.
        torch.testing.assert_close(ss2d._scan(x.flip(2, 3)), ss2d._scan(x).flip(2, 3), atol=1e-5, rtol=1e-5)


def test_vmamba_tiny_is_the_papers_configuration():
    model = create_encoder("vmamba_tiny")
    depths = [len(stage) for stage in model.model.stages]
    widths = [stage[0].norm.normalized_shape[0] for stage in model.model.stages]
    assert depths == [2, 2, 9, 2] and widths == [96, 192, 384, 768]
    ss2d = model.model.stages[0][0].op
    assert ss2d.d_state == 16 and ss2d.d_inner == 2 * 96
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 22.12) < 0.05, n_params  # VMamba-T v0 without its 0.77 M ImageNet classifier
    small = create_encoder("vmamba_tiny", depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)).eval()
    with torch.no_grad():
        out = small(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64) and small.num_features == 64


def test_vmamba_v2_is_what_vssm_builds_with_its_defaults():
    """The CLEAR authors' encoder: VSSM() of MzeroMiko/VMamba with its defaults. Checked against that
    implementation on CPU during development (same weights through `convert_vmamba`: features equal
    to 4.4e-7 relative, every key matched); here its structure and size, which the converter relies on."""
    model = create_encoder("vmamba_v2")
    vssm = model.model
    assert [len(stage) for stage in vssm.stages] == [2, 2, 9, 2]
    block = vssm.stages[2][0]
    assert block.mlp.fc1.out_features == 4 * 384 and isinstance(block.mlp.act, torch.nn.GELU)
    assert block.norm.eps == 1e-5 and block.norm2.eps == 1e-5 and vssm.norm.eps == 1e-5
    conv = vssm.downsamples[0].conv
    assert conv.kernel_size == (2, 2) and conv.stride == (2, 2) and conv.out_channels == 192
    n_params = sum(p.numel() for p in model.parameters())
    # VSSM() has 43.72 M with its 1000-class head (768 * 1000 + 1000); the encoder drops the head.
    assert abs((n_params + 769_000) / 1e6 - 43.72) < 0.01, n_params
    assert model.num_features == 768


def test_mambaout_embedding_is_the_pooled_normed_feature_not_the_hidden_layer():
    encoder = create_encoder("mambaout_tiny").eval()
    assert encoder.num_features == 576
    reference = timm.create_model("mambaout_tiny", pretrained=False, num_classes=0).eval()
    reference.load_state_dict(encoder.model.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = encoder(x)
        hidden = reference(x)  # timm's num_classes=0 output: the head's MLP hidden layer
        pooled = reference.head.norm(reference.forward_features(x).mean((1, 2)))
    assert ours.shape == (2, 576) and hidden.shape == (2, 2304)
    torch.testing.assert_close(ours, pooled)


def test_vit_conv_stem_and_fixed_sincos_positions():
    encoder = create_encoder("vit_conv_base", img_size=64).eval()
    stem = encoder.model.patch_embed.proj
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 4 + [(1, 1)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    assert [c.out_channels for c in convs] == [96, 192, 384, 768, 768]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in stem) == 4 and isinstance(stem[2], nn.ReLU)
    assert len(encoder.model.blocks) == 11 and not encoder.model.pos_embed.requires_grad
    torch.testing.assert_close(encoder.model.pos_embed.data, sincos_2d_position_embedding(4, 4, 768))
    with torch.no_grad():
        out = encoder(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 768)


def test_sincos_table_by_hand():
    dim, h, w = 8, 2, 3
    table = sincos_2d_position_embedding(h, w, dim)[0]
    assert torch.all(table[0] == 0)  # class token
    quarter = dim // 4
    omega = [1.0 / 10000 ** (i / quarter) for i in range(quarter)]
    for m in range(h * w):
        slow, fast = divmod(m, h)  # MoCo v3 enumerates its (w, h) meshgrid with w slowest
        expected = (
            [math.sin(slow * o) for o in omega]
            + [math.cos(slow * o) for o in omega]
            + [math.sin(fast * o) for o in omega]
            + [math.cos(fast * o) for o in omega]
        )
        np.testing.assert_allclose(table[1 + m].numpy(), expected, atol=1e-6)


def test_registry_lists_every_family():
    names = list_encoders()
    for name in ("mambaout_tiny", "vit_conv_base", "vmamba_tiny", "fmcib_resnet50"):
        assert name in names
    assert list_encoders("lesion") == ["fmcib_resnet50"]
    with pytest.raises(KeyError, match="unknown encoder"):
        create_encoder("resnet9000")


# ----------------------------------------------------------------------------------------- ABMIL
def test_abmil_layers_follow_the_paper():
    model = ABMIL(in_dim=32, n_outputs=3)
    assert isinstance(model.encoder[0], nn.Linear) and model.encoder[0].out_features == 256
    assert isinstance(model.encoder[1], nn.ReLU)
    kinds = [type(m) for m in model.head]
    assert kinds == [nn.LayerNorm, nn.Linear, nn.SiLU, nn.Dropout, nn.Linear]
    assert model.head[0].normalized_shape == (256,) and model.head[-1].out_features == 3


def test_abmil_matches_a_hand_computation():
    torch.manual_seed(0)
    model = ABMIL(in_dim=4, n_outputs=2, hidden_dim=6, attention_dim=3).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        logits, attention = model(x)
    W, b = model.encoder[0].weight.detach().numpy(), model.encoder[0].bias.detach().numpy()
    h = np.maximum(x.numpy() @ W.T + b, 0)
    V, bv = model.attention_V.weight.detach().numpy(), model.attention_V.bias.detach().numpy()
    w, bw = model.attention_w.weight.detach().numpy(), model.attention_w.bias.detach().numpy()
    scores = (np.tanh(h @ V.T + bv) @ w.T + bw)[:, 0]
    a = np.exp(scores - scores.max())
    a /= a.sum()
    np.testing.assert_allclose(attention.numpy(), a, rtol=1e-5, atol=1e-6)
    z = torch.from_numpy((a[:, None] * h).sum(0)).float()
    with torch.no_grad():
        np.testing.assert_allclose(logits.numpy(), model.head(z).numpy(), rtol=1e-5, atol=1e-6)


def test_per_label_attention_pools_one_vector_per_label_and_reads_each_label_from_its_own():
    torch.manual_seed(0)
    model = ABMIL(in_dim=4, n_outputs=3, hidden_dim=6, attention_dim=3, per_label_attention=True).eval()
    x = torch.randn(2, 5, 4)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    with torch.no_grad():
        logits, attention = model(x, mask)
        h = model.encoder(x)
        scores = model.attention_w(torch.tanh(model.attention_V(h)))  # [B, N, 3]
    assert logits.shape == (2, 3) and attention.shape == (2, 5, 3)
    torch.testing.assert_close(attention.sum(1), torch.ones(2, 3))
    assert torch.all(attention[1, 3:] == 0)
    for b, n in enumerate([5, 3]):
        for label in range(3):
            a = torch.softmax(scores[b, :n, label], 0)
            torch.testing.assert_close(attention[b, :n, label], a, atol=1e-6, rtol=1e-5)
            with torch.no_grad():
                expected = model.head((a[:, None] * h[b, :n]).sum(0))[label]
            torch.testing.assert_close(logits[b, label], expected, atol=1e-5, rtol=1e-5)
    # the labels' attentions differ (their own scores), so this is not the shared form in disguise
    assert not torch.allclose(attention[0, :, 0], attention[0, :, 1])


def test_attention_columns_name_each_label_and_keep_a_summing_overall_column():
    from CLEARLib.models import attention_columns, label_attention

    att = np.array([[0.7, 0.1], [0.2, 0.3], [0.1, 0.6]])
    columns = attention_columns(att, ["liver", "lung"])
    assert list(columns) == ["attention", "attention:liver", "attention:lung"]
    np.testing.assert_allclose(columns["attention"], [0.4, 0.25, 0.35])
    table = pd.DataFrame(columns)
    np.testing.assert_allclose(label_attention(table, "lung"), att[:, 1])
    shared = pd.DataFrame(attention_columns(att[:, 0], ["liver", "lung"]))
    assert list(shared) == ["attention"]
    np.testing.assert_allclose(label_attention(shared, "lung"), att[:, 0])
    with pytest.raises(ValueError, match="2 branches for 3 labels"):
        attention_columns(att, ["a", "b", "c"])


@pytest.mark.parametrize("gated", [False, True])
def test_abmil_ignores_padding_and_instance_order(gated):
    torch.manual_seed(1)
    model = ABMIL(in_dim=16, n_outputs=4, gated=gated).eval()
    bags = [torch.randn(7, 16), torch.randn(3, 16)]
    padded = torch.randn(2, 10, 16) * 50  # garbage in the padding
    mask = torch.zeros(2, 10, dtype=torch.bool)
    for i, bag in enumerate(bags):
        padded[i, : len(bag)] = bag
        mask[i, : len(bag)] = True
    with torch.no_grad():
        logits, attention = model(padded, mask)
        for i, bag in enumerate(bags):
            alone_logits, alone_attention = model(bag)
            torch.testing.assert_close(logits[i], alone_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(attention[i, : len(bag)], alone_attention, atol=1e-6, rtol=1e-5)
            assert torch.all(attention[i, len(bag) :] == 0)
        perm = torch.randperm(7)
        perm_logits, perm_attention = model(bags[0][perm])
        torch.testing.assert_close(perm_logits, model(bags[0])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(perm_attention, model(bags[0])[1][perm], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attention.sum(1), torch.ones(2))
    with pytest.raises(ValueError, match="at least one unmasked"):
        model(padded, torch.zeros_like(mask))


def test_probabilities_by_task():
    logits = torch.tensor([[0.0, 2.0, -1.0]])
    torch.testing.assert_close(probabilities(logits, "multilabel"), torch.sigmoid(logits))
    softmax = probabilities(logits, "multiclass")
    torch.testing.assert_close(softmax.sum(-1), torch.ones(1))
    with pytest.raises(ValueError, match="unknown task"):
        probabilities(logits, "regression")


# -------------------------------------------------------------------------------- lesion encoder
def test_fmcib_resnet50_matches_monai_and_gives_4096_features():
    from monai.networks.nets import resnet50

    ours = create_encoder("fmcib_resnet50").eval()
    monai_model = resnet50(
        n_input_channels=1, widen_factor=2, conv1_t_stride=2, feed_forward=False, bias_downsample=True
    ).eval()
    assert set(ours.trunk.state_dict()) == set(monai_model.state_dict())
    n_params = sum(p.numel() for p in ours.parameters())
    assert abs(n_params / 1e6 - 184.48) < 0.01, n_params
    ours.trunk.load_state_dict(monai_model.state_dict())
    x = torch.rand(1, 1, 50, 50, 50)
    with torch.no_grad():
        features = ours(x)
        torch.testing.assert_close(features, monai_model(x))
    assert features.shape == (1, 4096) and ours.num_features == 4096


@pytest.mark.parametrize("task", ["multilabel", "multiclass"])
def test_ensemble_averages_member_probabilities_as_they_are(task):
    from CLEARLib.models.abmil import ABMILEnsemble, head_probabilities

    torch.manual_seed(0)
    ensemble = ABMILEnsemble(16, 3, 4, task, hidden_dim=8, attention_dim=4).eval()
    features = torch.randn(2, 7, 16)
    with torch.no_grad():
        ensemble.members[0].head[-1].bias.fill_(60.0)  # a member certain of every label: p = 1 in float32
        probs, attention = head_probabilities(ensemble, features, task)
        members = [probabilities(m(features)[0], task) for m in ensemble.members]
        single, _ = head_probabilities(ensemble.members[1], features, task)
    torch.testing.assert_close(probs, torch.stack(members).mean(0))  # no round trip through logits
    torch.testing.assert_close(single, members[1])
    assert attention.shape == (2, 7) and torch.allclose(attention.sum(1), torch.ones(2))
    if task == "multiclass":
        torch.testing.assert_close(probs.sum(1), torch.ones(2))


def test_label_windows_confine_each_labels_attention_to_the_instances_of_its_windows():
    torch.manual_seed(0)
    kwargs = {"hidden_dim": 6, "attention_dim": 3, "per_label_attention": True}
    model = ABMIL(4, 2, windows=["abdomen", "lung"], label_windows=[["abdomen"], ["abdomen", "lung"]], **kwargs).eval()
    free = ABMIL(4, 2, **kwargs).eval()
    free.load_state_dict(model.state_dict())  # the same weights: the windows are arguments, not parameters
    x = torch.randn(7, 4)
    windows = model.window_index(["abdomen", "lung", "abdomen", "lung", "lung", "abdomen", "lung"])
    abdomen = windows == 0
    with torch.no_grad():
        logits, attention = model(x, window_index=windows)
        on_abdomen, _ = free(x[abdomen])
        everything, free_attention = free(x)
        moved, _ = model(torch.where(abdomen[:, None], x, x + 3.0), window_index=windows)
    assert torch.all(attention[~abdomen, 0] == 0) and attention[abdomen, 0].sum() == pytest.approx(1.0)
    torch.testing.assert_close(logits[0], on_abdomen[0])  # liver reads the abdomen window's instances alone
    torch.testing.assert_close(logits[1], everything[1])  # lung reads every window, as without label_windows
    torch.testing.assert_close(attention[:, 1], free_attention[:, 1])
    assert moved[0] == logits[0] and moved[1] != logits[1]  # the lung window's features cannot move liver
    with pytest.raises(ValueError, match="window_index"):
        model(x)
    with pytest.raises(ValueError, match="no instance of a label's windows"):
        model(x[~abdomen], window_index=windows[~abdomen])
    with pytest.raises(ValueError, match="does not read"):
        model.window_index(["abdomen", "bone"])
    with pytest.raises(ValueError, match="per_label_attention"):
        ABMIL(4, 2, windows=["abdomen", "lung"], label_windows=[["abdomen"], ["lung"]])
    with pytest.raises(ValueError, match="must name windows"):
        ABMIL(4, 2, windows=["abdomen"], label_windows=[["abdomen"], ["lung"]], per_label_attention=True)
