"""The shared input pipeline: built-in offline sets, TFDS, user arrays; transfer sets; batches."""

from kdjax.data.pipeline import (
    ClassBalancedBatches,
    TrainBatches,
    TransferSet,
    epoch_order,
    eval_batches,
    jitter_images,
    make_transfer_set,
    prefetch,
)
from kdjax.data.sources import (
    BUILTIN,
    BUILTIN_DESCRIPTIONS,
    Dataset,
    SubsetSplit,
    hold_out_classes,
    keep_classes,
    load,
    standardize,
    stratified_split,
    with_test_split,
)

__all__ = ["BUILTIN", "BUILTIN_DESCRIPTIONS", "ClassBalancedBatches", "Dataset", "SubsetSplit", "TrainBatches",
           "TransferSet", "epoch_order", "eval_batches", "hold_out_classes", "jitter_images", "keep_classes", "load",
           "make_transfer_set", "prefetch", "standardize", "stratified_split", "with_test_split"]
