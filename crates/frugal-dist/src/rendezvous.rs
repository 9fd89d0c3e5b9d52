//! A rendezvous over TCP for launches without MPI (torchrun-style variables): rank 0 listens at
//! `MASTER_ADDR:MASTER_PORT` and hands every other rank the same bytes (NCCL's unique id). Only
//! the start-up travels this way; the collectives themselves run on NCCL.

use crate::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Opens every message, so that a stray connection to the port is told apart from a rank.
const GREETING: &[u8; 8] = b"frugal1\n";

/// How long a rank waits between attempts to reach rank 0, which may not listen yet.
const RETRY: Duration = Duration::from_millis(50);

/// How long rank 0 waits for a connection's greeting: a rank sends it as soon as it connects,
/// so a connection that stays silent longer is not one.
const GREETING_WAIT: Duration = Duration::from_secs(5);

/// Rank 0's `payload`, on every one of `world_size` ranks: rank 0 listens at `master`
/// (`host:port`) until each other rank has connected and received it. Gives up with an error
/// naming the ranks that did not come (on rank 0) or the address that did not answer (on the
/// others) after `timeout`.
pub fn share(
    master: &str,
    rank: usize,
    world_size: usize,
    payload: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let deadline = Instant::now() + timeout;
    let addr = resolve(master)?;
    if rank == 0 {
        serve(addr, world_size, payload, deadline, timeout)?;
        Ok(payload.to_vec())
    } else {
        fetch(master, addr, rank, deadline, timeout)
    }
}

fn resolve(master: &str) -> Result<SocketAddr, Error> {
    master
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| {
            Error::Rendezvous(format!(
                "MASTER_ADDR:MASTER_PORT = {master} is not a reachable host and port"
            ))
        })
}

fn io(what: &str, e: std::io::Error) -> Error {
    Error::Rendezvous(format!("{what}: {e}"))
}

