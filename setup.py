"""Builds the C++ extension fastflow._C (CPU kernels registered as torch ops); metadata is in pyproject.toml.

Environment switches:
  FASTFLOW_SKIP_EXTENSION=1  build no extension (fastflow then JIT-compiles it on first use, or uses the
                             reference ops; see fastflow/_extension.py)
  FASTFLOW_NATIVE=1          add -march=native (fast on this machine, not portable: never for wheels)
  FASTFLOW_DEBUG=1           -O0 -g
"""

import glob
import os

from setuptools import find_packages, setup

PY_LIMITED_API = "cp310"  # = requires-python; _C uses only the limited C API, so one wheel fits all 3.10+


def env_flag(name):
    return os.environ.get(name, "0") == "1"


def extension_compile_args():
    # fastflow/_extension.py passes the same flags to its JIT build.
    args = ["-O0", "-g"] if env_flag("FASTFLOW_DEBUG") else ["-O3", "-g0"]  # -g0: Python's CFLAGS carry -g
    args.append(
        "-fopenmp"
    )  # the -std flag comes from torch: sources are C++17, torch >= 2.10 headers need C++20
    if env_flag("FASTFLOW_NATIVE"):
        args.append("-march=native")
    return args


def ext_modules():
    if env_flag("FASTFLOW_SKIP_EXTENSION"):
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    extension = CppExtension(
        "fastflow._C",
        sorted(glob.glob("csrc/*.cpp")),
        depends=sorted(glob.glob("csrc/*.h")),  # a changed header rebuilds the kernels that include it
        extra_compile_args=extension_compile_args(),
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    return [extension], {"build_ext": BuildExtension}


extensions, cmdclass = ext_modules()
setup(
    # packages.find cannot see fastflow.triton_kernels: its source folder is the top-level triton_kernels/
    # (mapped by package-dir in pyproject.toml), so it is listed by hand.
    packages=find_packages(include=["fastflow", "fastflow.*"]) + ["fastflow.triton_kernels"],
    ext_modules=extensions,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": PY_LIMITED_API}} if extensions else {},
)
