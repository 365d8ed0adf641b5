//! Types and constants shared by Weft's eBPF programs and user space.
//!
//! Every type is `#[repr(C)]`, `Copy`, and free of implicit padding, so the kernel and user space
//! agree on its layout byte for byte. IPv4 addresses are stored exactly as the kernel hands them
//! to programs: network byte order inside a `u32`. Ports are stored in host byte order; the
//! programs convert at the edge (see `mesh-ebpf/src/ctx.rs`).
#![no_std]

/// Outbound capture listener of the node proxy.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext capture listener of the node proxy.
pub const INBOUND_PORT: u16 = 15006;
/// Node-to-node tunnel listener (HBONE).
pub const TUNNEL_PORT: u16 = 15008;
/// Prometheus metrics and admin endpoints.
pub const ADMIN_PORT: u16 = 15020;
/// Health endpoints for Kubernetes probes.
pub const HEALTH_PORT: u16 = 15021;

/// Packet mark set by the inbound TC program on packets it assigned to a proxy socket, so that
/// a policy route delivers them locally instead of forwarding them to the pod.
pub const INBOUND_MARK: u32 = 0x0f00_0000 | INBOUND_PORT as u32;
/// Routing table holding `local 0.0.0.0/0 dev lo` for [`INBOUND_MARK`]ed packets.
pub const INBOUND_ROUTE_TABLE: u32 = INBOUND_PORT as u32;

/// Map and program names, shared so the loader and the programs cannot drift apart.
pub mod names {
    pub const MESHED_CGROUPS: &str = "MESHED_CGROUPS";
    pub const MESH_DESTS: &str = "MESH_DESTS";
    pub const LOCAL_MESHED_PODS: &str = "LOCAL_MESHED_PODS";
    pub const ORIG_DST_BY_COOKIE: &str = "ORIG_DST_BY_COOKIE";
    pub const ORIG_DST_BY_TUPLE: &str = "ORIG_DST_BY_TUPLE";
    pub const SOCK_HASH: &str = "SOCK_HASH";
    pub const COUNTERS: &str = "COUNTERS";

    pub const PROG_CONNECT4: &str = "weft_connect4";
    pub const PROG_CONNECT6: &str = "weft_connect6";
    pub const PROG_GETPEERNAME4: &str = "weft_getpeername4";
    pub const PROG_GETPEERNAME6: &str = "weft_getpeername6";
    pub const PROG_SOCK_OPS: &str = "weft_sock_ops";
    pub const PROG_SK_MSG: &str = "weft_sk_msg";
    pub const PROG_TC_INBOUND: &str = "weft_tc_inbound";
    pub const PROG_TC_TO_POD: &str = "weft_tc_to_pod";

    /// Load-time globals (set with `EbpfLoader::override_global`).
    pub const GLOBAL_PROXY_IP4: &str = "PROXY_IP4";
}

/// Map sizes. LRU maps bound memory even if a close callback is missed.
pub mod limits {
    pub const MESHED_CGROUPS: u32 = 16_384;
    pub const MESH_DESTS: u32 = 65_536;
    pub const LOCAL_MESHED_PODS: u32 = 4_096;
    pub const ORIG_DST: u32 = 65_536;
    pub const SOCK_HASH: u32 = 65_536;
}

/// Value of `MESH_DESTS`: what kind of mesh destination an IPv4 address is.
pub mod dest_kind {
    pub const SERVICE: u32 = 1;
    pub const POD: u32 = 2;
    /// An address a ServiceEntry host resolves to (its endpoints).
    pub const ENTRY: u32 = 3;
}

/// The destination a captured socket originally dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    /// IPv4 address, network byte order.
    pub ip4: u32,
    /// Port, host byte order.
    pub port: u16,
    pub _pad: u16,
}

/// One end of an IPv4 TCP connection: the key of `ORIG_DST_BY_TUPLE` (the client end, as the
/// proxy sees it in `peer_addr()`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr4 {
    /// Network byte order.
    pub ip4: u32,
    /// Host byte order, widened so the struct has no padding.
    pub port: u32,
}

