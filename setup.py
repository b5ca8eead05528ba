"""Build script for grpo_kernels.

torch and numpy are the runtime requirements (numpy only so that torch does not warn "Failed
to initialize NumPy" when torch.compile loads dynamo). Install torch yourself first with the
build that matches your machine (a CPU build on CPU-only machines), so that pip never
resolves `torch` from the index and pulls CUDA wheels onto a machine without a GPU.
triton is optional (the `triton` extra): torch's CUDA wheels bring their own matching triton,
and a CPU-only machine cannot run Triton kernels (only interpret them, as the tests do, which
is why the `test` extra brings it).

Native extensions (csrc/), neither of which includes or links libtorch:
- grpo_kernels._C: the CPU kernels (pybind11, OpenMP, -O3), always attempted.
- grpo_kernels._C_cuda: the CUDA kernels, built when `nvcc` is found (GRPO_KERNELS_CUDA=1
  forces it, =0 skips it), for sm_80 and sm_90 (TORCH_CUDA_ARCH_LIST, as torch's own builds read
  it, e.g. "9.0" or "8.0;9.0+PTX", picks others); cudart is linked statically. The .cu files
  and the C++ sources compile in parallel, MAX_JOBS at a time (default: the CPU count).
A machine without a C++ compiler (or whose build fails) still installs the pure-Python
package and says so; backend="cpp"/"cuda" then raise BackendUnavailableError.
GRPO_KERNELS_NATIVE_ARCH=0 drops -march=native (for binaries that must run on other CPUs).
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import ParallelCompile, Pybind11Extension
except ImportError:  # building without pybind11: pure-Python install
    Pybind11Extension = None
else:  # each extension's C++ sources compile in parallel, MAX_JOBS at a time (default: the CPU count)
    ParallelCompile("MAX_JOBS").install()

# verl itself pins transformers<5.11 and pulls Ray's full stack, so the test set installs only
# what `import verl.trainer.ppo.core_algos` needs, and the README adds `pip install --no-deps verl`.
VERL_IMPORT_DEPS = ["ray>=2.41", "tensordict>=0.8,<=0.10.0,!=0.9.0", "omegaconf>=2.3", "hydra-core>=1.3",
                    "codetiming>=1.4"]
# `import grpo_kernels` needs only torch (the triton backend is there wherever triton is
# installed); the trainer and the benchmarks bring their own extras, and the tests need both
# and triton (they interpret the Triton kernels on CPU with TRITON_INTERPRET=1).
# Tested range: every Triton kernel variant is compiled for sm_90 under triton 3.2 (the floor), 3.6
# (the GPU machine's) and 3.9 (CI, which also runs them under the interpreter), results per version
# in benchmarks/results/kernels_triton_versions.csv; torch 2.13 in CI (torch >= 2.6 declared).
TRITON = ["triton>=3.2; platform_system == 'Linux' and platform_machine == 'x86_64'"]
TRAINER = ["transformers>=4.46", "tqdm>=4.60", "matplotlib>=3.7"]
BENCH = ["matplotlib>=3.7", "tqdm>=4.60", "pytest-benchmark>=4"]
TEST = (["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "numpy", "ruff>=0.5", "trl>=0.24"] + TRAINER
        + TRITON + VERL_IMPORT_DEPS)
HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
              "-gencode=arch=compute_90,code=compute_90"]


def cuda_arch_flags(arch_list=None):
    """nvcc -gencode flags for TORCH_CUDA_ARCH_LIST ("9.0", "8.0;9.0+PTX", "8.0 9.0a"): machine code
    for each entry, and PTX too for a "+PTX" one. Unset or empty: CUDA_ARCHS."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if arch_list is None else arch_list
    flags = []
    for entry in re.split(r"[;\s]+", arch_list.strip()):
        if not entry:
            continue
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: cannot read {entry!r} (expected e.g. 9.0, 9.0a or 9.0+PTX)")
        cc = match.group(1) + match.group(2) + match.group(3)
        flags.append(f"-gencode=arch=compute_{cc},code=sm_{cc}")
        if match.group(4):
            flags.append(f"-gencode=arch=compute_{cc},code=compute_{cc}")
    return flags or list(CUDA_ARCHS)


def _cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    if os.environ.get("GRPO_KERNELS_NATIVE_ARCH", "1") != "0":
        flags.append("-march=native")
    return flags


