//! The private network namespace every test runs in.
//!
//! Tests send traffic only to loopback or to 10.250.x.y addresses that exist on `lo` of a
//! network namespace made for the run (`tests/netns-run.sh`), which has no route out. Before
//! anything opens a socket, [`assert_private_network`] proves that is where we are.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};

/// The address the run adds to `lo`, with its /16: every 10.250.x.y is local in the namespace.
pub const NAMESPACE_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// Panics, with what to do instead, unless this process is in a network namespace made for the
/// run: only `lo` exists, there is no default route, and 10.250.0.1 is a local address.
///
/// This is a panic, never a skip: a test run outside the namespace must fail rather than send
/// traffic to 10.250.x.y over the host's network.
pub fn assert_private_network() {
    if let Err(problem) = check_private_network() {
        panic!(
            "refusing to run: {problem}.\n\
             kubegrpc's tests and demo run inside a private network namespace made for the run, \
             with no route out. Run them with `make test` (or `make demo`), which wraps them in \
             tests/netns-run.sh (needs root for `unshare --net`)."
        );
    }
}

/// The checks of [`assert_private_network`], as a result.
pub fn check_private_network() -> Result<(), String> {
    let interfaces = interfaces()?;
    if interfaces != ["lo"] {
        return Err(format!(
            "this network namespace has interfaces {interfaces:?}; a namespace made for the run has only \"lo\""
        ));
    }
    if let Some(route) = default_route()? {
        return Err(format!("this network namespace has a default route ({route})"));
    }
    UdpSocket::bind(SocketAddr::from((NAMESPACE_ADDRESS, 0)))
        .map_err(|error| format!("{NAMESPACE_ADDRESS} is not an address on lo ({error})"))?;
    Ok(())
}

/// Interfaces of this process's network namespace (/proc/net/dev is per namespace).
fn interfaces() -> Result<Vec<String>, String> {
    let dev = read("/proc/net/dev")?;
    let mut names: Vec<String> = dev
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .collect();
    names.sort();
    Ok(names)
}

/// A default route in the main IPv4 table or the IPv6 tables, ignoring IPv6's built-in
/// unreachable route (flag RTF_REJECT).
fn default_route() -> Result<Option<String>, String> {
    const RTF_REJECT: u32 = 0x0200;
    for line in read("/proc/net/route")?.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() > 7 && fields[1] == "00000000" && fields[7] == "00000000" {
            return Ok(Some(format!("IPv4 via {}", fields[0])));
        }
    }
    for line in read("/proc/net/ipv6_route").unwrap_or_default().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 10 {
            continue;
        }
        let flags = u32::from_str_radix(fields[8], 16).unwrap_or(0);
        if fields[0] == "00000000000000000000000000000000" && fields[1] == "00" && flags & RTF_REJECT == 0 {
            return Ok(Some(format!("IPv6 via {}", fields[9])));
        }
    }
    Ok(None)
}

fn read(path: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|error| format!("cannot read {path}: {error}"))
}
