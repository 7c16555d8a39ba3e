//! Everything that talks to KVM. This is the only module that imports `kvm_ioctls`: the
//! system handle and capability checks ([`kvm`]), the VM with its irqchip, memory slots,
//! irqfds and ioeventfds ([`vm`]), the vCPUs and their run loop ([`vcpu`]), and guest RAM
//! ([`memory`]).

pub mod kvm;
pub mod memory;
pub mod vcpu;
pub mod vm;

#[cfg(test)]
mod kvm_tests;
