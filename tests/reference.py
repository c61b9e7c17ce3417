"""Float64 NumPy transcriptions of the AdaGrad formulas: the reference every numeric test uses.

Nothing here imports mx_adagrad; each function is the formula as MXNet documents it, one line per
line of the documentation. Complex weights and gradients are computed in complex128 with a float64
history, by the rules of ``mx_adagrad.transforms`` (MXNet had no complex numbers): ``square(g)`` is
``|g|**2`` and ``clip`` bounds the modulus.
"""

from __future__ import annotations

import numpy as np


def as_float64(x) -> np.ndarray:
    """``x`` in float64, or complex128 if it is complex."""
    return np.asarray(x, np.complex128 if np.iscomplexobj(x) else np.float64)


def square(g):
    """``g**2``; for complex ``g`` the squared modulus, real."""
    return np.real(g * np.conj(g)) if np.iscomplexobj(g) else np.square(g)


def clip(g, bound):
    """MXNet's ``clip(g, -bound, bound)``; for complex ``g`` (finite) ``g * bound / |g|`` where
    ``|g| > bound``, so the modulus is at most ``bound`` and the phase is kept."""
    if not np.iscomplexobj(g):
        return np.clip(g, -bound, bound)
    modulus = np.abs(g)
    with np.errstate(divide="ignore"):  # |g| = 0: the factor is min(1, inf) = 1
        return g * np.minimum(1.0, bound / modulus)


def mxnet2_step(
    weight,
    grad,
    history,
    *,
    lr,
    epsilon=1e-6,
    rescale_grad=1.0,
    clip_gradient=None,
    wd=0.0,
):
    """One step of MXNet 2.0's ``AdaGrad`` (``mxnet.optimizer.adagrad``), in float64.

    grad = clip(grad * rescale_grad, clip_gradient) + wd * weight
    history += square(grad)
    weight -= learning_rate * grad / (sqrt(history) + epsilon)
    """
    weight, grad, history = (as_float64(x) for x in (weight, grad, history))
    grad = grad * rescale_grad
    if clip_gradient is not None:
        grad = clip(grad, clip_gradient)
    grad = grad + wd * weight
    history = history + square(grad)
    weight = weight - lr * grad / (np.sqrt(history) + epsilon)
    return weight, history


