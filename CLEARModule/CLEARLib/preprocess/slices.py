"""Slice instances for 2D encoders: every axial slice under every window, made lazily batch by batch.

An instance is one slice seen through one HU window, resized to the encoder's input size with
antialiasing, replicated to 3 channels and normalised with the encoder's mean and std. Instances are
ordered slice-major (slice 0 under each window, then slice 1, ...). Only the slices of the current
batch are ever converted to float, so a 700-slice CT is never one float tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..io.volume import CTVolume


@dataclass(frozen=True)
class Window:
    """An HU window: values below `low` map to 0, above `high` to 1, linearly between."""

    name: str
    low: float
    high: float

    def __post_init__(self):
        if not self.high > self.low:
            raise ValueError(f"window {self.name!r}: high ({self.high}) must exceed low ({self.low})")


WINDOWS = {
    "abdomen": Window("abdomen", -175.0, 275.0),
    "lung": Window("lung", -1500.0, 500.0),
}


def resolve_window(spec) -> Window:
    """A preset name, a `Window`, a (name, low, high) triple or a "name:low:high" string."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        if spec in WINDOWS:
            return WINDOWS[spec]
        parts = spec.split(":")
        if len(parts) == 3:
            try:
                return Window(parts[0], float(parts[1]), float(parts[2]))
            except ValueError:
                pass
        raise ValueError(f"unknown window {spec!r}: use one of {sorted(WINDOWS)} or 'name:low:high'")
    if isinstance(spec, Sequence) and len(spec) == 3:
        return Window(str(spec[0]), float(spec[1]), float(spec[2]))
    raise ValueError(f"cannot read a window from {spec!r}")


def resolve_windows(specs: Iterable) -> tuple[Window, ...]:
    windows = tuple(resolve_window(s) for s in specs)
    names = [w.name for w in windows]
    if not windows or len(set(names)) != len(names):
        raise ValueError(f"windows must be a non-empty list with distinct names, got {names}")
    return windows


@dataclass(frozen=True)
class InputSpec:
    """What an encoder expects: square size, channel count, and per-channel mean and std."""

    size: int = 224
    channels: int = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)

    def __post_init__(self):
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean and std need {self.channels} values each")
        if self.size < 8 or min(self.std) <= 0:
            raise ValueError("input size must be at least 8 and std positive")

    def to_dict(self) -> dict:
        return {"size": self.size, "channels": self.channels, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> InputSpec:
        return cls(
            size=int(data["size"]),
            channels=int(data.get("channels", 3)),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )


@dataclass
class InstanceBatch:
    pixels: torch.Tensor  # [B, C, size, size] float32, normalised
    instance_index: np.ndarray  # [B] position in the case's instance order
    slice_index: np.ndarray  # [B]
    window: np.ndarray  # [B] window names
    z_mm: np.ndarray  # [B] S coordinate of the slice centre


class SliceInstances:
    """The instances (slices x windows) of one volume, produced batch by batch on `device`."""

    def __init__(
        self,
        volume: CTVolume,
        windows: Iterable = ("abdomen", "lung"),
        spec: InputSpec | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.volume = volume
        self.windows = resolve_windows(windows)
        self.spec = spec or InputSpec()
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self._z_mm = volume.slice_positions_mm
        n_w = len(self.windows)
        self._bounds = torch.tensor([[w.low, w.high] for w in self.windows], dtype=torch.float32)
        self._mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self._std = torch.tensor(self.spec.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._window_names = np.array([w.name for w in self.windows])
        self._n = volume.shape[0] * n_w

    def __len__(self) -> int:
        return self._n

    def table(self) -> dict[str, np.ndarray]:
        """slice_index, window and z_mm of every instance, in instance order (no pixels)."""
        idx = np.arange(self._n)
        n_w = len(self.windows)
        return {
            "slice_index": idx // n_w,
            "window": self._window_names[idx % n_w],
            "z_mm": self._z_mm[idx // n_w],
        }

    def batch(self, start: int, stop: int) -> InstanceBatch:
        if not 0 <= start < stop <= self._n:
            raise IndexError(f"instance range [{start}, {stop}) outside [0, {self._n})")
        n_w = len(self.windows)
        first_slice, last_slice = start // n_w, (stop - 1) // n_w
        # int16 slices go to the device as they are; float conversion happens there, per batch.
        raw = torch.from_numpy(np.ascontiguousarray(self.volume.hu[first_slice : last_slice + 1]))
        hu = raw.to(self.device, non_blocking=True).float()  # [S, Y, X]
        bounds = self._bounds.to(self.device)
        low, high = bounds[:, 0].view(1, -1, 1, 1), bounds[:, 1].view(1, -1, 1, 1)
        windowed = ((hu.unsqueeze(1).clamp(low, high) - low) / (high - low)).flatten(0, 1)  # [S*W, Y, X]
        windowed = windowed[start - first_slice * n_w : stop - first_slice * n_w].unsqueeze(1)
        size = self.spec.size
        if windowed.shape[-2:] != (size, size):
            windowed = F.interpolate(windowed, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        pixels = (windowed.expand(-1, self.spec.channels, -1, -1) - self._mean.to(self.device)) / self._std.to(
            self.device
        )
        idx = np.arange(start, stop)
        return InstanceBatch(
            pixels=pixels.contiguous(),
            instance_index=idx,
            slice_index=idx // n_w,
            window=self._window_names[idx % n_w],
            z_mm=self._z_mm[idx // n_w],
        )

    def __iter__(self) -> Iterator[InstanceBatch]:
        for start in range(0, self._n, self.batch_size):
            yield self.batch(start, min(start + self.batch_size, self._n))
