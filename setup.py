"""Package list for the wheel.

The control plane lives in ``platform/`` but imports as ``hydraserve`` (a package named
``platform`` would shadow the standard library module). setuptools cannot discover a renamed
package by itself, so the list is generated here: every package under ``platform/`` is mapped
onto ``hydraserve.*`` and nothing is left out of the wheel when a subpackage is added.
"""

from setuptools import find_packages, setup

control_plane = ["hydraserve"] + [f"hydraserve.{p}" for p in find_packages("platform")]
data_plane = find_packages(include=["gpu_runtime", "gpu_runtime.*"])

setup(
    packages=control_plane + data_plane,
    package_dir={"hydraserve": "platform"},
    # the native kernels' source, compiled on the target machine (gpu_runtime/native.py)
    package_data={"gpu_runtime": ["csrc/*.c", "csrc/*.h"],
                  # the console's pages, styles, scripts and vendored chart library
                  "hydraserve.api.console": ["templates/*.html", "static/*.css", "static/*.js",
                                             "static/vendor/chartist/*"]},
)
