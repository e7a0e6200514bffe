//! The one kernel interface of this crate outside aya: an `AF_PACKET` socket to send frames
//! (gratuitous ARP, unsolicited Neighbor Advertisements). Neither nix nor rustix can name a
//! `sockaddr_ll` safely, so this module calls libc; each `unsafe` states its invariant.
#![allow(
    unsafe_code,
    reason = "the AF_PACKET seam: raw socket calls through libc"
)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::LbError;

fn syscall(call: &'static str) -> LbError {
    LbError::Syscall {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Sends one raw Ethernet frame out of interface `ifindex` (of the calling thread's network
/// namespace).
pub fn send_frame(ifindex: u32, frame: &[u8]) -> Result<(), LbError> {
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
