"""The build backend: setuptools', asking for zig's compiler only where kernels are compiled.

A wheel (pip wheel ., pip install .) compiles the CRF kernels (setup.py), with zig from the PyPI
package ziglang; an editable install (pip install -e .) compiles nothing, so it does not fetch zig.
"""
import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not defined here)

ZIG = "ziglang==0.17.1"


def get_requires_for_build_wheel(config_settings=None):
    # DEEPLAB_WHEEL_KERNELS=0 (setup.py): a wheel without prebuilt kernels, for which zig is not needed
    needs_zig = os.environ.get("DEEPLAB_WHEEL_KERNELS") != "0"
    return _setuptools.get_requires_for_build_wheel(config_settings) + ([ZIG] if needs_zig else [])
