"""Windows, lazy slice instances, and FMCIB lesion patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CLEARLib.errors import CLEARInputError
from CLEARLib.io import CTVolume
from CLEARLib.preprocess import (
    WINDOWS,
    InputSpec,
    SliceInstances,
    Window,
    extract_lesion_patch,
    fmcib_grid,
    fmcib_reference_patch,
    lesion_patch_centre,
    resolve_window,
    resolve_windows,
)

IDENTITY_SPEC = InputSpec(size=8, channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _ramp_volume(n_slices=5, size=8) -> CTVolume:
    """Slice k holds the HU values k*100 - 1600 + column*50: a known ramp through both windows."""
    hu = np.zeros((n_slices, size, size), np.int16)
    for k in range(n_slices):
        hu[k] = (k * 100 - 1600 + np.arange(size) * 50)[None, :]
    return CTVolume(hu, (1.0, 1.0, 2.0), np.array([0.0, 0.0, -10.0]), np.eye(3))


def test_window_presets_match_the_paper():
    assert WINDOWS["abdomen"] == Window("abdomen", -175.0, 275.0)
    assert WINDOWS["lung"] == Window("lung", -1500.0, 500.0)
    assert resolve_window("bone:-500:1300") == Window("bone", -500.0, 1300.0)
    assert resolve_window(("soft", -100, 200)) == Window("soft", -100.0, 200.0)
    with pytest.raises(ValueError, match="unknown window"):
        resolve_window("brain")
    with pytest.raises(ValueError, match="must exceed"):
        Window("x", 10, 10)
    with pytest.raises(ValueError, match="distinct names"):
        resolve_windows(["lung", "lung"])


def test_window_values_are_exact_without_resizing():
    volume = _ramp_volume()
    instances = SliceInstances(volume, windows=["abdomen", "lung"], spec=IDENTITY_SPEC, batch_size=100)
    batch = instances.batch(0, len(instances))
    assert batch.pixels.shape == (10, 3, 8, 8)
    for i in range(10):
        k, window = batch.slice_index[i], WINDOWS[batch.window[i]]
        expected = (np.clip(volume.hu[k].astype(np.float32), window.low, window.high) - window.low) / (
            window.high - window.low
        )
        for c in range(3):
            np.testing.assert_allclose(batch.pixels[i, c].numpy(), expected, atol=1e-6)
    # Known points: -175 HU is 0 and 275 HU is 1 in the abdomen window; 500 HU is 1 in the lung window.
    assert batch.pixels[batch.window == "abdomen"].min() == 0.0
    np.testing.assert_allclose(batch.pixels[9, 0, 0, 7].item(), (-1600 + 400 + 350 + 1500) / 2000)


def test_instance_order_and_table():
    volume = _ramp_volume(n_slices=4)
    instances = SliceInstances(volume, windows=["lung", "abdomen"], spec=IDENTITY_SPEC)
    table = instances.table()
    assert len(instances) == 8
    np.testing.assert_array_equal(table["slice_index"], [0, 0, 1, 1, 2, 2, 3, 3])
    assert list(table["window"]) == ["lung", "abdomen"] * 4
    np.testing.assert_allclose(table["z_mm"], np.repeat([-10.0, -8.0, -6.0, -4.0], 2))


def test_normalisation_uses_the_encoder_spec():
    volume = _ramp_volume()
    spec = InputSpec(size=8, channels=3, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    raw = SliceInstances(volume, windows=["lung"], spec=IDENTITY_SPEC).batch(0, 5).pixels
    normalised = SliceInstances(volume, windows=["lung"], spec=spec).batch(0, 5).pixels
    for c in range(3):
        torch.testing.assert_close(normalised[:, c], (raw[:, c] - spec.mean[c]) / spec.std[c])


def test_batches_concatenate_to_the_whole_case(phantom):
    volume, _ = phantom
    spec = InputSpec(size=32)
    whole = SliceInstances(volume, spec=spec, batch_size=10_000)
    chunked = SliceInstances(volume, spec=spec, batch_size=7)
    batches = list(chunked)
    assert [len(b.instance_index) for b in batches][:-1] == [7] * (len(batches) - 1)
    joined = torch.cat([b.pixels for b in batches])
    torch.testing.assert_close(joined, whole.batch(0, len(whole)).pixels)
    np.testing.assert_array_equal(np.concatenate([b.slice_index for b in batches]), whole.table()["slice_index"])


class _RecordingArray(np.ndarray):
    """An ndarray that records which slice ranges are read through indexing."""

    reads: list

    def __getitem__(self, item):
        if isinstance(item, slice):
            start, stop, _ = item.indices(self.shape[0])
            self.reads.append(stop - start)
        return super().__getitem__(item)


def test_instances_are_made_lazily_from_a_few_slices_at_a_time(phantom):
    volume, _ = phantom
    recorded = volume.hu.view(_RecordingArray)
    recorded.reads = []
    lazy = CTVolume(recorded, volume.spacing, volume.origin, volume.direction)
    instances = SliceInstances(lazy, windows=["abdomen", "lung"], spec=InputSpec(size=16), batch_size=6)
    n = sum(len(b.instance_index) for b in instances)
    assert n == 2 * volume.shape[0]
    assert recorded.reads and max(recorded.reads) <= 3 + 1, recorded.reads
    assert sum(recorded.reads) <= volume.shape[0] + len(recorded.reads)


def test_resize_is_antialiased():
    checker = np.where((np.indices((256, 256)).sum(0) % 2) == 0, 275, -175).astype(np.int16)
    volume = CTVolume(np.stack([checker] * 2), (0.5, 0.5, 1.0), np.zeros(3), np.eye(3))
    spec = InputSpec(size=50, mean=(0.0,) * 3, std=(1.0,) * 3)
    pixels = SliceInstances(volume, windows=["abdomen"], spec=spec).batch(0, 2).pixels
    assert pixels.shape == (2, 3, 50, 50)
    # A 1-pixel checkerboard averages to grey; without antialiasing bilinear sampling aliases it.
    assert abs(pixels.mean().item() - 0.5) < 0.02
    assert pixels.std().item() < 0.05


def test_bad_ranges_and_batch_sizes(phantom):
    volume, _ = phantom
    with pytest.raises(ValueError, match="batch_size"):
        SliceInstances(volume, batch_size=0)
    instances = SliceInstances(volume, spec=InputSpec(size=16))
    with pytest.raises(IndexError):
        instances.batch(0, len(instances) + 1)


# ------------------------------------------------------------------------------- lesion patches
def test_patch_shape_scale_and_centre(big_lesion_phantom):
    volume, lesion = big_lesion_phantom
    patch = extract_lesion_patch(volume, lesion.center_lps)
    assert patch.shape == (50, 50, 50) and patch.dtype == np.float32
    expected_centre = (lesion.hu + 1024) / 3072
    assert patch[25, 25, 25] == pytest.approx(expected_centre, abs=1e-5)
    # The patch starts 25 points before the seed's truncated index on FMCIB's 1 mm grid, so the seed
    # sits at 25 + the fractional part of its grid index.
    first_lps, _ = fmcib_grid(volume)
    grid_index_zyx = (np.asarray(lesion.center_lps) - first_lps)[::-1]
    seed_in_patch = 25 + grid_index_zyx - np.trunc(grid_index_zyx)
    lesion_mask = np.isclose(patch, expected_centre, atol=1e-4)
    lesion_mask[:, :, :] &= np.sum((np.indices(patch.shape) - 25) ** 2, axis=0) <= 20**2  # not bone edges
    np.testing.assert_allclose(np.argwhere(lesion_mask).mean(axis=0), seed_in_patch, atol=0.3)
    # Along each axis through the centre, the 1 mm points with the lesion's exact value are those between
    # its outermost source voxels (interpolation blurs the rest): floor(span) or floor(span) + 1 of
    # them, depending on where the grid falls. 2.5 mm slices make z shorter than x and y.
    z, y, x = np.rint(volume.lps_to_index(lesion.center_lps)).astype(int)
    source_lines = [volume.hu[:, y, x], volume.hu[z, :, x], volume.hu[z, y, :]]
    spans_mm = [(np.sum(line == lesion.hu) - 1) * volume.spacing[2 - a] for a, line in enumerate(source_lines)]
    diameters = [lesion_mask[:, 25, 25].sum(), lesion_mask[25, :, 25].sum(), lesion_mask[25, 25, :].sum()]
    for diameter, span in zip(diameters, spans_mm, strict=True):
        assert np.floor(span) <= diameter <= np.floor(span) + 1, (diameters, spans_mm)
    # Values stay within the phantom's HU range mapped by (HU + 1024) / 3072, without clipping.
    assert patch.min() >= (-1000 + 1024) / 3072 - 1e-6 and patch.max() <= (700 + 1024) / 3072 + 1e-6


def test_ras_seed_equals_lps_seed(big_lesion_phantom):
    volume, lesion = big_lesion_phantom
    lps = np.asarray(lesion.center_lps) + [0.3, -0.6, 1.1]
    ras = lps * [-1, -1, 1]
    np.testing.assert_array_equal(extract_lesion_patch(volume, ras, coord="RAS"), extract_lesion_patch(volume, lps))
    with pytest.raises(ValueError, match="coord must be"):
        extract_lesion_patch(volume, lps, coord="IJK")


def _raw_ct(direction, spacing=(0.57, 0.57, 2.5), shape_zyx=(30, 90, 100), seed=5) -> CTVolume:
    """A CT exactly as stored (not reoriented), random texture inside a 2-voxel shell of air.

    The air shell (-1024 HU, 0 after normalisation) is what real CT has around the body; with it, the
    value of points beyond the outermost voxel centres is -1024 HU in every recipe (MONAI's zero
    padding, ITK's edge value, CLEAR's fill), so patches can be compared right up to the border.
    """
    rng = np.random.default_rng(seed)
    hu = np.full(shape_zyx, -1024, np.int16)
    hu[2:-2, 2:-2, 2:-2] = rng.integers(-1000, 1500, size=np.array(shape_zyx) - 4)
    return CTVolume(hu, tuple(spacing), np.array([-35.3, 20.1, 100.2]), np.asarray(direction, float), {})


def _tilt(deg):
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]


RAW_DIRECTIONS = {
    "identity": np.eye(3),
    "flipped x and z": np.diag([-1.0, 1.0, -1.0]),
    "permuted (x along P, y along L)": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]],
    "tilted 0.6 degrees": _tilt(0.6),
}


@pytest.mark.parametrize("name", list(RAW_DIRECTIONS))
@pytest.mark.parametrize("border", ["centred", "fmcib"])
def test_roi_patch_equals_fmcib_recipe_through_monai(name, border):
    """CLEAR reorients the volume and samples only the patch; FMCIB's recipe (MONAI's Spacingd and
    Orientationd on the volume as stored) resamples everything: the patches must be the same."""
    raw = _raw_ct(RAW_DIRECTIONS[name])
    volume = CTVolume.from_array(raw.hu, raw.spacing, raw.origin, raw.direction)  # what read_ct gives
    rng = np.random.default_rng(1)
    shape = np.array(raw.shape, dtype=float)
    seeds = [raw.index_to_lps(rng.uniform([0, 0, 0], shape - 1)) for _ in range(4)]
    seeds.append(raw.index_to_lps([0.3, 0.2, 0.4]))  # next to a corner: clamping and padding
    for seed in seeds:
        ours = extract_lesion_patch(volume, seed, border=border)
        reference = fmcib_reference_patch(raw, seed, border=border)
        np.testing.assert_allclose(ours, reference, atol=1e-5, err_msg=f"{name}, seed {seed}")


def test_fmcib_grid_is_anchored_where_monai_puts_it():
    """For an ordinary axial CT the L and P points count back from the last column and row, and the
    S points up from the first slice; a grid anchored at the origin would be off by a fraction of a mm."""
    volume = _raw_ct(np.eye(3), spacing=(0.57, 0.57, 2.4))  # extents 56.43, 50.73, 69.6 mm: no .5 to round
    first, size = fmcib_grid(volume)
    nx, ny, nz = volume.shape[::-1]
    extent = (np.array([nx, ny, nz]) - 1) * np.array(volume.spacing)
    np.testing.assert_array_equal(size, np.round(extent + 1).astype(int))
    last_column_l = volume.origin[0] + (nx - 1) * 0.57
    last_row_p = volume.origin[1] + (ny - 1) * 0.57
    np.testing.assert_allclose(first[:2], [last_column_l - (size[0] - 1), last_row_p - (size[1] - 1)])
    assert first[2] == pytest.approx(volume.origin[2])
    assert abs(first[0] - volume.origin[0]) > 0.1  # the old origin-anchored grid was wrong here


def test_border_patch_stays_centred_by_default_and_fmcib_pads_symmetrically():
    volume = _raw_ct(np.eye(3))
    corner = volume.index_to_lps([0.2, 0.4, 0.3])  # next to the first voxel
    centred = extract_lesion_patch(volume, corner)
    # Everything before the grid's first point is outside: -1024 HU, i.e. exactly 0.
    first, _ = fmcib_grid(volume)
    start = np.trunc(corner - first).astype(int) - 25  # x, y, z
    assert np.all(centred[: -start[2]] == 0.0) and np.all(centred[:, : -start[1]] == 0.0)
    # FMCIB's code: the crop keeps only the grid part and pads it symmetrically, moving the seed.
    fmcib = extract_lesion_patch(volume, corner, border="fmcib")
    before = -start[::-1]  # z, y, x: points of the centred patch that lie before the grid
    assert np.all(before > 0)
    pad = before // 2  # MONAI SpatialPad(method="symmetric") puts floor(missing / 2) first
    np.testing.assert_array_equal(
        fmcib[pad[0] : pad[0] + 50 - before[0], pad[1] : pad[1] + 50 - before[1], pad[2] : pad[2] + 50 - before[2]],
        centred[before[0] :, before[1] :, before[2] :],
    )
    assert np.all(fmcib[: pad[0]] == 0.0) and np.all(fmcib[50 - (before[0] - pad[0]) :] == 0.0)
    with pytest.raises(ValueError, match="border must be"):
        extract_lesion_patch(volume, corner, border="reflect")


def test_patch_centre_for_the_roi_display():
    volume = _raw_ct(np.eye(3))
    seed = volume.index_to_lps([12.3, 40.6, 51.2])
    first, _ = fmcib_grid(volume)
    start = np.trunc(seed - first).astype(int) - 25
    np.testing.assert_allclose(lesion_patch_centre(volume, seed), first + start + 24.5)
    assert np.all(np.abs(lesion_patch_centre(volume, seed) - seed) <= 1.5)


def test_seed_outside_the_image_is_refused():
    volume = _raw_ct(np.eye(3))
    outside = volume.index_to_lps([-5.0, 10.0, 10.0])
    with pytest.raises(CLEARInputError, match="lies outside the image"):
        extract_lesion_patch(volume, outside)
    with pytest.raises(CLEARInputError, match="3 finite coordinates"):
        extract_lesion_patch(volume, [1.0, 2.0])
