//! Sending raw Ethernet frames out of an interface through an `AF_PACKET` socket (the LB's
//! gratuitous ARP and unsolicited Neighbor Advertisements). Neither nix nor rustix can name a
//! `sockaddr_ll` safely, so this module calls libc; each `unsafe` states its invariant.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::DataplaneError;

fn syscall(call: &'static str) -> DataplaneError {
    DataplaneError::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Sends one raw Ethernet frame out of interface `ifindex` (of the calling thread's network
/// namespace).
pub fn send_frame(ifindex: u32, frame: &[u8]) -> Result<(), DataplaneError> {
    // SAFETY: socket(2) takes no pointers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(syscall("socket(AF_PACKET)"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns; OwnedFd closes it on drop.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = ifindex as i32;
    addr.sll_halen = 6;
    addr.sll_addr[..6].copy_from_slice(frame.get(..6).unwrap_or(&[0xff; 6]));
    // SAFETY: frame and addr outlive the call; the lengths passed are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&raw const addr).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(syscall("sendto(AF_PACKET)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::netns::{self, tests::Scratch};

    fn ip(ns: &str, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip -n {ns} {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn rx_packets(ns: &str, ifname: &str) -> u64 {
        let text = ip(ns, &["-j", "-s", "link", "show", "dev", ifname]);
        let links: serde_json::Value = serde_json::from_str(&text).expect("ip -j");
        links[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("rx packets")
    }

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: root + netns; run with --ignored"
    )]
    fn a_frame_sent_out_of_a_veth_arrives_at_its_peer() {
        let ns = Scratch::new("pkttest");
        ip(
            &ns.0,
            &[
                "link", "add", "name", "a", "type", "veth", "peer", "name", "b",
            ],
        );
        ip(&ns.0, &["link", "set", "dev", "a", "up"]);
        ip(&ns.0, &["link", "set", "dev", "b", "up"]);
        let before = rx_packets(&ns.0, "b");
        // A broadcast frame of an unused EtherType: nothing in the namespace answers it.
        let mut frame = vec![0xff; 6];
        frame.extend([0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        frame.extend([0u8; 46]);
        netns::run_in(&ns.0, || {
            let ifindex = netns::ifindex("a").expect("ifindex of a");
            send_frame(ifindex, &frame)
        })
        .expect("run in netns")
        .expect("send");
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx_packets(&ns.0, "b") == before {
            assert!(Instant::now() < deadline, "the frame never reached b");
            std::thread::sleep(Duration::from_millis(10));
        }
        let err = netns::run_in(&ns.0, || send_frame(u32::MAX >> 1, &frame))
            .expect("run in netns")
            .expect_err("no such interface");
        assert!(err.to_string().contains("sendto(AF_PACKET)"), "{err}");
    }
}
