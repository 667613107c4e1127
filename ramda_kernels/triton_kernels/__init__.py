"""Triton kernels of the ``triton`` backend (``ramda_kernels.backends.triton_backend``).

Importing this package imports triton; the backend module catches the failure
so that ``import ramda_kernels`` never needs triton.
"""
