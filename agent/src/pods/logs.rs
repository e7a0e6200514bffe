//! Container logs as the CRI writes them (`<rfc3339nano> <stdout|stderr> <F|P> <text>`, one
//! record per line; see the CRI's `ContainerConfig.log_path` and kubelet's
//! `pkg/kubelet/kuberuntime/logs`), turned back into what the container printed: partial (`P`)
//! records joined into their line, stdout and stderr kept interleaved in the order written,
//! the prefix stripped (or only the timestamp kept), the last N lines, a byte limit. No I/O:
//! [`crate::kubelet_api`] reads the files.

use std::collections::VecDeque;

use k8s_openapi::jiff::Timestamp;

/// Which stream a record came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// One record of a CRI log file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// The runtime's RFC 3339 timestamp, as written.
    pub time: &'a str,
    pub stream: Stream,
    /// `P`: the line goes on in the next record of the stream.
    pub partial: bool,
    /// The text, without the record's newline.
    pub text: &'a [u8],
}

/// Why a line is not a CRI log record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("a log record needs a timestamp, a stream, a tag and text")]
    Fields,
    #[error("stream: {0:?} is neither stdout nor stderr")]
    Stream(String),
    #[error("tag: {0:?} is neither F nor P")]
    Tag(String),
}

/// Parses one line of a CRI log file (with or without its trailing newline).
pub fn parse_record(line: &[u8]) -> Result<Record<'_>, RecordError> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let mut fields = line.splitn(4, |b| *b == b' ');
    let (Some(time), Some(stream), Some(tag)) = (fields.next(), fields.next(), fields.next())
    else {
        return Err(RecordError::Fields);
    };
    let time = std::str::from_utf8(time).map_err(|_| RecordError::Fields)?;
    let stream = match stream {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        other => return Err(RecordError::Stream(lossy(other))),
    };
    // The tag may carry more flags after `:` in later CRI versions; the first one is F or P.
    let first = tag.split(|b| *b == b':').next().unwrap_or_default();
    let partial = match first {
        b"F" => false,
        b"P" => true,
        _ => return Err(RecordError::Tag(lossy(tag))),
    };
    Ok(Record {
        time,
        stream,
        partial,
        text: fields.next().unwrap_or_default(),
    })
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A whole line the container printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The timestamp of its first record.
    pub time: String,
    pub stream: Stream,
    /// The text without its newline.
    pub text: Vec<u8>,
}

impl Line {
    /// The line as `kubectl logs` prints it: the text, after the timestamp and a space if
    /// asked, and a newline.
    pub fn render(&self, timestamps: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + self.time.len() + 2);
        if timestamps {
            out.extend_from_slice(self.time.as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(&self.text);
        out.push(b'\n');
        out
    }

    /// Whether the line was written at or after `since` (a line whose time does not parse is
    /// kept: it is better shown than lost).
    pub fn at_or_after(&self, since: Timestamp) -> bool {
        self.time.parse::<Timestamp>().map_or(true, |t| t >= since)
    }
}

/// Joins partial records into lines, one pending line per stream, so a long stdout line split
/// around a stderr record comes out whole and in the place its end was written.
#[derive(Debug, Default)]
pub struct Joiner {
    pending: [Option<Line>; 2],
}

impl Joiner {
    /// Takes one record; returns the line it completes, if any.
    pub fn push(&mut self, record: &Record<'_>) -> Option<Line> {
        let slot = &mut self.pending[match record.stream {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }];
        let line = slot.get_or_insert_with(|| Line {
            time: record.time.to_owned(),
            stream: record.stream,
            text: Vec::new(),
        });
        line.text.extend_from_slice(record.text);
        if record.partial { None } else { slot.take() }
    }
}

/// Keeps the last `n` lines (all of them when `n` is None).
#[derive(Debug)]
pub struct Tail {
    n: Option<usize>,
    lines: VecDeque<Line>,
}

impl Tail {
    pub fn new(n: Option<u64>) -> Self {
        Self {
            n: n.map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            lines: VecDeque::new(),
        }
    }

    pub fn push(&mut self, line: Line) {
        if self.n == Some(0) {
            return;
        }
        self.lines.push_back(line);
        if let Some(n) = self.n
            && self.lines.len() > n
        {
            self.lines.pop_front();
        }
    }

    pub fn into_lines(self) -> VecDeque<Line> {
        self.lines
    }
}

/// Cuts the output at `limitBytes`.
#[derive(Debug)]
pub struct Limit {
    left: Option<u64>,
}

impl Limit {
    pub fn new(limit: Option<u64>) -> Self {
        Self { left: limit }
    }

    /// What of `bytes` may still go out (a prefix, perhaps empty).
    pub fn take<'a>(&mut self, bytes: &'a [u8]) -> &'a [u8] {
        let Some(left) = self.left.as_mut() else {
            return bytes;
        };
        let n = usize::try_from(*left)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        *left -= n as u64;
        &bytes[..n]
    }

    /// Whether nothing more may go out.
    pub fn reached(&self) -> bool {
        self.left == Some(0)
    }
}

