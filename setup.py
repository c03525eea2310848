"""Build rlhf_kernels._C: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Environment:
  FORCE_CUDA=1            build the CUDA part or fail (never fall back silently)
  RLHF_KERNELS_CUDA=0     skip the CUDA part (quick local iteration)
  TORCH_CUDA_ARCH_LIST    default "8.0;9.0+PTX"
  MAX_JOBS                parallel compile jobs (ninja)
  RLHF_KERNELS_CPU_ISAS   the CPU kernels' ISA copies to build, e.g. "baseline,avx2" (default: all this
                          architecture has; baseline always included; see docs/backends.md, "CPU ISA")
  RLHF_KERNELS_SANITIZE   extra compile+link flags for an instrumented CPU build, e.g. "-fsanitize=address"
                          (`make sanitize` sets it and builds into build/sanitize/, never over the normal .so)
"""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_root_of(nvcc):
    """The toolkit root that `nvcc` really runs from: ask nvcc itself, since /usr/local/bin/nvcc
    may be a symlink or a wrapper script whose parent is not the toolkit."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-v", "-c", "x.cu"], capture_output=True, text=True,
                             timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        out = ""
    m = re.search(r"TOP=(\S+)", out)
    candidates = [m.group(1)] if m else []
    candidates.append(os.path.join(os.path.dirname(os.path.realpath(nvcc)), ".."))
    return candidates


def _is_toolkit(root):
    return (os.path.isfile(os.path.join(root, "bin", "nvcc"))
            and bool(glob.glob(os.path.join(root, "lib64", "libcudart.so*"))
                     + glob.glob(os.path.join(root, "targets", "*", "lib", "libcudart.so*"))))


def find_cuda_home():
    candidates = [os.environ.get(k) for k in ("CUDA_HOME", "CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _toolkit_root_of(nvcc)
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and _is_toolkit(c):
            return os.path.realpath(c)
    return None


def wheel_cuda_includes():
    """Headers of the CUDA libraries torch depends on (cusparse.h, cublas_v2.h, ...) ship inside
    the nvidia-* wheels, not always in the toolkit: add them so no hand-set CPATH is needed."""
    dirs = []
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]} | set(sys.path):
        if sp and os.path.isdir(os.path.join(sp, "nvidia")):
            dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "cu*", "include")))
            dirs += sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include")))
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def want_cuda(cuda_home):
    import torch

    force = os.environ.get("FORCE_CUDA", "0") == "1"
    if os.environ.get("RLHF_KERNELS_CUDA", "1") == "0":
        if force:
            sys.exit("error: FORCE_CUDA=1 and RLHF_KERNELS_CUDA=0 contradict each other")
        return False
    if torch.version.cuda and cuda_home:
        return True
    if force:
        why = "no CUDA toolkit found (set CUDA_HOME)" if not cuda_home else \
            f"torch {torch.__version__} is not a CUDA build"
        sys.exit(f"error: FORCE_CUDA=1 but {why}")
    return False


def has_openmp():
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-E", "-"], input="#include <omp.h>\n",
                           capture_output=True, text=True, timeout=60)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


# The CPU kernel loops (csrc/cpu/kernels/) are compiled once per ISA into their own namespace and picked
# at load time (csrc/cpu/isa.h), so one binary runs on any x86-64 and uses the best ISA it finds; nothing
# else is compiled for more than the architecture's baseline. Every flag here must be checked by
# csrc/cpu/isa.cpp before its kernels run.
ISA_FLAGS = {
    "baseline": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
}
# no errno and no FP traps: lets gcc if-convert and vectorise the math loops; IEEE results are unchanged
MATH_FLAGS = ["-fno-math-errno", "-fno-trapping-math"]


def cpu_isas():
    """The ISAs to build kernels for: all three on x86-64, the baseline elsewhere (e.g. aarch64); or the subset
    RLHF_KERNELS_CPU_ISAS names (a quicker build, e.g. an instrumented one that only needs what this CPU runs).
    The baseline is always in it: it is what any CPU falls back to."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    possible = list(ISA_FLAGS) if x86 else ["baseline"]
    env = os.environ.get("RLHF_KERNELS_CPU_ISAS", "").strip()
    if not env:
        return possible
    want = [w.strip() for w in env.split(",") if w.strip()]
    bad = [w for w in want if w not in possible]
    if bad:
        sys.exit(f"error: RLHF_KERNELS_CPU_ISAS={env}: expected a comma-separated subset of {','.join(possible)} "
                 f"(the copies a build on {platform.machine()} can hold), got {', '.join(bad)}")
    if "baseline" not in want:
        sys.exit(f"error: RLHF_KERNELS_CPU_ISAS={env} must include baseline (the kernels any CPU can run)")
    return [isa for isa in possible if isa in want]


