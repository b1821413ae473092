"""Attention kernels on plain NumPy arrays, no autograd (installed as ``microattn.kernels``).

Every kernel module offers the same protocol::

    forward(q, k, v, spec)                     -> (out, lse)
    backward(q, k, v, out, lse, dout, spec)    -> (dq, dk, dv)

with ``spec`` an :class:`~microattn.kernels.spec.AttentionSpec`. Modules: ``reference``
(NumPy, the oracle), ``cpu.flash`` (numba, tiled flash; band-skipping for windows),
``cuda.flash`` (numba.cuda). Linear attention: ``linear_reference`` and ``cpu.linear``.
"""
