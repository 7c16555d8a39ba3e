//! Everything that talks to KVM. This is the only module that imports `kvm_ioctls`: the
//! system handle and capability checks ([`kvm`]), the VM with its irqchip, memory slots,
//! irqfds and ioeventfds ([`vm`]), and the vCPUs and their run loop ([`vcpu`]). It is the
//! bottom of the crate with [`crate::memory`] and [`crate::layout`]: what it needs from the
//! layers above (the buses, the VM's lifecycle, the vCPUs' boot state) comes in through the
//! traits and values of [`vcpu`].

pub mod kvm;
pub mod vcpu;
pub mod vm;
