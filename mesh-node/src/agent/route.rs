//! Policy routing for inbound capture: packets the TC program assigned to a proxy socket carry
//! [`INBOUND_MARK`] and must be delivered locally, not forwarded to the pod they are addressed
//! to (the kernel drops forwarded packets that already have a socket).

use std::{
    fs,
    net::Ipv4Addr,
    process::{Command, Output},
};

use mesh_common::{INBOUND_MARK, INBOUND_ROUTE_TABLE};

fn ip(args: &[&str]) -> Result<Output, String> {
    Command::new("ip").args(args).output().map_err(|e| {
        format!(
            "running `ip {}`: {e} (is iproute2 installed?)",
            args.join(" ")
        )
    })
}

/// Installs `ip rule fwmark INBOUND_MARK lookup T` and `local 0.0.0.0/0 dev lo table T` in the
/// current network namespace; idempotent.
pub fn ensure_inbound_delivery() -> Result<(), String> {
    let table = INBOUND_ROUTE_TABLE.to_string();
    let route = ip(&[
        "-4",
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    if !route.status.success() {
        return Err(format!(
            "ip route replace local 0.0.0.0/0 dev lo table {table}: {}",
            String::from_utf8_lossy(&route.stderr).trim()
        ));
    }
    let mark = format!("{INBOUND_MARK:#x}");
    let rules = ip(&["-4", "rule", "show", "table", &table])?;
    if String::from_utf8_lossy(&rules.stdout).contains(&format!("fwmark {mark}")) {
        return Ok(());
    }
    let add = ip(&[
        "-4", "rule", "add", "fwmark", &mark, "lookup", &table, "priority", "100",
    ])?;
    if !add.status.success() {
        return Err(format!(
            "ip rule add fwmark {mark} lookup {table}: {}",
            String::from_utf8_lossy(&add.stderr).trim()
        ));
    }
    Ok(())
}

/// The interface the current network namespace routes `ip` through, from `/proc/net/route`
/// (longest prefix wins).
pub fn interface_for(ip: Ipv4Addr) -> Option<String> {
    let table = fs::read_to_string("/proc/net/route").ok()?;
    route_lookup(&table, ip)
}

fn route_lookup(table: &str, ip: Ipv4Addr) -> Option<String> {
    let addr = u32::from(ip);
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let iface = cols.next()?;
            let dest = u32::from_str_radix(cols.next()?, 16).ok()?;
            let mask = u32::from_str_radix(cols.nth(5)?, 16).ok()?;
            // /proc/net/route prints addresses as little-endian hex of the network-order value.
            let (dest, mask) = (u32::from_be(dest.to_le()), u32::from_be(mask.to_le()));
            (addr & mask == dest).then(|| (mask.count_ones(), iface.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, iface)| iface)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t0A00001F\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t00001FAC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
wv1a2b3c4d\t0201F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0
eth0\t0002F40A\t0B001FAC\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    #[test]
    fn longest_prefix_wins() {
        assert_eq!(
            route_lookup(TABLE, Ipv4Addr::new(10, 244, 1, 2)).as_deref(),
            Some("wv1a2b3c4d")
        );
        assert_eq!(
            route_lookup(TABLE, Ipv4Addr::new(10, 244, 2, 7)).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            route_lookup(TABLE, Ipv4Addr::new(172, 31, 0, 12)).as_deref(),
            Some("eth0")
        );
    }

    #[test]
    fn no_default_route_no_match() {
        let table: String = TABLE
            .lines()
            .filter(|l| !l.contains("\t00000000\t0A"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(route_lookup(&table, Ipv4Addr::new(8, 8, 8, 8)), None);
    }
}
