//! The first line of a stdio stream connection (see [`crate::STDIO_VSOCK_PORT`]),
//! written by the host and read by the agent.

use std::fmt;

use crate::INIT_PROCESS_STREAM_ID;

/// Which standard stream a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
}

impl fmt::Display for StdioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        })
    }
}

/// The process and stream a connection is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
    pub stream: StdioStream,
}

/// The longest header the agent reads before giving up on a connection.
pub const MAX_HEADER_LEN: usize = 512;

impl StreamHeader {
    /// The line as written on the wire. IDs are containerd's, which hold no
    /// whitespace; the init process's empty exec ID is written as `-`.
    pub fn to_line(&self) -> String {
        let exec_id = if self.exec_id.is_empty() {
            INIT_PROCESS_STREAM_ID
        } else {
            &self.exec_id
        };
        format!("{} {exec_id} {}\n", self.container_id, self.stream)
    }

    /// Parses a line, without its newline.
    pub fn parse(line: &str) -> Result<StreamHeader, String> {
        let fields: Vec<&str> = line.split(' ').collect();
        let [container_id, exec_id, stream] = fields[..] else {
            return Err(format!(
                "stdio header {line:?} is not `<container> <exec> <stream>`"
            ));
        };
        if container_id.is_empty() || exec_id.is_empty() {
            return Err(format!("stdio header {line:?} has an empty ID"));
        }
        let stream = match stream {
            "stdin" => StdioStream::Stdin,
            "stdout" => StdioStream::Stdout,
            "stderr" => StdioStream::Stderr,
            other => return Err(format!("stdio header names unknown stream {other:?}")),
        };
        let exec_id = if exec_id == INIT_PROCESS_STREAM_ID {
            String::new()
        } else {
            exec_id.to_owned()
        };
        Ok(StreamHeader {
            container_id: container_id.to_owned(),
            exec_id,
            stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for exec_id in ["", "exec-1"] {
            let header = StreamHeader {
                container_id: "web".into(),
                exec_id: exec_id.into(),
                stream: StdioStream::Stderr,
            };
            let line = header.to_line();
            assert!(line.ends_with('\n'));
            assert_eq!(StreamHeader::parse(line.trim_end()), Ok(header));
        }
        assert_eq!(
            StreamHeader {
                container_id: "web".into(),
                exec_id: String::new(),
                stream: StdioStream::Stdout
            }
            .to_line(),
            "web - stdout\n"
        );
    }

    #[test]
    fn bad_headers_are_refused() {
        for line in [
            "web - ",
            "web stdout",
            "web - stdtty",
            " - stdin",
            "a b c d",
        ] {
            assert!(StreamHeader::parse(line).is_err(), "{line:?}");
        }
    }
}
