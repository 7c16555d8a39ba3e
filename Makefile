# tern — top-level entry points. `make run` and `make test` install what they need.
#
#   make run     boot a microVM with the built-in rootfs and run a demo command in it
#   make test    unit tests on the host, then the real-KVM tests (through tests/nested-runner
#                on hosts whose KVM cannot boot Linux, e.g. kvm_pvm)
#   make bench   the benchmark harness (tern vs QEMU microvm), results under tests/bench/results
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

.PHONY: all deps build kernel agent initramfs run test lint test-unit test-runner test-kvm bench clippy clean

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

clippy:
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
