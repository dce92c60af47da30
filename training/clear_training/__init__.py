"""CLEAR training: pretraining, feature extraction, MIL, probes and export (filled stage by stage)."""

__version__ = "0.1.0"
