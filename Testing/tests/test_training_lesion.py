"""SimCLR lesion pretraining and fine-tuning: losses, DDP equivalence, exact resume, bundles."""

from __future__ import annotations

import json
import socket

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from configfactory import write_config

from clear_training.cli import main as train_main
from clear_training.config import LesionPretrainConfig, load_config
from clear_training.export import export_lesion_bundle
from clear_training.lesion import LesionFinetuner, LesionPretrainer
from clear_training.losses import fmcib_background_loss, nt_xent
from clear_training.models import SimCLRModel
from clear_training.views import finetune_views, simclr_views
from CLEARLib.bundle import load_bundle
from CLEARLib.cli import main as ct_main
from CLEARLib.io import write_volume
from CLEARLib.phantom import Lesion, make_phantom

TINY = {
    "layers": [1, 1, 1, 1],
    "block_inplanes": [4, 8, 8, 16],
    "widen_factor": 1.0,
    "norm": ["group", {"num_groups": 1}],
}


@pytest.fixture(scope="module")
def seed_table(tmp_path_factory):
    root = tmp_path_factory.mktemp("lesions")
    rows = []
    rng = np.random.default_rng(0)
    for i in range(4):
        lesions = []
        for _ in range(2):
            centre = (float(rng.uniform(-40, 40)), float(rng.uniform(-30, 30)), float(rng.uniform(-30, 30)))
            lesions.append(Lesion("liver", centre, float(rng.uniform(5, 10)), 150 if (i + len(lesions)) % 2 else -20))
        volume, _ = make_phantom((40, 64, 64), (3.0, 3.0, 3.0), lesions=lesions, seed=i)
        path = write_volume(volume, root / f"ct{i}.nrrd")
        for lesion in lesions:
            rows.append(
                {
                    "image_path": path.name,
                    "coordX": lesion.center_lps[0],
                    "coordY": lesion.center_lps[1],
                    "coordZ": lesion.center_lps[2],
                    "label": "dense" if lesion.hu > 0 else "cystic",
                }
            )
    pd.DataFrame(rows).to_csv(root / "seeds.csv", index=False)
    return root


def _config(root, name, **overrides):
    cfg = {
        "run": {"name": name, "out_dir": str(root / name), "epochs": 6, "warmup_epochs": 1, "log_every_steps": 1},
        "data": {"seeds": str(root / "seeds.csv"), "cache_dir": str(root / "cache"), "negatives_per_seed": 2},
        "model": {"encoder_kwargs": TINY, "hidden_dim": 32, "projection_dim": 16},
        "method": {"loss": "ntxent"},
        "optim": {"name": "lars", "lr": 2.0, "batch_size": 4, "weight_decay": 0.0},
    }
    return load_config(write_config(root, name, cfg, overrides), model=LesionPretrainConfig)


def _nt_xent_by_hand(z1, z2, t):
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    s = z @ z.T / t
    n = len(z1)
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        losses.append(-s[i, j] + np.log(np.exp(s[i, others]).sum()))
    return np.mean(losses)


def _fmcib_criterion_by_hand(z1, z2, b1, b2, t):
    """FMCIB's NegativeMiningInfoNCECriterion written out for one process: rows [pos0, pos1, neg0, neg1]
    normalised together; positive mask pairs pos0[i] with pos1[i]; the negative mask keeps both
    background views of every other item; loss over the 2B lesion rows."""
    b = len(z1)
    e = np.concatenate([z1, z2, b1, b2])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    similarity = np.exp(e @ e.T / t)
    pos_mask, neg_mask = np.zeros((4 * b, 4 * b)), np.zeros((4 * b, 4 * b))
    for anchor, other in ((0, 1), (1, 0)):
        for i in range(b):
            pos_mask[anchor * b + i, other * b + i] = 1
            for j in range(b):
                if j != i:
                    neg_mask[anchor * b + i, [2 * b + j, 3 * b + j]] = 1
    pos = (similarity * pos_mask).sum(1)[: 2 * b]
    neg = (similarity * neg_mask).sum(1)[: 2 * b]
    return -np.mean(np.log(pos / (pos + neg)))


