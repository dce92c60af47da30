"""Bundles: round trips, every rejection, and the converters on checkpoints built in their source layouts."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile

import numpy as np
import pytest
import torch
from conftest import TINY_MAMBAOUT
from safetensors.torch import load_file, save_file

from CLEARLib.bundle import load_bundle, manifest_schema, read_manifest, save_bundle
from CLEARLib.bundle.convert import convert_fmcib, convert_moco
from CLEARLib.errors import CLEARInputError
from CLEARLib.models import ABMIL, create_encoder


def _unzip(bundle_zip, folder):
    with zipfile.ZipFile(bundle_zip) as zf:
        zf.extractall(folder)
    return folder


def _rewrite_weights(folder, edit):
    """Apply `edit` to the tensors of an unzipped bundle and fix the checksum, so only `edit` is wrong."""
    weights = folder / "weights.safetensors"
    tensors = edit(load_file(weights))
    save_file(tensors, weights)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["weights"]["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder, edit):
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_round_trip_zip_and_folder(tmp_path, tiny_case_bundle):
    bundle = load_bundle(tiny_case_bundle)
    assert bundle.kind == "case" and bundle.labels == ["liver", "lung", "bone"]
    assert [w.name for w in bundle.windows] == ["abdomen", "lung"] and bundle.input_spec.size == 32
    assert not bundle.encoder.training and not bundle.head.training
    folder = save_bundle(
        tmp_path / "copy",
        name="copy",
        kind="case",
        encoder=bundle.encoder,
        head=bundle.head,
        labels=bundle.labels,
        task="multilabel",
        windows=bundle.windows,
        input_spec=bundle.input_spec,
        metrics={"auroc": 0.9},
    )
    copy = load_bundle(folder)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(copy.encoder(x), bundle.encoder(x))
        features = torch.randn(9, bundle.manifest.encoder.feature_dim)
        torch.testing.assert_close(copy.head(features)[0], bundle.head(features)[0])
    assert copy.manifest.encoder.weights_sha256 == bundle.manifest.encoder.weights_sha256
    assert copy.manifest.metrics == {"auroc": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no temporary left behind
    assert "properties" in manifest_schema()


def test_zip_with_a_top_folder_loads(tmp_path, tiny_case_bundle):
    inner = _unzip(tiny_case_bundle, tmp_path / "x" / "my-model")
    archive = shutil.make_archive(str(tmp_path / "nested"), "zip", root_dir=tmp_path / "x")
    assert load_bundle(archive).manifest.name == "tiny-case"
    assert inner.exists()


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: {k: v for k, v in t.items() if k != "head.attention_w.weight"},
            "head weights do not fit the model: missing: attention_w.weight",
        ),
        (lambda t: {**t, "encoder.extra.weight": torch.zeros(2)}, "unexpected: extra.weight"),
        (
            lambda t: {**t, "head.attention_w.weight": torch.zeros(1, 99)},
            r"shape mismatch: attention_w.weight \(1, 99\)",
        ),
        (lambda t: {**t, "stray": torch.zeros(1)}, "outside encoder.\\* and head.\\*: stray"),
    ],
    ids=["missing", "unexpected", "shape", "stray"],
)
def test_weight_mismatches_are_named(tmp_path, tiny_case_bundle, edit, message):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    _rewrite_weights(folder, edit)
    with pytest.raises(CLEARInputError, match=message):
        load_bundle(folder)


def test_checksum_mismatch(tmp_path, tiny_case_bundle):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CLEARInputError, match="checksum mismatch for weights.safetensors"):
        load_bundle(folder)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path, tiny_case_bundle):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.write(folder / "manifest.json", "manifest.json")
        zf.writestr("weights.safetensors", bytes(64 << 20))  # 64 MiB of zeros in about 64 KiB
    with pytest.raises(CLEARInputError, match=r"bomb.zip: weights.safetensors would inflate to 67108864 bytes"):
        load_bundle(bomb)


def test_a_deeply_nested_manifest_is_refused(tmp_path, tiny_case_bundle):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    (folder / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CLEARInputError, match="manifest.json nests too deeply"):
        load_bundle(folder)


def test_a_weights_file_that_never_ends_is_refused(tmp_path, tiny_case_bundle):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    (folder / "weights.safetensors").unlink()
    (folder / "weights.safetensors").symlink_to("/dev/zero")
    with pytest.raises(CLEARInputError, match="weights.safetensors is missing from the bundle"):
        load_bundle(folder)


def test_altered_or_non_finite_weights_are_refused(tmp_path, tiny_case_bundle):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["encoder"]["weights_sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CLEARInputError, match="do not match the manifest's encoder.weights_sha256"):
        load_bundle(folder)
    bundle = load_bundle(tiny_case_bundle)
    with torch.no_grad():
        next(bundle.head.parameters()).view(-1)[:3] = float("nan")
    broken = save_bundle(tmp_path / "nan.zip", name="nan", kind="case", encoder=bundle.encoder, head=bundle.head,
                         labels=bundle.labels, task=bundle.manifest.task, windows=["abdomen", "lung"])  # fmt: skip
    with pytest.raises(CLEARInputError, match=r"nan.zip: tensor head\..* has 3 non-finite values"):
        load_bundle(broken)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda m: m.update(schema_version=2), "unknown bundle schema_version 2"),
        (lambda m: m.update(labels=["liver", "lung"]), "head has 3 outputs"),
        (lambda m: m.update(kind="lesion"), "lesion"),
        (lambda m: m["encoder"].update(architecture="resnet9000"), "unknown encoder 'resnet9000'"),
        (lambda m: m["encoder"].update(feature_dim=33), "encoder gives 32 features, manifest says 33"),
        (lambda m: m.update(surprise=1), "surprise: Extra inputs are not permitted"),
        (lambda m: m["weights"].update(file="../../etc/passwd"), "weights.file: String should match pattern"),
        (
            lambda m: m["encoder"]["kwargs"].update(checkpoint_path="/etc/passwd"),
            r"of mambaout_femto do not build the model: .*does not take \['checkpoint_path'\]",
        ),
        (lambda m: m["weights"].update(file="other.safetensors"), "other.safetensors is missing"),
        (lambda m: m["preprocessing"]["windows"][0].update(low=900), r"low \(900.0\) must be below high"),
        (lambda m: m["encoder"]["input"].update(mean=[0.5]), "mean and std need 3 values each"),
        (lambda m: m["head"]["kwargs"].update(bogus=1), "do not build the model: .*bogus"),
        (lambda m: m["head"]["kwargs"].update(hidden_dim=10**6), r"build \d+ values but the weights file holds"),
        (lambda m: m["encoder"]["kwargs"].update(dims=[8000, 16000, 24000, 32000]), r"build \d+ values but"),
    ],
    ids=[
        "schema",
        "labels",
        "kind",
        "arch",
        "dim",
        "extra",
        "outside",
        "timm-file",
        "file",
        "window",
        "mean",
        "head-kwarg",
        "head-bomb",
        "encoder-bomb",
    ],  # fmt: skip
)
def test_manifest_problems_are_named(tmp_path, tiny_case_bundle, edit, message):
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    _edit_manifest(folder, edit)
    with pytest.raises(CLEARInputError, match=message) as info:
        load_bundle(folder)
    assert str(folder) in str(info.value)


class _Boobytrap:
    def __reduce__(self):
        return (open, ("/tmp/clear-unpickled-marker", "w"))


def test_pickles_are_never_unpickled(tmp_path, tiny_case_bundle):
    marker = __import__("pathlib").Path("/tmp/clear-unpickled-marker")
    marker.unlink(missing_ok=True)
    folder = _unzip(tiny_case_bundle, tmp_path / "b")
    (folder / "weights.safetensors").write_bytes(pickle.dumps({"w": _Boobytrap()}))
    _edit_manifest(
        folder,
        lambda m: m["weights"].update(sha256=hashlib.sha256((folder / "weights.safetensors").read_bytes()).hexdigest()),
    )
    with pytest.raises(CLEARInputError, match="not a valid safetensors file"):
        load_bundle(folder)
    checkpoint = tmp_path / "evil.torch"
    torch.save({"trunk_state_dict": {"w": _Boobytrap()}}, checkpoint)
    with pytest.raises(CLEARInputError, match="weights_only=True"):
        convert_fmcib(checkpoint, tmp_path / "out")
    assert not marker.exists()


def test_not_a_bundle(tmp_path):
    junk = tmp_path / "model.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CLEARInputError, match="a bundle is a folder or a .zip"):
        load_bundle(junk)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CLEARInputError, match="no manifest.json"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(CLEARInputError, match="no such bundle"):
        load_bundle(tmp_path / "missing.zip")


def test_save_refuses_inconsistent_bundles(tmp_path):
    encoder = create_encoder("mambaout_femto", **TINY_MAMBAOUT)
    with pytest.raises(ValueError, match="not for a lesion bundle"):
        save_bundle(tmp_path / "x", name="x", kind="lesion", encoder=encoder)
    with pytest.raises(Exception, match="head has 2 outputs"):
        save_bundle(
            tmp_path / "y",
            name="y",
            kind="case",
            encoder=encoder,
            head=ABMIL(encoder.num_features, 2),
            labels=["a", "b", "c"],
            task="multilabel",
            windows=["lung"],
        )


# ------------------------------------------------------------------------------------ converters
def _monai_fmcib_trunk():
    from monai.networks.nets import resnet50

    torch.manual_seed(3)
    return resnet50(n_input_channels=1, widen_factor=2, conv1_t_stride=2, feed_forward=False, bias_downsample=True)


@pytest.fixture(scope="module")
def fmcib_trunk():
    return _monai_fmcib_trunk().eval()


@pytest.mark.parametrize("layout", ["trunk_state_dict", "lightning_state_dict"])
def test_convert_fmcib_matches_every_key(tmp_path, fmcib_trunk, layout):
    state = fmcib_trunk.state_dict()
    if layout == "trunk_state_dict":
        checkpoint = {"trunk_state_dict": state}
    else:  # a training checkpoint: model.trunk.* plus heads and optimiser state that must be ignored
        checkpoint = {
            "state_dict": {**{f"model.trunk.{k}": v for k, v in state.items()}, "model.heads.0.weight": torch.zeros(3)},
            "epoch": 10,
        }
    torch.save(checkpoint, tmp_path / "model_weights.torch")
    bundle = load_bundle(convert_fmcib(tmp_path / "model_weights.torch", tmp_path / "fmcib.zip"))
    assert bundle.kind == "lesion" and bundle.head is None
    assert bundle.manifest.encoder.feature_dim == 4096
    x = torch.rand(1, 1, 50, 50, 50)
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), fmcib_trunk(x))


def test_convert_fmcib_is_strict(tmp_path, fmcib_trunk):
    state = dict(fmcib_trunk.state_dict())
    state.pop("layer4.2.bn3.weight")
    state["fc.weight"] = torch.zeros(1, 4096)
    torch.save({"trunk_state_dict": state}, tmp_path / "w.torch")
    with pytest.raises(CLEARInputError, match=r"missing: layer4.2.bn3.weight; unexpected: fc.weight"):
        convert_fmcib(tmp_path / "w.torch", tmp_path / "out")
    torch.save({"something": 1}, tmp_path / "other.torch")
    with pytest.raises(CLEARInputError, match="neither 'trunk_state_dict' nor 'state_dict'"):
        convert_fmcib(tmp_path / "other.torch", tmp_path / "out")


def _moco_checkpoint(source_state: dict, projector_keys: dict) -> dict:
    """MoCo v3's layout: module.base_encoder.* (with the projector as head), momentum encoder, predictor."""
    state = {}
    for k, v in {**source_state, **projector_keys}.items():
        state[f"module.base_encoder.{k}"] = v
        state[f"module.momentum_encoder.{k}"] = v + 1
    state["module.predictor.0.weight"] = torch.zeros(4, 4)
    return {"epoch": 100, "arch": "x", "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def test_convert_moco_vit(tmp_path):
    source = create_encoder("vit_conv_small", img_size=32, depth=2).eval()
    timm_state = source.model.state_dict()  # timm names, as MoCo v3 saves them
    projector = {"head.0.weight": torch.randn(16, 384), "head.1.running_mean": torch.zeros(16)}
    torch.save(_moco_checkpoint(timm_state, projector), tmp_path / "checkpoint_0099.pth.tar")
    out = convert_moco(
        tmp_path / "checkpoint_0099.pth.tar",
        tmp_path / "vit.zip",
        "vit_conv_small",
        input_size=32,
        encoder_kwargs={"depth": 2},
    )
    bundle = load_bundle(out)
    assert bundle.head is None and bundle.input_spec.size == 32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), source(x))


