//! Running the `preseed` binary cargo built for this test run, and other
//! commands, the way every test does: the output captured, success
//! asserted with both streams in the failure message.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// The `preseed` binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_preseed"))
}

/// A command for the binary, for a test that spawns it or sets more than
/// arguments.
pub fn command() -> Command {
    Command::new(bin())
}

/// Runs `preseed` with `args` in the test's own environment (in-tree
/// builds need the user's `$HOME`: cargo and rustup live there).
pub fn preseed(args: &[&str]) -> Output {
    command().args(args).output().unwrap()
}

/// Runs `preseed` with no docker credentials in reach (no `$DOCKER_CONFIG`,
/// a `$HOME` that does not exist), so a test never picks up the machine's
/// registry logins.
pub fn preseed_without_credentials(args: &[&str]) -> Output {
    preseed_with_env(args, &[])
}

/// [`preseed_without_credentials`], with `envs` set on top (a test's own
/// `DOCKER_CONFIG`, say).
pub fn preseed_with_env(args: &[&str], envs: &[(&str, &OsStr)]) -> Output {
    let mut cmd = command();
    cmd.args(args).env_remove("DOCKER_CONFIG").env("HOME", "/nonexistent");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Asserts that `what` succeeded, with its exit status, stdout and stderr
/// in the message if not; returns its stdout.
pub fn ok(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` (stdin closed, so nothing waits on the terminal) and
/// asserts it succeeded ([`ok`]); returns its stdout.
pub fn run(what: &str, cmd: &mut Command) -> String {
    ok(what, &cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}")))
}
