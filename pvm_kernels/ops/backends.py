"""Every backend the package ships, registered in preference order.

Importing this module registers: ``reference`` (plain PyTorch), ``triton`` (Triton
kernels), ``cpu`` and ``cuda`` (the compiled extensions, when built).
"""
from . import reference_backend, triton_backend  # noqa: F401
from . import native_backend  # noqa: F401
from .registry import (_CHECKS, Backend, available_backends, backend_status, glue_status,  # noqa: F401
                       register_backend, resolve_backend)
from .triton_backend import triton_interpret_requested  # noqa: F401
