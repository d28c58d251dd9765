//! A port-forward connection (see [`crate::PORT_FORWARD_VSOCK_PORT`]): the
//! host's request line, the agent's reply line, then the TCP stream's
//! bytes both ways.

/// The longest request line, `65535\n`.
pub const MAX_REQUEST_LEN: usize = 6;

/// The longest reply line the host reads; a longer one is a broken agent.
pub const MAX_REPLY_LEN: usize = 256;

/// The host's request line for TCP port `port` in the guest.
pub fn request_line(port: u16) -> String {
    format!("{port}\n")
}

/// The port of a request line (without its newline).
pub fn parse_request(line: &str) -> Result<u16, String> {
    match line.parse::<u16>() {
        Ok(port) if port != 0 && !line.starts_with(['+', '0']) => Ok(port),
        _ => Err(format!(
            "the port-forward request {line:?} is not a TCP port (1 to 65535)"
        )),
    }
}

/// The agent's reply: connected, or why not.
pub fn reply_line(outcome: &Result<(), String>) -> String {
    match outcome {
        Ok(()) => "OK\n".to_owned(),
        Err(why) => {
            // One line, and short enough for the host to read it whole.
            let mut why: String = why.replace(['\n', '\r'], " ");
            let room = MAX_REPLY_LEN - "ERR \n".len();
            if why.len() > room {
                let mut end = room;
                while !why.is_char_boundary(end) {
                    end -= 1;
                }
                why.truncate(end);
            }
            format!("ERR {why}\n")
        }
    }
}

/// The outcome a reply line (without its newline) reports.
pub fn parse_reply(line: &str) -> Result<(), String> {
    match line {
        "OK" => Ok(()),
        _ => Err(match line.strip_prefix("ERR ") {
            Some(why) => why.to_owned(),
            None => format!("the agent answered a port-forward with {line:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_name_one_port() {
        assert_eq!(request_line(8080), "8080\n");
        assert_eq!(parse_request("8080"), Ok(8080));
        assert_eq!(parse_request("65535"), Ok(65535));
        assert!(request_line(65535).len() <= MAX_REQUEST_LEN);
        for bad in ["0", "65536", "", "-1", "+80", "080", "80 ", "http"] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn replies_fit_one_bounded_line() {
        assert_eq!(parse_reply(reply_line(&Ok(())).trim_end()), Ok(()));
        let refused = reply_line(&Err("connection refused\non 127.0.0.1:80".into()));
        assert_eq!(refused, "ERR connection refused on 127.0.0.1:80\n");
        assert_eq!(
            parse_reply(refused.trim_end()),
            Err("connection refused on 127.0.0.1:80".into())
        );
        let long = reply_line(&Err("é".repeat(400)));
        assert!(
            long.len() <= MAX_REPLY_LEN && long.ends_with('\n'),
            "{}",
            long.len()
        );
        assert!(parse_reply("HELLO").unwrap_err().contains("HELLO"));
    }
}
