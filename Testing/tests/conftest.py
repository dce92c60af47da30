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


@pytest.fixture(autouse=True)
def _engine_logs(caplog):
    caplog.set_level(logging.INFO, logger="CLEARLib")