def mxnet2_run(weight, grads, *, lrs=None, lr=0.01, history=None, **hyper):
    """Runs :func:`mxnet2_step` over a sequence of gradients; returns the weight after each step."""
    history = np.zeros(np.shape(weight)) if history is None else history
    lrs = [lr] * len(grads) if lrs is None else lrs
    weights = []
    for grad, step_lr in zip(grads, lrs):
        weight, history = mxnet2_step(weight, grad, history, lr=step_lr, **hyper)
        weights.append(weight)
    return weights, history


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the error relative to the array's scale.

    Elementwise relative error is undefined where a weight crosses zero; this norm-wise form is
    what "relative error <= 1e-5" means throughout the tests. For complex arrays ``|.|`` is the
    modulus.
    """
    actual, expected = as_float64(actual), as_float64(expected)
    scale = max(np.max(np.abs(expected)), np.finfo(np.float64).tiny)
    return float(np.max(np.abs(actual - expected)) / scale)


def mxnet1_step(
    weight, grad, history, *, lr, eps=1e-7, rescale_grad=1.0, clip_gradient=None, wd=0.0
):
    """One step of MXNet 1.9.1's ``AdaGrad`` (``mxnet.optimizer.optimizer``), in float64.

    grad = clip(grad * rescale_grad, clip_gradient)
    history += square(grad)
    weight += (grad / sqrt(history + eps) + weight * wd) * -lr
    """
    weight, grad, history = (as_float64(x) for x in (weight, grad, history))
    grad = grad * rescale_grad
    if clip_gradient is not None:
        grad = clip(grad, clip_gradient)
    history = history + square(grad)
    weight = weight + (grad / np.sqrt(history + eps) + weight * wd) * -lr
    return weight, history


def rowwise_step(
    weight, grad, history, *, lr, epsilon=1e-6, rescale_grad=1.0, clip_gradient=None, wd=0.0
):
    """One step of row-wise AdaGrad (``mx_adagrad.rowwise_adagrad``), in float64.

    grad = clip(grad * rescale_grad, clip_gradient) + wd * weight
    history[r] += mean(square(grad[r]))          # over every axis but the first; per element
                                                 # for arrays of fewer than two axes
    weight[r] -= learning_rate * grad[r] / (sqrt(history[r]) + epsilon)
    """
    weight, grad, history = (as_float64(x) for x in (weight, grad, history))
    grad = grad * rescale_grad
    if clip_gradient is not None:
        grad = clip(grad, clip_gradient)
    grad = grad + wd * weight
    if grad.ndim < 2:
        history = history + square(grad)
        return weight - lr * grad / (np.sqrt(history) + epsilon), history
    history = history + square(grad).reshape(grad.shape[0], -1).mean(axis=1)
    root = (np.sqrt(history) + epsilon).reshape((-1,) + (1,) * (grad.ndim - 1))
    return weight - lr * grad / root, history


def group_adagrad_step(
    weight, grad, history, *, lr, eps=1e-5, rescale_grad=1.0, clip_gradient=None
):
    """One step of MXNet 1.x's ``contrib.GroupAdaGrad`` on a 2-D weight, in float64, as its
    Python source writes it (``mxnet/optimizer/contrib.py``)::

        grad = clip(grad * rescale_grad, clip_gradient)
        history += mean(square(grad), axis=1, keepdims=True)      # history: (rows, 1)
        weight -= lr * grad / sqrt(history + eps)
    """
    weight, grad, history = (as_float64(x) for x in (weight, grad, history))
    grad = grad * rescale_grad
    if clip_gradient is not None:
        grad = clip(grad, clip_gradient)
    history = history + np.mean(square(grad), axis=1, keepdims=True)
    return weight - lr * grad / np.sqrt(history + eps), history


def torchrec_rowwise_step(param, grad, state_sum, *, lr, eps, weight_decay=0.0):
    """One step of TorchRec's ``RowWiseAdagrad`` on a 2-D table, as published, in float64:

    grad = grad + weight_decay * param
    state_sum += grad.pow(2).mean(1)
    param -= lr * grad / (sqrt(state_sum) + eps)
    """
    param, grad, state_sum = (np.asarray(x, np.float64) for x in (param, grad, state_sum))
    grad = grad + weight_decay * param
    state_sum = state_sum + (grad**2).mean(1)
    param = param - lr * grad / (np.sqrt(state_sum) + eps)[:, None]
    return param, state_sum


def flat_bags(ids, offsets):
    """Bags as flat ids and offsets: ``(bags, length)`` ids (``offsets`` None) become their rows,
    bag ``b`` being ``ids[offsets[b]:offsets[b + 1]]``."""
    ids = np.asarray(ids)
    if offsets is None:
        bags, length = ids.shape
        return ids.reshape(-1), np.arange(bags + 1) * length
    return ids, np.asarray(offsets)


def bag_terms(ids, offsets, weights, mode, num_rows):
    """The bag of each id and its factor, in float64 (``ids`` flat or ``(bags, length)``, see
    :func:`flat_bags`)::

        bag[i] = b  where offsets[b] <= i < offsets[b + 1]
        scale[i] = 1 (sum), weights[i] (weighted sum), 1 / (ids of bag b in [0, num_rows)) (mean)
        scale[i] = 0 where ids[i] is outside [0, num_rows) (padding)
    """
    ids, offsets = flat_bags(ids, offsets)
    bag = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    valid = (ids >= 0) & (ids < num_rows)
    if mode == "mean":
        counts = np.bincount(bag[valid], minlength=offsets.size - 1)
        scale = 1.0 / np.maximum(counts, 1)[bag]
    elif weights is None:
        scale = np.ones(ids.size)
    else:
        scale = np.asarray(weights, np.float64)
    return bag, np.where(valid, scale, 0.0)


def pool_bags(table, ids, offsets, weights, mode):
    """The pooled lookup of embedding bags (torch's ``EmbeddingBag``), in float64::

        pooled[b] = sum(scale[i] * table[ids[i]] for i in bag b)      # scale: bag_terms

    padding ids add nothing and do not count in the mean; an empty bag pools to zeros.
    """
    table = np.asarray(table, np.float64)
    flat_ids, offsets = flat_bags(ids, offsets)
    bag, scale = bag_terms(flat_ids, offsets, weights, mode, table.shape[0])
    pooled = np.zeros((offsets.size - 1, table.shape[1]))
    for i, row in enumerate(flat_ids):
        if 0 <= row < table.shape[0]:
            pooled[bag[i]] += scale[i] * table[row]
    return pooled


def bag_table_grad(shape, ids, offsets, weights, mode, d_pooled):
    """The transpose of :func:`pool_bags`: the dense gradient of the table, in float64::

    d_table[ids[i]] += scale[i] * d_pooled[bag[i]]       for every valid id i
    """
    flat_ids, offsets = flat_bags(ids, offsets)
    bag, scale = bag_terms(flat_ids, offsets, weights, mode, shape[0])
    d_pooled = np.asarray(d_pooled, np.float64)
    d_table = np.zeros(shape)
    for i, row in enumerate(flat_ids):
        if 0 <= row < shape[0]:
            d_table[row] += scale[i] * d_pooled[bag[i]]
    return d_table


def bag_weights_grad(table, ids, offsets, d_pooled):
    """The gradient of a weighted sum with respect to its weights, in float64::

    d_weights[i] = dot(d_pooled[bag[i]], table[ids[i]])      (0 at padding ids)
    """
    table, d_pooled = np.asarray(table, np.float64), np.asarray(d_pooled, np.float64)
    flat_ids, offsets = flat_bags(ids, offsets)
    bag, _ = bag_terms(flat_ids, offsets, None, "sum", table.shape[0])
    return np.array(
        [
            d_pooled[bag[i]] @ table[row] if 0 <= row < table.shape[0] else 0.0
            for i, row in enumerate(flat_ids)
        ]
    )


def lazy_bag_step(
    weight, history, ids, offsets, weights, mode, d_pooled, *, rowwise, lr, lr_mult=1.0, **hyper
):
    """One AdaGrad step of a table looked up in bags, applied lazily, in float64::

        rows = unique(ids in [0, num_rows))                     # the touched rows
        g = bag_table_grad(...)[rows]                           # their summed gradient
        weight[rows], history[rows] = step(weight[rows], g, history[rows])

    ``step`` is :func:`mxnet2_step` (element-wise history, ``weight``'s shape) or, with
    ``rowwise``, :func:`rowwise_step` (one history number per row); at ``lr * lr_mult``. Weight
    decay (``wd`` in ``hyper``) decays the touched rows only; the other rows do not change.
    """
    weight, history = np.array(weight, np.float64), np.array(history, np.float64)
    flat_ids, _ = flat_bags(ids, offsets)
    rows = np.unique(flat_ids[(flat_ids >= 0) & (flat_ids < weight.shape[0])])
    grad = bag_table_grad(weight.shape, ids, offsets, weights, mode, d_pooled)[rows]
    step = rowwise_step if rowwise else mxnet2_step
    weight[rows], history[rows] = step(weight[rows], grad, history[rows], lr=lr * lr_mult, **hyper)
    return weight, history
