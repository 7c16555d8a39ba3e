//! Assembling a VM, in order: check KVM, map guest RAM, create the VM (irqchip, PIT) and
//! register RAM, set up the watch that ends the VM on a seccomp violation, create the devices
//! (virtio-mmio windows with their irqfds and ioeventfds: vsock, virtio-fs, then the net
//! devices; then COM1 and the i8042 reset port), build the command line, load the kernel and
//! boot structures, create and configure the vCPUs, start the device event loops (fs and net
//! too, if the VM has those devices), start the vCPU threads. Every thread started here is
//! hardened for its role (`seccomp`). [`RunningVm`] owns what must outlive the vCPUs and
//! releases it in order.

use std::fs::OpenOptions;
use std::io::Write;
use std::sync::{Arc, Mutex, Weak};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use vmm_sys_util::eventfd::EventFd;

use crate::boot::cmdline::{build_cmdline, MmioDeviceSlot};
use crate::boot::{prepare_guest_memory, vcpu_boot_state};
use crate::config::{ConsoleOutput, VmConfig};
use crate::devices::bus::{MmioBus, PioBus};
use crate::devices::event_loop::{EventLoop, EventLoopHandle, EventLoopThread};
use crate::devices::fs::{FsShares, VirtioFs, FS_TAG};
use crate::devices::legacy::{
    ConsoleTail, ConsoleWriter, I8042ResetPort, SerialConsole, COM1_IRQ, COM1_PORT, COM1_PORT_COUNT, I8042_DATA_PORT,
    I8042_PORT_COUNT,
};
use crate::devices::net::Net;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::VirtioDevice;
use crate::devices::vsock::Vsock;
use crate::error::VmmError;
use crate::fs_watcher::ShareWatchers;
use crate::layout::{MAX_IRQ, MAX_VCPUS, VIRTIO_FIRST_IRQ, VIRTIO_MMIO_BASE, VIRTIO_MMIO_WINDOW};
use crate::lifecycle::{VmFault, VmLifecycle};
use crate::memory::create_guest_memory;
use crate::memory::GuestMemory;
use crate::metrics::VmMetrics;
use crate::seccomp::{Hardening, SeccompRole, ViolationSink};
use crate::vstate::kvm::KvmSystem;
use crate::vstate::vcpu::{install_kick_handler, Vcpu, VcpuRunContext, VmExit};
use crate::vstate::vm::Vm;

/// Offset of the virtio-mmio QueueNotify register.
const VIRTIO_MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// Context ids 0–2 are the hypervisor, local and host; `u32::MAX` is "any".
const FIRST_GUEST_CID: u32 = 3;

/// What a started VM owns besides its vCPU threads.
pub(crate) struct RunningVm {
    event_loop: EventLoopThread,
    /// The virtio-fs device's loop (`tern-fs`), apart so that file-system work cannot delay
    /// vsock: agent RPC, stdio and change records.
    fs_event_loop: Option<EventLoopThread>,
    /// The net devices' loop, apart so that network load cannot stall vsock or virtio-fs.
    net_event_loop: Option<EventLoopThread>,
    fs_shares: Option<Arc<FsShares>>,
    /// Host watchers of the watchable shares (threads only once one is added).
    watchers: Arc<ShareWatchers>,
    pio: Arc<PioBus>,
    mmio: Arc<MmioBus>,
    vm: Vm,
    memory: GuestMemory,
    console_tail: Arc<ConsoleTail>,
}

impl RunningVm {
    /// The last bytes of the serial console (kept even when the console is discarded).
    pub(crate) fn console_tail(&self) -> Arc<ConsoleTail> {
        self.console_tail.clone()
    }

    /// The share table of the virtio-fs device, if the VM has one.
    pub(crate) fn fs_shares(&self) -> Option<Arc<FsShares>> {
        self.fs_shares.clone()
    }

    /// The watchers of the VM's watchable shares.
    pub(crate) fn watchers(&self) -> Arc<ShareWatchers> {
        self.watchers.clone()
    }

    /// Release everything; the vCPU threads must be joined first.
    pub(crate) fn shut_down(self) {
        let RunningVm {
            event_loop,
            fs_event_loop,
            net_event_loop,
            fs_shares,
            watchers,
            pio,
            mmio,
            vm,
            memory,
            console_tail: _, // the VM handle keeps its own reference
        } = self;
        // The watcher talks to the guest through the vsock device: stop it first.
        watchers.stop();
        event_loop.stop();
        if let Some(fs_event_loop) = fs_event_loop {
            fs_event_loop.stop();
        }
        if let Some(net_event_loop) = net_event_loop {
            net_event_loop.stop();
        }
        // Devices go before the VM: their eventfds are still registered with it.
        drop(mmio);
        drop(pio);
        drop(fs_shares);
        drop(vm);
        drop(memory);
    }
}

