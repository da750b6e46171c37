"""Build script.

The Python package always installs. The compiled extension ``sparse_sam._C`` is built ahead of time
only when torch is importable in the build environment (``pip install --no-build-isolation -e .``) and
``SPARSE_SAM_BUILD_EXT`` is not ``0``; otherwise ``sparse_sam._ext`` JIT-builds it on first use.
"""
import glob
import os

from setuptools import setup

PACKAGES = ["sparse_sam", "sparse_sam.experiments", "sparse_sam.kernels"]


def _ext_modules():
    if os.environ.get("SPARSE_SAM_BUILD_EXT", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:  # torch absent in an isolated build: JIT later
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    cpp = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("csrc", "bindings.cpp")]
    cpp = [s for s in cpp if os.path.exists(os.path.join(here, s))]
    if not cpp:
        return [], {}
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cu) and torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    cxx = ["-O3", "-fopenmp"]
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "sparse_sam._C", cpp + cu, define_macros=[("SPARSE_SAM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]}, extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension(
            "sparse_sam._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _ext_modules()
setup(packages=PACKAGES, ext_modules=ext_modules, cmdclass=cmdclass)
