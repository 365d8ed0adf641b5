//! Map declarations, load-time settings and the counter helper.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    Global,
};
use mesh_common::{limits, Counter, OrigDst, SockAddr4, SockKey};

/// The node proxy's address as pods reach it (network order); set by the loader.
#[unsafe(no_mangle)]
pub static PROXY_IP4: Global<u32> = Global::new(0);

/// cgroup id → 1 for every cgroup whose sockets are meshed.
#[map]
pub static MESHED_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(limits::MESHED_CGROUPS, 0);

/// IPv4 (network order) → `dest_kind`: Service VIPs and meshed pod IPs.
#[map]
pub static MESH_DESTS: HashMap<u32, u32> = HashMap::with_max_entries(limits::MESH_DESTS, 0);

/// IPv4 (network order) → 1 for meshed pods on this node (inbound capture).
#[map]
pub static LOCAL_MESHED_PODS: HashMap<u32, u32> =
    HashMap::with_max_entries(limits::LOCAL_MESHED_PODS, 0);

/// Socket cookie → the destination a captured socket dialled (for getpeername).
#[map]
pub static ORIG_DST_BY_COOKIE: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(limits::ORIG_DST, 0);

/// Client address (as the proxy sees the peer) → the destination it dialled.
#[map]
pub static ORIG_DST_BY_TUPLE: LruHashMap<SockAddr4, OrigDst> =
    LruHashMap::with_max_entries(limits::ORIG_DST, 0);

/// Established local sockets eligible for the same-node fast path.
#[map]
pub static SOCK_HASH: SockHash<SockKey> = SockHash::with_max_entries(limits::SOCK_HASH, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
pub fn count(counter: Counter) {
    add(counter, 1);
}

#[inline(always)]
pub fn add(counter: Counter, n: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += n };
    }
}
