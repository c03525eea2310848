#!/usr/bin/env bash
# `make sdist-check`: build the sdist and, from it, a wheel in a fresh venv (CPU-only build), install that
# wheel, then run the smoke test of every public op and `rlhf-kernels bench` from a folder outside the checkout.
# Usage: .ci/sdist_check.sh PYTHON WORKDIR    (PYTHON: the base interpreter the fresh venv is made from)
set -euo pipefail
PYTHON=${1:-python3}
WORK=$(realpath -m "${2:-build/sdist-check}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# torch for the fresh venv: the CPU build lies on this machine's disk (small and quick to install)
SDIST_TORCH=${SDIST_TORCH:-torch==2.13.0}
# CPU-only, even where the Makefile exports FORCE_CUDA=1 (nvcc present); but every ISA copy of the CPU kernels,
# as a plain `pip install` of the sdist builds them (this check is about the default build)
export RLHF_KERNELS_CUDA=0 FORCE_CUDA=0 MAX_JOBS=${MAX_JOBS:-2}
unset RLHF_KERNELS_CPU_ISAS
step() { echo "sdist-check: $* ($(( SECONDS - T0 )) s)"; }
T0=$SECONDS

rm -rf "$WORK" && mkdir -p "$WORK/dist" "$WORK/run"
step "fresh venv with $SDIST_TORCH"
"$PYTHON" -m venv "$WORK/venv"
PY="$WORK/venv/bin/python"
{ "$PY" -m pip install -q --upgrade pip && "$PY" -m pip install -q "$SDIST_TORCH" numpy "setuptools>=77" wheel ninja build; } \
    >"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log"; exit 1; }

step "sdist"
(cd "$ROOT" && "$PY" -m build --sdist --no-isolation -o "$WORK/dist" . >"$WORK/sdist.log" 2>&1) \
    || { tail -50 "$WORK/sdist.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
# every native source and header must be in it, CUDA's included, whatever this machine built
tar tzf "$SDIST" | sed 's|^[^/]*/||' | sort >"$WORK/sdist.txt"
(cd "$ROOT" && git ls-files csrc bench LICENSE) | sort | comm -23 - "$WORK/sdist.txt" >"$WORK/missing.txt"
if [ -s "$WORK/missing.txt" ]; then echo "sdist-check: missing from the sdist:"; cat "$WORK/missing.txt"; exit 1; fi
echo "sdist-check: $(grep -c '^csrc/.*\.\(h\|cuh\)$' "$WORK/sdist.txt") headers," \
     "$(grep -c '^csrc/.*\.cu$' "$WORK/sdist.txt") .cu files in $(basename "$SDIST")"

step "wheel from the sdist (compiles the CPU extension)"
(cd "$WORK/run" && "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$SDIST" \
    >"$WORK/wheel.log" 2>&1) || { tail -50 "$WORK/wheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/*.whl)
"$PY" - "$WHEEL" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["rlhf_kernels/bench/__main__.py", "rlhf_kernels/bench/common.py", "rlhf_kernels/ops/gae.py"]
missing = [n for n in need if n not in names] + ([] if any(n.startswith("rlhf_kernels/_C") for n in names) else ["_C"])
assert not missing, f"wheel lacks {missing}"
assert not any(n.startswith(("bench/", "tests/")) for n in names), "the wheel must not install top-level bench/ or tests/"
print(f"sdist-check: {len(names)} files in the wheel, rlhf_kernels.bench and the extension among them")
PYEOF

step "install the wheel, smoke test from outside the checkout"
"$PY" -m pip install -q --no-deps "$WHEEL" >>"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log"; exit 1; }
cp "$ROOT/.ci/smoke_installed.py" "$WORK/run/"
(cd "$WORK/run" && "$PY" smoke_installed.py "$ROOT")
(cd "$WORK/run" && "$PY" -c "import platform, rlhf_kernels._C as c
x86 = platform.machine().lower() in ('x86_64', 'amd64')
want = ('baseline', 'avx2', 'avx512') if x86 else ('baseline',)
assert c.built_cpu_isas == want, f'the default build holds {c.built_cpu_isas}, expected {want}'
print('sdist-check: CPU kernels built for', ','.join(want))")
(cd "$WORK/run" && "$WORK/venv/bin/rlhf-kernels" bench --help >"$WORK/bench-help.txt") \
    && grep -q -- "--quick" "$WORK/bench-help.txt" && grep -q "rlhf-kernels bench" "$WORK/bench-help.txt"
(cd "$WORK/run" && "$WORK/venv/bin/rlhf-kernels" bench --quick --only token_kl 2>"$WORK/bench.err" \
    | tee "$WORK/bench.txt" | tail -8) || { tail -30 "$WORK/bench.err"; exit 1; }
grep -q "rk cpu" "$WORK/bench.txt"
step "passed"
