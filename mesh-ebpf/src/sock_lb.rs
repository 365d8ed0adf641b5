//! Outbound capture at connect time, and the reverse rewrite for getpeername.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_socket_cookie},
    programs::SockAddrContext,
    EbpfContext as _,
};
use mesh_common::{Counter, OrigDst, OUTBOUND_PORT};

use crate::{
    ctx,
    maps::{count, MESHED_CGROUPS, MESH_DESTS, ORIG_DST_BY_COOKIE, PROXY_IP4},
};

const IPPROTO_TCP: u32 = 6;

/// Decides whether a connect() of this socket to `dst_ip4` is captured; returns the proxy
/// address to dial instead.
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst_ip4: u32, dst_port: u16) -> Option<u32> {
    count(Counter::ConnectSeen);
    // SAFETY: the helper has no preconditions in a cgroup sock_addr program.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: map values are plain integers.
    if unsafe { MESHED_CGROUPS.get(cgroup) }.is_none() {
        count(Counter::SkippedNotMeshed);
        return None;
    }
    // SAFETY: as above.
    if unsafe { MESH_DESTS.get(dst_ip4) }.is_none() {
        count(Counter::SkippedNotMeshDest);
        return None;
    }
    let proxy = PROXY_IP4.load();
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        ip4: dst_ip4,
        port: dst_port,
        _pad: 0,
    };
    if proxy == 0 || ORIG_DST_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Still send it to the proxy address: without a recorded destination the proxy refuses
        // the connection, which is the fail-closed outcome we want.
        count(Counter::Errors);
    }
    count(Counter::Captured);
    Some(proxy)
}

pub fn connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    let port = ctx::sock_addr_port(sa);
    if let Some(proxy) = capture(ctx, sa.user_ip4, port) {
        sa.user_ip4 = proxy;
        ctx::set_sock_addr_port(sa, OUTBOUND_PORT);
    }
}

/// IPv6 sockets dialling IPv4-mapped addresses (dual-stack applications) are captured like
/// IPv4 ones; native IPv6 destinations are not part of the mesh yet.
pub fn connect6(ctx: &SockAddrContext) {
    // SAFETY: the kernel passes a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.protocol != IPPROTO_TCP {
        return;
    }
    let ip6 = sa.user_ip6;
    let Some(dst) = ctx::v4_mapped(&ip6) else {
        return;
    };
    let port = ctx::sock_addr_port(sa);
    if let Some(proxy) = capture(ctx, dst, port) {
        sa.user_ip6[3] = proxy;
        ctx::set_sock_addr_port(sa, OUTBOUND_PORT);
    }
}

#[inline(always)]
fn original(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out.
    let orig = unsafe { ORIG_DST_BY_COOKIE.get(cookie) }.copied()?;
    count(Counter::PeernameRestored);
    Some(orig)
}

pub fn getpeername4(ctx: &SockAddrContext) {
    if let Some(orig) = original(ctx) {
        // SAFETY: the kernel passes a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = orig.ip4;
        ctx::set_sock_addr_port(sa, orig.port);
    }
}

pub fn getpeername6(ctx: &SockAddrContext) {
    if let Some(orig) = original(ctx) {
        // SAFETY: the kernel passes a valid bpf_sock_addr.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[3] = orig.ip4;
        ctx::set_sock_addr_port(sa, orig.port);
    }
}
