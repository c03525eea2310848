# Two commands: `make demo` and `make test` (see README.md). Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch with CUDA so the CUDA part of the extension can be compiled where nvcc exists
TORCH_SPEC ?= torch==2.14.1
MAX_JOBS ?= 2
export MAX_JOBS
# where nvcc exists, a CPU-only build must fail loudly rather than pass silently
ifneq ($(shell command -v nvcc 2>/dev/null),)
ifneq ($(RLHF_KERNELS_CUDA),0)
export FORCE_CUDA ?= 1
endif
endif

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.h csrc/*.cpp csrc/cpu/*.h csrc/cpu/*.cpp csrc/cpu/kernels/*.cpp \
           csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.cpp)

.PHONY: demo test bench build clean gpu-report gpu-check lint sanitize sdist-check mutants mutants-quick reproduce \
        reproduce-quick

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" setuptools wheel ninja
	touch $@

$(VENV)/.built: $(VENV)/.base $(SOURCES)
	$(PIP) install -q --no-build-isolation -e ".[dev]"
	touch $@

build: $(VENV)/.built

# the linter, the suite, then the instrumented CPU build and the install from the sdist
test: build
	@date +"make test: lint %T"
	$(MAKE) --no-print-directory lint
	@date +"make test: pytest %T"
	$(PY) -m pytest -q --durations=25 tests
	@date +"make test: sanitize %T"
	$(MAKE) --no-print-directory sanitize
	@date +"make test: sdist-check %T"
	$(MAKE) --no-print-directory sdist-check
	@date +"make test: done %T"

# ruff (rules in pyproject.toml; also a pre-commit hook: .pre-commit-config.yaml)
lint: build
	$(PY) -m ruff check .

# the CPU extension under AddressSanitizer + UBSan (build/sanitize/), the CPU op tests against it
sanitize: build
	bash .ci/sanitize.sh $(PY)

# sdist -> wheel -> install in a fresh venv (CPU-only build), smoke test of every op from outside the checkout
sdist-check:
	bash .ci/sdist_check.sh $(PYTHON) build/sdist-check

# plant a curated list of realistic bugs one at a time and check that the tests catch every one
# (.ci/mutants.py; minutes, so not part of `make test`); mutants-quick: a subset of them
mutants: build
	$(PY) .ci/mutants.py

mutants-quick: build
	$(PY) .ci/mutants.py --quick

demo: build
	$(PY) -m rlhf_kernels demo --out runs/demo

bench: build
	$(PY) -m bench

# re-run the documented experiments over seeds 0,1,2 and compare with docs/results.json (a mismatch fails);
# ARGS=--update records a deliberate change (results file and docs tables, one command). reproduce-quick: the
# subset CI runs (minutes). Runs go to runs/reproduce.
reproduce: build
	$(PY) -m rlhf_kernels reproduce $(ARGS)

reproduce-quick: build
	$(PY) -m rlhf_kernels reproduce --quick $(ARGS)

# compile every Triton kernel the launchers select for sm_80..sm_120 and read the CUDA kernels' resource usage
# (no GPU needed); fails on a kernel that does not compile or does not fit a target. Writes gpu_report.{json,md}.
gpu-report: build
	env -u TRITON_INTERPRET $(PY) -m bench.gpu_report

# on a machine with an NVIDIA GPU: GPU tests, GPU benchmark tables, head memory -> gpu_check_results.md
gpu-check: build
	$(PY) -m bench.gpu_check

clean:
	rm -rf build rlhf_kernels/_C*.so *.egg-info $(VENV)/.built
