//! A model's server output: the last lines in memory, everything in a size-capped file.
//!
//! Lines from stdout and stderr land in one ring (for `/api/models/{id}/logs` and for the tail
//! shown with a start failure), are appended to `<state_dir>/logs/<id>.log` (rotated once to
//! `.log.1` when it passes the cap), and are broadcast to followers (`logs -f`).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::sync::LockExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::broadcast;

/// Lines kept in memory per model.
pub const RING_LINES: usize = 1000;
/// The log file is rotated when it grows past this.
pub const FILE_CAP_BYTES: u64 = 8 * 1024 * 1024;
/// Bytes kept of one line; the rest of a longer line is dropped (and counted in a marker), so a
/// server printing without newlines cannot grow llmvisor's memory.
pub const LINE_CAP_BYTES: usize = 16 * 1024;

pub struct LogSink {
    ring: Mutex<VecDeque<String>>,
    file: Mutex<FileState>,
    follow: broadcast::Sender<String>,
}

/// The log file is opened at the first line, not when the sink is made: a daemon serving a
/// thousand discovered models creates (and holds open) only the files of those that ran.
enum FileState {
    None,
    Unopened(PathBuf),
    Open(LogFile),
}

struct LogFile {
    path: PathBuf,
    file: File,
    len: u64,
}

impl LogSink {
    /// A sink writing to `path` (created 0600 at the first line); `None` keeps lines in memory
    /// only.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self {
            ring: Mutex::new(VecDeque::with_capacity(64)),
            file: Mutex::new(path.map_or(FileState::None, FileState::Unopened)),
            follow: broadcast::channel(256).0,
        }
    }

    pub fn push(&self, line: String) {
        {
            let mut file = self.file.locked();
            if let FileState::Unopened(p) = &*file {
                *file = match LogFile::open(p.clone()) {
                    Ok(f) => FileState::Open(f),
                    Err(e) => {
                        // Once: the lines stay in memory.
                        tracing::warn!(path = %p.display(), "cannot open log file: {e}");
                        FileState::None
                    }
                };
            }
            if let FileState::Open(f) = &mut *file {
                f.append(&line);
            }
        }
        let _ = self.follow.send(line.clone());
        let mut ring = self.ring.locked();
        if ring.len() == RING_LINES {
            ring.pop_front();
        }
        ring.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let ring = self.ring.locked();
        ring.iter()
            .skip(ring.len().saturating_sub(n))
            .cloned()
            .collect()
    }

    /// The lines in memory, and a receiver for every line after them (no gap, no overlap).
    pub fn follow(&self) -> (Vec<String>, broadcast::Receiver<String>) {
        let ring = self.ring.locked();
        // Subscribing under the ring lock: `push` sends before it takes this lock, so a line is
        // either in the snapshot or will arrive on the receiver — possibly both for the one line
        // racing right now, which is harmless for a log view.
        let rx = self.follow.subscribe();
        (ring.iter().cloned().collect(), rx)
    }

    /// Copies `reader` into the sink line by line until it ends. Invalid UTF-8 is replaced, not
    /// fatal: a server's output is shown, never trusted.
    /// A line longer than [`LINE_CAP_BYTES`] keeps its first bytes and a marker.
    pub async fn capture(&self, reader: impl AsyncRead + Unpin) {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::with_capacity(256);
        let mut dropped = 0usize;
        loop {
            let chunk = match reader.fill_buf().await {
                Ok([]) | Err(_) => break,
                Ok(c) => c,
            };
            let (part, ended) = match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => (&chunk[..i], true),
                None => (chunk, false),
            };
            let room = LINE_CAP_BYTES.saturating_sub(buf.len());
            buf.extend_from_slice(&part[..part.len().min(room)]);
            dropped += part.len().saturating_sub(room);
            let used = part.len() + usize::from(ended);
            reader.consume(used);
            if ended {
                self.push_line(&mut buf, &mut dropped);
            }
        }
        if !buf.is_empty() || dropped > 0 {
            self.push_line(&mut buf, &mut dropped);
        }
    }

    fn push_line(&self, buf: &mut Vec<u8>, dropped: &mut usize) {
        while matches!(buf.last(), Some(b'\r')) {
            buf.pop();
        }
        let mut line = String::from_utf8_lossy(buf).into_owned();
        if *dropped > 0 {
            line.push_str(&format!(
                " … [llmvisor: {dropped} more bytes of this line dropped]"
            ));
        }
        self.push(line);
        buf.clear();
        *dropped = 0;
    }
}

