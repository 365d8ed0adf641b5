//! Weft's eBPF programs: thin entry points over the helpers in the modules below.
//!
//! - `sock_lb`: cgroup `connect4/6` capture meshed pods' connections into the node proxy, and
//!   `getpeername4/6` make the application see the address it dialled.
//! - `sockmap`: `sock_ops` records original destinations and fills the fast-path socket hash;
//!   `sk_msg` short-circuits bytes between the two local ends of a pod ↔ proxy connection.
//! - `tc`: steers plaintext connections that arrive for a meshed pod to the inbound listener.
//!   `weft_tc_inbound` runs at ingress of pod interfaces and uplinks, `weft_tc_to_pod` at egress
//!   of pod interfaces.
#![no_std]
#![no_main]
// The workspace denies `unsafe_code`; eBPF programs cannot avoid it: every context field is
// read through a raw pointer the kernel hands over, every helper is an `extern` call, and map
// lookups return references the verifier, not the borrow checker, keeps valid.
#![allow(
    unsafe_code,
    reason = "eBPF programs read kernel memory through raw pointers"
)]

mod ctx;
mod maps;
mod sock_lb;
mod sockmap;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};

/// cgroup sock_addr programs return 1 to let the call proceed (with the rewritten address).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    sock_lb::connect4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    sock_lb::connect6(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_lb::getpeername4(&ctx);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_lb::getpeername6(&ctx);
    ALLOW
}

#[sock_ops]
pub fn weft_sock_ops(ctx: SockOpsContext) -> u32 {
    sockmap::sock_ops(&ctx);
    0
}

#[sk_msg]
pub fn weft_sk_msg(ctx: SkMsgContext) -> u32 {
    sockmap::sk_msg(&ctx)
}

#[classifier]
pub fn weft_tc_inbound(ctx: TcContext) -> i32 {
    tc::inbound(&ctx)
}

#[classifier]
pub fn weft_tc_to_pod(ctx: TcContext) -> i32 {
    tc::to_pod(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
