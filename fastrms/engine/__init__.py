"""The optimizer engine under every front end (``fastrms.RMSprop``, ``fastrms.torch.RMSprop``,
the sharded optimizer): buckets of parameters with their state and step counts, the per-step
checks, and the all-or-nothing step through a backend's multi-tensor entry.

A front end translates its world (NumPy arrays, torch tensors and ``param_groups``, MPI shards)
into :class:`Bucket` objects holding NumPy arrays, and steps them with an :class:`Engine`:

- :mod:`.hyperparameters`: group keys, their check, the coefficients of a bucket;
- :mod:`.buckets`: :class:`Bucket` and :class:`StepCounts`;
- :mod:`.checks`: disjoint parameters, gradients that fit and do not alias the step's writes;
- :mod:`.stepper`: :class:`Engine`, the step;
- :mod:`.interrupts`: a Ctrl-C during a step's writes delivered after them;
- :mod:`.precision`: the options of float16 / bfloat16 parameters (``param_rounding``, ``seed``,
  ``master_weights``) and their stochastic rounding keys;
- :mod:`.compact`: the ``state_format`` option (bfloat16 or blockwise8 state) and the step of a
  bucket with compact state.
"""
from .buckets import OPTIONAL_BUFFERS, STATE_BUFFERS, Bucket, StepCounts
from .checks import ArrayGradients, WrittenRegions, check_params_disjoint
from .hyperparameters import HYPERPARAMETERS, check_hyperparameters, group_coefficients
from .stepper import Engine, resolve_module

__all__ = ["ArrayGradients", "Bucket", "Engine", "HYPERPARAMETERS",
           "OPTIONAL_BUFFERS", "STATE_BUFFERS", "StepCounts", "WrittenRegions",
           "check_hyperparameters", "check_params_disjoint", "group_coefficients",
           "resolve_module"]
