//! The command line (hand-parsed: the tool has no dependencies).

use std::fmt;
use std::time::Duration;

use crate::protocol::{MAX_DURATION, MAX_ECHO_SIZE};

pub const USAGE: &str = "\
usage: tern-netperf server PORT
       tern-netperf client HOST PORT send SECS [--connect-timeout SECS]
       tern-netperf client HOST PORT recv SECS [--connect-timeout SECS]
       tern-netperf client HOST PORT rr [--count N] [--size BYTES] [--connect-timeout SECS]
       tern-netperf client HOST PORT stop [--connect-timeout SECS]

server   accept connections on PORT (all IPv4 addresses), one thread each
send     write to the server for SECS; prints bytes the server counted and Gbit/s
recv     the server writes for SECS; prints bytes received and Gbit/s
rr       N round trips of BYTES each way after 100 uncounted ones (TCP_NODELAY);
         prints p50/p99/mean latency in microseconds (defaults: --count 10000 --size 64)
stop     the server process exits
";

/// Round trips an `rr` test makes unless told.
pub const DEFAULT_RR_COUNT: u32 = 10_000;
/// Request and response size of an `rr` test unless told.
pub const DEFAULT_RR_SIZE: u32 = 64;
/// How long a client tries to connect unless told.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most round trips one `rr` test may make (every sample is kept: 8 bytes each).
pub const MAX_RR_COUNT: u32 = 10_000_000;

/// What to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Server { port: u16 },
    Client { target: Target, test: Test },
}

/// The server a client talks to.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub connect_timeout: Duration,
}

/// A client test.
#[derive(Debug, Clone, PartialEq)]
pub enum Test {
    Send { duration: Duration },
    Recv { duration: Duration },
    Rr { count: u32, size: u32 },
    Stop,
}

/// A command line that does not parse.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageError(String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parse the arguments after the program name.
pub fn parse(argv: &[String]) -> Result<Command, UsageError> {
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    match args.as_slice() {
        [] => Err(usage("missing command")),
        ["-h" | "--help" | "help", ..] => Ok(Command::Help),
        ["server", port] => Ok(Command::Server { port: parse_port(port)? }),
        ["server", ..] => Err(usage("server takes exactly one argument: PORT")),
        ["client", host, port, test, rest @ ..] => parse_client(host, port, test, rest),
        ["client", ..] => Err(usage("client needs HOST PORT TEST")),
        [other, ..] => Err(usage(format!("unknown command {other:?}"))),
    }
}

fn parse_client(host: &str, port: &str, test: &str, rest: &[&str]) -> Result<Command, UsageError> {
    let port = parse_port(port)?;
    let (positional, options) = split_options(rest)?;
    let mut connect_timeout = DEFAULT_CONNECT_TIMEOUT;
    let mut count = None;
    let mut size = None;
    for (name, value) in options {
        match name {
            "--connect-timeout" => connect_timeout = parse_seconds(name, value, Duration::from_secs(3600))?,
            "--count" => count = Some(parse_bounded(name, value, 1, MAX_RR_COUNT)?),
            "--size" => size = Some(parse_bounded(name, value, 1, MAX_ECHO_SIZE)?),
            _ => return Err(usage(format!("unknown option {name}"))),
        }
    }
    if test != "rr" && (count.is_some() || size.is_some()) {
        return Err(usage("--count and --size are options of rr only"));
    }
    let test = match (test, positional.as_slice()) {
        ("send", [secs]) => Test::Send { duration: parse_seconds("SECS", secs, MAX_DURATION)? },
        ("recv", [secs]) => Test::Recv { duration: parse_seconds("SECS", secs, MAX_DURATION)? },
        ("send" | "recv", _) => return Err(usage(format!("{test} takes exactly one argument: SECS"))),
        ("rr", []) => Test::Rr { count: count.unwrap_or(DEFAULT_RR_COUNT), size: size.unwrap_or(DEFAULT_RR_SIZE) },
        ("stop", []) => Test::Stop,
        ("rr" | "stop", _) => return Err(usage(format!("{test} takes no positional argument"))),
        _ => return Err(usage(format!("unknown test {test:?} (send, recv, rr, stop)"))),
    };
    let target = Target { host: host.to_owned(), port, connect_timeout };
    Ok(Command::Client { target, test })
}

