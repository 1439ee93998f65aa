//! Data-parallel training across processes: a process group found through `torchrun`'s (or
//! Slurm's) environment, and a ring all-reduce over TCP with nothing but `std::net`.
//!
//! Each rank listens on a port of its own; rank 0 also listens on `MASTER_ADDR:MASTER_PORT`,
//! where every other rank announces itself (rank, world size, a job hash that must match, and
//! its ring port) and gets back the address of its successor. Each rank then opens one
//! connection to its successor and accepts one from its predecessor: the ring.
//!
//! [`Group::all_reduce_sum`] is the bandwidth-optimal ring (a reduce-scatter then an all-gather,
//! `2·(W−1)/W` of the buffer sent per rank). Every segment is summed in a fixed order by one
//! rank and copied to the others, so all ranks end with **bit-identical** sums: replicas that
//! apply the same optimiser to the same gradients stay equal. This is the portable path (CPU
//! backends, any number of machines); on GPUs it copies gradients through host memory, where
//! NCCL would not (`ARCHITECTURE.md`, "Beyond one GPU").

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// What can go wrong in a process group.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// A variable of the launch environment is missing or malformed.
    #[error("environment variable `{var}`: {why}")]
    Env {
        /// Variable name.
        var: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The ranks could not meet.
    #[error("rank {rank}: rendezvous at {master}: {why}")]
    Rendezvous {
        /// This rank.
        rank: usize,
        /// `MASTER_ADDR:MASTER_PORT`.
        master: String,
        /// What went wrong.
        why: String,
    },
    /// A neighbour stopped answering or closed its connection.
    #[error("rank {rank}: lost connection to rank {peer} while {during}: {io} (that process stopped or failed; see its output)")]
    Peer {
        /// This rank.
        rank: usize,
        /// The neighbour.
        peer: usize,
        /// The operation.
        during: &'static str,
        /// I/O error (shown in the message, not chained: it would print twice).
        io: std::io::Error,
    },
    /// Ranks disagree on something that must be equal on all of them.
    #[error("ranks disagree on {what}: {detail}")]
    Mismatch {
        /// What was compared.
        what: String,
        /// The values.
        detail: String,
    },
}

/// Where and as what this process joins a group (`torchrun`'s variables).
#[derive(Debug, Clone, PartialEq)]
pub struct Launch {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world: usize,
    /// Rank among the processes of this machine (picks the GPU).
    pub local_rank: usize,
    /// Rank 0's rendezvous address (`MASTER_ADDR:MASTER_PORT`).
    pub master: String,
    /// How long to wait for the others at the rendezvous, and for any message after it.
    pub timeout: Duration,
}

/// Default wait for a peer (`STU_DIST_TIMEOUT` seconds overrides it): as long as PyTorch's
/// default for Gloo, so a slow checkpoint write on rank 0 does not break the group.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1800);

impl Launch {
    /// The launch described by the environment: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
    /// `MASTER_ADDR`, `MASTER_PORT`, as torchrun and `stu train --nproc` set them. `None` when
    /// no world size above 1 is set (a single process). Slurm's own variables are not read on
    /// purpose: a batch script with `--ntasks` sets them outside `srun` too, where a lone
    /// process would wait for ranks that never come; job scripts map them (README).
    pub fn from_env() -> Result<Option<Self>, DistError> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// [`Launch::from_env`] over any variable lookup (tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Option<Self>, DistError> {
        let num = |var: &'static str| -> Result<Option<usize>, DistError> {
            match get(var) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| DistError::Env { var, why: format!("`{v}` is not a non-negative integer") }),
            }
        };
        let Some(world) = num("WORLD_SIZE")? else { return Ok(None) };
        let rank = num("RANK")?.ok_or(DistError::Env { var: "RANK", why: "missing while WORLD_SIZE is set".into() })?;
        let local = num("LOCAL_RANK")?;
        if world <= 1 {
            return Ok(None);
        }
        if rank >= world {
            return Err(DistError::Env { var: "RANK", why: format!("rank {rank} is not below the world size {world}") });
        }
        let addr = get("MASTER_ADDR").ok_or(DistError::Env { var: "MASTER_ADDR", why: "missing: the host of rank 0".into() })?;
        let port = num("MASTER_PORT")?.ok_or(DistError::Env { var: "MASTER_PORT", why: "missing: a free port on rank 0's host".into() })?;
        if port == 0 || port > 65535 {
            return Err(DistError::Env { var: "MASTER_PORT", why: format!("{port} is not a port number") });
        }
        let timeout = match get("STU_DIST_TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            Some(v) => Duration::from_secs_f64(v.trim().parse::<f64>().ok().filter(|s| *s > 0.0).ok_or(DistError::Env { var: "STU_DIST_TIMEOUT", why: format!("`{v}` is not a positive number of seconds") })?),
        };
        Ok(Some(Self { rank, world, local_rank: local.unwrap_or(rank), master: format!("{addr}:{port}"), timeout }))
    }
}

