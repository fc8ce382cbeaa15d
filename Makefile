# Thin wrapper over CMake and scripts/ (see README.md and docs/fuzzing.md).
#   make build                      release build into build/
#   make test                       scripts/test.sh (everything CI runs)
#   make fuzz [FUZZ_SECONDS=60]     libFuzzer targets under ASan/UBSan, one at a time;
#                                   non-zero exit on a crash
PYTHON ?= /usr/bin/python3
JOBS ?= 2
FUZZ_SECONDS ?= 60

.PHONY: build test fuzz

build:
	cmake -S . -B build -DPython3_EXECUTABLE=$(PYTHON)
	cmake --build build -j$(JOBS)

test:
	scripts/test.sh

fuzz:
	CC=clang cmake -S . -B build/fuzz -DBEAM_FUZZ=ON -DPython3_EXECUTABLE=$(PYTHON) \
	  -DFUZZ_SECONDS=$(FUZZ_SECONDS) -DBEAM_BUILD_BENCH=OFF
	cmake --build build/fuzz -j$(JOBS) --target fuzz
