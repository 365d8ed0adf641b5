//! Byte order of ports and addresses in every attach context, in one place.
//!
//! Addresses stay in network order everywhere (`u32` as the kernel hands them over). Ports are
//! converted to host order at this edge, because each context stores them differently.

use aya_ebpf::bindings::{bpf_sock_addr, bpf_sock_ops, sk_msg_md};

/// `bpf_sock_addr.user_port`: the network-order `u16` in the low half of a `u32`.
#[inline(always)]
pub fn sock_addr_port(sa: &bpf_sock_addr) -> u16 {
    u16::from_be(sa.user_port as u16)
}

#[inline(always)]
pub fn set_sock_addr_port(sa: &mut bpf_sock_addr, port: u16) {
    sa.user_port = port.to_be() as u32;
}

/// `bpf_sock_ops.remote_port` / `sk_msg_md.remote_port`: the network-order port in the upper
/// 16 bits.
#[inline(always)]
fn remote_port(raw: u32) -> u32 {
    u32::from_be(raw)
}

#[inline(always)]
pub fn sock_ops_remote_port(ops: &bpf_sock_ops) -> u32 {
    remote_port(ops.remote_port)
}

/// `bpf_sock_ops.local_port` is already in host order.
#[inline(always)]
pub fn sock_ops_local_port(ops: &bpf_sock_ops) -> u32 {
    ops.local_port
}

#[inline(always)]
pub fn sk_msg_remote_port(md: &sk_msg_md) -> u32 {
    remote_port(md.remote_port)
}

#[inline(always)]
pub fn sk_msg_local_port(md: &sk_msg_md) -> u32 {
    md.local_port
}

/// The IPv4 address inside an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`), network order.
#[inline(always)]
pub fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0xffffu32.to_be()).then_some(ip6[3])
}
