//! The only `unsafe` of user space: socket options the standard library does not expose.

use std::{io, os::fd::AsRawFd};

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
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
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
