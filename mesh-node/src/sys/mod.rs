//! The only `unsafe` of user space: socket options the standard library does not expose, and
//! trimming the heap.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
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

/// A descriptor of its own for the socket behind `fd` (`F_DUPFD_CLOEXEC`): it keeps the
/// connection open after `fd` closes. `fd` must belong to an object the caller holds, so that
/// it is open and names that socket for the call.
pub fn dup_held(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: fcntl reads no memory; the caller holds what owns `fd`.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` was just returned by the kernel and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Sets `SO_LINGER` to zero: closing the socket then resets the connection instead of ending
/// it cleanly (for a blocking socket the standard library cannot set it on).
pub fn set_zero_linger(socket: &impl AsRawFd) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: valid fd, pointer and length of a linger option value.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
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

/// Restores the default action of SIGPIPE (ending the process), which Rust's runtime sets to
/// ignore: a command-line tool whose output is piped into `head` then ends quietly instead of
/// failing on its next write.
pub fn default_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler; it changes only the disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// The size of a memory page.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

/// The most file descriptors one [`send_fds`] message carries.
pub const MAX_FDS: usize = 16;

/// Sends `data` and the descriptors `fds` (`SCM_RIGHTS`) in one message on a Unix stream
/// socket: the receiver gets its own descriptors of the same open files.
pub fn send_fds(socket: BorrowedFd<'_>, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if data.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a message carries at least one byte and at most MAX_FDS descriptors",
        ));
    }
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let payload = size_of_val(raw.as_slice());
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
    // u64 words keep the control buffer aligned for `cmsghdr`.
    let mut control = vec![0u64; space.div_ceil(8).max(1)];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !raw.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is `space` bytes, room for one header and `raw`; the
        // header pointer is non-null because msg_controllen holds a header.
        unsafe {
            let header = libc::CMSG_FIRSTHDR(&msg);
            (*header).cmsg_level = libc::SOL_SOCKET;
            (*header).cmsg_type = libc::SCM_RIGHTS;
            (*header).cmsg_len = libc::CMSG_LEN(payload as u32) as usize;
            std::ptr::copy_nonoverlapping(
                raw.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(header),
                payload,
            );
        }
    }
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    // The descriptors went with the first bytes; a message larger than the socket's buffer
    // goes on as plain writes.
    let mut rest = &data[sent as usize..];
    while !rest.is_empty() {
        // SAFETY: `rest` is a live slice; send(2) reads at most its length.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        match n {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(io::ErrorKind::WriteZero.into()),
            n => rest = &rest[n as usize..],
        }
    }
    Ok(())
}

/// Receives one message of [`send_fds`]: its bytes into `buf` and the descriptors it carried
/// (close-on-exec). Zero bytes means the peer closed the socket.
pub fn recv_fds(socket: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<RawFd>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `msg` points at live buffers for the duration of the call.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg`'s control buffer; the CMSG_* macros walk only within
    // msg_controllen, and every SCM_RIGHTS payload is an array of descriptors now ours.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*header).cmsg_len - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(header);
                for i in 0..bytes / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "more descriptors than a message may carry",
        ));
    }
    Ok((n as usize, fds))
}

/// The process id and user id of the peer of a Unix socket, as the kernel recorded them when
/// it connected (`SO_PEERCRED`). The process id is `None` when the peer's process is not
/// visible here (another pid namespace: another pod).
pub fn peer_credentials(socket: BorrowedFd<'_>) -> io::Result<(Option<u32>, u32)> {
    // SAFETY: ucred is plain old data; all-zero is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid fd; `cred` and `len` are live and `len` is the size of `cred`.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut cred).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let pid = u32::try_from(cred.pid).ok().filter(|pid| *pid != 0);
    Ok((pid, cred.uid))
}

/// The cookie of the network namespace a socket lives in (`SO_NETNS_COOKIE`, Linux 5.14): two
/// sockets of one namespace have the same, whatever process holds them.
pub fn netns_cookie(socket: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd; `cookie` and `len` are live and `len` is the size of `cookie`.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if ret == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The IPv4 addresses of the interfaces of the network namespace at `netns` (a bind-mounted
/// namespace, as `/var/run/netns/NAME`, or `/proc/PID/ns/net`), read from a thread of its own
/// that enters the namespace and ends with it.
pub fn ipv4_addresses_in(netns: &std::path::Path) -> io::Result<Vec<Ipv4Addr>> {
    let file = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns(2) takes an open namespace descriptor and a type flag; it
                // changes only this thread, which ends here.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                interface_addresses()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the namespace reader panicked")))
    })
}

/// The IPv4 addresses of this thread's network namespace (`getifaddrs`).
fn interface_addresses() -> io::Result<Vec<Ipv4Addr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addresses = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr; its family says which kind.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                addresses.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(addresses)
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

    #[test]
    fn a_listening_socket_passed_over_a_unix_socket_accepts_in_the_receiver() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_fds(a.as_fd(), b"listeners", &[listener.as_fd()]).unwrap();
        drop(listener);
        let mut buf = [0u8; 64];
        let (n, mut fds) = recv_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"listeners");
        assert_eq!(fds.len(), 1);
        // The sender's descriptor is closed: the socket lives on in the receiver's.
        let taken = TcpListener::from(fds.pop().unwrap());
        assert_eq!(taken.local_addr().unwrap(), addr);
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (accepted, _) = taken.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
    }

    #[test]
    fn the_addresses_of_this_network_namespace() {
        let here = ipv4_addresses_in(std::path::Path::new("/proc/self/ns/net")).unwrap();
        assert!(here.contains(&Ipv4Addr::LOCALHOST), "{here:?}");
        assert!(ipv4_addresses_in(std::path::Path::new("/nonexistent")).is_err());
    }

    #[test]
    fn a_message_without_descriptors_and_a_closed_peer() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        send_fds(a.as_fd(), b"x", &[]).unwrap();
        let mut buf = [0u8; 8];
        let (n, fds) = recv_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 0));
        drop(a);
        assert_eq!(recv_fds(b.as_fd(), &mut buf).unwrap().0, 0);
        assert!(send_fds(b.as_fd(), b"", &[]).is_err());
    }
}
