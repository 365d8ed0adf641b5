//! Node networking that inbound capture relies on, set up in the agent's network namespace.
//!
//! - Policy routing: packets the TC program assigned to a proxy socket carry [`INBOUND_MARK`] and
//!   must be delivered locally, not forwarded to the pod they are addressed to (the kernel drops
//!   forwarded packets that already have a socket).
//! - No conntrack for steered packets: a local client that dialled a Service address is looped
//!   back after kube-proxy's translation; tracking the looped packet again would create a second
//!   entry clashing with the first, and the proxy's answers would not be translated back to the
//!   Service address. (Cilium does the same for its proxy traffic.)
//! - No TCP early demux: it would attach the proxy's socket (whose local address is the pod's) to
//!   the translated packet before routing, and the kernel drops forwarded packets that carry a
//!   socket, before the egress classifier could loop them back.

use std::{
    fs,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Output, Stdio},
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

/// Prepares the current network namespace for inbound capture; idempotent.
pub fn prepare_inbound() -> Result<(), String> {
    ensure_local_delivery()?;
    ensure_untracked()?;
    // Containers get /proc/sys read-only: in Kubernetes a privileged init container sets it,
    // and the agent only checks.
    if fs::read_to_string(EARLY_DEMUX).is_ok_and(|v| v.trim() == "0") {
        return Ok(());
    }
    fs::write(EARLY_DEMUX, "0").map_err(|e| format!("disabling net.ipv4.tcp_early_demux: {e}"))
}

const EARLY_DEMUX: &str = "/proc/sys/net/ipv4/tcp_early_demux";

/// `ip rule fwmark INBOUND_MARK lookup T` and `local 0.0.0.0/0 dev lo table T`.
fn ensure_local_delivery() -> Result<(), String> {
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

/// nftables table `ip weft_mesh`: `notrack` for [`INBOUND_MARK`]ed packets, replaced atomically.
fn ensure_untracked() -> Result<(), String> {
    let script = format!(
        "table ip weft_mesh {{}}\n\
         delete table ip weft_mesh\n\
         table ip weft_mesh {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority raw; policy accept;\n\
         \t\tmeta mark {INBOUND_MARK:#x} notrack\n\
         \t}}\n\
         }}\n"
    );
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running `nft`: {e} (is nftables installed?)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| format!("writing to `nft`: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for `nft`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "nft table ip weft_mesh: {}",
            String::from_utf8_lossy(&out.stderr).trim()
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
