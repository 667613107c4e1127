"""Installs ``ramda_kernels`` (the package) and ``ramda_ref`` (the reference).

The compiled extension ``ramda_kernels._C`` is described by
``tools/build_extension.py``; installing never fails for lack of a GPU.
Install with ``pip install --no-build-isolation .`` so the build uses the
torch already installed instead of fetching a second one.
"""

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
from build_extension import cmdclass, extensions  # noqa: E402

setup(
    name="ramda_kernels",
    version="0.1.0",
    description="Fused RAMDA / RMDA / ProxAdamW / ProxSGD optimizers for structured neural networks",
    python_requires=">=3.10",
    packages=find_packages(include=["ramda_kernels", "ramda_kernels.*"])
    + find_packages("python", include=["ramda_ref", "ramda_ref.*"]),
    package_dir={"ramda_ref": "python/ramda_ref"},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton"],
        "demo": ["scikit-learn", "tqdm", "matplotlib"],
        "test": ["pytest", "hypothesis"],
    },
    ext_modules=extensions(),
    cmdclass=cmdclass(),
    entry_points={"console_scripts": ["ramda-kernels=ramda_kernels.cli:main"]},
)