impl LogFile {
    fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = open_append(&path)?;
        let len = file.metadata()?.len();
        Ok(Self { path, file, len })
    }

    fn append(&mut self, line: &str) {
        if self.len >= FILE_CAP_BYTES {
            let rotated = self.path.with_extension("log.1");
            let reopened =
                std::fs::rename(&self.path, &rotated).and_then(|_| open_append(&self.path));
            match reopened {
                Ok(f) => {
                    self.file = f;
                    self.len = 0;
                }
                Err(e) => tracing::warn!(path = %self.path.display(), "cannot rotate log: {e}"),
            }
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        if self.file.write_all(&bytes).is_ok() {
            self.len += bytes.len() as u64;
        }
    }
}

/// Opens (creating 0600) the log file; a symbolic link in its place is not followed.
fn open_append(path: &Path) -> std::io::Result<File> {
    crate::statedir::nofollow(OpenOptions::new().create(true).append(true).mode(0o600)).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_lines() {
        let sink = LogSink::new(None);
        for i in 0..(RING_LINES + 5) {
            sink.push(format!("line {i}"));
        }
        let tail = sink.tail(2);
        assert_eq!(
            tail,
            vec![
                format!("line {}", RING_LINES + 3),
                format!("line {}", RING_LINES + 4)
            ]
        );
        assert_eq!(sink.tail(usize::MAX).len(), RING_LINES);
    }

    #[test]
    fn the_file_is_created_at_the_first_line_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let sink = LogSink::new(Some(path.clone()));
        assert!(!path.exists(), "a model that never ran has no log file");
        sink.push("hello".into());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "hello\n");
    }

    #[test]
    fn file_rotates_once_past_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let sink = LogSink::new(Some(path.clone()));
        let line = "x".repeat(1023);
        for _ in 0..(FILE_CAP_BYTES / 1024 + 10) {
            sink.push(line.clone());
        }
        let rotated = std::fs::metadata(dir.path().join("m.log.1")).unwrap().len();
        let current = std::fs::metadata(&path).unwrap().len();
        assert!(rotated >= FILE_CAP_BYTES);
        assert!(current < FILE_CAP_BYTES && current > 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[tokio::test]
    async fn a_line_without_end_is_capped() {
        let sink = LogSink::new(None);
        let mut input = vec![b'x'; 4 << 20];
        input.extend_from_slice(b"\nnext\n");
        sink.capture(&input[..]).await;
        let tail = sink.tail(10);
        assert_eq!(
            tail.len(),
            2,
            "{:?}",
            tail.iter().map(String::len).collect::<Vec<_>>()
        );
        assert!(tail[0].len() < LINE_CAP_BYTES + 100, "{}", tail[0].len());
        assert!(tail[0].ends_with(&format!(
            "{} more bytes of this line dropped]",
            (4 << 20) - LINE_CAP_BYTES
        )));
        assert_eq!(tail[1], "next");
    }

    #[tokio::test]
    async fn capture_splits_lines_and_survives_bad_utf8() {
        let sink = LogSink::new(None);
        let input: &[u8] = b"one\r\ntwo\n\xff\xfe three\nlast-without-newline";
        sink.capture(input).await;
        assert_eq!(
            sink.tail(10),
            vec![
                "one",
                "two",
                "\u{fffd}\u{fffd} three",
                "last-without-newline"
            ]
        );
    }
}
