# The two commands: `make demo` and `make test`. Both set up what is missing first.
BUILD_DIR ?= build
BUILD_TYPE ?= RelWithDebInfo
PY := $(CURDIR)/.venv/bin/python

.PHONY: all setup configure build test demo image clean

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
	@cmake --build $(BUILD_DIR) -- -j$$(nproc)

test: build
	@scripts/test.sh $(BUILD_DIR)

demo: build
	@scripts/demo.sh $(BUILD_DIR)

# Container images (deploy/container): VARIANT=cpu (default here) or cuda. Not part of `make test`.
VARIANT ?= cpu
image: setup
	@deploy/container/build.sh --variant $(VARIANT)

clean:
	rm -rf $(BUILD_DIR)
