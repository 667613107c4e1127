"""Set up the test session once, before any test module imports triton.

Without a GPU the Triton backend runs CPU tensors under the interpreter
(``TRITON_INTERPRET=1``); triton reads the variable when a kernel is
decorated, that is when ``ramda_kernels.triton_kernels`` is first imported,
so it is set here rather than in each test module. A value already in the
environment wins (``TRITON_INTERPRET=0`` leaves the interpreter off).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
