"""Slice-encoder pretraining: losses by hand, DDP equivalence, exact resume, data store, and a tiny run."""

from __future__ import annotations

import json
import socket
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from configfactory import TINY_ENCODER, write_config
from deeplesion_factory import write_deeplesion

from clear_training.cli import main as train_main
from clear_training.config import ConfigError, load_config
from clear_training.data import SliceStore, prepare_ct, prepare_deeplesion
from clear_training.export import export_encoder
from clear_training.losses import SliceContrastiveLoss, lecl_loss, lecl_loss_public_variant, moco_v3_loss
from clear_training.models import MoCo
from clear_training.pretrain import Trainer
from clear_training.views import ViewConfig, lesion_boxes, make_views
from CLEARLib.bundle import load_bundle
from CLEARLib.errors import CLEARInputError
from CLEARLib.io import write_volume
from CLEARLib.phantom import make_phantom
from CLEARLib.preprocess import InputSpec, resolve_windows


# ------------------------------------------------------------------------------------------ losses
def _by_hand(q, k, tau, extra_weight=None):
    """-log(exp(s_ii) / denominator) averaged and scaled by 2 tau; the denominator is the row's sum of
    exp(s_ij) plus `extra_weight(s_i, i)` when given."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    s = q @ k.T / tau
    losses = []
    for i in range(len(q)):
        denominator = np.exp(s[i]).sum()
        if extra_weight is not None:
            denominator += extra_weight(s[i], i)
        losses.append(-np.log(np.exp(s[i, i]) / denominator))
    return float(np.mean(losses) * 2 * tau)


def test_losses_against_hand_computation():
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    key = np.array([True, False, False, True, False, True])
    tq, tk, tkey = torch.tensor(q), torch.tensor(k), torch.tensor(key)
    assert moco_v3_loss(tq, tk, 0.2).item() == pytest.approx(_by_hand(q, k, 0.2), rel=1e-6)
    for lam in (1.0, 3.0, 5.0):
        expected = _by_hand(q, k, 0.2, lambda s, i, lam=lam: lam * np.exp(s[key]).sum())
        assert lecl_loss(tq, tk, tkey, lam, 0.2).item() == pytest.approx(expected, rel=1e-6)


def _authors_lesion_loss(q, k, key, weight, tau):
    """The authors' contrastive_loss_lesion written out for one process: the denominator holds every
    exp(s_ij) plus exp(weight * s_ij) for each key-slice key j other than the query's own key i."""
    keys = np.flatnonzero(key)
    return _by_hand(q, k, tau, lambda s, i: sum(np.exp(weight * s[j]) for j in keys if j != i))


