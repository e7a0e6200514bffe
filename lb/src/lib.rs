//! The Slipway L4 load balancer: Maglev table, VIP pools, backend health checks, ARP/NDP announcement.
#![forbid(unsafe_code)]
