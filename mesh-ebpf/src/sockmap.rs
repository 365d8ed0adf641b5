//! sock_ops: original destinations by client address, fast-path membership, cleanup on close.
//! sk_msg: the same-node fast path between the two local ends of a connection.

use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE,
    },
    helpers::bpf_get_socket_cookie,
    programs::{SkMsgContext, SockOpsContext},
    EbpfContext as _,
};
use mesh_common::{Counter, SockAddr4, SockKey};

use crate::{
    ctx,
    maps::{add, count, ORIG_DST_BY_COOKIE, ORIG_DST_BY_TUPLE, PROXY_IP4, SOCK_HASH},
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

pub fn sock_ops(ctx: &SockOpsContext) {
    if !is_ipv4(ctx) {
        return;
    }
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            record_original_dst(ctx);
            join_fast_path(ctx);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => join_fast_path(ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => forget(ctx),
        _ => {}
    }
}

/// IPv4 sockets, and dual-stack IPv6 sockets talking to a v4-mapped address (gRPC's C core,
/// Java): the kernel runs those as IPv4 and fills the `*_ip4` fields.
fn is_ipv4(ctx: &SockOpsContext) -> bool {
    match ctx.family() {
        AF_INET => true,
        AF_INET6 => {
            // SAFETY: the kernel passes a valid bpf_sock_ops.
            let ops = unsafe { &*ctx.ops };
            ctx::v4_mapped(&ops.remote_ip6).is_some()
        }
        _ => false,
    }
}

fn client_addr(ctx: &SockOpsContext) -> SockAddr4 {
    // SAFETY: the kernel passes a valid bpf_sock_ops.
    let ops = unsafe { &*ctx.ops };
    SockAddr4 {
        ip4: ops.local_ip4,
        port: ctx::sock_ops_local_port(ops),
    }
}

/// A captured client socket is now established: publish its original destination under the
/// address the proxy will see as the peer, and ask for a callback when it closes.
fn record_original_dst(ctx: &SockOpsContext) {
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain-data value, copied out.
    let Some(orig) = (unsafe { ORIG_DST_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    if ORIG_DST_BY_TUPLE.insert(client_addr(ctx), orig, 0).is_err() {
        count(Counter::Errors);
        return;
    }
    count(Counter::OrigDstRecorded);
    let flags = ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32;
    if ctx.set_cb_flags(flags).is_err() {
        count(Counter::Errors);
    }
}

fn forget(ctx: &SockOpsContext) {
    // SAFETY: valid context pointer.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = ORIG_DST_BY_COOKIE.remove(cookie);
    let _ = ORIG_DST_BY_TUPLE.remove(client_addr(ctx));
}

/// Sockets with the node proxy at one end (pod ↔ proxy, proxy ↔ local pod) join the fast path.
/// The kernel removes them from the hash when they close.
fn join_fast_path(ctx: &SockOpsContext) {
    // SAFETY: the kernel passes a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    let proxy = PROXY_IP4.load();
    if proxy == 0 || (ops.local_ip4 != proxy && ops.remote_ip4 != proxy) {
        return;
    }
    let mut key = SockKey {
        local_ip4: ops.local_ip4,
        remote_ip4: ops.remote_ip4,
        local_port: ctx::sock_ops_local_port(ops),
        remote_port: ctx::sock_ops_remote_port(ops),
    };
    match SOCK_HASH.update(&mut key, ops, 0) {
        Ok(()) => count(Counter::FastPathSockets),
        Err(_) => count(Counter::Errors),
    }
}

/// Hands the message straight to the peer socket's receive queue when the peer is local and
/// in the hash; otherwise lets it take the normal TCP path.
pub fn sk_msg(ctx: &SkMsgContext) -> u32 {
    // SAFETY: the kernel passes a valid sk_msg_md.
    let md = unsafe { &*ctx.msg };
    let size = md.size;
    let mut peer = SockKey {
        local_ip4: md.local_ip4,
        remote_ip4: md.remote_ip4,
        local_port: ctx::sk_msg_local_port(md),
        remote_port: ctx::sk_msg_remote_port(md),
    }
    .peer();
    if SOCK_HASH.redirect_msg(ctx, &mut peer, BPF_F_INGRESS as u64) == SK_PASS as i64 {
        count(Counter::FastPathRedirects);
        add(Counter::FastPathBytes, size as u64);
    } else {
        count(Counter::FastPathMisses);
    }
    SK_PASS
}