fn validate(config: &VmConfig, kvm: &KvmSystem) -> Result<(), VmmError> {
    let max_vcpus = usize::from(MAX_VCPUS).min(kvm.max_vcpus());
    if config.vcpus == 0 || usize::from(config.vcpus) > max_vcpus {
        return Err(VmmError::InvalidConfig(format!(
            "{} vCPUs requested; 1 to {max_vcpus} are supported",
            config.vcpus
        )));
    }
    if let Some(vsock) = &config.vsock {
        if vsock.guest_cid < FIRST_GUEST_CID || vsock.guest_cid == u32::MAX {
            return Err(VmmError::InvalidConfig(format!(
                "vsock guest CID {} is reserved; use {FIRST_GUEST_CID} or more",
                vsock.guest_cid
            )));
        }
    }
    let mut names = std::collections::HashSet::new();
    for net in &config.net {
        if net.name.is_empty() || !names.insert(net.name.as_str()) {
            return Err(VmmError::InvalidConfig(format!("net device name {:?} is empty or used twice", net.name)));
        }
        crate::devices::net::validate_params(&net.mac, net.mtu)
            .map_err(|err| VmmError::InvalidConfig(format!("net device {}: {err}", net.name)))?;
    }
    Ok(())
}

fn console_writer(output: &ConsoleOutput, hardening: &Hardening) -> Result<ConsoleWriter, VmmError> {
    let sink: Box<dyn Write + Send> = match output {
        ConsoleOutput::Discard => return Ok(ConsoleWriter::discard()),
        ConsoleOutput::Stdout => Box::new(std::io::stdout()),
        ConsoleOutput::Stderr => Box::new(std::io::stderr()),
        ConsoleOutput::File(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| VmmError::Console { path: path.clone(), source })?,
        ),
    };
    ConsoleWriter::spawn(sink, hardening).map_err(|err| VmmError::Thread("console", err))
}

fn new_eventfd() -> Result<EventFd, VmmError> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)
}

/// Put `device` in virtio-mmio window `slot`: its interrupt becomes an irqfd, each queue's
/// notification an ioeventfd, so neither needs a trip through a vCPU thread.
fn attach_virtio_device(
    vm: &Vm,
    memory: &GuestMemory,
    mmio: &mut MmioBus,
    device: Box<dyn VirtioDevice>,
    slot: usize,
) -> Result<MmioDeviceSlot, VmmError> {
    let irq = u32::try_from(slot)
        .ok()
        .and_then(|slot| VIRTIO_FIRST_IRQ.checked_add(slot))
        .filter(|irq| *irq <= MAX_IRQ)
        .ok_or_else(|| VmmError::InvalidConfig("more virtio devices than interrupt lines".into()))?;
    let base = VIRTIO_MMIO_BASE + slot as u64 * VIRTIO_MMIO_WINDOW;

    let interrupt = new_eventfd()?;
    vm.register_irqfd(&interrupt, irq)?;
    let mut queue_kicks = Vec::new();
    for queue in 0..device.queue_max_sizes().len() {
        let kick = new_eventfd()?;
        vm.register_mmio_notify(&kick, base + VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32)?;
        queue_kicks.push(kick);
    }
    let transport = MmioTransport::new(device, memory.clone(), interrupt, queue_kicks);
    mmio.insert(base, VIRTIO_MMIO_WINDOW, Arc::new(Mutex::new(transport)))?;
    Ok(MmioDeviceSlot { base, size: VIRTIO_MMIO_WINDOW, irq })
}

/// What [`build_virtio_devices`] made.
struct VirtioDevices {
    mmio: MmioBus,
    slots: Vec<MmioDeviceSlot>,
    fs_shares: Option<Arc<FsShares>>,
}

/// The event loops devices register with: `fs` exists iff the VM has an fs device, `net` iff
/// it has net devices.
struct DeviceLoops {
    devices: EventLoopHandle,
    fs: Option<EventLoopHandle>,
    net: Option<EventLoopHandle>,
}

