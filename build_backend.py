"""The build backend: setuptools', asking for zig's compiler only where kernels are compiled.

A wheel (pip wheel ., pip install .) compiles the CRF kernels (setup.py), with zig from the PyPI
package ziglang; an editable install (pip install -e .) compiles nothing, so it does not fetch zig.
"""
from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (every hook not defined here)

ZIG = "ziglang==0.17.1"


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + [ZIG]