const MAGIC: &[u8; 4] = b"STU1";

/// A process group: this rank and its two ring neighbours.
pub struct Group {
    rank: usize,
    world: usize,
    /// To the successor, from the predecessor (none for a single process).
    ring: Option<(TcpStream, TcpStream)>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Group(rank {} of {})", self.rank, self.world)
    }
}

fn write_u64(s: &mut TcpStream, v: u64) -> std::io::Result<()> {
    s.write_all(&v.to_le_bytes())
}

fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn write_str(s: &mut TcpStream, v: &str) -> std::io::Result<()> {
    write_u64(s, v.len() as u64)?;
    s.write_all(v.as_bytes())
}

fn read_str(s: &mut TcpStream) -> std::io::Result<String> {
    let n = read_u64(s)?;
    if n > 1 << 16 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "message too long"));
    }
    let mut b = vec![0u8; n as usize];
    s.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"))
}

/// `accept` with a deadline.
fn accept_until(l: &TcpListener, deadline: Instant) -> std::io::Result<(TcpStream, SocketAddr)> {
    l.set_nonblocking(true)?;
    loop {
        match l.accept() {
            Ok((s, a)) => {
                s.set_nonblocking(false)?;
                return Ok((s, a));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "nobody connected in time"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `connect`, retried until the deadline (the listener may not be up yet).
fn connect_until(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let last = match addr.to_socket_addrs() {
            Ok(addrs) => {
                let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "the name resolves to no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e,
                    }
                }
                last
            }
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl Group {
    /// The trivial group of one process.
    pub fn single() -> Self {
        Self { rank: 0, world: 1, ring: None }
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Joins the group of `launch`. `job` must be equal on every rank (a hash of what they were
    /// asked to do): a rank started with other arguments is refused at the door.
    pub fn join(launch: &Launch, job: u64) -> Result<Self, DistError> {
        let (rank, world) = (launch.rank, launch.world);
        if world <= 1 {
            return Ok(Self::single());
        }
        let fail = |why: String| DistError::Rendezvous { rank, master: launch.master.clone(), why };
        let deadline = Instant::now() + launch.timeout;
        let ring_listener = TcpListener::bind("0.0.0.0:0").map_err(|e| fail(format!("cannot open a ring port: {e}")))?;
        let ring_port = ring_listener.local_addr().map_err(|e| fail(e.to_string()))?.port();
        // The successor's address: rank 0 tells everybody.
        let next_addr: String = if rank == 0 {
            let port = launch.master.rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
            let master = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| fail(format!("cannot listen on port {port}: {e}")))?;
            let mut peers: Vec<Option<(TcpStream, String, u64)>> = (0..world).map(|_| None).collect();
            for _ in 1..world {
                let (mut s, _) = accept_until(&master, deadline).map_err(|e| fail(format!("{} of {world} ranks arrived: {e}", 1 + peers.iter().filter(|p| p.is_some()).count())))?;
                s.set_read_timeout(Some(Duration::from_secs(30))).ok();
                let mut magic = [0u8; 4];
                s.read_exact(&mut magic).map_err(|e| fail(format!("a connection did not introduce itself: {e}")))?;
                if &magic != MAGIC {
                    return Err(fail("a connection to the rendezvous port is not a `stu` rank (another program on MASTER_PORT?)".into()));
                }
                let mut hdr = || -> std::io::Result<(u64, u64, u64, u64)> { Ok((read_u64(&mut s)?, read_u64(&mut s)?, read_u64(&mut s)?, read_u64(&mut s)?)) };
                let (r, w, their_job, their_port) = hdr().map_err(|e| fail(format!("a rank's introduction broke off: {e}")))?;
                let (r, w) = (r as usize, w as usize);
                if w != world || r == 0 || r >= world || peers[r].is_some() {
                    return Err(fail(format!("a process announced itself as rank {r} of {w}; this group has {world} ranks (duplicate or stray launch?)")));
                }
                let ip = s.peer_addr().map_err(|e| fail(e.to_string()))?.ip();
                peers[r] = Some((s, SocketAddr::new(ip, their_port as u16).to_string(), their_job));
            }
            let mismatched: Vec<usize> = (1..world).filter(|&r| peers[r].as_ref().is_some_and(|p| p.2 != job)).collect();
            let verdict = if mismatched.is_empty() { String::new() } else { format!("ranks {mismatched:?} were started with other arguments or files than rank 0 (job hash differs)") };
            if !verdict.is_empty() {
                for p in peers.iter_mut().flatten() {
                    let _ = write_str(&mut p.0, &verdict); // they may be gone already
                }
                return Err(DistError::Mismatch { what: "the job".into(), detail: verdict });
            }
            for r in 1..world {
                let next = (r + 1) % world;
                let addr = if next == 0 {
                    // Rank 0 as its predecessor sees it: the address that rank reached the master on.
                    let p = peers[r].as_ref().expect("all arrived");
                    SocketAddr::new(p.0.local_addr().map_err(|e| fail(e.to_string()))?.ip(), ring_port).to_string()
                } else {
                    peers[next].as_ref().expect("all arrived").1.clone()
                };
                let s = &mut peers[r].as_mut().expect("all arrived").0;
                write_str(s, "").and_then(|_| write_str(s, &addr)).map_err(|e| fail(format!("cannot answer rank {r}: {e}")))?;
            }
            peers[1].as_ref().expect("all arrived").1.clone()
        } else {
            let mut s = connect_until(&launch.master, deadline).map_err(|e| fail(format!("cannot reach rank 0: {e}")))?;
            s.write_all(MAGIC)
                .and_then(|_| write_u64(&mut s, rank as u64))
                .and_then(|_| write_u64(&mut s, world as u64))
                .and_then(|_| write_u64(&mut s, job))
                .and_then(|_| write_u64(&mut s, u64::from(ring_port)))
                .map_err(|e| fail(format!("cannot introduce itself: {e}")))?;
            s.set_read_timeout(Some(launch.timeout)).ok();
            let verdict = read_str(&mut s).map_err(|e| fail(format!("rank 0 did not answer: {e}")))?;
            if !verdict.is_empty() {
                return Err(DistError::Mismatch { what: "the job".into(), detail: verdict });
            }
            read_str(&mut s).map_err(|e| fail(format!("rank 0 did not answer: {e}")))?
        };
        // The ring: connect forward (the successor's listener is bound, so the kernel completes
        // the connection before it accepts), then accept from behind and check who it is.
        let mut next = connect_until(&next_addr, deadline).map_err(|e| fail(format!("cannot reach rank {} at {next_addr}: {e}", (rank + 1) % world)))?;
        write_u64(&mut next, rank as u64).map_err(|e| fail(format!("cannot greet rank {}: {e}", (rank + 1) % world)))?;
        let (mut prev, _) = accept_until(&ring_listener, deadline).map_err(|e| fail(format!("rank {} never connected: {e}", (rank + world - 1) % world)))?;
        prev.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let from = read_u64(&mut prev).map_err(|e| fail(format!("the ring predecessor did not greet: {e}")))? as usize;
        if from != (rank + world - 1) % world {
            return Err(fail(format!("rank {from} connected where rank {} was expected", (rank + world - 1) % world)));
        }
        for s in [&next, &prev] {
            s.set_nodelay(true).ok();
            s.set_read_timeout(Some(launch.timeout)).ok();
            s.set_write_timeout(Some(launch.timeout)).ok();
        }
        Ok(Self { rank, world, ring: Some((next, prev)) })
    }

    /// Sums `data` over all ranks, in place; every rank ends with the same bits.
    pub fn all_reduce_sum<T: Elem>(&mut self, data: &mut [T]) -> Result<(), DistError> {
        let (w, r) = (self.world, self.rank);
        let Some((next, prev)) = self.ring.as_mut() else { return Ok(()) };
        let n = data.len();
        let seg = |k: usize| (k * n / w)..((k + 1) * n / w);
        let (succ, pred) = ((r + 1) % w, (r + w - 1) % w);
        // Received values arrive in chunks and are added while the next chunk is in flight.
        const CHUNK: usize = 1 << 20;
        let mut recv: Vec<T> = vec![T::zero(); CHUNK.min(n.div_ceil(w).max(1))];
        for phase in 0..2 {
            for s in 0..w - 1 {
                // Reduce-scatter: pass segment r−s on, add segment r−s−1 in. After W−1 steps rank
                // r holds the full sum of segment r+1. All-gather: pass r+1−s on, store r−s.
                let (out_k, in_k) = if phase == 0 { ((r + w - s) % w, (r + 2 * w - s - 1) % w) } else { ((r + 1 + w - s) % w, (r + w - s) % w) };
                let during = if phase == 0 { "reducing gradients" } else { "gathering gradients" };
                let (out_range, in_range) = (seg(out_k), seg(in_k));
                // The two segments are disjoint: split the buffer so the sender reads one while
                // this thread writes the other.
                let (send, dst): (&[T], &mut [T]) = if out_range.end <= in_range.start {
                    let (a, b) = data.split_at_mut(in_range.start);
                    (&a[out_range.clone()], &mut b[..in_range.len()])
                } else {
                    let (a, b) = data.split_at_mut(out_range.start);
                    (&b[..out_range.len()], &mut a[in_range.clone()])
                };
                let next = &mut *next;
                let prev = &mut *prev;
                let recv = &mut recv;
                std::thread::scope(|sc| {
                    let sender = sc.spawn(move || next.write_all(bytemuck::cast_slice(send)));
                    let mut got = Ok(());
                    for part in dst.chunks_mut(CHUNK) {
                        let buf = &mut recv[..part.len()];
                        if let Err(e) = prev.read_exact(bytemuck::cast_slice_mut(buf)) {
                            got = Err(e);
                            break;
                        }
                        if phase == 0 {
                            part.iter_mut().zip(buf.iter()).for_each(|(d, v)| *d = d.add(*v));
                        } else {
                            part.copy_from_slice(buf);
                        }
                    }
                    let sent = sender.join().expect("the ring sender panicked");
                    sent.map_err(|io| DistError::Peer { rank: r, peer: succ, during, io })?;
                    got.map_err(|io| DistError::Peer { rank: r, peer: pred, during, io })
                })?;
            }
        }
        Ok(())
    }

    /// Fails on every rank unless `value` is the same on all of them.
    pub fn check_equal(&mut self, what: &str, value: f64) -> Result<(), DistError> {
        let mut v = vec![0f64; self.world];
        v[self.rank] = value;
        self.all_reduce_sum(&mut v)?;
        if v.iter().any(|x| x.to_bits() != v[0].to_bits()) {
            let detail = v.iter().enumerate().map(|(k, x)| format!("rank {k}: {x:e}")).collect::<Vec<_>>().join(", ");
            return Err(DistError::Mismatch { what: what.into(), detail });
        }
        Ok(())
    }

    /// Waits until every rank arrives here.
    pub fn barrier(&mut self) -> Result<(), DistError> {
        self.all_reduce_sum(&mut [0f32])
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some((next, prev)) = &self.ring {
            let _ = next.shutdown(Shutdown::Both);
            let _ = prev.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(not(target_endian = "little"))]
compile_error!("the ring sends values in native byte order, which must be little-endian on every rank");

/// A number the ring can carry (sent as its native little-endian bytes).
pub trait Elem: bytemuck::Pod + Send + Sync {
    /// Zero.
    fn zero() -> Self;
    /// `self + other`.
    fn add(self, other: Self) -> Self;
}

impl Elem for f32 {
    fn zero() -> Self {
        0.0
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

impl Elem for f64 {
    fn zero() -> Self {
        0.0
    }
    fn add(self, other: Self) -> Self {
        self + other
    }
}

/// A free TCP port on this machine for a local launch's `MASTER_PORT`, drawn below Linux's
/// ephemeral range (32768–60999), so that the ring ports the ranks open meanwhile (which the
/// kernel draws from that range) cannot take it before rank 0 listens on it.
pub fn free_port() -> std::io::Result<u16> {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut rng = stu_core::rng::SplitMix64::new(t ^ u64::from(std::process::id()) << 32);
    for _ in 0..200 {
        let port = 20_000 + rng.below(12_000) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn launch(rank: usize, world: usize, port: u16) -> Launch {
        Launch { rank, world, local_rank: rank, master: format!("127.0.0.1:{port}"), timeout: Duration::from_secs(20) }
    }

    /// Runs `f(group)` on `world` threads joined into one group; returns their results by rank.
    fn on_ranks<R: Send>(world: usize, jobs: &[u64], f: impl Fn(&mut Group) -> R + Sync) -> Vec<Result<R, DistError>> {
        let port = free_port().unwrap();
        std::thread::scope(|sc| {
            let hs: Vec<_> = (0..world).map(|r| { let f = &f; let job = jobs[r]; sc.spawn(move || Group::join(&launch(r, world, port), job).map(|mut g| f(&mut g))) }).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn the_ring_sums_any_length_identically_on_every_rank() {
        for world in [2usize, 3, 4] {
            for n in [0usize, 1, 2, 5, 1000, 100_003] {
                let input = |r: usize| -> Vec<f32> { let mut g = stu_core::rng::SplitMix64::new((r * 7919 + n) as u64); g.fill_f32(n, -1.0, 1.0) };
                let out = on_ranks(world, &vec![9; world], |g| {
                    let mut v = input(g.rank());
                    g.all_reduce_sum(&mut v).unwrap();
                    v
                });
                let out: Vec<Vec<f32>> = out.into_iter().map(Result::unwrap).collect();
                let inputs: Vec<Vec<f32>> = (0..world).map(input).collect();
                for i in 0..n {
                    let exact: f64 = inputs.iter().map(|v| v[i] as f64).sum();
                    assert!((out[0][i] as f64 - exact).abs() <= 1e-6 * world as f64, "world {world}, n {n}, element {i}: {} vs {exact}", out[0][i]);
                }
                for r in 1..world {
                    assert!(out[r].iter().zip(&out[0]).all(|(a, b)| a.to_bits() == b.to_bits()), "world {world}, n {n}: rank {r} differs from rank 0");
                }
            }
        }
        // f64 carries counts exactly.
        let out = on_ranks(3, &[1; 3], |g| { let mut v = vec![(1u64 << 40) as f64 + g.rank() as f64; 7]; g.all_reduce_sum(&mut v).unwrap(); v });
        assert!(out.into_iter().all(|v| v.unwrap() == vec![3.0 * (1u64 << 40) as f64 + 3.0; 7]));
    }

    #[test]
    fn mismatches_and_lost_peers_are_errors_that_name_the_ranks() {
        let out = on_ranks(3, &[1, 1, 2], |_| ());
        for r in out {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("ranks [2]") && e.contains("other arguments"), "{e}");
        }
        let out = on_ranks(2, &[0, 0], |g| g.check_equal("the weights", if g.rank() == 0 { 1.0 } else { 1.5 }));
        for r in out {
            let e = r.unwrap().unwrap_err().to_string();
            assert!(e.contains("the weights") && e.contains("rank 1: 1.5e0"), "{e}");
        }
        // Rank 1 leaves; rank 0's next reduction fails naming it.
        let out = on_ranks(2, &[0, 0], |g| if g.rank() == 0 { std::thread::sleep(Duration::from_millis(200)); g.all_reduce_sum(&mut [1f32; 64]).err().map(|e| e.to_string()) } else { None });
        let e = out[0].as_ref().unwrap().clone().expect("rank 0 must see the loss of rank 1");
        assert!(e.contains("rank 0: lost connection to rank 1"), "{e}");
    }

    #[test]
    fn the_launch_is_read_from_torchrun_variables() {
        let env = |pairs: &[(&str, &str)]| { let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(); move |k: &str| m.get(k).cloned() };
        assert_eq!(Launch::from_lookup(env(&[])).unwrap(), None);
        assert_eq!(Launch::from_lookup(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let l = Launch::from_lookup(env(&[("WORLD_SIZE", "4"), ("RANK", "3"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "29500")])).unwrap().unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.master.as_str(), l.timeout), (3, 4, 1, "node7:29500", DEFAULT_TIMEOUT));
        let l = Launch::from_lookup(env(&[("WORLD_SIZE", "8"), ("RANK", "5"), ("MASTER_ADDR", "n1"), ("MASTER_PORT", "6000"), ("STU_DIST_TIMEOUT", "60")])).unwrap().unwrap();
        assert_eq!((l.rank, l.world, l.local_rank, l.timeout), (5, 8, 5, Duration::from_secs(60)));
        // Slurm's variables alone start nothing (a batch script outside srun has them too).
        assert_eq!(Launch::from_lookup(env(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")])).unwrap(), None);
        for (pairs, var) in [
            (&[("WORLD_SIZE", "2")][..], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "1")][..], "RANK"),
            (&[("WORLD_SIZE", "2"), ("RANK", "1")][..], "MASTER_ADDR"),
            (&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "a"), ("MASTER_PORT", "x")][..], "MASTER_PORT"),
            (&[("WORLD_SIZE", "two")][..], "WORLD_SIZE"),
        ] {
            let e = Launch::from_lookup(env(pairs)).unwrap_err().to_string();
            assert!(e.contains(&format!("`{var}`")), "{pairs:?}: {e}");
        }
    }
}
