//! The only unsafe code of xtask: what a child process does between fork and exec, and a
//! thread entering a network namespace.
//!
//! In the child, between fork and exec, only async-signal-safe calls are allowed: no
//! allocation, no locks, no opening of paths. Everything the hook needs is opened and
//! computed before fork.

use std::{
    fs::File,
    io,
    os::{
        fd::{AsRawFd as _, RawFd},
        unix::process::CommandExt as _,
    },
    process::Command,
};

/// Makes the child of `cmd`, before it execs: start a new session (`new_session`), write its
/// pid into the already opened `cgroup.procs` file (`cgroup_procs`), then enter the network
/// namespace of the already opened `netns` file, in that order.
pub(crate) fn place_before_exec(
    cmd: &mut Command,
    cgroup_procs: Vec<File>,
    netns: Option<File>,
    new_session: bool,
) {
    let hook = move || -> io::Result<()> {
        if new_session {
            // SAFETY: setsid(2) has no memory effects; async-signal-safe.
            if unsafe { libc::setsid() } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        for procs in &cgroup_procs {
            write_pid(procs.as_raw_fd())?;
        }
        if let Some(ns) = &netns {
            // SAFETY: the fd stays open for as long as the closure (and `ns`) lives;
            // setns(2) is async-signal-safe.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls on file descriptors
    // opened before fork, formats into a stack buffer and never allocates or locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Writes this process's pid into a `cgroup.procs` file without allocating.
fn write_pid(fd: RawFd) -> io::Result<()> {
    let mut buf = [0u8; 10];
    let mut pid = std::process::id();
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let digits = &buf[start..];
    // SAFETY: `digits` is a live stack buffer of the given length; write(2) is
    // async-signal-safe.
    let written = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Moves the calling thread (only it) into the network namespace of the open `netns` file:
/// the sockets it creates from then on belong to that namespace.
pub(crate) fn enter_netns(netns: &File) -> io::Result<()> {
    // SAFETY: setns(2) on an open descriptor changes only this thread's namespace; it has no
    // memory effects.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
