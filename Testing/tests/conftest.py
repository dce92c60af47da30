import logging

import pytest

from CLEARLib.phantom import Lesion, make_phantom


@pytest.fixture(scope="session")
def phantom():
    """A small canonical phantom with distinct axis lengths and spacings, so that axis mix-ups show."""
    volume, lesions = make_phantom(shape_zyx=(24, 40, 48), spacing_xyz=(4.0, 3.5, 5.0), seed=1)
    return volume, lesions


@pytest.fixture(scope="session")
def big_lesion_phantom():
    """Anisotropic phantom with one large lesion off-centre, for seed and patch tests."""
    lesion = Lesion("liver", (-30.0, 12.0, -18.0), 14.0, 150)
    volume, lesions = make_phantom(
        shape_zyx=(40, 96, 112), spacing_xyz=(1.2, 1.1, 2.5), lesions=[lesion], noise_hu=0.0, seed=2
    )
    return volume, lesions[0]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches (downloaded bundles, exported ONNX encoders) go to a temporary folder, never the user's home."""
    import os

    previous = os.environ.get("CLEAR_CACHE")
    os.environ["CLEAR_CACHE"] = str(tmp_path_factory.mktemp("clear-cache"))
    yield
    if previous is None:
        os.environ.pop("CLEAR_CACHE", None)
    else:
        os.environ["CLEAR_CACHE"] = previous


@pytest.fixture(autouse=True)
def _engine_logs(caplog):
    caplog.set_level(logging.INFO, logger="CLEARLib")


TINY_MAMBAOUT = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)}
TINY_LESION = {"layers": (1, 1, 1, 1), "block_inplanes": (4, 8, 8, 16), "widen_factor": 1.0}


@pytest.fixture(scope="session")
def tiny_case_bundle(tmp_path_factory):
    """A small but real case bundle: MambaOut (1 block per stage) at 32 px, ABMIL with 3 labels."""
    return _tiny_case_bundle(tmp_path_factory.mktemp("bundles") / "case.zip", per_label_attention=False)


@pytest.fixture(scope="session")
def tiny_per_label_bundle(tmp_path_factory):
    """The tiny case bundle's encoder under an ABMIL with one attention per label."""
    return _tiny_case_bundle(tmp_path_factory.mktemp("bundles") / "per-label.zip", per_label_attention=True)


def _tiny_case_bundle(path, per_label_attention: bool):
    import torch

    from CLEARLib.bundle import save_bundle
    from CLEARLib.models import ABMIL, create_encoder
    from CLEARLib.preprocess import InputSpec

    torch.manual_seed(0)
    encoder = create_encoder("mambaout_femto", **TINY_MAMBAOUT)
    head = ABMIL(encoder.num_features, 3, hidden_dim=32, attention_dim=16, per_label_attention=per_label_attention)
    return save_bundle(
        path,
        name="tiny-per-label" if per_label_attention else "tiny-case",
        kind="case",
        encoder=encoder,
        head=head,
        labels=["liver", "lung", "bone"],
        task="multilabel",
        windows=["abdomen", "lung"],
        input_spec=InputSpec(size=32),
    )


@pytest.fixture(scope="session")
def tiny_lesion_bundle(tmp_path_factory):
    import torch

    from CLEARLib.bundle import save_bundle
    from CLEARLib.models import LinearHead, create_encoder

    torch.manual_seed(0)
    encoder = create_encoder("fmcib_resnet50", **TINY_LESION)
    head = LinearHead(encoder.num_features, 2)
    path = tmp_path_factory.mktemp("bundles") / "lesion"
    return save_bundle(
        path,
        name="tiny-lesion",
        kind="lesion",
        encoder=encoder,
        head=head,
        labels=["benign", "malignant"],
        task="multiclass",
    )
