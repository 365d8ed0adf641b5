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
