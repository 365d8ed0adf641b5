//! Inbound capture: plaintext TCP arriving for a meshed pod on this node is handed to the node
//! proxy's inbound listener (15006) with `bpf_sk_assign`, the way TPROXY would, so policy applies
//! to it. Runs at ingress of the node's pod interfaces and uplinks (sk_assign works only at
//! ingress, in the listener's network namespace).
//!
//! Every packet of a steered connection is assigned to its proxy socket and marked, so the
//! policy route installed by the agent delivers it locally instead of forwarding it to the pod.
//! Packets of connections that existed before the pod joined the mesh are left alone.
//!
//! A local client that dials a Service address reaches ingress with the ClusterIP as
//! destination: kube-proxy translates it to the pod only afterwards, in prerouting. The egress
//! program on meshed pods' interfaces catches those packets after translation and loops them back
//! to ingress of the same interface, where the ingress program steers them like any other
//! (conntrack keeps the translation, so the client still sees the Service address).

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_sock, bpf_sock_tuple, BPF_F_CURRENT_NETNS, BPF_F_INGRESS, BPF_TCP_LISTEN,
        BPF_TCP_TIME_WAIT, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_redirect, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
    EbpfContext as _,
};
use mesh_common::{Counter, INBOUND_MARK, INBOUND_PORT};

use crate::maps::{count, LOCAL_MESHED_PODS, PROXY_IP4};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

pub fn inbound(ctx: &TcContext) -> i32 {
    try_inbound(ctx).unwrap_or(TC_ACT_OK)
}

struct Flow {
    tuple: bpf_sock_tuple,
    syn: bool,
}

/// Egress of a pod interface: packets that reach a meshed pod without having been steered.
pub fn to_pod(ctx: &TcContext) -> i32 {
    try_to_pod(ctx).unwrap_or(TC_ACT_OK)
}

fn try_to_pod(ctx: &TcContext) -> Result<i32, ()> {
    let Some(mut flow) = parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };
    // The proxy's own connections to its pods are the ones that must get through.
    // SAFETY: reading the ipv4 member of the tuple we built.
    if unsafe { flow.tuple.__bindgen_anon_1.ipv4.saddr } == PROXY_IP4.load() {
        return Ok(TC_ACT_OK);
    }
    let steered = match lookup(ctx, &mut flow.tuple) {
        Some(sk) => {
            // SAFETY: non-null socket returned by the lookup helper, released right after.
            let state = unsafe { (*sk).state };
            // SAFETY: `sk` is the lookup's reference, released once and not used after.
            unsafe { bpf_sk_release(sk.cast()) };
            state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT
        }
        None => false,
    };
    if !steered && !flow.syn {
        return Ok(TC_ACT_OK);
    }
    // Address the frame to the interface itself (its source MAC): a frame still addressed to
    // the pod would be taken for another host's traffic on the way back in and dropped.
    let own_mac: [u8; 6] = ctx.load(6).map_err(|_| ())?;
    ctx.store(0, &own_mac, 0).map_err(|_| ())?;
    count(Counter::InboundLooped);
    // SAFETY: valid context pointer; the kernel validates the interface index.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: no preconditions beyond a valid interface index.
    Ok(unsafe { bpf_redirect(ifindex, BPF_F_INGRESS as u64) } as i32)
}

fn try_inbound(ctx: &TcContext) -> Result<i32, ()> {
    let Some(mut flow) = parse(ctx)? else {
        return Ok(TC_ACT_OK);
    };

    // A packet of a connection already steered (or being set up) to the proxy.
    if let Some(sk) = lookup(ctx, &mut flow.tuple) {
        // SAFETY: non-null socket returned by the lookup helper.
        let state = unsafe { (*sk).state };
        if state != BPF_TCP_LISTEN && state != BPF_TCP_TIME_WAIT {
            let res = assign(ctx, sk);
            if res == TC_ACT_OK {
                count(Counter::InboundPackets);
            }
            return Ok(res);
        }
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    if !flow.syn {
        return Ok(TC_ACT_OK);
    }

    // A new connection: hand it to the inbound listener, or drop it if the proxy is not there
    // (fail closed: a meshed pod is never reached around the proxy).
    flow.tuple.__bindgen_anon_1.ipv4.dport = INBOUND_PORT.to_be();
    let Some(listener) = lookup(ctx, &mut flow.tuple) else {
        count(Counter::InboundNoListener);
        return Ok(TC_ACT_SHOT);
    };
    let res = assign(ctx, listener);
    if res == TC_ACT_OK {
        count(Counter::InboundCaptured);
    }
    Ok(res)
}

/// IPv4 TCP to a meshed pod of this node, or `None`.
fn parse(ctx: &TcContext) -> Result<Option<Flow>, ()> {
    let proto: u16 = ctx.load(12).map_err(|_| ())?;
    if u16::from_be(proto) != ETH_P_IP {
        return Ok(None);
    }
    let vihl: u8 = ctx.load(ETH_HLEN).map_err(|_| ())?;
    let l4proto: u8 = ctx.load(ETH_HLEN + 9).map_err(|_| ())?;
    if l4proto != IPPROTO_TCP {
        return Ok(None);
    }
    let daddr: u32 = ctx.load(ETH_HLEN + 16).map_err(|_| ())?;
    // SAFETY: plain integer value.
    if unsafe { LOCAL_MESHED_PODS.get(daddr) }.is_none() {
        return Ok(None);
    }
    let saddr: u32 = ctx.load(ETH_HLEN + 12).map_err(|_| ())?;
    let l4 = ETH_HLEN + ((vihl & 0x0f) as usize) * 4;
    let sport: u16 = ctx.load(l4).map_err(|_| ())?;
    let dport: u16 = ctx.load(l4 + 2).map_err(|_| ())?;
    let flags: u8 = ctx.load(l4 + 13).map_err(|_| ())?;

    // SAFETY: an all-zero tuple is a valid value of this plain-data union.
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    // SAFETY: writing the ipv4 member of the union.
    unsafe {
        let v4 = &mut tuple.__bindgen_anon_1.ipv4;
        v4.saddr = saddr;
        v4.daddr = daddr;
        v4.sport = sport;
        v4.dport = dport;
    }
    Ok(Some(Flow {
        tuple,
        syn: flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0,
    }))
}

fn lookup(ctx: &TcContext, tuple: &mut bpf_sock_tuple) -> Option<*mut bpf_sock> {
    // SAFETY: valid skb and tuple; the returned socket is released by the caller or `assign`.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            ctx.as_ptr(),
            tuple,
            size_of::<[u32; 3]>() as u32,
            BPF_F_CURRENT_NETNS as u64,
            0,
        )
    };
    (!sk.is_null()).then_some(sk)
}

/// Assigns the packet to `sk`, marks it for local delivery, and releases `sk`.
fn assign(ctx: &TcContext, sk: *mut bpf_sock) -> i32 {
    // SAFETY: `sk` is a referenced socket from the lookup helper; released right after.
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    // SAFETY: `sk` is the lookup's reference, released once and not used after.
    unsafe { bpf_sk_release(sk.cast()) };
    if ret != 0 {
        count(Counter::Errors);
        return TC_ACT_SHOT;
    }
    ctx.set_mark(INBOUND_MARK);
    TC_ACT_OK
}
