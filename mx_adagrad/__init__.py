"""mx_adagrad: MXNet's AdaGrad as exact, composable, fused Optax gradient transformations."""

from mx_adagrad import bags, contrib, flat, legacy, lr_scheduler, mxnet_io, sparse
from mx_adagrad.alias import adagrad, rowwise_adagrad
from mx_adagrad.bags import BagGrad, Bags, embedding_bag, value_and_bag_grad
from mx_adagrad.compat import AdaGrad
from mx_adagrad.precision import MultiPrecisionState, multi_precision
from mx_adagrad.sparse import RowSparse, check_indices, value_and_row_grad
from mx_adagrad.transforms import (
    ScaleByAdagradState,
    ScaleByRowwiseAdagradState,
    ScaleByScheduleState,
    add_decayed_weights,
    clip,
    rescale,
    scale_by_adagrad,
    scale_by_rowwise_adagrad,
    scale_by_schedule,
)
from mx_adagrad.updates import apply_updates

__version__ = "0.1.0"

__all__ = [
    "AdaGrad",
    "BagGrad",
    "Bags",
    "MultiPrecisionState",
    "RowSparse",
    "ScaleByAdagradState",
    "ScaleByRowwiseAdagradState",
    "ScaleByScheduleState",
    "adagrad",
    "add_decayed_weights",
    "apply_updates",
    "bags",
    "check_indices",
    "clip",
    "contrib",
    "embedding_bag",
    "flat",
    "legacy",
    "lr_scheduler",
    "multi_precision",
    "mxnet_io",
    "rescale",
    "rowwise_adagrad",
    "scale_by_adagrad",
    "scale_by_rowwise_adagrad",
    "scale_by_schedule",
    "sparse",
    "value_and_bag_grad",
    "value_and_row_grad",
]
