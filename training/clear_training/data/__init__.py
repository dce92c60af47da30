"""Pretraining data: DeepLesion and generic CT into a memory-mapped slice store."""

from .ct import prepare_ct, read_cohort
from .deeplesion import LESION_TYPES, prepare_deeplesion, read_dl_info
from .store import SliceRecord, SliceStore, SliceStoreWriter

__all__ = [
    "LESION_TYPES",
    "SliceRecord",
    "SliceStore",
    "SliceStoreWriter",
    "prepare_ct",
    "prepare_deeplesion",
    "read_cohort",
    "read_dl_info",
]
