"""What ``setup.py`` builds besides pure Python: the ``ramda_kernels._C`` extension.

Filled in by the C++/CUDA extension work; until then nothing is compiled.
"""


def extensions():
    return []


def cmdclass():
    return {}
