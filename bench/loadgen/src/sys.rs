//! The load generator's only unsafe code: system calls the standard library does not expose.

use std::io;

/// Sets the calling thread's timer slack to 1 ns: Linux rounds every sleep up by 50 µs by
/// default, which would shift a fixed-rate schedule.
pub fn precise_sleeps() {
    // prctl is variadic: the argument must have the C type the kernel reads.
    let slack_ns: libc::c_ulong = 1;
    // SAFETY: prctl(PR_SET_TIMERSLACK) takes an integer argument and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, slack_ns, 0, 0, 0);
    }
}

/// Raises this process's limit of open files (`RLIMIT_NOFILE`) to at least `wanted` when it
/// can: the soft limit up to the hard one, and the hard one too when the process may (root,
/// `CAP_SYS_RESOURCE`, up to `fs.nr_open`). Returns the soft limit in force afterwards.
pub fn raise_open_files(wanted: u64) -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into the valid, exclusively borrowed `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur >= wanted {
        return Ok(limit.rlim_cur);
    }
    if limit.rlim_max < wanted {
        let raised = libc::rlimit {
            rlim_cur: wanted,
            rlim_max: wanted,
        };
        // SAFETY: setrlimit reads one `rlimit` from the valid `raised`.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Ok(wanted);
        }
        // Not allowed above the hard limit: take what the hard limit gives.
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max.min(wanted),
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads one `rlimit` from the valid `raised`.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(raised.rlim_cur)
}
