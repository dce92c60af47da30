"""CLEAR engine: CT input, preprocessing, models, bundles and inference. Never imports qt or slicer."""

__version__ = "0.1.0"
