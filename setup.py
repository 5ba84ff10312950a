"""Build of dbprop: the Python package, plus the native extension dbprop._C when a compiler is present.

Install with ``pip install --no-build-isolation -e .`` (build isolation would compile against a different
torch). ``FORCE_ONLY_CPU=1`` skips CUDA; ``MAX_JOBS`` limits parallel compile jobs (ninja).
A failed native build is reported and the package still installs: the pure-PyTorch passes then run.
"""
import glob
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ext_modules = []
cmdclass = {}
try:
    import torch  # noqa: F401
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    ext_modules.append(CppExtension(
        "dbprop._C", sources, include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"]))

    class OptionalBuildExtension(BuildExtension):
        """Build the extension if possible; never fail the install because of it."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any compiler failure
                print(f"WARNING: dbprop._C was not built ({e}); the pure-PyTorch backend will be used")

    cmdclass["build_ext"] = OptionalBuildExtension.with_options(no_python_abi_suffix=False)
except ImportError:
    print("WARNING: torch is not importable at build time; dbprop._C is not built "
          "(install torch first and use --no-build-isolation)")
    cmdclass["build_ext"] = _setuptools_build_ext

setup(ext_modules=ext_modules, cmdclass=cmdclass)
