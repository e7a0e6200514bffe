//! End-to-end tests that cross crates (hosts in network namespaces, real traffic, real clients)
//! live in `tests/tests/`; they arrive with the CNI, the load balancer and the CSI driver.
#![forbid(unsafe_code)]