def test_convert_moco_mambaout_keeps_head_norm_and_drops_projector(tmp_path):
    source = create_encoder("mambaout_femto", **TINY_MAMBAOUT).eval()
    with torch.no_grad():
        source.model.head.norm.weight.normal_()
    timm_state = source.model.state_dict()
    assert "head.norm.weight" in timm_state
    projector = {"head.fc.0.weight": torch.randn(8, 32), "head.pre_logits.fc.weight": torch.randn(128, 32)}
    torch.save(_moco_checkpoint(timm_state, projector), tmp_path / "ckpt.pth")
    bundle = load_bundle(
        convert_moco(tmp_path / "ckpt.pth", tmp_path / "m", "mambaout_femto", encoder_kwargs=TINY_MAMBAOUT)
    )
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), source(x))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(1)}}, tmp_path / "bad.pth")
    with pytest.raises(CLEARInputError, match="no 'module.base_encoder"):
        convert_moco(tmp_path / "bad.pth", tmp_path / "n", "mambaout_femto")


def test_encoder_hash_identifies_weights(tiny_case_bundle, tmp_path):
    bundle = load_bundle(tiny_case_bundle)
    with torch.no_grad():
        bundle.encoder.model.head.norm.bias.add_(1e-3)
    changed = save_bundle(
        tmp_path / "c",
        name="c",
        kind="case",
        encoder=bundle.encoder,
        windows=["lung"],
        input_spec=bundle.input_spec,
    )
    assert read_manifest(changed).encoder.weights_sha256 != read_manifest(tiny_case_bundle).encoder.weights_sha256
    assert np.isfinite(bundle.manifest.encoder.feature_dim)