def _nvcc():
    wanted = os.environ.get("GRPO_KERNELS_CUDA")
    if wanted == "0":
        return None
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    if nvcc and os.path.exists(nvcc):
        return nvcc
    if wanted == "1":
        raise RuntimeError("GRPO_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    return None


def _cuda_home(nvcc):
    """The CUDA toolkit root: CUDA_HOME, or the first candidate with include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
                  "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    raise RuntimeError("found nvcc but no CUDA toolkit (include/cuda_runtime.h); set CUDA_HOME")


class OptionalNativeBuild(build_ext):
    """Builds the native extensions when it can; otherwise says why and carries on without them."""

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                if getattr(ext, "cuda_sources", None):
                    ext.extra_objects = self._compile_cuda(ext)
                self.build_extension(ext)
                built.append(ext)
            except Exception as exc:  # noqa: BLE001 - any toolchain failure means "no native backend"
                print(f"\n*** grpo_kernels: could not build {ext.name} ({exc}).\n*** Installing without it: "
                      f"backend='{'cuda' if 'cuda' in ext.name else 'cpp'}' will be unavailable; the torch and "
                      "triton backends are unaffected.\n", file=sys.stderr)
        self.extensions = built

    def _compile_cuda(self, ext):
        nvcc = _nvcc()
        out_dir = os.path.join(self.build_temp, "cuda")
        os.makedirs(out_dir, exist_ok=True)
        archs = cuda_arch_flags()
        objects = [os.path.join(out_dir, os.path.basename(src) + ".o") for src in ext.cuda_sources]

        def compile_one(src, obj):
            subprocess.check_call([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", *archs, "-c", src, "-o", obj])

        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for done in [pool.submit(compile_one, src, obj) for src, obj in zip(ext.cuda_sources, objects)]:
                done.result()  # raises the first failure
        return objects


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def _extensions():
    if Pybind11Extension is None:
        print("*** grpo_kernels: pybind11 missing, installing without native kernels", file=sys.stderr)
        return []
    cpu_sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # A change to a shared header (grpo_math.h, the generated options.h, ...) rebuilds the extension.
    headers = sorted(glob.glob("csrc/*.h")) + sorted(glob.glob("csrc/cuda/*.cuh"))
    exts = [Pybind11Extension("grpo_kernels._C", cpu_sources, include_dirs=["csrc"], extra_compile_args=_cxx_flags(),
                              extra_link_args=["-fopenmp"], cxx_std=17, depends=headers)]
    nvcc = _nvcc()
    if nvcc:
        try:
            cuda_home = _cuda_home(nvcc)
        except RuntimeError as exc:
            print(f"*** grpo_kernels: {exc}; building without CUDA kernels", file=sys.stderr)
            return exts
        lib_dirs = [d for d in (os.path.join(cuda_home, "lib64"), os.path.join(cuda_home, "lib"),
                                os.path.join(cuda_home, "targets", "x86_64-linux", "lib")) if os.path.isdir(d)]
        ext = Pybind11Extension(
            "grpo_kernels._C_cuda", ["csrc/bindings.cpp"], include_dirs=["csrc", os.path.join(cuda_home, "include")],
            define_macros=[("GK_WITH_CUDA", "1"), ("GK_MODULE_NAME", "_C_cuda")], extra_compile_args=["-O3"],
            library_dirs=lib_dirs, libraries=["cudart_static", "rt", "dl", "pthread"], cxx_std=17, depends=headers)
        ext.cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        exts.append(ext)
    return exts


setup(
    name="grpo_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for GRPO: log-probs, group advantages and the clipped surrogate + KL loss",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["grpo_kernels", "grpo_kernels.*"]),
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalNativeBuild},
    install_requires=[
        "torch>=2.6",
        "numpy",
    ],
    extras_require={
        "triton": TRITON,
        "trainer": TRAINER,
        "test": TEST,
        "bench": BENCH,
        "gpu": ["flash-attn>=2.6"],
        "trl": ["trl>=0.24"],
        "verl": ["verl>=0.7"],
        "dev": sorted(set(TEST + BENCH)),
    },
    entry_points={
        "console_scripts": ["grpo-kernels-train=grpo_kernels.train:cli"],
        # verl imports these in every process that imports verl: our policy losses get registered there.
        "verl.plugins": ["grpo_kernels=grpo_kernels.integrations.verl_plugin"],
    },
)
