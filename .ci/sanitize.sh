#!/usr/bin/env bash
# `make sanitize`: the CPU extension built with AddressSanitizer + UBSan into build/sanitize/ (never over the
# normal .so), the CPU op tests run against it, and a self-check that a deliberate out-of-bounds read and a
# signed overflow are caught (so the sanitizer cannot silently be off). Any sanitizer report fails the run.
# Usage: .ci/sanitize.sh PYTHON
set -euo pipefail
PY=${1:-python3}
# an absolute path: the tests run from another folder (a venv's python must not be resolved through its symlink)
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")";; esac
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT="$ROOT/build/sanitize"
CXX=${CXX:-c++}
FLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
# the op tests of the CPU backend (-k cpu), plus every test of the edge-case file
TESTS=${SANITIZE_TESTS:-"tests/test_cpu_edges.py $(cd "$ROOT" && ls tests/test_*.py | grep -v -E 'test_(train|build|bench|examples|reference|cpu_edges|gpu_tools|triton_launch|docs_refs|docs_commands|results|vocab_parallel)' | tr '\n' ' ')"}
step() { echo "sanitize: $* ($(( SECONDS - T0 )) s)"; }
T0=$SECONDS
cd "$ROOT"
mkdir -p "$OUT"

# the CPU kernels' ISA copies to instrument: the baseline, and the one the kernels run with here (RLHF_KERNELS_CPU_ISA,
# else the best this CPU runs, from the /proc/cpuinfo flags each copy is compiled with: setup.py ISA_FLAGS). Other
# copies would not run here; tests/test_cpu_isa.py checks that the dispatcher agrees and refuses them by name.
best_isa() {
    local flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
    has() { local f; for f in "$@"; do [[ "$flags" == *" $f "* ]] || return 1; done; }
    if has avx2 fma f16c avx512f avx512bw avx512vl avx512dq; then echo avx512
    elif has avx2 fma f16c; then echo avx2
    else echo baseline; fi  # no x86 flags line (another architecture): the baseline copy is all there is
}
RUN_ISA=${RLHF_KERNELS_CPU_ISA:-$(best_isa)}
if [ "$RUN_ISA" = baseline ]; then ISAS=baseline; else ISAS="baseline,$RUN_ISA"; fi

step "building the instrumented CPU extension (CPU kernels for $ISAS) into $OUT"
RLHF_KERNELS_CUDA=0 FORCE_CUDA=0 RLHF_KERNELS_CPU_ISAS="$ISAS" RLHF_KERNELS_SANITIZE="$FLAGS" "$PY" setup.py -q build_ext \
    --build-lib "$OUT/lib" --build-temp "$OUT/temp" >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
SO=$(ls "$OUT"/lib/rlhf_kernels/_C*.so)

# the package as it is in the checkout, with the instrumented extension in place of the normal one
PKG="$OUT/pkg/rlhf_kernels"
rm -rf "$OUT/pkg" && mkdir -p "$PKG"
for f in rlhf_kernels/*; do
    case "$(basename "$f")" in _C*.so|__pycache__) ;; *) ln -s "$ROOT/$f" "$PKG/";; esac
done
ln -s "$SO" "$PKG/"

ASAN_LIB=$("$CXX" -print-file-name=libasan.so)
[ -f "$ASAN_LIB" ] || { echo "sanitize: libasan.so not found ($ASAN_LIB)"; exit 1; }
# libstdc++ right after libasan: Python itself does not link it, and without it ASan cannot find the real
# __cxa_throw when a C++ extension (triton's, torch's) throws during import
STDCXX_LIB=$(readlink -f "$("$CXX" -print-file-name=libstdc++.so)")
export LD_PRELOAD="$ASAN_LIB $STDCXX_LIB"
# Python's allocator keeps memory by design: leak reports would be noise. Anything else stops the run.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

step "the extension is instrumented"
ldd "$SO" | grep -E "libasan|libubsan"
n_asan=$(nm -D --undefined-only "$SO" | grep -c "__asan_report_load" || true)
n_ubsan=$(nm -D --undefined-only "$SO" | grep -c "__ubsan_handle" || true)
echo "sanitize: $SO imports $n_asan distinct __asan_report_load* and $n_ubsan __ubsan_handle_* hooks"
[ "$n_asan" -gt 0 ] && [ "$n_ubsan" -gt 0 ] || { echo "sanitize: the extension is not instrumented"; exit 1; }

step "self-check: a deliberate out-of-bounds read and a signed overflow must be caught"
"$CXX" $FLAGS -shared -fPIC tests/sanitize/selfcheck.cpp -o "$OUT/selfcheck.so"
expect_caught() {  # $1: function to call, $2: the report it must print
    local log="$OUT/selfcheck-$1.log"
    if "$PY" -c "import ctypes, torch; ctypes.CDLL('$OUT/selfcheck.so').$1(4)" >"$log" 2>&1; then
        echo "sanitize: $1 ran without a report: the sanitizer is not working"; exit 1
    fi
    grep -q "$2" "$log" || { echo "sanitize: $1 failed without the expected '$2' report:"; cat "$log"; exit 1; }
    echo "sanitize: caught as expected: $(grep -m1 "$2" "$log")"
}
expect_caught read_past_end "heap-buffer-overflow"
expect_caught overflow_int "runtime error: signed integer overflow"

step "op tests (CPU backend) against the instrumented extension"
(cd "$OUT/pkg" && "$PY" -c "import rlhf_kernels._C as c, rlhf_kernels as rk; print('sanitize: extension', c.__file__); \
    assert '$OUT' in __import__('os').path.realpath(c.__file__); assert rk.available_backends()['cpu'] == 'available'")
# run from build/sanitize/pkg so that `import rlhf_kernels` finds the instrumented package first
status=0
(cd "$OUT/pkg" && "$PY" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" -k cpu \
    $(for t in $TESTS; do echo "$ROOT/$t"; done)) >"$OUT/pytest.log" 2>&1 || status=$?
tail -15 "$OUT/pytest.log"
if grep -q -E "ERROR: AddressSanitizer|runtime error:" "$OUT/pytest.log"; then
    echo "sanitize: sanitizer reports in $OUT/pytest.log"; exit 1
fi
[ "$status" -eq 0 ] || { echo "sanitize: the tests failed (log: $OUT/pytest.log)"; exit "$status"; }
step "passed: no sanitizer report"
