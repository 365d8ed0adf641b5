//! The only `unsafe` of user space: socket options the standard library does not expose, and
//! trimming the heap.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, BorrowedFd},
};

/// Sets `IP_TRANSPARENT` on a listening socket. Connections the inbound classifier assigns to
/// it keep the pod's address as their local address; without this flag the kernel refuses to
/// send the SYN-ACK from an address that is not local to the node. Needs CAP_NET_ADMIN.
pub fn set_ip_transparent(socket: &impl AsRawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: valid fd, pointer and length of a c_int option value.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            std::ptr::from_ref(&on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Moves the calling thread (and the threads it starts afterwards) into a new, empty network
/// namespace; mounts are untouched. Used by tools that must not change the host's networking.
pub fn unshare_network() -> io::Result<()> {
    // SAFETY: unshare(2) takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The destination a connection had before an nftables/iptables `REDIRECT` (or DNAT) rule
/// rewrote it to a local listener: `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on the accepted socket.
/// Fails with `ENOENT` when the connection was not translated.
pub fn original_dst(socket: BorrowedFd<'_>) -> io::Result<SocketAddrV4> {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd; `addr` and `len` are live and `len` is the size of `addr`.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            std::ptr::from_mut(&mut addr).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    if i32::from(addr.sin_family) != libc::AF_INET {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_ORIGINAL_DST answered a non-IPv4 address",
        ));
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

/// Returns the heap's free pages to the kernel. glibc keeps what a thread's arena freed for
/// later: after a burst of connections a proxy's RSS would stay at the burst's peak for good.
pub fn trim_heap() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use std::{net::TcpListener, os::fd::AsFd};

    use super::*;

    #[test]
    fn untranslated_connections_have_no_original_destination() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        // No NAT happened: the kernel has nothing to report (ENOENT, or ENOPROTOOPT when
        // conntrack is not loaded at all), and it says so instead of answering garbage.
        let err = original_dst(accepted.as_fd()).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ENOENT | libc::ENOPROTOOPT)),
            "{err}"
        );
        drop(client);
    }
}
