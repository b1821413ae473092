"""Beyond one process, on MPI (mpi4py): sequence-parallel attention and data parallel training.

Install with the ``mpi`` extra (mpi4py and the ``mpich`` wheel, which brings ``mpiexec``)::

    pip install "microattn[mpi]"
    mpiexec -n 4 python my_script.py

Every function takes the communicator (``comm``, e.g. ``mpi4py.MPI.COMM_WORLD``) explicitly.
docs/distributed.md explains the layouts, the ring and the costs.
"""

from .data_parallel import (
    allreduce_gradients,
    broadcast_parameters,
    buckets,
    check_same_weights,
    weights_digest,
)
from .sharding import LAYOUTS, gather, positions, shard
from .ulysses import ulysses_attention

__all__ = [
    "LAYOUTS", "allreduce_gradients", "broadcast_parameters", "buckets", "check_same_weights",
    "gather", "positions", "shard", "ulysses_attention", "weights_digest",
]
