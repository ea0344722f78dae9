//! The pod sandbox's PID 1: holds the pod's namespaces open while doing
//! nothing, reaps the zombies that get re-parented to it, and exits 0 when
//! asked to stop (SIGINT or SIGTERM).
//!
//! It blocks the signals it cares about and takes them synchronously with
//! `sigwaitinfo`, so there are no signal handlers and no async-signal-safety
//! concerns. Blocked signals stay pending even for a namespace's init (the
//! kernel drops default-disposition signals to PID 1 only when unblocked).

use std::mem::MaybeUninit;

fn main() {
    // SAFETY: plain libc calls on a locally owned, initialised sigset.
    unsafe {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(set.as_mut_ptr());
        let mut set = set.assume_init();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            eprintln!("pause: sigprocmask failed: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
        if libc::getpid() != 1 {
            eprintln!("pause: warning: not running as PID 1");
        }
        loop {
            let sig = libc::sigwaitinfo(&set, std::ptr::null_mut());
            match sig {
                libc::SIGINT | libc::SIGTERM => std::process::exit(0),
                libc::SIGCHLD => while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {},
                _ => {} // EINTR (e.g. SIGCONT after a stop): wait again
            }
        }
    }
}
