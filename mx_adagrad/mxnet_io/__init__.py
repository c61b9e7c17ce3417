"""Migrating from MXNet, without MXNet: read a Gluon checkpoint, continue it, or move it into a JAX
model's own layout.

None of these functions imports mxnet or executes anything stored in the files. The steps of a
migration, one module each:

1. :mod:`.ndarray_files`: :func:`load_params` reads ``.params`` NDArray files (``mx.nd.save``,
   Gluon's ``save_parameters`` and ``export``, Module checkpoints) into numpy arrays.
2. :mod:`.trainer_states`: :func:`load_trainer_states` reads Gluon's ``trainer.states`` pickle
   with a restricted unpickler that turns a fixed list of MXNet classes into inert data and
   refuses every other global.
3. :mod:`.pairing`: which optimizer state belongs to which weight (Gluon's Trainer index against
   the structural names of ``net.params``).
4. :mod:`.schedulers`: a pickled ``lr_scheduler`` as the :mod:`mx_adagrad.lr_scheduler` class
   that continues it exactly.
5. :mod:`.optimizers`: :func:`restore` (MXNet's Optimizer API) and :func:`restore_functional`
   (an optax transformation and its state) continue the checkpoint where MXNet stopped.
6. :mod:`.layouts`: the layout rules (Dense ``(out, in)`` -> ``(in, out)``, Conv ``OIHW`` ->
   ``HWIO``, BatchNorm ``gamma`` -> ``scale``, ...).
7. :mod:`.mapping`: which Gluon array goes to which leaf of the JAX model (``name_map``, or pairing
   by order for plain sequential nets).
8. :mod:`.jax_model`: :func:`to_jax` (Gluon arrays in the JAX model's layout) and
   :func:`restore_into` (a whole checkpoint, AdaGrad state included, in that layout).
"""

from mx_adagrad.mxnet_io.jax_model import restore_into, to_jax
from mx_adagrad.mxnet_io.ndarray_files import load_params
from mx_adagrad.mxnet_io.optimizers import restore, restore_functional
from mx_adagrad.mxnet_io.pairing import TrainerOrder
from mx_adagrad.mxnet_io.trainer_states import State, load_trainer_states

__all__ = [
    "State",
    "TrainerOrder",
    "load_params",
    "load_trainer_states",
    "restore",
    "restore_functional",
    "restore_into",
    "to_jax",
]