fn build_virtio_devices(
    config: &VmConfig,
    vm: &Vm,
    memory: &GuestMemory,
    loops: &DeviceLoops,
    metrics: &Arc<VmMetrics>,
) -> Result<VirtioDevices, VmmError> {
    let events = &loops.devices;
    let mut mmio = MmioBus::new();
    let mut slots = Vec::new();
    if let Some(vsock) = &config.vsock {
        let mut device = Vsock::new(u64::from(vsock.guest_cid), &vsock.uds_path, events.clone())
            .map_err(|err| VmmError::Device { device: "vsock", source: Box::new(err) })?;
        device.set_metrics(metrics.clone());
        slots.push(attach_virtio_device(vm, memory, &mut mmio, Box::new(device), slots.len())?);
    }
    let mut fs_shares = None;
    if config.has_fs_device() {
        let shares = Arc::new(FsShares::new());
        for share in &config.fs_shares {
            shares.add(share.clone())?;
        }
        let events =
            loops.fs.as_ref().ok_or_else(|| VmmError::InvalidConfig("the fs device needs the fs event loop".into()))?;
        let mut device = VirtioFs::new(FS_TAG, shares.clone(), events.clone())
            .map_err(|err| VmmError::Device { device: "virtio-fs", source: Box::new(err) })?;
        device.set_metrics(metrics.clone());
        slots.push(attach_virtio_device(vm, memory, &mut mmio, Box::new(device), slots.len())?);
        fs_shares = Some(shares);
    }
    // Last, so the vsock and virtio-fs slots are the same with or without net devices.
    for net in &config.net {
        let events =
            loops.net.as_ref().ok_or_else(|| VmmError::InvalidConfig("net devices need the net event loop".into()))?;
        let mut device = Net::new(&net.name, &net.tap, net.mac, net.mtu, events.clone())
            .map_err(|err| VmmError::Device { device: "virtio-net", source: Box::new(err) })?;
        device.set_metrics(metrics.add_net_device(&net.name));
        slots.push(attach_virtio_device(vm, memory, &mut mmio, Box::new(device), slots.len())?);
    }
    Ok(VirtioDevices { mmio, slots, fs_shares })
}

fn build_legacy_devices(
    config: &VmConfig,
    vm: &Vm,
    lifecycle: &Arc<VmLifecycle>,
    hardening: &Hardening,
) -> Result<(PioBus, Arc<ConsoleTail>), VmmError> {
    let mut pio = PioBus::new();
    let serial_irq = new_eventfd()?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)?;
    let console = console_writer(&config.console, hardening)?;
    let console_tail = console.tail();
    let serial = SerialConsole::new(serial_irq, console);
    pio.insert(COM1_PORT, COM1_PORT_COUNT, Arc::new(Mutex::new(serial)))?;

    // A weak reference: the lifecycle must not be kept alive by a device it outlives.
    let lifecycle = Arc::downgrade(lifecycle);
    let reset_port = I8042ResetPort::new(move || {
        if let Some(lifecycle) = lifecycle.upgrade() {
            tracing::debug!("guest requested a reset through the i8042");
            lifecycle.finish(Ok(VmExit::Reset));
        }
    });
    pio.insert(I8042_DATA_PORT, I8042_PORT_COUNT, Arc::new(Mutex::new(reset_port)))?;
    Ok((pio, console_tail))
}

/// Ends the VM when one of its hardened threads reports a seccomp violation (mode `trap`):
/// the SIGSYS handler can only count and write an eventfd, so the ending happens here, on the
/// device event loop.
struct ViolationWatch {
    notify: EventFd,
    sink: Arc<ViolationSink>,
    lifecycle: Weak<VmLifecycle>,
}

impl Drop for ViolationWatch {
    fn drop(&mut self) {
        self.sink.withdraw_notify();
    }
}

impl MutEventSubscriber for ViolationWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.notify.read();
        let (Some(violation), Some(lifecycle)) = (self.sink.first(), self.lifecycle.upgrade()) else { return };
        tracing::error!(
            thread = %violation.thread,
            syscall = violation.syscall,
            name = violation.name.as_deref().unwrap_or("unknown"),
            "seccomp violation: a VMM thread made a syscall its filter forbids; the VM ends"
        );
        lifecycle.finish(Err(VmFault::Seccomp(violation)));
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.notify, EventSet::IN)) {
            tracing::error!(error = %err, "cannot watch for seccomp violations");
        }
    }
}

fn watch_for_violations(
    devices: &EventLoopHandle,
    metrics: &Arc<VmMetrics>,
    lifecycle: &Arc<VmLifecycle>,
) -> Result<(), VmmError> {
    let watch =
        ViolationWatch { notify: new_eventfd()?, sink: metrics.seccomp.clone(), lifecycle: Arc::downgrade(lifecycle) };
    // Each VM has metrics of its own, so the sink has no waker yet.
    if !metrics.seccomp.set_notify(&watch.notify) {
        return Err(VmmError::InvalidConfig("the VM's metrics are already in use by another VM".into()));
    }
    devices.add_subscriber(Arc::new(Mutex::new(watch))).map_err(|err| VmmError::Thread("device event loop", err))?;
    Ok(())
}

