//! kube-proxy, emulated with nftables in every node namespace.
//!
//! One table, `ip weft_kubeproxy`, replaced whole in a single `nft -f` batch on every change:
//! the batch first declares the table (so deleting it cannot fail when it does not exist
//! yet), deletes it and declares it again with the new rules, and the kernel commits all
//! of it or nothing. Connections already established keep their conntrack NAT mapping.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use super::plan::{Protocol, ServiceView};

pub const TABLE: &str = "weft_kubeproxy";

/// The whole ruleset of one node. `local_pods` are the pods on that node: a pod reaching
/// itself through its own Service is masqueraded (hairpin), or its reply would bypass
/// the node and never match the translated connection.
pub fn render(services: &[ServiceView], local_pods: &[Ipv4Addr]) -> String {
    let mut dnat = String::new();
    let mut reject = String::new();
    for svc in services {
        let Some(vip) = svc.cluster_ip else { continue };
        for port in &svc.ports {
            let proto = match port.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
                // nft's `sctp dport` needs the sctp module; nothing here uses SCTP.
                Protocol::Sctp => continue,
            };
            let matcher = format!("ip daddr {vip} {proto} dport {}", port.port);
            match port.endpoints.as_slice() {
                [] => {
                    let with = match port.protocol {
                        Protocol::Tcp => " with tcp reset",
                        _ => "",
                    };
                    reject.push_str(&format!("\t\t{matcher} reject{with}\n"));
                }
                [(ip, p)] => dnat.push_str(&format!("\t\t{matcher} dnat ip to {ip}:{p}\n")),
                many => {
                    let map = many
                        .iter()
                        .enumerate()
                        .map(|(i, (ip, p))| format!("{i} : {ip} . {p}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    dnat.push_str(&format!(
                        "\t\t{matcher} dnat ip addr . port to numgen random mod {} map {{ {map} }}\n",
                        many.len()
                    ));
                }
            }
        }
    }
    let mut hairpin = String::new();
    for ip in local_pods {
        hairpin.push_str(&format!(
            "\t\tip saddr {ip} ip daddr {ip} ct status dnat masquerade\n"
        ));
    }

    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain services {{\n{dnat}\t}}\n\
         \tchain no_endpoints {{\n{reject}\t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tjump services\n\
         \t}}\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tjump services\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         {hairpin}\
         \t}}\n\
         \tchain filter_input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tjump no_endpoints\n\
         \t}}\n\
         \tchain filter_forward {{\n\
         \t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tjump no_endpoints\n\
         \t}}\n\
         \tchain filter_output {{\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\tjump no_endpoints\n\
         \t}}\n\
         }}\n"
    )
}

/// Loads `ruleset` into the namespace `netns` as one transaction.
pub fn apply(netns: &str, ruleset: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run nft (apt-get install nftables)")?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(ruleset.as_bytes())
        .context("writing the ruleset to nft")?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft rejected the kube-proxy rules of {netns}: {}\n{ruleset}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::plan::PortView;

    fn svc(ip: Option<Ipv4Addr>, ports: Vec<PortView>) -> ServiceView {
        ServiceView {
            namespace: "default".into(),
            name: "s".into(),
            cluster_ip: ip,
            ports,
        }
    }

    fn port(port: u16, protocol: Protocol, endpoints: &[(Ipv4Addr, u16)]) -> PortView {
        PortView {
            name: None,
            port,
            protocol,
            endpoints: endpoints.to_vec(),
        }
    }

    #[test]
    fn renders_dnat_per_endpoint_count() {
        let vip = Ipv4Addr::new(10, 96, 0, 10);
        let a = Ipv4Addr::new(10, 244, 1, 2);
        let b = Ipv4Addr::new(10, 244, 2, 2);
        let rules = render(
            &[
                svc(
                    Some(vip),
                    vec![
                        port(9080, Protocol::Tcp, &[(a, 9080), (b, 9081)]),
                        port(53, Protocol::Udp, &[(a, 5353)]),
                        port(70, Protocol::Tcp, &[]),
                        port(71, Protocol::Udp, &[]),
                    ],
                ),
                // Headless: no rules at all.
                svc(None, vec![port(1, Protocol::Tcp, &[(a, 1)])]),
            ],
            &[a],
        );
        assert!(rules.starts_with(
            "table ip weft_kubeproxy\ndelete table ip weft_kubeproxy\ntable ip weft_kubeproxy {\n"
        ));
        assert!(rules.contains(
            "\t\tip daddr 10.96.0.10 tcp dport 9080 dnat ip addr . port to numgen random mod 2 \
             map { 0 : 10.244.1.2 . 9080, 1 : 10.244.2.2 . 9081 }\n"
        ));
        assert!(rules.contains("\t\tip daddr 10.96.0.10 udp dport 53 dnat ip to 10.244.1.2:5353\n"));
        assert!(rules.contains("\t\tip daddr 10.96.0.10 tcp dport 70 reject with tcp reset\n"));
        assert!(rules.contains("\t\tip daddr 10.96.0.10 udp dport 71 reject\n"));
        assert!(rules.contains("ip saddr 10.244.1.2 ip daddr 10.244.1.2 ct status dnat masquerade"));
        assert!(!rules.contains("dport 1 "));
        assert_eq!(rules.matches('{').count(), rules.matches('}').count());
    }

    #[test]
    fn empty_cluster_still_declares_the_chains() {
        let rules = render(&[], &[]);
        for chain in [
            "services",
            "prerouting",
            "output",
            "postrouting",
            "filter_output",
        ] {
            assert!(rules.contains(&format!("\tchain {chain} {{\n")), "{chain}");
        }
    }
}