def test_public_variant_is_the_authors_lesion_loss():
    rng = np.random.default_rng(1)
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    key = np.array([True, False, False, True, False, True])
    tq, tk, tkey = torch.tensor(q), torch.tensor(k), torch.tensor(key)
    for weight in (1.0, 2.0, 10.0):
        expected = _authors_lesion_loss(q, k, key, weight, 0.5)
        assert lecl_loss_public_variant(tq, tk, tkey, weight, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # Weight 0, or no key slice in the batch: plain MoCo v3, as the authors' forward() does.
    moco = moco_v3_loss(tq, tk, 0.5).item()
    assert lecl_loss_public_variant(tq, tk, tkey, 0.0, 0.5).item() == pytest.approx(moco, rel=1e-12)
    assert lecl_loss_public_variant(tq, tk, torch.zeros(6, dtype=torch.bool), 3.0, 0.5).item() == pytest.approx(moco)


def test_lecl_with_lambda_zero_is_moco():
    torch.manual_seed(0)
    q, k = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    key = torch.rand(16) < 0.5
    a = lecl_loss(q, k, key, 0.0, 0.2)
    b = moco_v3_loss(q, k, 0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)  # same maths, float32 rounding only
    (ga,) = torch.autograd.grad(a, q)
    (gb,) = torch.autograd.grad(b, q)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    assert lecl_loss(q, k, key, 3.0, 0.2).item() > a.item()  # key-slice keys weigh more in the denominator


def test_moco_heads_and_vit_initialisation_follow_moco_v3():
    from clear_training.models import MoCo

    model = MoCo("mambaout_femto", TINY_ENCODER, dim=16, mlp_dim=32)
    last = model.predictor[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine  # as the projector's last layer
    assert len([m for m in model.base_projector if isinstance(m, torch.nn.Linear)]) == 2  # CNN-like default
    authors = MoCo("mambaout_femto", TINY_ENCODER, dim=16, mlp_dim=32, projector_layers=3)
    assert len([m for m in authors.base_projector if isinstance(m, torch.nn.Linear)]) == 3
    vit = MoCo("vit_conv_small", {"img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 4}, dim=16, mlp_dim=32)
    blocks = vit.base_encoder.model.blocks
    qkv = blocks[0].attn.qkv.weight
    bound = np.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
    assert qkv.abs().max().item() <= bound and qkv.abs().max().item() > 0.9 * bound  # uniform in +-bound
    fc1 = blocks[1].mlp.fc1.weight
    xavier = np.sqrt(6.0 / (fc1.shape[0] + fc1.shape[1]))
    assert fc1.abs().max().item() <= xavier and fc1.abs().max().item() > 0.9 * xavier
    assert torch.count_nonzero(blocks[0].attn.qkv.bias) == 0
    assert vit.base_encoder.model.cls_token.abs().max().item() < 1e-5
    # The momentum encoder starts as an exact copy of the initialised base encoder.
    for a, b in zip(vit.base_encoder.parameters(), vit.momentum_encoder.parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_moco():
    torch.manual_seed(0)
    return MoCo("mambaout_femto", TINY_ENCODER, dim=8, mlp_dim=16, mlp_norm="none")


def _batch():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    key = torch.tensor([True, False, False, True, False, False, True, False])
    return views, key


def _ddp_worker(rank, world, port, method, out):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DistributedDataParallel(_tiny_moco())
    views, key = _batch()
    half = slice(rank * 4, rank * 4 + 4)
    q1, q2, k1, k2 = model(*(v[half] for v in views), 0.99)
    loss = SliceContrastiveLoss.from_config(method)(q1, q2, k1, k2, key[half])
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    if rank == 0:
        grads = {n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}
        torch.save({"loss": mean_loss / world, "grads": grads}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("method", [{"name": "moco", "lam": 0.0}, {"name": "lecl", "lam": 3.0}], ids=["moco", "lecl"])
def test_two_process_ddp_equals_one_process_with_the_whole_batch(tmp_path, method):
    from clear_training.config import MethodConfig

    method = MethodConfig(**method)
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), method, str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    model = _tiny_moco()
    views, key = _batch()
    q1, q2, k1, k2 = model(*views, 0.99)
    loss = SliceContrastiveLoss.from_config(method)(q1, q2, k1, k2, key)
    loss.backward()
    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(distributed["grads"]) and grads
    for name, grad in grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, atol=1e-6, rtol=1e-4, msg=name)


# -------------------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def deeplesion_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("dl")
    info = write_deeplesion(root / "DeepLesion", n_patients=6, slices=16, size=64)
    summary = prepare_deeplesion(root / "DeepLesion", root / "store", size=48, test_fraction=0.25, seed=0)
    return root, info, summary


def test_deeplesion_store_excludes_test_patients_and_scales_boxes(deeplesion_store):
    root, info, summary = deeplesion_store
    splits = pd.read_csv(summary["splits"], dtype={"patient_id": str})
    test = set(splits.patient_id[splits.split == "test"])
    labelled = {f"{p:06d}" for p in info.Patient_index[info.Coarse_lesion_type > 0]}
    assert len(test) == round(0.25 * len(labelled)) and test <= labelled
    store = SliceStore(root / "store")
    assert not set(store.index.patient_id) & test
    assert len(store) == 16 * (6 - len(test)) and store.size == 48
    # Key slices carry their box, scaled from 64 to 48 pixels; x1,y1,x2,y2 order is kept.
    for row in info.itertuples():
        patient = f"{row.Patient_index:06d}"
        if patient in test:
            continue
        hit = store.index[
            (store.index.case_id == f"{patient}_01_01") & (store.index.slice_index == row.Key_slice_index)
        ]
        assert len(hit) == 1 and bool(hit.is_key.iloc[0])
        stored = [float(v) for v in hit.boxes.iloc[0].split()]
        expected = [float(v) * 48 / 64 for v in row.Bounding_boxes.split(",")]
        np.testing.assert_allclose(stored, expected, atol=0.01)
    assert store.is_key.sum() == 6 - len(test)


def test_store_keeps_hounsfield_units(tmp_path):
    root = tmp_path / "dl"
    write_deeplesion(root, n_patients=1, slices=8, size=32)
    prepare_deeplesion(root, tmp_path / "store", size=32, test_fraction=0.0)
    store = SliceStore(tmp_path / "store")
    from PIL import Image

    png = np.asarray(Image.open(root / "Images_png" / "000001_01_01" / "002.png")).astype(np.int32) - 32768
    np.testing.assert_array_equal(store.slices(np.array([2]))[0].numpy(), png)


def test_prepare_ct_from_a_cohort_with_key_slices(tmp_path):
    paths = []
    for i in range(2):
        volume, lesions = make_phantom((10, 40, 40), (5.0, 5.0, 8.0), seed=i)
        paths.append(write_volume(volume, tmp_path / f"case{i}.nii.gz"))
    pd.DataFrame({"path": [p.name for p in paths] + ["missing.nrrd"]}).to_csv(tmp_path / "cohort.csv", index=False)
    pd.DataFrame(
        [{"case_id": "case0", "key_slice_index": 3, "x1": 5, "y1": 6, "x2": 15, "y2": 18, "lesion_type": 4}]
    ).to_csv(tmp_path / "keys.csv", index=False)
    summary = prepare_ct(tmp_path / "cohort.csv", tmp_path / "store", tmp_path / "keys.csv", size=40)
    assert summary["cases"] == 2 and summary["failures"][0]["case_id"] == "missing"
    store = SliceStore(tmp_path / "store")
    assert len(store) == 20 and store.is_key.sum() == 1
    key = store.index[store.index.is_key].iloc[0]
    assert key.case_id == "case0" and key.slice_index == 3 and key.boxes == "5.00 6.00 15.00 18.00"
    # Lesion types by name (as Slicer users type them) or by DeepLesion code; bad ones name file, row, column.
    pd.DataFrame(
        [
            {"case_id": "case0", "key_slice_index": 3, "x1": 5, "y1": 6, "x2": 15, "y2": 18, "lesion_type": "Lung"},
            {
                "case_id": "case1",
                "key_slice_index": 2,
                "x1": 5,
                "y1": 6,
                "x2": 15,
                "y2": 18,
                "lesion_type": "soft tissue",
            },
        ]
    ).to_csv(tmp_path / "named.csv", index=False)
    prepare_ct(tmp_path / "cohort.csv", tmp_path / "named", tmp_path / "named.csv", size=40)
    named = SliceStore(tmp_path / "named").index
    assert sorted(named[named.is_key].lesion_types) == ["5", "7"]
    pd.DataFrame(
        [{"case_id": "case0", "key_slice_index": 3, "x1": 5, "y1": 6, "x2": 15, "y2": 18, "lesion_type": "tumour"}]
    ).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match=r"bad.csv: row 1, column lesion_type: 'tumour'.*lung"):
        prepare_ct(tmp_path / "cohort.csv", tmp_path / "bad", tmp_path / "bad.csv", size=40)


# Views without flips or intensity augmentation: what the geometry alone does.
PLAIN = {"hflip": 0, "window_jitter": 0, "contrast": 0, "gamma": 0, "noise_std": 0, "blur_p": 0}


def test_lesion_crop_is_centred_on_the_box_centre():
    hu = torch.full((1, 64, 64), -1000, dtype=torch.int16)
    hu[0, 20:30, 40:52] = 200  # rows 20-29 (y), columns 40-51 (x)
    box = torch.tensor([[40.0, 20.0, 52.0, 30.0]])  # x1, y1, x2, y2
    cfg = ViewConfig(spec=InputSpec(size=24, channels=1, mean=(0.0,), std=(1.0,)), lesion_context=(1.0, 1.0), **PLAIN)
    g = torch.Generator().manual_seed(0)
    view = make_views(hu, torch.tensor([[-175.0, 275.0]]), cfg, g, lesion_boxes(box, (64, 64), cfg, g, "cpu"))
    # The crop spans the box's longer side (12 px) around its centre (46, 25): rows 19-30 of which
    # 20-29 are lesion, so the middle rows of the view are lesion and the crop's top and bottom are not.
    assert view.shape == (1, 1, 24, 24)
    assert view[0, 0, 12, 12] > 0.7 and view[0, 0, 8:16, 4:20].min() > 0.7
    assert view[0, 0, 0, 12] < 0.5 and view[0, 0, 23, 12] < 0.5


def test_authors_lesion_crop_side_in_pixels():
    """lesion_crop_px: the side is drawn in [low, high) pixels whatever the box size, centred on the box."""
    boxes = torch.tensor([[100.0, 200.0, 110.0, 206.0]] * 2000)  # a 10 x 6 px lesion centred at (105, 203)
    cfg = ViewConfig(lesion_crop_px=(145.0, 512.0))
    crops = lesion_boxes(boxes, (512, 512), cfg, torch.Generator().manual_seed(0), "cpu")
    side_px = crops[:, 2] * 512
    assert side_px.min() >= 145 and side_px.max() < 512 and abs(side_px.mean().item() - (145 + 512) / 2) < 10
    torch.testing.assert_close(crops[:, 0], torch.full((2000,), (105 + 0.5) / 512 * 2 - 1))
    torch.testing.assert_close(crops[:, 1], torch.full((2000,), (203 + 0.5) / 512 * 2 - 1))
    default = lesion_boxes(boxes, (512, 512), ViewConfig(), torch.Generator().manual_seed(0), "cpu")
    assert (default[:, 2] * 512).max() <= 10 * 4.0 + 1e-4  # CLEAR's default: 1.5-4 x the longer side


def test_moco_v3_colour_augmentations():
    """The authors' views: brightness and contrast jitter as torchvision's ColorJitter, solarisation."""
    from clear_training.views import _color_jitter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, 8, 8) * 0.5 + 0.25
    always = ViewConfig(color_jitter=(0.4, 0.4), color_jitter_p=1.0)
    out = _color_jitter(x, always, g)
    assert not torch.equal(out, x) and out.min() >= 0 and out.max() <= 1
    # Contrast blends with each image's mean and brightness scales: means move by at most the brightness range.
    ratio = out.mean(dim=(1, 2, 3)) / x.mean(dim=(1, 2, 3))
    assert ratio.min() > 0.59 and ratio.max() < 1.41
    never = ViewConfig(color_jitter=(0.4, 0.4), color_jitter_p=0.0)
    assert torch.equal(_color_jitter(x, never, torch.Generator().manual_seed(0)), x)
    # Solarisation inverts the bright half only; with p 1 every view is solarised.
    hu = torch.linspace(-175, 275, 32 * 32).view(1, 32, 32).repeat(2, 1, 1).to(torch.int16)
    plain = dict(spec=InputSpec(size=32, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), scale=(1.0, 1.0), ratio=(1.0, 1.0),
                 **PLAIN)  # fmt: skip
    bounds = torch.tensor([[-175.0, 275.0]] * 2)
    base = make_views(hu, bounds, ViewConfig(**plain), torch.Generator().manual_seed(1))
    solar = make_views(hu, bounds, ViewConfig(**plain, solarize_p=1.0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(solar, torch.where(base >= 0.5, 1 - base, base))


def test_views_are_reproducible_from_the_seed():
    hu = torch.randint(-1000, 1000, (4, 48, 48), dtype=torch.int16)
    bounds = torch.tensor([[-175.0, 275.0]] * 4)
    a = make_views(hu, bounds, ViewConfig(spec=InputSpec(size=32)), torch.Generator().manual_seed(5))
    b = make_views(hu, bounds, ViewConfig(spec=InputSpec(size=32)), torch.Generator().manual_seed(5))
    c = make_views(hu, bounds, ViewConfig(spec=InputSpec(size=32)), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (4, 3, 32, 32)


# -------------------------------------------------------------------------------- trainer
def _config(tmp_path, store, name="run", **overrides):
    cfg = {
        "run": {"name": name, "out_dir": str(tmp_path / name), "epochs": 8, "warmup_epochs": 1, "log_every_steps": 1},
        "data": {"store": str(store), "image_size": 32},
        "model": {"encoder": "mambaout_femto", "encoder_kwargs": TINY_ENCODER, "dim": 16, "mlp_dim": 32},
        "method": {"name": "lecl", "lam": 1.0},
        "optim": {"lr": 0.05, "batch_size": 16, "weight_decay": 0.0},
    }
    return write_config(tmp_path, name, cfg, overrides)


def test_resume_continues_exactly(tmp_path, deeplesion_store):
    root, _, _ = deeplesion_store
    straight = Trainer(load_config(_config(tmp_path, root / "store", "straight", run__max_steps=7)))
    history = straight.fit()
    interrupted = Trainer(load_config(_config(tmp_path, root / "store", "resumed", run__max_steps=4)))
    interrupted.fit()
    resumed = Trainer(load_config(_config(tmp_path, root / "store", "resumed", run__max_steps=7)))
    assert resumed.global_step == 4
    rest = resumed.fit()
    assert [r["loss"] for r in rest] == [r["loss"] for r in history[4:]]
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_tiny_pretraining_lowers_the_loss_and_exports_a_bundle(tmp_path, deeplesion_store, phantom):
    root, _, _ = deeplesion_store
    config = load_config(_config(tmp_path, root / "store", "tiny", run__epochs=12))
    trainer = Trainer(config)
    history = trainer.fit()
    losses = [r["loss"] for r in history]
    assert len(losses) == 12 * (len(trainer.store) // 16)
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.2, losses
    assert sum(r["key_slices"] for r in history) > 0
    log = [json.loads(line) for line in (tmp_path / "tiny" / "log.jsonl").read_text().splitlines()]
    assert {"loss", "lr", "momentum", "views_per_s"} <= set(log[-1])
    bundle = load_bundle(export_encoder(tmp_path / "tiny" / "last.pt", tmp_path / "enc.zip"))
    assert bundle.head is None and bundle.input_spec.size == 32
    x = torch.randn(2, 3, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), trainer.model.base_encoder(x))
    assert bundle.windows == tuple(resolve_windows(config.data.windows)) and "lecl" in bundle.manifest.description
    weights = trainer.model.base_encoder.state_dict()
    foreign = {"state_dict": {f"module.base_encoder.{k}": v for k, v in weights.items()}}
    torch.save(foreign, tmp_path / "moco.pth.tar")
    with pytest.raises(CLEARInputError, match="not a CLEAR training checkpoint.*clear-ct convert"):
        export_encoder(tmp_path / "moco.pth.tar", tmp_path / "foreign.zip")
    from CLEARLib.inference import CasePredictor

    volume, _ = phantom
    embeddings, _ = CasePredictor(bundle, device="cpu").encode(volume)
    assert embeddings.shape == (2 * volume.shape[0], 32) and np.isfinite(embeddings).all()


def test_config_errors_name_the_keys(tmp_path, deeplesion_store, capsys):
    root, _, _ = deeplesion_store
    path = _config(tmp_path, root / "store", "bad", method__lamda=1.0, model__encoder="resnet9000")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "bad.yaml" in text and "method.lamda" in text and "model.encoder" in text and "resnet9000" in text
    good = _config(tmp_path, root / "store", "good")
    with pytest.raises(ConfigError, match="method.lam applies to lecl only"):
        load_config(good, ["method.name=moco", "method.lam=3"])
    assert train_main(["pretrain", "--config", str(good), "--set", "method.lam=5", "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["method"]["lam"] == 5.0
    assert train_main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_shipped_configs_reproduce_the_paper():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "training" / "configs"
    configs = sorted(p for p in folder.glob("*.yaml") if p.name.startswith(("mambaout_", "vmamba_", "vit_")))
    assert len(configs) == 6
    for path in configs:
        for lam in [0, 1, 3, 5] if "lecl" in path.name else [None]:
            config = load_config(path, [f"method.lam={lam}"] if lam is not None else [])
            assert config.run.epochs == 100 and config.run.warmup_epochs == 10 and config.optim.lr == 1e-4
            assert config.optim.batch_size == (1024 if config.model.encoder.startswith("vit") else 2048)
    assert sys.version_info >= (3, 11)


def test_authors_preset_says_where_each_setting_comes_from():
    """The authors' preset (training/configs/authors/) validates and holds their values for what the
    paper leaves open; every setting line is marked [paper], [authors] or [CLEAR]."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "training" / "configs" / "authors" / "mambaout_lecl.yaml"
    config = load_config(path)
    assert config.method.tau == 1.0 and config.optim.weight_decay == 1e-6 and config.optim.betas == (0.9, 0.999)
    assert config.data.crop_scale == (0.08, 1.0) and config.data.lesion_crop_px == (145, 512)
    assert config.method.momentum_schedule == "constant" and config.method.loss_variant == "public"
    assert config.model.projector_layers == 3 and config.model.predictor_last_bn
    assert config.data.augmentations == "moco_v3"
    settings = [line for line in path.read_text().splitlines() if ":" in line and not line.startswith("#")]
    sections = {"run:", "data:", "model:", "method:", "optim:"}
    for line in settings:
        if line.strip() not in sections and not line.strip().startswith(
            ("name: mambaout_lecl_authors", "out_dir", "store")
        ):
            assert any(tag in line for tag in ("[paper]", "[authors]", "[CLEAR]")), line


def test_constant_momentum_and_adam_betas_reach_the_trainer(tmp_path, deeplesion_store):
    root, _, _ = deeplesion_store
    overrides = {"run__max_steps": 3, "method__momentum_schedule": "constant", "optim__betas": [0.9, 0.999]}
    overrides["data__augmentations"] = "moco_v3"  # the asymmetric views run through the same batcher
    trainer = Trainer(load_config(_config(tmp_path, root / "store", "authors", optim__name="adamw", **overrides)))
    history = trainer.fit()
    assert [r["momentum"] for r in history] == [0.99] * 3
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    first, second = trainer.batcher.views
    assert (first.blur_p, first.solarize_p, second.blur_p, second.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert all(np.isfinite(r["loss"]) for r in history)
    cosine = Trainer(load_config(_config(tmp_path, root / "store", "cosine", run__max_steps=3))).fit()
    assert cosine[-1]["momentum"] > 0.99  # MoCo v3's schedule rises from 0.99 towards 1


def test_blur_probability_reaches_the_views(tmp_path, deeplesion_store):
    """data.blur_p: at 0 no view is blurred, at 1 every one is: the same rows and seed give views whose fine
    detail (mean absolute difference of neighbouring pixels) is lower with blur (blur strengths are drawn from
    0.1 px up, and the views' noise adds detail to both)."""
    root, _, _ = deeplesion_store

    def detail(blur_p):
        trainer = Trainer(load_config(_config(tmp_path, root / "store", f"blur{blur_p}", data__blur_p=blur_p)))
        assert all(view.blur_p == blur_p for view in trainer.batcher.views)
        x1, x2, _, _, _ = trainer.batcher(np.arange(8), seed=3)
        views = torch.cat([x1, x2])
        return (views[..., 1:] - views[..., :-1]).abs().mean().item()

    assert detail(0.0) > 1.05 * detail(1.0)


def test_crop_grid_equals_affine_grid():
    import torch.nn.functional as F

    from clear_training.views import _crop_grid

    boxes = torch.tensor([[0.1, -0.2, 0.5, 0.7], [0.0, 0.0, 1.0, 1.0], [-0.3, 0.4, 0.2, 0.9]])
    hflip, vflip = torch.tensor([True, False, True]), torch.tensor([False, True, True])
    theta = torch.zeros(3, 2, 3)
    theta[:, 0, 0] = boxes[:, 2] * torch.where(hflip, -1.0, 1.0)
    theta[:, 1, 1] = boxes[:, 3] * torch.where(vflip, -1.0, 1.0)
    theta[:, :, 2] = boxes[:, :2]
    expected = F.affine_grid(theta, [3, 1, 9, 9], align_corners=False)
    torch.testing.assert_close(_crop_grid(boxes, hflip, vflip, 9), expected)


def test_key_slice_fraction_fills_every_batch_with_key_slices(tmp_path, deeplesion_store):
    root, _, _ = deeplesion_store
    store = SliceStore(root / "store")
    keys = set(np.flatnonzero(store.is_key).tolist())
    assert 0 < len(keys) < len(store) // 4  # a store where key slices are rare
    trainer = Trainer(load_config(_config(tmp_path, root / "store", "keys", data__key_slice_fraction=0.5)))
    others = len(store) - len(keys)
    assert trainer.steps_per_epoch == others // 8  # an epoch: one pass over the other slices, 8 per batch
    seen_others = []
    for step in range(trainer.steps_per_epoch):
        rows = trainer.rows_for(0, step)
        assert len(rows) == 16 and sum(int(r) in keys for r in rows) == 8
        seen_others += [int(r) for r in rows if int(r) not in keys]
    assert len(seen_others) == len(set(seen_others))  # no other slice twice in an epoch
    assert not np.array_equal(trainer.rows_for(0, 0), trainer.rows_for(1, 0))
    # A batch needs at least one key slice and one other slice.
    with pytest.raises(CLEARInputError, match="key_slice_fraction"):
        Trainer(load_config(_config(tmp_path, root / "store", "few", data__key_slice_fraction=0.01)))
    history = trainer.fit()
    assert all(r["key_slices"] == 8 for r in history)


def test_lesion_windows_show_key_slices_in_the_window_their_lesion_is_read_in(tmp_path):
    """data.lesion_windows: key slices of a mapped lesion type always get their window; a slice with lesions read
    in both windows gets either (fixed by the seed); unmapped key slices and other slices still draw at random,
    and without the setting every slice draws exactly as before."""
    volume, _ = make_phantom((20, 40, 40), (5.0, 5.0, 8.0), seed=0)  # one batch of 16 fits
    write_volume(volume, tmp_path / "case0.nii.gz")
    pd.DataFrame({"path": ["case0.nii.gz"]}).to_csv(tmp_path / "cohort.csv", index=False)
    box = {"case_id": "case0", "x1": 5, "y1": 6, "x2": 15, "y2": 18}
    types = {2: ["lung"], 4: ["liver"], 6: ["bone"], 8: ["lung", "liver"]}
    rows = [{**box, "key_slice_index": k, "lesion_type": t} for k, names in types.items() for t in names]
    pd.DataFrame(rows).to_csv(tmp_path / "keys.csv", index=False)
    prepare_ct(tmp_path / "cohort.csv", tmp_path / "store", tmp_path / "keys.csv", size=40)
    store = tmp_path / "store"
    abdomen, lung = 0, 1  # the default windows, in this order
    read_in = {"lung": "lung", "liver": "abdomen"}
    batcher = Trainer(load_config(_config(tmp_path, store, "win", data__lesion_windows=read_in))).batcher
    plain = Trainer(load_config(_config(tmp_path, store, "plain"))).batcher
    batch = np.arange(12)  # the store's rows: the case's slices in order
    seen = {k: set() for k in range(12)}
    for seed in range(40):
        window = batcher.windows_for(batch, torch.Generator().manual_seed(seed), seed)
        drawn = plain.windows_for(batch, torch.Generator().manual_seed(seed), seed)
        assert torch.equal(drawn, torch.randint(2, (12,), generator=torch.Generator().manual_seed(seed)))
        assert window[2] == lung and window[4] == abdomen
        others = [k for k in range(12) if k not in (2, 4, 8)]
        assert torch.equal(window[others], drawn[others])  # the bone key slice and plain slices: as drawn
        assert torch.equal(window, batcher.windows_for(batch, torch.Generator().manual_seed(seed), seed))
        for k in range(12):
            seen[k].add(int(window[k]))
    assert seen[2] == {lung} and seen[4] == {abdomen}
    assert seen[8] == seen[6] == seen[0] == {abdomen, lung}
    # A short run with it.
    history = Trainer(
        load_config(_config(tmp_path, store, "fit", data__lesion_windows=read_in, run__max_steps=2))
    ).fit()
    assert len(history) == 2 and all(np.isfinite(r["loss"]) for r in history)
    # Errors name the setting: an unknown lesion type, a window the run does not use, MoCo (no key slices).
    for name, overrides, message in [
        ("badtype", {"data__lesion_windows": {"tumour": "lung"}}, "tumour"),
        ("badwindow", {"data__lesion_windows": {"lung": "bone"}, "data__windows": ["abdomen", "lung"]}, "bone"),
        ("moco", {"data__lesion_windows": read_in, "method__name": "moco", "method__lam": 0.0}, "lecl only"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(_config(tmp_path, store, name, **overrides))