def test_losses_by_hand():
    rng = np.random.default_rng(0)
    z1, z2, b1, b2 = (rng.normal(size=(5, 6)) for _ in range(4))
    got = nt_xent(torch.tensor(z1), torch.tensor(z2), 0.1).item()
    assert got == pytest.approx(_nt_xent_by_hand(z1, z2, 0.1), rel=1e-6)
    got = fmcib_background_loss(*(torch.tensor(a) for a in (z1, z2, b1, b2)), 0.1).item()
    assert got == pytest.approx(_fmcib_criterion_by_hand(z1, z2, b1, b2, 0.1), rel=1e-6)
    # The item's own background is never a negative: with one item there are none, and the loss is 0.
    alone = fmcib_background_loss(*(torch.tensor(a[:1]) for a in (z1, z2, b1, b2)), 0.1).item()
    assert alone == pytest.approx(0.0, abs=1e-7)


def test_simclr_crop_scales_each_axis():
    """Scale s takes a crop of side 50 s along every axis (MONAI RandScaleCrop), not a volume fraction s:
    on a linear ramp along x, the resized view spans s times the patch's intensity range."""
    ramp = torch.linspace(0, 1, 70).view(1, 1, 1, 1, 70).expand(1, 1, 70, 70, 70).contiguous()
    for s in (0.5, 0.8):
        spans = []
        for seed in range(40):
            view = simclr_views(ramp, 10, (s, s), torch.Generator().manual_seed(seed))
            line = view[0, 0, 25, 25]
            if torch.all(line[1:] >= line[:-1] - 1e-6) or torch.all(line[1:] <= line[:-1] + 1e-6):
                spans.append(float(line.max() - line.min()))  # unflipped or flipped, unsmoothed-enough lines
        assert np.median(spans) == pytest.approx(s * 49 / 69, rel=0.1), (s, np.median(spans))


def test_region_cache_views_and_background_patches(seed_table):
    config = _config(seed_table, "views")
    trainer = LesionPretrainer(config)
    assert trainer.n_items == 8 and len({p.name for p in trainer.cache}) == 8
    regions = np.load(trainer.cache[0])
    assert regions.shape == (3, 70, 70, 70)  # the lesion and two background regions, 50 + 2 * 10 voxels
    seeds = trainer.seeds
    lesion_hu = regions[0, 35, 35, 35] * 3072 - 1024
    assert lesion_hu == pytest.approx(150 if seeds.label[0] == "dense" else -20, abs=30)
    v1, v2 = trainer.make_batch(np.array([0, 1, 2, 3]), seed=5)  # ntxent: lesion views only
    assert v1.shape == (4, 1, 50, 50, 50) and not torch.equal(v1, v2)
    again = trainer.make_batch(np.array([0, 1, 2, 3]), seed=5)
    assert all(torch.equal(a, b) for a, b in zip((v1, v2), again, strict=True))
    trainer.config.method.loss = "fmcib"
    views = trainer.make_batch(np.array([0, 1, 2, 3]), seed=5)
    assert len(views) == 4 and trainer.views_per_item == 4
    assert not torch.equal(views[2], views[3])  # two views of one background patch
    x = finetune_views(torch.from_numpy(regions[:1][None].copy()), 10, torch.Generator().manual_seed(0))
    assert x.shape == (1, 1, 50, 50, 50)
    views = simclr_views(torch.from_numpy(regions[:1][None].copy()), 10, (0.5, 1.0), torch.Generator().manual_seed(1))
    assert views.shape == (1, 1, 50, 50, 50) and torch.isfinite(views).all()