def per_isa_build_ext(base):
    """torch's BuildExtension that also compiles csrc/cpu/kernels/*.cpp once per ISA, each with its flags
    and -DRK_CPU_CAPABILITY=<isa>, and links those objects into the extension."""
    class BuildExt(base):
        def build_extension(self, ext):
            cxx = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else ext.extra_compile_args
            kernels = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
            objects = []
            for isa in cpu_isas():
                objects += self.compiler.compile(
                    kernels, output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                    macros=ext.define_macros + [("RK_CPU_CAPABILITY", isa)], include_dirs=ext.include_dirs,
                    debug=self.debug, extra_postargs=cxx + ISA_FLAGS[isa], depends=ext.depends)
            ext.extra_objects = list(dict.fromkeys(ext.extra_objects + objects))  # once, however often run
            super().build_extension(ext)
    return BuildExt


def cpu_entry_points():
    """One translation unit that includes every csrc/cpu/*.cpp (the CPU entry points: checks and dispatch).
    Each of them alone spends ~9 s of CPU parsing the ATen headers and ~0.5 s on its own code; together they
    compile in ~15 s instead of ~110 s, and CI builds the extension three times. The price: the names in those
    files' anonymous namespaces must differ from file to file (the compiler says so when they do not)."""
    path = os.path.join("build", "unity", "cpu_entry_points.cpp")
    text = "// generated by setup.py: every CPU entry point in one translation unit (see cpu_entry_points())\n" + "".join(
        f'#include "cpu/{os.path.basename(f)}"\n' for f in sorted(glob.glob("csrc/cpu/*.cpp")))  # csrc/ is on the path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path) or open(path).read() != text:  # rewritten only when it changes: no needless rebuild
        with open(path, "w") as f:
            f.write(text)
    return path


def has_cxx():
    return shutil.which(os.environ.get("CXX", "c++")) is not None


def extensions():
    if not has_cxx():
        warnings.warn("rlhf_kernels: no C++ compiler found; installing without the native "
                      "extension (only the 'reference' and 'triton' backends will be available)", stacklevel=2)
        return [], {}
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import time
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    from torch.utils import cpp_extension as ce

    with_cuda = want_cuda(cuda_home)
    sources = ["csrc/ops.cpp", "csrc/autograd.cpp", cpu_entry_points()]
    # -g0: Python's own CFLAGS ask for debug info, which doubles the compile time of the ATen-including files
    # (autograd.cpp: 34 s -> 21 s of CPU); the sanitizer build puts -g back (its flags come after these)
    cxx = ["-O3", "-g0"] + MATH_FLAGS
    ldflags = []
    if has_openmp():
        cxx.append("-fopenmp")
        ldflags.append("-fopenmp")
    sanitize = os.environ.get("RLHF_KERNELS_SANITIZE", "").split()
    if sanitize and with_cuda:
        sys.exit("error: RLHF_KERNELS_SANITIZE instruments the CPU kernels only; set RLHF_KERNELS_CUDA=0")
    cxx += sanitize
    ldflags += sanitize
    # which per-ISA copies exist (csrc/cpu/isa.h): the dispatcher only offers those
    macros = [(f"RK_CPU_WITH_{isa.upper()}", "1") for isa in cpu_isas() if isa != "baseline"]
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        macros.append(("RLHF_WITH_CUDA", "1"))
        macros.append(("RLHF_CUDA_ARCHS", '"' + archs.replace(" ", "") + '"'))
        ext = ce.CUDAExtension(
            "rlhf_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")] + wheel_cuda_includes(),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=ldflags)
    else:
        ext = ce.CppExtension(
            "rlhf_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], define_macros=macros,
            extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    print(f"rlhf_kernels: building the {'CPU+CUDA' if with_cuda else 'CPU-only'} extension, CPU kernels for "
          f"{','.join(cpu_isas())}"
          + (f" (CUDA_HOME={cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda else ""))
    return [ext], {"build_ext": per_isa_build_ext(ce.BuildExtension).with_options(use_ninja=True)}


def packages():
    """Every rlhf_kernels subpackage, and the repository's bench/ shipped inside as rlhf_kernels.bench so that
    `rlhf-kernels bench` works from a wheel, with no checkout."""
    return {"packages": find_packages(include=["rlhf_kernels", "rlhf_kernels.*"]) + ["rlhf_kernels.bench"],
            "package_dir": {"rlhf_kernels.bench": "bench"}}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass, **packages())
