"""The shared input pipeline: built-in offline sets, TFDS, user arrays; transfer sets; batches."""

from kdjax.data.pipeline import (
    TrainBatches,
    TransferSet,
    epoch_order,
    eval_batches,
    jitter_images,
    make_transfer_set,
    prefetch,
)
from kdjax.data.sources import BUILTIN, BUILTIN_DESCRIPTIONS, Dataset, load, standardize, stratified_split

__all__ = ["BUILTIN", "BUILTIN_DESCRIPTIONS", "Dataset", "TrainBatches", "TransferSet", "epoch_order",
           "eval_batches", "jitter_images", "load", "make_transfer_set", "prefetch", "standardize",
           "stratified_split"]
