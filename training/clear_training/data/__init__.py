"""Pretraining data: DeepLesion and generic CT into a memory-mapped slice store (the readers are CLEARLib.io's)."""

from .ct import prepare_ct
from .deeplesion import prepare_deeplesion, read_dl_info
from .store import SliceRecord, SliceStore, SliceStoreWriter

__all__ = [
    "SliceRecord",
    "SliceStore",
    "SliceStoreWriter",
    "prepare_ct",
    "prepare_deeplesion",
    "read_dl_info",
]