/// Rank 0: accepts the other ranks and sends each the payload.
fn serve(
    addr: SocketAddr,
    world_size: usize,
    payload: &[u8],
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Error> {
    let listener = TcpListener::bind(addr).map_err(|e| {
        io(
            &format!("rank 0 cannot listen at {addr} (MASTER_ADDR:MASTER_PORT; another job may hold the port: choose another MASTER_PORT)"),
            e,
        )
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("rendezvous", e))?;
    let mut joined = vec![false; world_size];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        match listener.accept() {
            Ok((stream, _)) => {
                // A connection that is not a rank of this job is dropped; the wait goes on.
                if let Ok(r) = greet(stream, world_size, payload, deadline) {
                    if std::mem::replace(&mut joined[r], true) {
                        return Err(Error::Rendezvous(format!(
                            "two processes joined as rank {r}: check each process's RANK"
                        )));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (0..world_size)
                        .filter(|&r| !joined[r])
                        .map(|r| r.to_string())
                        .collect();
                    return Err(Error::Rendezvous(format!(
                        "rank 0 waited {} s at {addr} for ranks {} of {world_size}: start every rank with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE, or raise --collective-timeout",
                        timeout.as_secs_f64(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(RETRY.min(deadline.saturating_duration_since(Instant::now())));
            }
            Err(e) => return Err(io("rank 0 accepting ranks", e)),
        }
    }
    Ok(())
}

/// Reads one rank's greeting and rank from `stream`, then sends it the payload. Returns the rank.
fn greet(
    mut stream: TcpStream,
    world_size: usize,
    payload: &[u8],
    deadline: Instant,
) -> std::io::Result<usize> {
    stream.set_nonblocking(false)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .clamp(Duration::from_millis(1), GREETING_WAIT);
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    let mut hello = [0u8; GREETING.len() + 8];
    stream.read_exact(&mut hello)?;
    let rank = u64::from_le_bytes(hello[GREETING.len()..].try_into().expect("8 bytes"));
    if &hello[..GREETING.len()] != GREETING || rank == 0 || rank >= world_size as u64 {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let mut message = GREETING.to_vec();
    message.extend((payload.len() as u64).to_le_bytes());
    message.extend(payload);
    stream.write_all(&message)?;
    Ok(rank as usize)
}

/// Any rank but 0: connects to rank 0 (retrying until it listens) and reads the payload.
fn fetch(
    master: &str,
    addr: SocketAddr,
    rank: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, Error> {
    let unreachable = |e: std::io::Error| {
        Error::Rendezvous(format!(
            "rank {rank} could not reach rank 0 at {master} within {} s ({e}): start rank 0 with the same MASTER_ADDR and MASTER_PORT, or raise --collective-timeout",
            timeout.as_secs_f64()
        ))
    };
    let mut stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.max(Duration::from_millis(1))) {
            Ok(s) => break s,
            Err(e) if left.is_zero() => return Err(unreachable(e)),
            Err(_) => std::thread::sleep(RETRY.min(left)),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let exchange = |stream: &mut TcpStream| -> std::io::Result<Vec<u8>> {
        stream.set_read_timeout(Some(left))?;
        stream.set_write_timeout(Some(left))?;
        let mut hello = GREETING.to_vec();
        hello.extend((rank as u64).to_le_bytes());
        stream.write_all(&hello)?;
        let mut head = [0u8; GREETING.len() + 8];
        stream.read_exact(&mut head)?;
        if &head[..GREETING.len()] != GREETING {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let len = u64::from_le_bytes(head[GREETING.len()..].try_into().expect("8 bytes"));
        let mut payload = Vec::new();
        stream.take(len).read_to_end(&mut payload)?;
        if payload.len() as u64 != len {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(payload)
    };
    exchange(&mut stream).map_err(unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port that was free a moment ago.
    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[test]
    fn every_rank_receives_rank_zeros_bytes() {
        let master = format!("127.0.0.1:{}", free_port());
        let world = 4;
        // The other ranks start first: they must wait for rank 0 to listen.
        let ranks: Vec<_> = (1..world)
            .map(|rank| {
                let master = master.clone();
                std::thread::spawn(move || {
                    share(&master, rank, world, b"ignored", Duration::from_secs(20))
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(100));
        let id: Vec<u8> = (0..128u8).collect();
        assert_eq!(
            share(&master, 0, world, &id, Duration::from_secs(20)).unwrap(),
            id
        );
        for r in ranks {
            assert_eq!(r.join().unwrap().unwrap(), id);
        }
    }

    #[test]
    fn a_missing_rank_is_named_within_the_timeout() {
        let master = format!("127.0.0.1:{}", free_port());
        let start = Instant::now();
        let other = {
            let master = master.clone();
            std::thread::spawn(move || share(&master, 1, 3, &[], Duration::from_secs(20)))
        };
        let e = share(&master, 0, 3, b"id", Duration::from_millis(800))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ranks 2 of 3"), "{e}");
        assert!(start.elapsed() < Duration::from_secs(10));
        assert_eq!(other.join().unwrap().unwrap(), b"id");
    }

    #[test]
    fn a_rank_without_rank_zero_gives_up_naming_the_address() {
        let master = format!("127.0.0.1:{}", free_port());
        let e = share(&master, 1, 2, &[], Duration::from_millis(300))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&master) && e.contains("rank 1"), "{e}");
    }

    #[test]
    fn strangers_are_ignored_and_bad_addresses_named() {
        let master = format!("127.0.0.1:{}", free_port());
        let server = {
            let master = master.clone();
            std::thread::spawn(move || share(&master, 0, 2, b"id", Duration::from_secs(20)))
        };
        // A connection that does not greet is ignored by rank 0.
        let addr = resolve(&master).unwrap();
        let stranger = loop {
            match TcpStream::connect(addr) {
                Ok(s) => break s,
                Err(_) => std::thread::sleep(RETRY),
            }
        };
        let mut stranger = stranger;
        stranger.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        drop(stranger);
        // A connection that stays silent is given up after a few seconds.
        let silent = TcpStream::connect(addr).unwrap();
        assert_eq!(
            share(&master, 1, 2, &[], Duration::from_secs(20)).unwrap(),
            b"id"
        );
        server.join().unwrap().unwrap();
        drop(silent);
        let e = resolve("127.0.0.1").unwrap_err().to_string();
        assert!(e.contains("= 127.0.0.1 "), "{e}");
    }
}
