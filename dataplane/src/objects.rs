//! The BPF objects `build.rs` compiled from `ebpf/`, embedded in the binary so that a node needs
//! no file beside it.

/// `ebpf/pod_veth.c`: the TC program for the host side of a pod's veth.
pub static POD_VETH: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/pod_veth.o"));

/// `ebpf/host.c`: the TC program for host devices that bring pod traffic in from other hosts.
pub static HOST: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/host.o"));

/// `ebpf/lb.c`: the L4 load balancer at TC (TCX ingress of the LB host's interface).
pub static LB: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb.o"));
/// `ebpf/lb_xdp.c`: the same load balancer at XDP, for NICs with native XDP.
pub static LB_XDP: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb_xdp.o"));

/// `ebpf/sock.c`: the cgroup sock_addr programs that translate service addresses.
pub static SOCK: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.o"));
