# adpop: `make demo` and `make test` set up everything they need on a fresh Debian 12 (root).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v /usr/bin/python3 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
DEMO_DIR := .demo

# Debian packages the project needs. Grouped by what uses them.
APT_PACKAGES := \
	python3-venv python3-dev build-essential pkg-config \
	cmake g++ capnproto libcapnp-dev libssl-dev libgtest-dev \
	clang libclang-rt-14-dev redis-server libsystemd-dev libudev1 iproute2 \
	libbenchmark-dev nginx-light wrk clang-format libbpf-dev \
	debootstrap e2fsprogs dosfstools mtools fdisk qemu-system-x86 ovmf systemd-container zstd \
	nats-server

FUZZ_SECONDS ?= 60

.PHONY: help setup engine xdp demo test check test-vm image bench lint fuzz clean

help:
	@echo "make demo   - set up, then run an origin and a whole PoP on 127.0.0.1 (Ctrl-C stops it)"
	@echo "make test   - set up, then run the whole test suite (ruff and mypy included)"
	@echo "make check  - lint, types and every test but the image and vm tiers (between edits)"
	@echo "make bench  - set up, then run the benchmarks in bench/"
	@echo "make image  - build the appliance disk image into images/out/"
	@echo "make test-vm - boot the image under qemu (the boot tier of make test)"
	@echo "make lint   - ruff and mypy only"
	@echo "make fuzz   - run the libFuzzer targets for FUZZ_SECONDS each (default 60)"
	@echo "make setup  - apt packages, the .venv, the adpop package (idempotent)"

# (defined before `setup`, whose prerequisites make expands as it reads them)
PROMTOOL := .tools/promtool

setup: $(STAMPS)/apt $(STAMPS)/venv engine xdp $(PROMTOOL)

# promtool, to check the engine's /metrics exposition in the tests: Debian's prometheus
# package carries it, but installing that package would also start a Prometheus server, so
# only its promtool is unpacked here (no daemon, no user).
$(PROMTOOL): $(STAMPS)/apt
	@mkdir -p .tools/deb
	@# _apt cannot write into a root-owned folder: apt says so and downloads as root, which is fine.
	cd .tools/deb && rm -f prometheus_*.deb && { apt-get download -qq prometheus 2>/dev/null || \
		{ apt-get update -qq && apt-get download -qq prometheus; }; }
	dpkg-deb -x .tools/deb/prometheus_*.deb .tools/deb/root
	install -m 0755 .tools/deb/root/usr/bin/promtool $@
	rm -rf .tools/deb

# The XDP filter: one BPF object, against Debian's libbpf headers.
XDP_OBJECT := appliance/xdp/build/filter.bpf.o
xdp: $(XDP_OBJECT)
$(XDP_OBJECT): appliance/xdp/filter.bpf.c appliance/xdp/filter.h $(STAMPS)/apt
	@mkdir -p $(dir $@)
	clang -O2 -g -Wall -Werror -target bpf -I/usr/include/$$(gcc -dumpmachine) -c $< -o $@

# The engine, optimised (engine/build), with ASan + UBSan (engine/build-asan) for the unit
# tests, and with TSan (engine/build-tsan) for the unit tests and a swap-under-load run.
# cmake --build is incremental, so an up-to-date tree costs a second.
engine: $(STAMPS)/apt
	@test -f engine/build/CMakeCache.txt || cmake -S engine -B engine/build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build engine/build -j$$(nproc) -- --no-print-directory
	@test -f engine/build-asan/CMakeCache.txt || cmake -S engine -B engine/build-asan -DCMAKE_BUILD_TYPE=Debug -DADPOP_SANITIZE=ON >/dev/null
	cmake --build engine/build-asan -j$$(nproc) -- --no-print-directory
	@test -f engine/build-tsan/CMakeCache.txt || cmake -S engine -B engine/build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DADPOP_TSAN=ON >/dev/null
	cmake --build engine/build-tsan -j$$(nproc) --target adpop-engine-tests adpop-engine -- --no-print-directory
	@test -f engine/build-fuzz/CMakeCache.txt || cmake -S engine -B engine/build-fuzz -DADPOP_FUZZ=ON \
		-DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
	cmake --build engine/build-fuzz -j$$(nproc) --target fuzz_http fuzz_json -- --no-print-directory

# Each libFuzzer target for FUZZ_SECONDS, growing a corpus under engine/build-fuzz from the
# committed seeds in engine/fuzz/corpus/. A crash leaves its input in engine/build-fuzz/.
fuzz: setup
	@for t in http json; do \
		mkdir -p engine/build-fuzz/corpus-$$t; \
		echo "fuzz_$$t for $(FUZZ_SECONDS)s"; \
		(cd engine/build-fuzz && ./fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -max_len=8192 \
			-print_final_stats=1 corpus-$$t ../fuzz/corpus/$$t) 2>&1 | grep -E "^(stat::|Done|==)" || exit 1; \
	done
# Installs only what is missing, so a second run costs a dpkg query, not an apt-get.
$(STAMPS)/apt: Makefile
	@mkdir -p $(STAMPS)
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "apt: installing" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@touch $@

$(STAMPS)/venv: pyproject.toml $(STAMPS)/apt
	@mkdir -p $(STAMPS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,origin]'
	@touch $@

demo: setup
	@bash scripts/demo.sh

test: setup
	$(BIN)/pytest -q

# The inner loop between edits: lint, types and every test but the image and qemu tiers.
check: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -m "not image and not vm"

# The appliance disk (images/out/adpop-VERSION.raw, its manifest and a zstd copy); reused
# when no input changed. DRAGONFLY_DEB=path (with DRAGONFLY_SHA256) puts Dragonfly in.
image: setup
	$(BIN)/python -m images.build

# The boot tier alone: the image under qemu with OVMF (make test runs it too).
test-vm: setup
	$(BIN)/pytest -q -m vm

bench: setup
	$(BIN)/python -m bench.bench_snapshot
	$(BIN)/python -m bench.bench_engine
	$(BIN)/python -m bench.bench_sync
	$(BIN)/python -m bench.bench_events
	$(BIN)/python -m bench.bench_pacing
	$(BIN)/python -m bench.bench_tuning
	$(BIN)/python -m bench.bench_xdp
	$(BIN)/python -m bench.bench_console
	$(BIN)/python -m bench.bench_image

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(STAMPS) $(DEMO_DIR) .tools .pytest_cache .mypy_cache .ruff_cache engine/build engine/build-asan engine/build-tsan engine/build-fuzz
