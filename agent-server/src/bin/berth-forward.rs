//! `berth-forward LISTEN SOCKET`: the sandbox's only way out. It runs inside
//! a session's container (the node mounts it there read-only; the image
//! needs nothing added), listens on the container's loopback and pipes each
//! connection to the node's egress gateway over a Unix socket mounted into
//! the container. It knows no policy: the gateway decides everything.
//!
//! `berth-forward --watch FILE SECONDS -- KEEPALIVE...`: the container's
//! main process when the node's dead man's switch is on. It runs the
//! keep-alive command as its child and exits (and the container stops with
//! it) once FILE, which the node touches, is older than SECONDS: the node
//! is dead, and nothing will stop this container otherwise. It also exits,
//! with its code, when the keep-alive does.
//!
//! `berth-forward --ready ADDR SECONDS`: exits 0 once ADDR accepts a
//! connection (the forwarder started beside it listens), 1 after SECONDS.
//! The node runs it before it starts an agent, so the agent's first
//! request never finds the port closed.
//!
//! Standard library only, so it runs in any glibc image.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

fn pipe(mut from: impl Read, mut to: impl Write + Shut) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    to.shut();
}

trait Shut {
    fn shut(&self);
}

impl Shut for TcpStream {
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Shut for UnixStream {
    fn shut(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

fn serve(tcp: TcpStream, socket: &PathBuf) -> std::io::Result<()> {
    let unix = UnixStream::connect(socket)?;
    let (tcp2, unix2) = (tcp.try_clone()?, unix.try_clone()?);
    std::thread::spawn(move || pipe(tcp2, unix2));
    pipe(unix, tcp);
    Ok(())
}

/// Runs `keepalive` until `file` has not been touched for `timeout` (or is
/// gone), or until the keep-alive exits.
fn watch(file: &str, timeout: &str, keepalive: &[String]) -> ! {
    let Ok(secs) = timeout.parse::<u64>() else {
        eprintln!("berth-forward: --watch SECONDS must be a whole number, not `{timeout}`");
        std::process::exit(2);
    };
    let timeout = std::time::Duration::from_secs(secs);
    let mut child = match keepalive.split_first() {
        Some((cmd, args)) => match std::process::Command::new(cmd).args(args).spawn() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("berth-forward: cannot start the keep-alive `{cmd}`: {e}");
                std::process::exit(1);
            }
        },
        None => None,
    };
    loop {
        if let Some(Ok(Some(status))) = child.as_mut().map(std::process::Child::try_wait) {
            std::process::exit(status.code().unwrap_or(1));
        }
        let age = std::fs::metadata(file)
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default());
        match age {
            Ok(age) if age <= timeout => {}
            Ok(age) => {
                eprintln!(
                    "berth-forward: the node has been silent for {}s; stopping the container",
                    age.as_secs()
                );
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("berth-forward: {file}: {e}; the node is gone; stopping the container");
                std::process::exit(0);
            }
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Waits until `addr` accepts a connection; exits 0, or 1 after `seconds`.
fn ready(addr: &str, seconds: &str) -> ! {
    let Ok(seconds) = seconds.parse::<u64>() else {
        eprintln!("berth-forward: --ready SECONDS must be a whole number, not `{seconds}`");
        std::process::exit(2);
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    while std::time::Instant::now() < deadline {
        if TcpStream::connect(addr).is_ok() {
            std::process::exit(0);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    eprintln!("berth-forward: nothing listens on {addr} after {seconds} s");
    std::process::exit(1);
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, addr, seconds] = args.as_slice()
        && flag == "--ready"
    {
        ready(addr, seconds);
    }
    if let [_, flag, file, timeout, rest @ ..] = args.as_slice()
        && flag == "--watch"
    {
        let keepalive = match rest {
            [dashes, cmd @ ..] if dashes == "--" => cmd,
            other => other,
        };
        watch(file, timeout, keepalive);
    }
    let [_, listen, socket] = args.as_slice() else {
        eprintln!(
            "usage: berth-forward LISTEN_ADDR GATEWAY_SOCKET\n       berth-forward --watch FILE SECONDS [-- KEEPALIVE...]\n       berth-forward --ready ADDR SECONDS"
        );
        std::process::exit(2);
    };
    let socket = PathBuf::from(socket);
    let listener = match TcpListener::bind(listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("berth-forward: cannot listen on {listen}: {e}");
            std::process::exit(1);
        }
    };
    for conn in listener.incoming() {
        let Ok(tcp) = conn else { continue };
        let socket = socket.clone();
        std::thread::spawn(move || {
            // No gateway (no session yet, or it ended): the connection closes.
            let _ = serve(tcp, &socket);
        });
    }
}
