# make demo | make demo-active | make study | make test | make bench | make lint — each sets up what it needs (virtual
# environment, build) itself.

VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
# This machine's pip serves these builds from local disk; elsewhere set TORCH_SPEC to the torch you want.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# torch guesses CUDA_HOME from the nvcc on PATH, which may be a wrapper script; prefer the real toolkit.
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif
export PATH := $(VENV)/bin:$(PATH)

BENCH_FILES := $(wildcard bench/bench_*.py)
SOURCES := setup.py pyproject.toml $(shell find csrc -type f)

# A cap on each demo student's optimizer steps (none: the demo's full run); CI runs a short demo (DEMO_STEPS=20), the
# same code path.
DEMO_STEPS ?=
# STUDY_QUICK=1: CI's few-step study (one seed), the same code path, written to build/study-quick.
STUDY_QUICK ?=
# STUDY_RESUME=1: keep the runs a killed study finished (--resume).
STUDY_RESUME ?=
# The active-learning demo: selection rounds after the 1-shot start and steps of each round's student; CI runs a
# short one (DEMO_ACTIVE_ROUNDS=1 DEMO_ACTIVE_STEPS=5), the same code path.
DEMO_ACTIVE_ROUNDS ?= 5
DEMO_ACTIVE_STEPS ?= 50

.PHONY: install test test-python test-triton test-cpp test-bench demo demo-active study bench lint

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24" "setuptools>=69" wheel ninja
	$(PY) -m pip install $(TORCH_SPEC)
	touch $@

# --no-build-isolation: build against the torch installed above instead of downloading another into a build env.
$(VENV)/.installed: $(VENV)/.torch $(SOURCES)
	$(PY) -m pip install --no-build-isolation -e ".[test,train,demo]"
	touch $@

install: $(VENV)/.installed

test: test-python test-triton test-cpp test-bench

test-python: install
	$(PY) -m pytest tests -m "not triton" -q

# Triton kernels run on the CPU under the interpreter, which must be switched on before triton is imported.
test-triton: install
	TRITON_INTERPRET=1 $(PY) -m pytest tests -m triton -q

test-cpp: install
	mkdir -p build
	cmake -S . -B build/cmake -DPython3_EXECUTABLE=$(PY) > build/cmake-configure.log 2>&1 || (cat build/cmake-configure.log; exit 1)
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

demo: install
	mkdir -p build
	$(PY) demo/run_demo.py $(if $(DEMO_STEPS),--steps $(DEMO_STEPS))
	$(PY) -m pytest bench/bench_loss.py -k "N512-C1000 and float32" --benchmark-only -q -p no:cacheprovider \
		--benchmark-json=build/bench-loss.json > build/bench-loss.log 2>&1 || (cat build/bench-loss.log; exit 1)
	$(PY) bench/report.py build/bench-loss.json

demo-active: install
	mkdir -p build
	$(PY) demo/run_active.py --rounds $(DEMO_ACTIVE_ROUNDS) --steps $(DEMO_ACTIVE_STEPS) \
		--json build/active-results.json --plot build/active-accuracy.png

study: install
	$(PY) demo/run_study.py $(if $(STUDY_QUICK),--quick) $(if $(STUDY_RESUME),--resume)

# The benchmark suite (bench/bench_*.py): its JSON, the speed-up plot and the README's generated section, from one run.
bench: install
	mkdir -p bench/results
	$(PY) -m pytest $(BENCH_FILES) --benchmark-only -q -p no:cacheprovider --benchmark-json=bench/results/bench.json
	$(PY) bench/report.py bench/results/bench.json --plot bench/results/speedup.png --readme README.md

# Every benchmark file's first case once, untimed, so that none rots.
test-bench: install
	$(PY) -m pytest $(BENCH_FILES) --benchmark-disable -q -p no:cacheprovider

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
