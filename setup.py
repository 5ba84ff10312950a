"""Build of dbprop: the Python package plus the native extension dbprop._C.

Install with ``pip install --no-build-isolation -e .`` (build isolation would compile against a different
torch). The extension is a CppExtension (C++ with OpenMP) always, and a CUDAExtension when torch is a CUDA
build and nvcc is found (or ``FORCE_CUDA=1``). Environment:

* ``FORCE_ONLY_CPU=1``      never build the CUDA part;
* ``FORCE_CUDA=1``          build the CUDA part even when torch sees no GPU (the usual case on build machines);
* ``TORCH_CUDA_ARCH_LIST``  CUDA architectures, e.g. "8.0;9.0" (default here: "8.0;9.0");
* ``MAX_JOBS``              parallel compile jobs (ninja).

A failed C++ build is reported and the package still installs: the pure-PyTorch passes then run. A failed
CUDA build with ``FORCE_CUDA=1`` is an error (CI uses it to catch CUDA compile errors).
"""
import glob
import os
import re
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda(torch, cuda_home):
    if os.environ.get("FORCE_ONLY_CPU", "0") == "1":
        return False
    if torch.version.cuda is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU build (torch.version.cuda is None)")
        return False
    if cuda_home is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME (e.g. /usr/local/cuda)")
        return False
    nvcc = _nvcc_version(cuda_home)
    want = tuple(int(v) for v in torch.version.cuda.split(".")[:2])
    if nvcc is None:
        sys.exit(f"cannot run nvcc in {cuda_home}/bin: set CUDA_HOME to a CUDA toolkit")
    if nvcc[0] != want[0]:
        sys.exit(f"nvcc is CUDA {nvcc[0]}.{nvcc[1]} but torch was built with CUDA {torch.version.cuda}: "
                 "install a torch built for this toolkit or point CUDA_HOME at a matching toolkit")
    if nvcc != want:
        print(f"WARNING: nvcc is CUDA {nvcc[0]}.{nvcc[1]}, torch was built with CUDA {torch.version.cuda}")
    return True


def _extensions():
    import torch
    from torch.utils import cpp_extension

    # CUDA_HOME from the environment, else /usr/local/cuda (torch's own guess from `which nvcc` can be a
    # wrapper's folder without the toolkit's libraries)
    cuda_home = os.environ.get("CUDA_HOME") or ("/usr/local/cuda" if os.path.isdir("/usr/local/cuda") else None) \
        or cpp_extension.CUDA_HOME
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard is the one torch.utils.cpp_extension picks for this torch
    if not _want_cuda(torch, cuda_home):
        return [cpp_extension.CppExtension("dbprop._C", sources, include_dirs=include_dirs,
                                           extra_compile_args=cxx, extra_link_args=["-fopenmp"])], False
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    arch_tag = "_".join(re.sub(r"[^0-9]", "", a) for a in re.split(r"[;\s]+", archs) if a)
    # the local toolkit lacks some headers (cusparse.h) that torch's CUDA headers include: use torch's wheels'
    for inc in glob.glob(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu*", "include")):
        include_dirs.append(os.path.abspath(inc))
    defines = ["-DWITH_CUDA", f"-DDBPROP_CUDA_ARCHS={arch_tag}"]
    return [cpp_extension.CUDAExtension(
        "dbprop._C", sources + sorted(glob.glob("csrc/cuda/*.cu")), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx + defines, "nvcc": ["-O3", "--expt-relaxed-constexpr"] + defines},
        extra_link_args=["-fopenmp"])], True


ext_modules, cmdclass = [], {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, with_cuda = _extensions()

    class OptionalBuildExtension(BuildExtension):
        """Build the extension if possible; a C++-only build failure never fails the install."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                if with_cuda and os.environ.get("FORCE_CUDA", "0") == "1":
                    raise
                print(f"WARNING: dbprop._C was not built ({e}); the pure-PyTorch backend will be used")

    cmdclass["build_ext"] = OptionalBuildExtension.with_options(no_python_abi_suffix=False)
except ImportError:
    print("WARNING: torch is not importable at build time; dbprop._C is not built "
          "(install torch first and use --no-build-isolation)")
    cmdclass["build_ext"] = _setuptools_build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