/// Build the VM described by `config` and start its vCPUs.
pub(crate) fn build_and_start(
    config: &VmConfig,
    lifecycle: Arc<VmLifecycle>,
    metrics: Arc<VmMetrics>,
) -> Result<RunningVm, VmmError> {
    let kvm = KvmSystem::open()?;
    validate(config, &kvm)?;
    install_kick_handler()?;
    let hardening = Hardening::new(config.seccomp, metrics.seccomp.clone());

    let memory = create_guest_memory(config.memory_mib)?;
    let mut vm = Vm::new(&kvm)?;
    vm.register_memory(&memory)?;

    let event_loop = EventLoop::new().map_err(|err| VmmError::Thread("device event loop", err))?;
    let net_event_loop = if config.net.is_empty() {
        None
    } else {
        Some(EventLoop::new().map_err(|err| VmmError::Thread("net event loop", err))?)
    };
    let fs_event_loop = if config.has_fs_device() {
        Some(EventLoop::new().map_err(|err| VmmError::Thread("fs event loop", err))?)
    } else {
        None
    };
    let loops = DeviceLoops {
        devices: event_loop.handle(),
        fs: fs_event_loop.as_ref().map(EventLoop::handle),
        net: net_event_loop.as_ref().map(EventLoop::handle),
    };
    // Before the first hardened thread (the console's) starts: a violation wakes the watch
    // even if it happens before the device loop runs.
    watch_for_violations(&loops.devices, &metrics, &lifecycle)?;
    let VirtioDevices { mmio, slots: virtio_slots, fs_shares } =
        build_virtio_devices(config, &vm, &memory, &loops, &metrics)?;
    let (pio, console_tail) = build_legacy_devices(config, &vm, &lifecycle, &hardening)?;

    let cmdline = build_cmdline(&virtio_slots, &config.cmdline)?;
    let boot = prepare_guest_memory(&memory, &config.kernel, config.initrd.as_deref(), &cmdline, config.vcpus)?;
    tracing::debug!("loaded {:?} kernel, entry {:#x}, initramfs {:?}", boot.format, boot.entry.0, boot.initrd);

    let supported_cpuid = kvm.supported_cpuid()?;
    let mut vcpus: Vec<Vcpu> = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = vm.create_vcpu(index)?;
        let entry = (index == 0).then_some(boot.entry.0);
        vcpu.configure(&vcpu_boot_state(&kvm, &supported_cpuid, index, config.vcpus, entry))?;
        vcpus.push(vcpu);
    }

    let watchers = Arc::new(ShareWatchers::new(
        config.vsock.as_ref().map(|v| v.uds_path.clone()),
        config.watch_resync_interval,
        hardening.clone(),
    ));
    for share in config.fs_shares.iter().filter(|s| s.watch) {
        watchers.watch(&share.name, &share.host_dir)?;
    }
    let event_loop = event_loop
        .spawn(crate::threads::DEVICES, SeccompRole::Devices, &hardening)
        .map_err(|err| VmmError::Thread("device event loop", err))?;
    let fs_event_loop = fs_event_loop
        .map(|fs_loop| fs_loop.spawn(crate::threads::FS, SeccompRole::Fs, &hardening))
        .transpose()
        .map_err(|err| VmmError::Thread("fs event loop", err))?;
    let net_event_loop = net_event_loop
        .map(|net_loop| net_loop.spawn(crate::threads::NET, SeccompRole::Net, &hardening))
        .transpose()
        .map_err(|err| VmmError::Thread("net event loop", err))?;
    let running = RunningVm {
        event_loop,
        fs_event_loop,
        net_event_loop,
        fs_shares,
        watchers,
        pio: Arc::new(pio),
        mmio: Arc::new(mmio),
        vm,
        memory,
        console_tail,
    };

    // Application processors first: they wait in KVM for the bootstrap processor's SIPI.
    for vcpu in vcpus.into_iter().rev() {
        let context = VcpuRunContext {
            pio: running.pio.clone(),
            mmio: running.mmio.clone(),
            supervisor: lifecycle.clone(),
            metrics: metrics.clone(),
            hardening: hardening.clone(),
        };
        match vcpu.spawn(context) {
            Ok(thread) => lifecycle.adopt_vcpu_thread(thread),
            Err(err) => {
                lifecycle.finish(Ok(VmExit::Stopped));
                lifecycle.join_vcpus();
                running.shut_down();
                return Err(VmmError::Thread("vCPU", err));
            }
        }
    }
    Ok(running)
}
