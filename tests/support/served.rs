//! A running `preseed serve` (the binary), on a free loopback port.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use super::cli;

/// A running `preseed serve`, killed on drop.
pub struct Served {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

impl Served {
    /// `preseed serve --image PARTITION`.
    pub fn image(partition: &Path) -> Served {
        Served::start(&[OsStr::new("--image"), partition.as_os_str()])
    }

    /// `preseed serve` with `args` (the source, and any other options), on
    /// a free port; returns once it prints its address.
    pub fn start(args: &[&OsStr]) -> Served {
        let mut child = cli::command()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        eprintln!("{}", line.trim_end());
        let addr = line
            .rsplit("http://")
            .next()
            .map(|a| a.trim().to_string())
            .filter(|a| a.starts_with("127.0.0.1:"))
            .unwrap_or_else(|| panic!("preseed serve printed {line:?}, not its address"));
        Served { child, addr }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn assert_running(&mut self) {
        assert!(self.child.try_wait().unwrap().is_none(), "preseed serve exited");
    }

    /// Stops it with SIGTERM, as systemd does; it must exit 0 promptly.
    pub fn stop(mut self) {
        // SAFETY: a signal to a process this test started; no memory is passed.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "preseed serve exited with {status} on SIGTERM");
                return;
            }
            assert!(Instant::now() < deadline, "preseed serve did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
