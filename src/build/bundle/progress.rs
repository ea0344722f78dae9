//! Progress output: bars on a terminal (indicatif), plain lines otherwise.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// How to report progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Progress {
    /// Bars if stderr is a terminal, else lines.
    Auto,
    /// Plain log lines on stderr.
    Lines,
    /// Nothing.
    Quiet,
}

impl Progress {
    fn bars(self) -> bool {
        self == Progress::Auto && std::io::stderr().is_terminal()
    }

    /// A one-off status line.
    pub fn line(self, msg: &str) {
        if self != Progress::Quiet {
            if self.bars() {
                eprintln!("  {msg}");
            } else {
                eprintln!("preseed: {msg}");
            }
        }
    }

    /// A byte counter for a long step.
    pub fn bytes(self, what: &str, total: u64) -> Bar {
        self.line(&format!("{what} {}", super::human_bytes(total)));
        if self.bars() {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("  {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            Bar(Some(bar))
        } else {
            Bar(None)
        }
    }
}

/// A progress bar, or nothing when not on a terminal.
#[derive(Clone)]
pub struct Bar(Option<ProgressBar>);

impl Bar {
    /// Adds `n` bytes.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
    /// Clears the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}