/// The log file's attempt among the attempts whose files exist (`<attempt>.log`): the newest,
/// or the one before it for `previous`.
pub fn pick_attempt(attempts: &[u32], previous: bool) -> Option<u32> {
    let mut sorted = attempts.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted.iter().rev().nth(usize::from(previous)).copied()
}

/// Every line of a whole log file, in order; lines that are not CRI records are skipped, and a
/// last partial line with no end yet comes out as it is.
pub fn lines_of(file: &[u8]) -> Vec<Line> {
    let mut joiner = Joiner::default();
    let mut out = Vec::new();
    for raw in file.split_inclusive(|b| *b == b'\n') {
        if let Ok(record) = parse_record(raw)
            && let Some(line) = joiner.push(&record)
        {
            out.push(line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &[u8] = b"2026-01-02T03:04:05.000000001Z stdout F one\n\
2026-01-02T03:04:06.000000001Z stdout P tw\n\
2026-01-02T03:04:06.500000001Z stderr F oops\n\
2026-01-02T03:04:07.000000001Z stdout F o\n\
2026-01-02T03:04:08.000000001Z stdout F \n\
2026-01-02T03:04:09.000000001Z stderr F three words here\n";

    fn texts(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.text).into_owned())
            .collect()
    }

    #[test]
    fn records_parse_and_bad_ones_say_why() {
        let r = parse_record(b"2026-01-02T03:04:05Z stderr P a b c\n").expect("record");
        assert_eq!(
            r,
            Record {
                time: "2026-01-02T03:04:05Z",
                stream: Stream::Stderr,
                partial: true,
                text: b"a b c",
            }
        );
        assert_eq!(
            parse_record(b"2026-01-02T03:04:05Z stdout F")
                .expect("empty")
                .text,
            b""
        );
        assert_eq!(parse_record(b"garbage"), Err(RecordError::Fields));
        assert_eq!(
            parse_record(b"t stdin F x"),
            Err(RecordError::Stream("stdin".into()))
        );
        assert_eq!(
            parse_record(b"t stdout X x"),
            Err(RecordError::Tag("X".into()))
        );
    }

    #[test]
    fn partial_records_join_per_stream_and_streams_stay_interleaved() {
        let lines = lines_of(FILE);
        assert_eq!(
            texts(&lines),
            ["one", "oops", "two", "", "three words here"]
        );
        // A joined line carries the time of its first part.
        assert_eq!(lines[2].time, "2026-01-02T03:04:06.000000001Z");
        assert_eq!(lines[1].stream, Stream::Stderr);
    }

    #[test]
    fn rendering_strips_the_prefix_or_keeps_the_timestamp() {
        let lines = lines_of(FILE);
        assert_eq!(lines[0].render(false), b"one\n");
        assert_eq!(
            lines[0].render(true),
            b"2026-01-02T03:04:05.000000001Z one\n"
        );
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let mut tail = Tail::new(Some(2));
        for l in lines_of(FILE) {
            tail.push(l);
        }
        assert_eq!(
            texts(&tail.into_lines().into_iter().collect::<Vec<_>>()),
            ["", "three words here"]
        );
        let mut none = Tail::new(Some(0));
        for l in lines_of(FILE) {
            none.push(l);
        }
        assert!(none.into_lines().is_empty());
        let mut all = Tail::new(None);
        for l in lines_of(FILE) {
            all.push(l);
        }
        assert_eq!(all.into_lines().len(), 5);
    }

    #[test]
    fn limit_bytes_cuts_mid_line_and_then_stops() {
        let mut limit = Limit::new(Some(6));
        assert_eq!(limit.take(b"one\n"), b"one\n");
        assert!(!limit.reached());
        assert_eq!(limit.take(b"oops\n"), b"oo");
        assert!(limit.reached());
        assert_eq!(limit.take(b"two\n"), b"");
        let mut none = Limit::new(None);
        assert_eq!(none.take(b"anything"), b"anything");
        assert!(!none.reached());
    }

    #[test]
    fn since_filters_by_the_first_record_time() {
        let since: Timestamp = "2026-01-02T03:04:06.2Z".parse().expect("time");
        let kept: Vec<Line> = lines_of(FILE)
            .into_iter()
            .filter(|l| l.at_or_after(since))
            .collect();
        assert_eq!(texts(&kept), ["oops", "", "three words here"]);
    }

    #[test]
    fn the_newest_attempt_or_the_one_before() {
        assert_eq!(pick_attempt(&[0, 2, 1], false), Some(2));
        assert_eq!(pick_attempt(&[0, 2, 1], true), Some(1));
        assert_eq!(pick_attempt(&[0], true), None);
        assert_eq!(pick_attempt(&[], false), None);
    }
}
