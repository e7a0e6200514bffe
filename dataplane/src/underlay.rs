//! Underlay segments: a bridge in a network namespace of its own, and namespaces plugged into it
//! by a veth (an address, optionally a default route). The one way hosts are wired onto an
//! underlay, shared by the `netns` host provider (`slipway-hosts`) and the test world. Every
//! step finds what exists and makes only what is missing, so a half-made segment or plug is
//! completed by running the step again.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::link::Netlink;
use crate::{DataplaneError, netns};

/// The bridge of a segment, in the segment's namespace.
pub const BRIDGE: &str = "br0";

/// The MTU of every underlay link.
pub const MTU: u32 = 1500;

/// How long a veth name may stay taken by a link being destroyed with its namespace.
const EXISTS_TIMEOUT: Duration = Duration::from_secs(2);

/// Makes namespace `name` (unless it exists) with `lo` up.
pub async fn ensure_netns(name: &str) -> Result<(), DataplaneError> {
    if !netns::exists(name) {
        netns::create(name)?;
    }
    let nl = Netlink::in_netns(&netns::path(name))?;
    if let Some(lo) = nl.link("lo").await? {
        nl.set_up(lo.index).await?;
    }
    Ok(())
}

/// Makes segment namespace `name` with its bridge [`BRIDGE`] up.
pub async fn ensure_segment(name: &str) -> Result<(), DataplaneError> {
    ensure_netns(name).await?;
    let nl = Netlink::in_netns(&netns::path(name))?;
    let bridge = nl.ensure_bridge(BRIDGE).await?;
    nl.set_up(bridge.index).await
}

/// Namespace `netns` on segment `segment`: a veth whose end `port` is a port of the segment's
/// bridge and whose end `ifname` in `netns` has `address/prefix`, and, with `gateway`, a default
/// route through it.
#[derive(Debug, Clone, Copy)]
pub struct Plug<'a> {
    pub segment: &'a str,
    pub port: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

impl Plug<'_> {
    /// Makes whatever of the plug is missing (the namespace too).
    pub async fn ensure(&self) -> Result<(), DataplaneError> {
        ensure_netns(self.netns).await?;
        let seg = Netlink::in_netns(&netns::path(self.segment))?;
        let ns = Netlink::in_netns(&netns::path(self.netns))?;
        if seg.link(self.port).await?.is_none() || ns.link(self.ifname).await?.is_none() {
            // One end without the other is left from a namespace being deleted.
            seg.delete_link(self.port).await?;
            ns.delete_link(self.ifname).await?;
            let target = netns::path(self.netns);
            let deadline = Instant::now() + EXISTS_TIMEOUT;
            loop {
                match seg.add_veth(self.port, self.ifname, &target, MTU).await {
                    Err(DataplaneError::Netlink { detail, .. })
                        if detail.contains("exists") && Instant::now() < deadline =>
                    {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => {
                        other?;
                        break;
                    }
                }
            }
        }
        let missing = |what: String| DataplaneError::Netlink {
            what,
            detail: "not found".into(),
        };
        let bridge = seg
            .link(BRIDGE)
            .await?
            .ok_or_else(|| missing(format!("bridge of {}", self.segment)))?;
        let port = seg
            .link(self.port)
            .await?
            .ok_or_else(|| missing(format!("port {}", self.port)))?;
        seg.set_controller(port.index, bridge.index).await?;
        seg.set_up(port.index).await?;
        let link = ns
            .link(self.ifname)
            .await?
            .ok_or_else(|| missing(format!("{} in {}", self.ifname, self.netns)))?;
        if !ns
            .addresses(link.index)
            .await?
            .contains(&(self.address, self.prefix))
        {
            ns.add_address(link.index, self.address, self.prefix)
                .await?;
        }
        ns.set_up(link.index).await?;
        if let Some(gateway) = self.gateway {
            ns.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(gateway), link.index)
                .await?;
        }
        Ok(())
    }
}

/// Runs `future` to completion on a runtime of its own, on a thread of its own: for callers
/// without a runtime, or inside one that must not be blocked on.
pub fn block_on<T: Send>(future: impl Future<Output = T> + Send) -> Result<T, DataplaneError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| DataplaneError::Syscall {
                        call: "start a tokio runtime",
                        source,
                    })?;
                Ok(runtime.block_on(future))
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