def test_pretraining_lowers_the_loss_resumes_exactly_and_exports(seed_table, capsys):
    straight = LesionPretrainer(_config(seed_table, "straight", run__max_steps=6, method__loss="fmcib"))
    history = straight.fit()
    part = LesionPretrainer(_config(seed_table, "resumed", run__max_steps=3, method__loss="fmcib"))
    part.fit()
    rest = LesionPretrainer(_config(seed_table, "resumed", run__max_steps=6, method__loss="fmcib")).fit()
    assert [r["loss"] for r in rest] == [r["loss"] for r in history[3:]]
    long = LesionPretrainer(
        _config(seed_table, "long", run__epochs=15, optim__name="adamw", optim__lr=0.1, method__crop_scale=[0.8, 1.0])
    )
    losses = [r["loss"] for r in long.fit()]
    assert np.mean(losses[-6:]) < np.mean(losses[:6]), losses
    bundle_path = export_lesion_bundle(seed_table / "long" / "last.pt", seed_table / "simclr.zip")
    bundle = load_bundle(bundle_path)
    assert bundle.kind == "lesion" and bundle.head is None
    x = torch.rand(2, 1, 50, 50, 50)
    long.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), long.model.encoder(x))
    seeds = pd.read_csv(seed_table / "seeds.csv")
    seed = ",".join(str(v) for v in seeds.loc[0, ["coordX", "coordY", "coordZ"]])
    assert ct_main(["lesion", str(seed_table / seeds.image_path[0]), "--model", str(bundle_path), "--seed", seed]) == 0
    assert json.loads(capsys.readouterr().out)["feature_dim"] == 64


def test_finetuning_from_the_pretrained_bundle(seed_table, capsys):
    pretrained = LesionPretrainer(_config(seed_table, "pre", run__epochs=1))
    pretrained.fit()
    init = export_lesion_bundle(seed_table / "pre" / "last.pt", seed_table / "pre.zip")
    config = _config(seed_table, "tune", run__epochs=4, optim__name="sgd", optim__lr=0.5, model__init_bundle=str(init))
    tuner = LesionFinetuner(config)
    # Its cache holds the lesion's region alone (no background regions), the same region the pretrainer cut.
    assert np.load(tuner.cache[0]).shape == (1, 70, 70, 70)
    np.testing.assert_array_equal(np.load(tuner.cache[0])[0], np.load(pretrained.cache[0])[0])
    torch.testing.assert_close(tuner.model.encoder.trunk.conv1.weight, load_bundle(init).encoder.trunk.conv1.weight)
    history = tuner.fit()
    assert len(history) == 4 * 2 and "accuracy" in history[0]
    bundle = load_bundle(export_lesion_bundle(seed_table / "tune" / "last.pt", seed_table / "tuned.zip"))
    assert bundle.labels == ["cystic", "dense"] and bundle.manifest.task == "multiclass"
    assert train_main(["lesion-finetune", "--config", str(seed_table / "tune.yaml"), "--check"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["name"] == "sgd"


# --------------------------------------------------------------------------------------------- DDP
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model():
    torch.manual_seed(0)
    return SimCLRModel(TINY, 32, 16)


def _views():
    g = torch.Generator().manual_seed(3)
    return [torch.rand(4, 1, 50, 50, 50, generator=g) for _ in range(4)]


def _ddp_worker(rank, world, port, loss_name, out):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = DistributedDataParallel(_model())
    half = slice(rank * 2, rank * 2 + 2)
    z1, z2, b1, b2 = model(*(v[half] for v in _views()))
    loss = nt_xent(z1, z2, 0.1) if loss_name == "ntxent" else fmcib_background_loss(z1, z2, b1, b2, 0.1)
    loss.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    if rank == 0:
        torch.save({"loss": mean / world, "grads": {n: p.grad for n, p in model.module.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["ntxent", "fmcib"])
def test_two_process_ddp_equals_one_process(tmp_path, loss_name):
    out = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), loss_name, str(out)), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    model = _model()
    z1, z2, b1, b2 = model(*_views())
    loss = nt_xent(z1, z2, 0.1) if loss_name == "ntxent" else fmcib_background_loss(z1, z2, b1, b2, 0.1)
    loss.backward()
    assert distributed["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(distributed["grads"][name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_shipped_lesion_configs_validate():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "training" / "configs"
    pretrain = load_config(folder / "lesion_simclr.yaml", model=LesionPretrainConfig)
    assert pretrain.method.temperature == 0.1 and pretrain.model.hidden_dim == 2048
    assert pretrain.model.projection_dim == 128 and pretrain.optim.name == "lars"
    finetune = load_config(folder / "lesion_finetune.yaml", model=LesionPretrainConfig)
    assert finetune.model.init_bundle is not None and finetune.data.margin == 10
