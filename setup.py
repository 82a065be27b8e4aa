"""Builds dho_fast._C: the CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA build of torch exist.

DHO_FAST_CUDA=1 forces the CUDA build (failing if it cannot be done), DHO_FAST_CUDA=0 skips it; unset means auto.
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default "8.0;9.0").
"""

import glob
import os
import platform
import shutil

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_HOME_CANDIDATES = ("/usr/local/cuda",)
# The CPU kernel's per-instruction-set builds, chosen at run time (csrc/cpu/kernel_dispatch.h), and their flags. Only
# x86-64 with GCC or Clang has them; elsewhere the files compile to nothing.
ISA_FLAGS = {
    "csrc/cpu/kernel_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "csrc/cpu/kernel_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}


def find_cuda_home() -> str | None:
    """The toolkit root. nvcc on PATH may be a wrapper script, so its location does not identify the toolkit."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *CUDA_HOME_CANDIDATES):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def want_cuda() -> bool:
    setting = os.environ.get("DHO_FAST_CUDA", "auto").lower()
    if setting in ("0", "off", "false", "no"):
        return False
    available = torch.version.cuda is not None and find_cuda_home() is not None
    if setting in ("1", "on", "true", "yes"):
        if not available:
            raise RuntimeError("DHO_FAST_CUDA=1 but no CUDA toolkit or no CUDA build of torch was found")
        return True
    return available


def pip_cuda_include_dirs() -> list[str]:
    """torch's CUDA headers include cuBLAS/cuSPARSE headers that ship in the nvidia-* pip packages."""
    import site

    dirs = []
    for base in site.getsitepackages():
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted(dirs)


def extension():
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    common = dict(name="dho_fast._C", extra_link_args=["-fopenmp"], py_limited_api=False)
    if not want_cuda():
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx_flags}, **common)
    cuda_home = find_cuda_home()
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        sources=sources + sorted(glob.glob("csrc/cuda/*.cu")),
        include_dirs=pip_cuda_include_dirs(),
        define_macros=[("DHO_FAST_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        **common,
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, which gives every source of an extension the same flags, with the per-instruction-set
    sources compiled first, each with its own flags added to the extension's, and linked in as objects. They come
    last on the link line, so that an inline function they share with the portable code is linked from the latter."""

    def build_extension(self, ext):
        if platform.machine() in ("x86_64", "AMD64") and self.compiler.compiler_type == "unix":
            isa_sources = [source for source in ext.sources if source in ISA_FLAGS]
            ext.sources = [source for source in ext.sources if source not in ISA_FLAGS]
            ext.depends = [*ext.depends, *isa_sources]
            for source in isa_sources:
                flags = dict(ext.extra_compile_args, cxx=ext.extra_compile_args["cxx"] + ISA_FLAGS[source])
                ext.extra_objects += self.compiler.compile(
                    [source],
                    output_dir=self.build_temp,
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs=flags,
                    depends=ext.depends,
                )
        super().build_extension(ext)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