/// Both ends of an established IPv4 TCP connection, from the point of view of one socket: the
/// key of `SOCK_HASH`. The peer socket of a local pair has the same key with the ends swapped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order.
    pub local_ip4: u32,
    /// Network byte order.
    pub remote_ip4: u32,
    /// Host byte order.
    pub local_port: u32,
    /// Host byte order.
    pub remote_port: u32,
}

impl SockKey {
    /// The key under which the other end of this connection is stored.
    pub const fn peer(&self) -> Self {
        Self {
            local_ip4: self.remote_ip4,
            remote_ip4: self.local_ip4,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Indexes into the per-CPU `COUNTERS` array: one counter per decision the programs take.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() calls seen from the attached cgroup subtree.
    ConnectSeen = 0,
    /// connect() of a meshed pod to a mesh destination, rewritten to the outbound listener.
    Captured,
    /// connect() from a cgroup that is not meshed: left alone.
    SkippedNotMeshed,
    /// connect() of a meshed pod to a destination outside the mesh: left alone.
    SkippedNotMeshDest,
    /// getpeername() answers rewritten back to the dialled address.
    PeernameRestored,
    /// Original destinations recorded for the proxy (by client address).
    OrigDstRecorded,
    /// Sockets added to the same-node fast path.
    FastPathSockets,
    /// sendmsg() calls short-circuited to the local peer socket.
    FastPathRedirects,
    /// Bytes short-circuited to the local peer socket.
    FastPathBytes,
    /// sendmsg() calls on fast-path sockets whose peer was not in the map (sent normally).
    FastPathMisses,
    /// New plaintext connections to a meshed pod steered to the inbound listener.
    InboundCaptured,
    /// Packets of already-steered inbound connections.
    InboundPackets,
    /// New inbound connections to a meshed pod dropped because no inbound listener exists
    /// (proxy down: fail closed).
    InboundNoListener,
    /// Packets for a meshed pod caught after kube-proxy's translation (a local client dialled a
    /// Service address) and looped back to ingress for steering.
    InboundLooped,
    /// Map updates or helper calls that failed.
    Errors,
}

impl Counter {
    pub const COUNT: u32 = Counter::Errors as u32 + 1;

    pub const ALL: [Counter; Counter::COUNT as usize] = [
        Counter::ConnectSeen,
        Counter::Captured,
        Counter::SkippedNotMeshed,
        Counter::SkippedNotMeshDest,
        Counter::PeernameRestored,
        Counter::OrigDstRecorded,
        Counter::FastPathSockets,
        Counter::FastPathRedirects,
        Counter::FastPathBytes,
        Counter::FastPathMisses,
        Counter::InboundCaptured,
        Counter::InboundPackets,
        Counter::InboundNoListener,
        Counter::InboundLooped,
        Counter::Errors,
    ];

    /// Metric name suffix, `weft_ebpf_<name>_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::ConnectSeen => "connect_seen",
            Counter::Captured => "captured",
            Counter::SkippedNotMeshed => "skipped_not_meshed",
            Counter::SkippedNotMeshDest => "skipped_not_mesh_dest",
            Counter::PeernameRestored => "peername_restored",
            Counter::OrigDstRecorded => "orig_dst_recorded",
            Counter::FastPathSockets => "fast_path_sockets",
            Counter::FastPathRedirects => "fast_path_redirects",
            Counter::FastPathBytes => "fast_path_bytes",
            Counter::FastPathMisses => "fast_path_misses",
            Counter::InboundCaptured => "inbound_captured",
            Counter::InboundPackets => "inbound_packets",
            Counter::InboundNoListener => "inbound_no_listener",
            Counter::InboundLooped => "inbound_looped",
            Counter::Errors => "errors",
        }
    }
}

const _: () = assert!(size_of::<OrigDst>() == 8);
const _: () = assert!(size_of::<SockAddr4>() == 8);
const _: () = assert!(size_of::<SockKey>() == 16);

// The crate's only unsafe code (the workspace denies it elsewhere).
#[cfg(feature = "user")]
#[allow(
    unsafe_code,
    reason = "aya::Pod for the shared map types: plain bytes the kernel reads"
)]
mod sys {
    //! `aya::Pod` for the map keys and values, so user space can read and write them.

    // SAFETY: all three are `#[repr(C)]`, `Copy`, contain only integers and have no padding
    // (checked by the size asserts above), so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddr4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
}
