//! The BPF objects `build.rs` compiled from `ebpf/`, embedded in the binary so that a node needs
//! no file beside it.

/// `ebpf/pod_veth.c`: the TC program for the host side of a pod's veth.
pub static POD_VETH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod_veth.o"));

/// `ebpf/sock.c`: the cgroup sock_addr programs that translate service addresses.
pub static SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
