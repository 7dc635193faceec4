# The two commands: `make demo` and `make test`. Both set up what is missing first.
BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
PY := $(CURDIR)/.venv/bin/python

.PHONY: all setup configure build test demo image clean fuzz help

all: build

setup:
	@scripts/setup.sh

$(BUILD_DIR)/build.ninja: CMakeLists.txt | setup
	@echo "[build] configuring CMake in $(BUILD_DIR)"
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=$(BUILD_TYPE) \
	  -DKILN_PYTHON=$(PY) \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')" >/dev/null

configure: setup $(BUILD_DIR)/build.ninja

build: configure
	@echo "[build] compiling (ninja)"
	@start=$$(date +%s); cmake --build $(BUILD_DIR) -- -j$$(nproc) && \
	  echo "[build] compiled in $$(( $$(date +%s) - start )) s"

test: build
	@scripts/test.sh $(BUILD_DIR)

demo: build
	@scripts/demo.sh $(BUILD_DIR)

# libFuzzer targets (tests/fuzz/README.md): builds $(BUILD_DIR)-fuzz with clang (ASan + UBSan, no
# LibTorch) and runs each target for FUZZ_SECONDS; FUZZ_TARGETS picks some (default: all).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz: setup
	@tests/fuzz/build.sh $(BUILD_DIR)-fuzz
	@tests/fuzz/run.sh $(BUILD_DIR)-fuzz $(FUZZ_SECONDS) $(FUZZ_TARGETS)

# Container images (deploy/container): VARIANT=cpu (default here) or cuda. Not part of `make test`.
VARIANT ?= cpu
image: setup
	@deploy/container/build.sh --variant $(VARIANT)

clean:
	rm -rf $(BUILD_DIR) $(BUILD_DIR)-fuzz

help:
	@echo "make build   configure and compile (CMake + Ninja) into $(BUILD_DIR)"
	@echo "make test    build, then fixtures, ctest, pytest, and the sanitizer build's tests +"
	@echo "             fuzz smoke in $(BUILD_DIR)-fuzz (KILN_TEST_SANITIZE=0 skips that step)"
	@echo "make demo    build, then the demo (scripts/demo.sh)"
	@echo "make fuzz    ASan + UBSan + libFuzzer build in $(BUILD_DIR)-fuzz, each target run"
	@echo "             FUZZ_SECONDS (default 60); FUZZ_TARGETS=\"a b\" picks targets"
	@echo "make image   container image (VARIANT=cpu|cuda)"
	@echo "make clean   remove $(BUILD_DIR) and $(BUILD_DIR)-fuzz"
