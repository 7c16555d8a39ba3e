# tern — top-level entry points. `make run` and `make test` install what they need.
#
#   make run     boot a microVM with the built-in rootfs and run a demo command in it
#   make test    unit tests on the host, then the real-KVM tests (through tests/nested-runner
#                on hosts whose KVM cannot boot Linux, e.g. kvm_pvm)
#   make bench   the benchmark harness (tern vs QEMU microvm), results under tests/bench/results
#   make fuzz    every fuzz target in fuzz/ for FUZZ_SECONDS each (stable toolchain, cargo-fuzz)
#
# The guest kernel is built once from Debian's linux-source and cached by config hash under
# $(TERN_CACHE) (default ~/.cache/tern), outside the repository.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
TERN_CACHE ?= $(HOME)/.cache/tern
export TERN_CACHE
RELEASE_DIR := target/release
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/release/tern-agent
INITRAMFS := $(RELEASE_DIR)/tern-initramfs.cpio
KERNEL_LINK := $(RELEASE_DIR)/tern-vmlinux
RUNNER := tests/nested-runner
DEMO_CMD ?= sh -c 'echo "hello from a tern microVM"; uname -sr; echo "vCPUs: $$(nproc)"; grep MemTotal /proc/meminfo'
APT_PACKAGES := qemu-system-x86 busybox-static cpio zstd xz-utils linux-source-6.1 bc flex bison \
	libelf-dev libssl-dev build-essential python3 containerd runc \
	protobuf-compiler containernetworking-plugins libseccomp-dev \
	python3-prometheus-client prometheus

.PHONY: all deps build kernel agent initramfs run test lint test-unit test-runner test-kvm bench fuzz clippy clean

all: build

## deps: Debian packages the build, the guest kernel and the runner need (idempotent).
deps:
	@missing=""; for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo ">> installing:$$missing"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q $$missing; \
	fi

## kernel: the guest kernel (cached by config hash); tern-vmlinux next to the tern binary.
kernel: deps
	@kernel-config/build-kernel.sh
	@mkdir -p $(RELEASE_DIR)
	@ln -sfn "$$(kernel-config/build-kernel.sh --print-path)/vmlinux" $(KERNEL_LINK)
	@echo ">> guest kernel: $(KERNEL_LINK) -> $$(readlink $(KERNEL_LINK))"

## agent: tern-agent as a static binary (it is /init in the guest).
agent:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release -p tern-agent --target $(AGENT_TARGET)

## initramfs: agent + busybox-static, the default rootfs; tern-initramfs.cpio next to tern.
initramfs: agent deps
	@mkdir -p $(RELEASE_DIR)
	guest-agent/build-initramfs.sh $(AGENT_BIN) $(INITRAMFS)

## build: everything `tern run` needs.
build: deps kernel initramfs
	$(CARGO) build --release --workspace --bins

## run: boot a microVM and run $(DEMO_CMD) in it.
run: build
	$(RUNNER) -- $(RELEASE_DIR)/tern run --timings -- $(DEMO_CMD)

## test: all tests. The lints and host unit tests first, then the runner's self-test, then
## the real-KVM tests.
test: build lint test-unit test-runner test-kvm

## lint: what STYLE.md promises, checked: rustfmt, clippy with every warning an error (unwrap,
## expect and undocumented unsafe are denied in the workspace lints), no module cycle in vmm.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	python3 vmm/scripts/module-deps.py

test-unit:
	$(CARGO) test --release --workspace --exclude tern-tests

test-runner: deps
	tests/runner-selftest.sh

## test-kvm: build the KVM test binaries on the host, run them all in one runner boot.
test-kvm: build
	tests/run-kvm-tests.sh

bench: build
	tests/bench/run.sh

## fuzz: build every target of the fuzz workspace (cargo-fuzz with `-s none`: no -Z flag, so the
## stable toolchain does; libfuzzer-sys needs build-essential's C++ compiler) and run each for
## FUZZ_SECONDS on its committed corpus (fuzz/corpus/<target>, read only; new inputs go to
## fuzz/target/corpus/<target>). Fails on the first target that crashes (the crashing input is
## under fuzz/artifacts/<target>/); prints each target's coverage at the end. `make test`
## replays the committed corpus through plain `cargo test` (the harnesses' unit tests).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := mmio virtio_fs vsock net agent_frame change_records oci_spec
fuzz: deps
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && $(CARGO) fuzz build -s none -a
	@mkdir -p fuzz/target/logs; summary=""; \
	for t in $(FUZZ_TARGETS); do \
		mkdir -p fuzz/target/corpus/$$t; \
		echo ">> fuzzing $$t for $(FUZZ_SECONDS) s"; \
		if ! (cd fuzz && $(CARGO) fuzz run -s none -a $$t target/corpus/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -timeout=30 -print_final_stats=1) > fuzz/target/logs/$$t.log 2>&1; then \
			tail -n 60 fuzz/target/logs/$$t.log; echo ">> $$t CRASHED (log: fuzz/target/logs/$$t.log)"; exit 1; \
		fi; \
		cov=$$(grep -o 'cov: [0-9]*' fuzz/target/logs/$$t.log | tail -n 1); \
		runs=$$(grep -o 'stat::number_of_executed_units: *[0-9]*' fuzz/target/logs/$$t.log | grep -o '[0-9]*$$'); \
		summary="$$summary$$(printf '%-16s %-12s runs: %s' $$t "$$cov" "$$runs")\n"; \
	done; \
	echo ">> coverage after $(FUZZ_SECONDS) s per target (cov = edges covered):"; printf "$$summary"

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