# --------------------------------------------------------------------------- MambaOut (timm, original)
def _timm_mambaout_with_classifier():
    """A real timm MambaOut with its ImageNet-style MLP classifier, as timm's pretrained files hold it."""
    import timm

    torch.manual_seed(4)
    return timm.create_model("mambaout_femto", pretrained=False, num_classes=10, **TINY_MAMBAOUT).eval()


def _original_layout(state: dict) -> dict:
    """timm's names back to the MambaOut repository's (the inverse of timm's checkpoint filter)."""
    import re

    out = {}
    for k, v in state.items():
        if k.startswith("head.norm."):
            k = k.replace("head.norm.", "norm.")
        k = k.replace("head.pre_logits.fc.", "head.fc1.").replace("head.pre_logits.norm.", "head.norm.")
        k = k.replace("head.fc.", "head.fc2.").replace("stem.", "downsample_layers.0.")
        k = re.sub(r"stages\.([0-9]+)\.downsample", r"downsample_layers.\1", k)
        k = re.sub(r"stages\.([0-9]+)\.blocks\.([0-9]+)", r"stages.\1.\2", k)
        out[k] = v
    return out


@pytest.mark.parametrize("layout", ["timm safetensors", "original checkpoint"])
def test_convert_mambaout_imagenet_weights(tmp_path, layout):
    from CLEARLib.bundle.convert import convert_mambaout

    model = _timm_mambaout_with_classifier()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if layout == "timm safetensors":
        source = tmp_path / "model.safetensors"
        save_file(state, source)
    else:
        original = _original_layout(state)
        assert "downsample_layers.0.conv1.weight" in original and "stem.conv1.weight" not in original
        source = tmp_path / "mambaout_femto.pth"
        torch.save({"model": _original_layout(state)}, source)
    path = convert_mambaout(source, tmp_path / "in1k.zip", "mambaout_femto", encoder_kwargs=TINY_MAMBAOUT)
    bundle = load_bundle(path)
    manifest = bundle.manifest
    assert manifest.kind == "case" and bundle.head is None
    assert manifest.provenance["dropped_classifier_keys"] == sorted(
        k for k in state if k.startswith(("head.pre_logits.", "head.fc."))
    )
    assert manifest.provenance["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert bundle.input_spec.mean == (0.485, 0.456, 0.406)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model.head.norm(model.forward_features(x).mean(dim=(1, 2)))  # pooled, normed features
        torch.testing.assert_close(bundle.encoder(x), expected)


def test_convert_mambaout_is_strict_beyond_the_classifier(tmp_path):
    from CLEARLib.bundle.convert import convert_mambaout

    state = {k: v.contiguous() for k, v in _timm_mambaout_with_classifier().state_dict().items()}
    del state["stages.1.blocks.0.norm.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CLEARInputError, match="missing: model.stages.1.blocks.0.norm.weight"):
        convert_mambaout(
            tmp_path / "model.safetensors", tmp_path / "b.zip", "mambaout_femto", encoder_kwargs=TINY_MAMBAOUT
        )
    with pytest.raises(CLEARInputError, match="not a MambaOut encoder"):
        convert_mambaout(tmp_path / "model.safetensors", tmp_path / "b.zip", "vit_conv_base")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CLEARInputError, match="not a valid safetensors file"):
        convert_mambaout(tmp_path / "broken.safetensors", tmp_path / "b.zip", "mambaout_femto")


# ------------------------------------------------------------------------------- VMamba (official)
def _official_vmamba_names(state: dict) -> dict:
    """CLEAR's VSSM names -> the official implementation's (MzeroMiko/VMamba `VSSM`): patch_embed.0 and
    .2 (conv, LayerNorm), layers.i.blocks.j, layers.i.downsample.1 and .3 (conv, LayerNorm), classifier.norm."""
    import re

    out = {}
    for k, v in state.items():
        k = k.removeprefix("model.")
        k = re.sub(r"^patch_norm\.", "patch_embed.2.", k)
        k = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"layers.\1.blocks.\2.", k)
        k = re.sub(r"^downsamples\.(\d+)\.conv\.", r"layers.\1.downsample.1.", k)
        k = re.sub(r"^downsamples\.(\d+)\.norm\.", r"layers.\1.downsample.3.", k)
        k = re.sub(r"^norm\.", "classifier.norm.", k)
        out[k] = v
    return out


