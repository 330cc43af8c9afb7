//! Progress while a command waits: a spinner with the elapsed time when stderr is a terminal,
//! one plain line otherwise.

use std::io::{IsTerminal, Write};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
const TICK: Duration = Duration::from_millis(80);
/// ANSI: carriage return, then erase the whole line.
const CLEAR_LINE: &str = "\r\x1b[2K";

/// One spinner line: `⠋ loading gemma… 1.2s`.
pub fn spinner_line(tick: usize, label: &str, elapsed: Duration) -> String {
    format!(
        "{} {label}… {}",
        FRAMES[tick % FRAMES.len()],
        crate::units::format_elapsed(elapsed)
    )
}

/// True when stderr is a terminal that understands a carriage return and ANSI line erase.
fn stderr_is_interactive() -> bool {
    std::io::stderr().is_terminal() && std::env::var("TERM").map_or(true, |t| t != "dumb")
}

/// Shows progress on stderr until dropped or [`Progress::finish`]ed; either way the spinner line
/// is erased, so what comes next (a result or an error) starts on a clean line.
pub struct Progress {
    started: Instant,
    spinner: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
}

impl Progress {
    /// Starts showing `label` (e.g. "loading gemma"): a spinner when stderr is a terminal,
    /// else the plain line `label…`.
    pub fn start(label: &str) -> Self {
        Self::start_with(label, stderr_is_interactive(), Box::new(std::io::stderr()))
    }

    /// Like [`Progress::start`], but prints nothing when stderr is not a terminal.
    pub fn start_spinner_only(label: &str) -> Self {
        if stderr_is_interactive() {
            Self::start_with(label, true, Box::new(std::io::stderr()))
        } else {
            Progress {
                started: Instant::now(),
                spinner: None,
            }
        }
    }

    fn start_with(label: &str, interactive: bool, mut out: Box<dyn Write + Send>) -> Self {
        let started = Instant::now();
        if !interactive {
            let _ = writeln!(out, "{label}…");
            let _ = out.flush();
            return Progress {
                started,
                spinner: None,
            };
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let label = label.to_string();
        let spawned = std::thread::Builder::new()
            .name("progress".into())
            .spawn(move || {
                let mut tick = 0usize;
                loop {
                    let line = spinner_line(tick, &label, started.elapsed());
                    let _ = write!(out, "{CLEAR_LINE}{line}");
                    let _ = out.flush();
                    tick += 1;
                    match stopped.recv_timeout(TICK) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
                let _ = write!(out, "{CLEAR_LINE}");
                let _ = out.flush();
            });
        Progress {
            started,
            spinner: spawned.ok().map(|handle| (stop, handle)),
        }
    }

    /// Time since the progress started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Erases the spinner and returns the elapsed time.
    pub fn finish(mut self) -> Duration {
        self.stop();
        self.started.elapsed()
    }

    fn stop(&mut self) {
        if let Some((stop, handle)) = self.spinner.take() {
            let _ = stop.send(());
            let _ = handle.join();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spinner_line_shows_frame_label_and_tenths() {
        assert_eq!(
            spinner_line(0, "loading gemma", Duration::from_millis(1234)),
            "⠋ loading gemma… 1.2s"
        );
        assert_eq!(
            spinner_line(11, "loading gemma", Duration::from_millis(50)),
            "⠙ loading gemma… 0.1s"
        );
    }

    /// A writer whose bytes the test can read afterwards.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn the_spinner_is_erased_on_finish_and_on_drop() {
        let out = Shared::default();
        let p = Progress::start_with("loading x", true, Box::new(out.clone()));
        std::thread::sleep(Duration::from_millis(200));
        assert!(p.finish() >= Duration::from_millis(200));
        let text = out.text();
        assert!(text.starts_with("\r\x1b[2K⠋ loading x… 0.0s"), "{text:?}");
        assert!(text.contains("⠙ loading x… "), "{text:?}");
        assert!(text.ends_with(CLEAR_LINE), "{text:?}");

        let out = Shared::default();
        drop(Progress::start_with(
            "loading y",
            true,
            Box::new(out.clone()),
        ));
        assert!(out.text().ends_with(CLEAR_LINE));
    }

    #[test]
    fn without_a_terminal_there_is_one_plain_line() {
        let out = Shared::default();
        let p = Progress::start_with("loading z", false, Box::new(out.clone()));
        assert!(p.spinner.is_none());
        p.finish();
        assert_eq!(out.text(), "loading z…\n");
    }
}
