//! The load generator's only unsafe code: system calls the standard library does not expose.

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