def test_convert_official_vmamba_checkpoint(tmp_path):
    from CLEARLib.bundle.convert import convert_vmamba

    small = {"depths": (1, 2), "dims": (8, 16)}
    torch.manual_seed(2)
    source = create_encoder("vmamba_v2", **small).eval()
    official = _official_vmamba_names(source.state_dict())
    assert "layers.0.downsample.1.weight" in official and "classifier.norm.weight" in official
    assert "layers.1.blocks.1.mlp.fc2.weight" in official and "patch_embed.0.weight" in official
    official["classifier.head.weight"], official["classifier.head.bias"] = torch.randn(10, 16), torch.zeros(10)
    torch.save({"model": official}, tmp_path / "vssm.pth")
    bundle = load_bundle(convert_vmamba(tmp_path / "vssm.pth", tmp_path / "v.zip", encoder_kwargs=small))
    assert bundle.manifest.provenance["dropped_classifier_keys"] == ["classifier.head.bias", "classifier.head.weight"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(bundle.encoder(x), source(x))
    # Names of older checkpoints (patch_embed.proj/.norm, a top-level norm) are read too.
    legacy = {
        k.replace("patch_embed.0.", "patch_embed.proj.").replace("patch_embed.2.", "patch_embed.norm."): v
        for k, v in official.items()
    }
    legacy = {
        ("norm." + k[len("classifier.norm.") :] if k.startswith("classifier.norm.") else k): v
        for k, v in legacy.items()
    }
    torch.save(legacy, tmp_path / "legacy.pth")
    again = load_bundle(convert_vmamba(tmp_path / "legacy.pth", tmp_path / "l.zip", encoder_kwargs=small))
    with torch.no_grad():
        torch.testing.assert_close(again.encoder(x), source(x))
    # Strict beyond the classifier: a v0 checkpoint does not fit the v2 model.
    del official["layers.1.blocks.0.mlp.fc1.weight"]
    torch.save({"model": official}, tmp_path / "bad.pth")
    with pytest.raises(CLEARInputError, match="missing: model.stages.1.0.mlp.fc1.weight"):
        convert_vmamba(tmp_path / "bad.pth", tmp_path / "b.zip", encoder_kwargs=small)
