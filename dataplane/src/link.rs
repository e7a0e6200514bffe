//! Netlink (rtnetlink) for the links, addresses, routes and neighbours Slipway manages, in the
//! caller's network namespace or in another one. A handle opened for a namespace keeps talking
//! to that namespace: the socket is created on a thread that entered it.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::neighbour::NeighbourState;
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteScope};
use rtnetlink::{
    Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder,
};

use crate::DataplaneError;

/// What Slipway needs to know of a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub up: bool,
}

/// An IPv4 route as read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route4 {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
    pub oif: Option<u32>,
}

/// An address on a link, as read back from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub ip: IpAddr,
    pub prefix: u8,
    /// Scope global (`RT_SCOPE_UNIVERSE`): neither link- nor host-local.
    pub global: bool,
}

/// A netlink handle bound to one network namespace.
#[derive(Debug, Clone)]
pub struct Netlink {
    handle: Handle,
}

fn nl_error(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> DataplaneError {
    let what = what.into();
    move |e| DataplaneError::Netlink {
        what,
        detail: e.to_string(),
    }
}

/// Whether a netlink error is the kernel's ENOENT/ENODEV/ESRCH ("no such thing").
pub fn is_absent(error: &DataplaneError) -> bool {
    matches!(error, DataplaneError::Netlink { detail, .. }
        if detail.contains("No such") || detail.contains("os error 2") || detail.contains("os error 19") || detail.contains("os error 3"))
}

impl Netlink {
    /// A handle on the caller's namespace. Must be called inside a tokio runtime, which drives
    /// the connection.
    pub fn current() -> Result<Self, DataplaneError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| DataplaneError::Syscall {
                call: "netlink socket",
                source,
            })?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// A handle on the namespace at `netns` (e.g. `/run/netns/x` or `/proc/<pid>/ns/net`).
    pub fn in_netns(netns: &Path) -> Result<Self, DataplaneError> {
        // The socket registers with the caller's tokio reactor when it is made.
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = crate::netns::run_in_path(netns, || {
            let _runtime = runtime.enter();
            rtnetlink::new_connection().map_err(|source| DataplaneError::Syscall {
                call: "netlink socket",
                source,
            })
        })??;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    /// The link named `name`, if it exists.
    pub async fn link(&self, name: &str) -> Result<Option<Link>, DataplaneError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(Some(to_link(&message))),
            Ok(None) => Ok(None),
            Err(e) => {
                let err = nl_error(format!("get link {name}"))(e);
                if is_absent(&err) { Ok(None) } else { Err(err) }
            }
        }
    }

    /// Every link whose name starts with `prefix`.
    pub async fn links_with_prefix(&self, prefix: &str) -> Result<Vec<Link>, DataplaneError> {
        let mut stream = self.handle.link().get().execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(nl_error("list links"))? {
            let link = to_link(&message);
            if link.name.starts_with(prefix) {
                found.push(link);
            }
        }
        Ok(found)
    }

    /// Creates a veth pair: `name` here, `peer` inside the namespace at `peer_netns`, both with
    /// `mtu`. Returns the local end.
    pub async fn add_veth(
        &self,
        name: &str,
        peer: &str,
        peer_netns: &Path,
        mtu: u32,
    ) -> Result<Link, DataplaneError> {
        let ns = File::open(peer_netns).map_err(|source| DataplaneError::Syscall {
            call: "open netns",
            source,
        })?;
        let peer_message = LinkMessageBuilder::<LinkUnspec>::new()
            .name(peer.to_owned())
            .mtu(mtu)
            .setns_by_fd(ns.as_raw_fd())
            .build();
        let message = LinkVeth::new(name, peer)
            .mtu(mtu)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_message)))
            .build();
        self.add_link(message, name, "veth").await
    }

    /// Creates an external (collect_md) VXLAN device on UDP `port`, or returns the existing one:
    /// the datapath sets each packet's remote and VNI with bpf_skb_set_tunnel_key. It learns
    /// nothing from what it receives: where a pod lives is the datapath's `routes` map.
    pub async fn ensure_vxlan_external(
        &self,
        name: &str,
        port: u16,
    ) -> Result<Link, DataplaneError> {
        if let Some(link) = self.link(name).await? {
            return Ok(link);
        }
        let message = LinkMessageBuilder::<LinkVxlan>::new(name)
            .collect_metadata(true)
            .learning(false)
            .port(port)
            .build();
        self.add_link(message, name, "vxlan").await
    }

    /// Creates a bridge named `name` (up), or returns the existing link of that name.
    pub async fn ensure_bridge(&self, name: &str) -> Result<Link, DataplaneError> {
        if let Some(link) = self.link(name).await? {
            return Ok(link);
        }
        self.add_link(LinkBridge::new(name).build(), name, "bridge")
            .await
    }

    /// Makes link `index` a port of the bridge (or other controller) `controller`.
    pub async fn set_controller(&self, index: u32, controller: u32) -> Result<(), DataplaneError> {
        let message = LinkUnspec::new_with_index(index)
            .controller(controller)
            .build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(nl_error(format!("set link {index} master {controller}")))
    }

    /// Creates the link `message` describes and reads it back by `name`.
    async fn add_link(
        &self,
        message: LinkMessage,
        name: &str,
        kind: &str,
    ) -> Result<Link, DataplaneError> {
        let what = format!("add {kind} {name}");
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(nl_error(what.clone()))?;
        self.link(name)
            .await?
            .ok_or_else(|| DataplaneError::Netlink {
                what,
                detail: "created but not found".into(),
            })
    }

    pub async fn set_up(&self, index: u32) -> Result<(), DataplaneError> {
        let message = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(nl_error(format!("set link {index} up")))
    }

    /// Sets the hardware address of link `index`.
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), DataplaneError> {
        let message = LinkUnspec::new_with_index(index)
            .address(mac.to_vec())
            .build();
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(nl_error(format!("set link {index} address")))
    }

    /// Deletes link `name`; an absent link is not an error.
    pub async fn delete_link(&self, name: &str) -> Result<(), DataplaneError> {
        let Some(link) = self.link(name).await? else {
            return Ok(());
        };
        match self
            .handle
            .link()
            .del(link.index)
            .execute()
            .await
            .map_err(nl_error(format!("delete link {name}")))
        {
            Err(e) if !is_absent(&e) => Err(e),
            _ => Ok(()),
        }
    }

    pub async fn add_address(
        &self,
        index: u32,
        ip: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), DataplaneError> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(nl_error(format!("add address {ip}/{prefix}")))
    }

    /// The IPv4 addresses (with prefix) on link `index`.
    pub async fn addresses(&self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>, DataplaneError> {
        Ok(self
            .link_addresses(index)
            .await?
            .into_iter()
            .filter_map(|a| match a.ip {
                IpAddr::V4(ip) => Some((ip, a.prefix)),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// Every address (IPv4 and IPv6) on link `index`, in the kernel's order (IPv4 first).
    pub async fn link_addresses(&self, index: u32) -> Result<Vec<Address>, DataplaneError> {
        let mut stream = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(message) = stream
            .try_next()
            .await
            .map_err(nl_error("list addresses"))?
        {
            if let Some(address) = to_address(&message) {
                found.push(address);
            }
        }
        Ok(found)
    }

    /// Adds `dst/prefix` via `gateway` (or directly on the link when `None`) out of link `oif`.
    pub async fn add_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        oif: u32,
    ) -> Result<(), DataplaneError> {
        let mut builder = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(oif);
        builder = match gateway {
            Some(gw) => builder.gateway(gw),
            None => builder.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(builder.build())
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!("add route {dst}/{prefix}")))
    }

    /// The IPv4 routes of the main table.
    pub async fn routes(&self) -> Result<Vec<Route4>, DataplaneError> {
        let mut stream = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut found = Vec::new();
        while let Some(message) = stream.try_next().await.map_err(nl_error("list routes"))? {
            let mut route = Route4 {
                dst: Ipv4Addr::UNSPECIFIED,
                prefix: message.header.destination_prefix_length,
                gateway: None,
                oif: None,
            };
            for attr in &message.attributes {
                match attr {
                    RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                    RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                    RouteAttribute::Oif(index) => route.oif = Some(*index),
                    _ => {}
                }
            }
            found.push(route);
        }
        Ok(found)
    }

    /// A permanent neighbour entry: `ip` is at `mac` on link `index`.
    pub async fn add_neighbour(
        &self,
        index: u32,
        ip: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), DataplaneError> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(nl_error(format!("add neighbour {ip}")))
    }
}

fn to_link(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mac: None,
        mtu: None,
        up: message.header.flags.contains(LinkFlags::Up),
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Address(mac) => link.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
            LinkAttribute::Mtu(mtu) => link.mtu = Some(*mtu),
            _ => {}
        }
    }
    link
}