/// Positional arguments, and `--name value` pairs (in order).
type SplitArgs<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>);

fn split_options<'a>(args: &[&'a str]) -> Result<SplitArgs<'a>, UsageError> {
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let mut iter = args.iter();
    while let Some(&arg) = iter.next() {
        if let Some((name, value)) = arg.split_once('=').filter(|_| arg.starts_with("--")) {
            options.push((name, value));
        } else if arg.starts_with("--") {
            let value = iter.next().ok_or_else(|| usage(format!("{arg} needs a value")))?;
            options.push((arg, *value));
        } else {
            positional.push(arg);
        }
    }
    Ok((positional, options))
}

fn parse_port(s: &str) -> Result<u16, UsageError> {
    match s.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(usage(format!("PORT {s:?} is not a port number (1-65535)"))),
    }
}

/// Seconds (fractions allowed), more than zero and at most `max`.
fn parse_seconds(name: &str, s: &str, max: Duration) -> Result<Duration, UsageError> {
    let bad = || usage(format!("{name} {s:?} is not a number of seconds in (0, {}]", max.as_secs()));
    let secs: f64 = s.parse().map_err(|_| bad())?;
    if !(secs > 0.0 && secs <= max.as_secs_f64()) {
        return Err(bad());
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

fn parse_bounded(name: &str, s: &str, min: u32, max: u32) -> Result<u32, UsageError> {
    match s.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(usage(format!("{name} {s:?} is not a whole number in [{min}, {max}]"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(line: &str) -> Result<Command, UsageError> {
        let argv: Vec<String> = line.split_whitespace().map(str::to_owned).collect();
        parse(&argv)
    }

    fn client(line: &str) -> (Target, Test) {
        match parse_str(line) {
            Ok(Command::Client { target, test }) => (target, test),
            other => panic!("{line:?} gave {other:?}"),
        }
    }

    #[test]
    fn server_takes_a_port() {
        assert_eq!(parse_str("server 5201"), Ok(Command::Server { port: 5201 }));
        for bad in ["server", "server 0", "server 65536", "server x", "server 1 2"] {
            assert!(parse_str(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn send_and_recv_take_seconds() {
        let (target, test) = client("client 10.0.0.2 5201 send 10");
        assert_eq!(target, Target { host: "10.0.0.2".into(), port: 5201, connect_timeout: DEFAULT_CONNECT_TIMEOUT });
        assert_eq!(test, Test::Send { duration: Duration::from_secs(10) });
        let (_, test) = client("client h 1 recv 0.5");
        assert_eq!(test, Test::Recv { duration: Duration::from_millis(500) });
        for bad in ["send", "send 0", "send -1", "send x", "send 1 2", "send 3601", "send NaN", "recv inf"] {
            assert!(parse_str(&format!("client h 1 {bad}")).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn rr_has_defaults_and_bounded_options() {
        let (_, test) = client("client h 1 rr");
        assert_eq!(test, Test::Rr { count: DEFAULT_RR_COUNT, size: DEFAULT_RR_SIZE });
        let (_, test) = client("client h 1 rr --count 20000 --size=1");
        assert_eq!(test, Test::Rr { count: 20000, size: 1 });
        for bad in ["rr --count 0", "rr --size 0", "rr --size 2000000", "rr --count", "rr 5", "rr --bogus 1"] {
            assert!(parse_str(&format!("client h 1 {bad}")).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn rr_options_belong_to_rr_only() {
        assert!(parse_str("client h 1 send 1 --count 5").is_err());
        assert!(parse_str("client h 1 stop --size 5").is_err());
    }

    #[test]
    fn connect_timeout_applies_to_every_test() {
        let (target, test) = client("client h 1 stop --connect-timeout 2.5");
        assert_eq!(target.connect_timeout, Duration::from_millis(2500));
        assert_eq!(test, Test::Stop);
        assert!(parse_str("client h 1 stop --connect-timeout 0").is_err());
    }

    #[test]
    fn unknown_commands_and_missing_arguments_are_usage_errors() {
        for bad in ["", "serve 1", "client", "client h 1", "client h 1 ping"] {
            assert!(parse_str(bad).is_err(), "{bad:?} parsed");
        }
        assert_eq!(parse_str("--help"), Ok(Command::Help));
    }
}
