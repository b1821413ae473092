"""Data parallel training: every rank holds the whole model and a part of the batch.

    broadcast_parameters(params, comm)   rank 0's weights everywhere (once, at the start)
    loss on this rank's part of the batch; loss.backward()
    allreduce_gradients(params, comm)    every gradient becomes the mean over ranks
    optimizer.step()                     the same step on every rank: the weights stay equal

With the loss a mean over this rank's rows and every rank holding as many rows, the mean of
the ranks' gradients is the gradient of the mean loss over the whole batch: one
data-parallel step equals one single-process step on the concatenated batch (the tests
check it to rounding).

Gradients travel in a few large buffers (``bucket_bytes`` each), not one message per
parameter: a message costs a latency whatever its size, and a model has many small
parameters (biases, norms). ``check_same_weights`` compares a SHA-256 of every rank's
weights (ShallowSpeed's model-hash check).
"""

from __future__ import annotations

import hashlib

import numpy as np

from .sharding import check_same_everywhere

BUCKET_BYTES = 1 << 22  # 4 MiB a message


def _params(params) -> list:
    params = list(params)
    for index, p in enumerate(params):
        if not hasattr(p, "data") or not isinstance(p.data, np.ndarray):
            raise TypeError(f"parameter {index} is a {type(p).__name__}, not a Tensor")
    return params


def broadcast_parameters(params, comm, root: int = 0) -> None:
    """Copy rank ``root``'s parameter values into every rank's parameters, in place."""
    params = _params(params)
    check_same_everywhere(comm, "the parameters' shapes and dtypes",
                          [(p.data.shape, str(p.data.dtype)) for p in params])
    for p in params:
        if not p.data.flags.c_contiguous:
            p.data = np.ascontiguousarray(p.data)
        comm.Bcast(p.data, root=root)


def buckets(params, bucket_bytes: int = BUCKET_BYTES) -> list[list[int]]:
    """Parameter indices grouped into runs of one dtype of about ``bucket_bytes`` each
    (a parameter larger than that travels alone), in order."""
    groups, current, size, dtype = [], [], 0, None
    for index, p in enumerate(params):
        nbytes = p.data.nbytes
        if current and (p.data.dtype != dtype or size + nbytes > bucket_bytes):
            groups.append(current)
            current, size = [], 0
        current.append(index)
        size += nbytes
        dtype = p.data.dtype
    if current:
        groups.append(current)
    return groups


def allreduce_gradients(params, comm, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Replace every parameter's ``.grad`` by its mean over the ranks, in buckets of about
    ``bucket_bytes``. A parameter without a gradient counts as a zero gradient (and gets
    one): every rank must send the same buckets."""
    from mpi4py import MPI

    params = _params(params)
    check_same_everywhere(comm, "the parameters' shapes and dtypes",
                          [(p.data.shape, str(p.data.dtype)) for p in params])
    for group in buckets(params, bucket_bytes):
        dtype = params[group[0]].data.dtype
        flat = np.empty(sum(params[i].data.size for i in group), dtype=dtype)
        offset = 0
        for i in group:
            p = params[i]
            n = p.data.size
            flat[offset:offset + n] = 0 if p.grad is None else np.asarray(p.grad).reshape(-1)
            offset += n
        comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        flat /= comm.size
        offset = 0
        for i in group:
            p = params[i]
            n = p.data.size
            p.grad = flat[offset:offset + n].reshape(p.data.shape).copy()
            offset += n


def weights_digest(params) -> str:
    """SHA-256 of every parameter's shape, dtype and bytes, in order."""
    digest = hashlib.sha256()
    for p in _params(params):
        digest.update(repr((p.data.shape, str(p.data.dtype))).encode())
        digest.update(np.ascontiguousarray(p.data).tobytes())
    return digest.hexdigest()


def check_same_weights(params, comm) -> str:
    """The weights' digest, the same on every rank; else the same ValueError on every rank."""
    digest = weights_digest(params)
    check_same_everywhere(comm, "the model's weights (SHA-256)", digest[:16])
    return digest