/// The address of `message`: its local address (`IFA_LOCAL`, which differs from `IFA_ADDRESS`
/// on point-to-point links), else its address, as `ip addr` shows them.
fn to_address(message: &AddressMessage) -> Option<Address> {
    let mut local = None;
    let mut address = None;
    for attr in &message.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    Some(Address {
        ip: local.or(address)?,
        prefix: message.header.prefix_len,
        global: message.header.scope == AddressScope::Universe,
    })
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;
    use std::process::Command;

    use super::*;
    use crate::netns::{self, tests::Scratch};

    #[test]
    fn macs_round_trip() {
        let mac = [0x02, 0xab, 0, 0x10, 0xff, 0x7];
        assert_eq!(format_mac(&mac), "02:ab:00:10:ff:07");
        assert_eq!(parse_mac("02:ab:00:10:ff:07"), Some(mac));
        assert_eq!(parse_mac("02:ab:00:10:ff"), None);
        assert_eq!(parse_mac("02:ab:00:10:ff:07:01"), None);
        assert_eq!(parse_mac("zz:ab:00:10:ff:07"), None);
    }

    fn ip(ns: &str, args: &[&str]) {
        let status = Command::new("ip")
            .args(["-n", ns])
            .args(args)
            .status()
            .expect("run ip");
        assert!(status.success(), "ip -n {ns} {args:?}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: root + netns; run with --ignored"
    )]
    fn link_addresses_reads_both_families_with_their_scope() {
        let ns = Scratch::new("addrtest");
        ip(
            &ns.0,
            &[
                "link", "add", "name", "a", "type", "veth", "peer", "name", "b",
            ],
        );
        ip(&ns.0, &["addr", "add", "10.1.2.3/24", "dev", "a"]);
        ip(&ns.0, &["addr", "add", "fd00::5/64", "dev", "a", "nodad"]);
        ip(&ns.0, &["addr", "add", "fe80::5/64", "dev", "a", "nodad"]);
        let (link, addresses) = netns::run_in(&ns.0, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let netlink = Netlink::current().expect("netlink");
                let link = netlink.link("a").await.expect("get").expect("link a");
                let addresses = netlink.link_addresses(link.index).await.expect("list");
                assert_eq!(netlink.link("nope").await.expect("get"), None);
                (link, addresses)
            })
        })
        .expect("run in netns");
        assert!(link.mac.is_some(), "{link:?}");
        let v4 = Address {
            ip: Ipv4Addr::new(10, 1, 2, 3).into(),
            prefix: 24,
            global: true,
        };
        let v6 = Address {
            ip: "fd00::5".parse::<Ipv6Addr>().expect("ip").into(),
            prefix: 64,
            global: true,
        };
        let local6 = Address {
            ip: "fe80::5".parse::<Ipv6Addr>().expect("ip").into(),
            prefix: 64,
            global: false,
        };
        for want in [v4, v6, local6] {
            assert!(addresses.contains(&want), "{want:?} not in {addresses:?}");
        }
        assert_eq!(addresses.len(), 3, "{addresses:?}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: root + netns; run with --ignored"
    )]
    fn a_bridge_takes_a_veth_as_its_port() {
        let ns = Scratch::new("brtest");
        let (bridge, port, again) = netns::run_in(&ns.0, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let netlink = Netlink::current().expect("netlink");
                let bridge = netlink.ensure_bridge("br0").await.expect("bridge");
                let again = netlink.ensure_bridge("br0").await.expect("bridge again");
                ip(
                    &ns.0,
                    &["link", "add", "p", "type", "veth", "peer", "name", "q"],
                );
                let port = netlink.link("p").await.expect("get").expect("link p");
                netlink
                    .set_controller(port.index, bridge.index)
                    .await
                    .expect("set master");
                (bridge, port, again)
            })
        })
        .expect("run in netns");
        assert_eq!(
            bridge.index, again.index,
            "ensure_bridge found the existing one"
        );
        let out = Command::new("ip")
            .args(["-n", &ns.0, "-o", "link", "show", "p"])
            .output()
            .expect("ip");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("master br0"), "{text} ({port:?})");
    }
}
