//! The shared-memory CPU back-end: ranks that are threads of one process (the ranks of one
//! pod) exchange tensors through memory instead of loopback TCP. A collective is one round
//! in which every rank posts its tensor (a reference, nothing is copied) and, once all have
//! posted, reads everyone's; reductions sum in rank order, so every rank gets bit-identical
//! results. Point-to-point messages go through per-pair mailboxes.
//!
//! A rank whose communicator is dropped (its thread ended or unwound) or shut down closes
//! the group: peers waiting on it fail at once naming it, as with a broken TCP link.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use candle_core::{Device, Tensor};

use crate::{part, CommError, Communicator, Result};

#[derive(Clone)]
enum Payload {
    Tensor(Tensor),
    Bytes(Arc<Vec<u8>>),
}

#[derive(Default)]
struct State {
    /// Completed collective rounds.
    round: u64,
    posted: Vec<Option<Payload>>,
    arrived: usize,
    /// Everyone's payloads of the last completed round.
    result: Arc<Vec<Payload>>,
    /// (from, to) → messages not yet received.
    mail: HashMap<(usize, usize), VecDeque<Payload>>,
    /// The rank that left the group, once one has.
    gone: Option<usize>,
}

/// The meeting point of one in-process group; [`ShmHub::join`] hands out the ranks.
#[derive(Clone)]
pub struct ShmHub {
    world: usize,
    inner: Arc<(Mutex<State>, Condvar)>,
}

impl ShmHub {
    pub fn new(world: usize) -> Self {
        let state = State { posted: vec![None; world], ..State::default() };
        Self { world, inner: Arc::new((Mutex::new(state), Condvar::new())) }
    }

    /// Rank `rank`'s communicator (each rank joins once).
    pub fn join(&self, rank: usize, device: Device) -> Result<ShmComm> {
        if rank >= self.world {
            return Err(CommError::Usage(format!("rank {rank} is not below the group size {}", self.world)));
        }
        Ok(ShmComm { rank, hub: self.clone(), device })
    }

    /// A whole group at once (tests, benchmarks).
    pub fn group(world: usize, device: Device) -> Result<Vec<ShmComm>> {
        let hub = Self::new(world);
        (0..world).map(|r| hub.join(r, device.clone())).collect()
    }
}

/// One rank of an in-process group.
pub struct ShmComm {
    rank: usize,
    hub: ShmHub,
    device: Device,
}

impl ShmComm {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.hub.inner.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.hub.inner.1.wait(g).unwrap_or_else(|p| p.into_inner())
    }

    /// Post `mine` and return every rank's post of this round, by rank.
    fn exchange(&self, mine: Payload) -> Result<Arc<Vec<Payload>>> {
        let mut g = self.lock();
        if let Some(r) = g.gone {
            return Err(CommError::PeerGone(r));
        }
        let round = g.round;
        g.posted[self.rank] = Some(mine);
        g.arrived += 1;
        if g.arrived == self.hub.world {
            let all = g.posted.iter_mut().map(|p| p.take()).collect::<Option<Vec<_>>>();
            g.result = Arc::new(all.ok_or_else(|| CommError::Usage("a collective round lost a post".into()))?);
            g.arrived = 0;
            g.round += 1;
            self.hub.inner.1.notify_all();
        }
        // A faster rank may start the next round, but it cannot complete without this rank,
        // so `result` is still this round's when we read it.
        while g.round == round {
            if let Some(r) = g.gone {
                return Err(CommError::PeerGone(r));
            }
            g = self.wait(g);
        }
        Ok(g.result.clone())
    }

    fn tensors(&self, all: &[Payload]) -> Result<Vec<Tensor>> {
        all.iter()
            .map(|p| match p {
                Payload::Tensor(t) => Ok(t.to_device(&self.device)?),
                Payload::Bytes(_) => Err(CommError::Usage("ranks called different collectives".into())),
            })
            .collect()
    }

    fn post(&self, to: usize, p: Payload) -> Result<()> {
        if to >= self.hub.world || to == self.rank {
            return Err(CommError::Usage(format!("rank {} cannot send to rank {to}", self.rank)));
        }
        let mut g = self.lock();
        if let Some(r) = g.gone {
            return Err(CommError::PeerGone(r));
        }
        g.mail.entry((self.rank, to)).or_default().push_back(p);
        self.hub.inner.1.notify_all();
        Ok(())
    }

    fn take(&self, from: usize) -> Result<Payload> {
        if from >= self.hub.world || from == self.rank {
            return Err(CommError::Usage(format!("rank {} cannot receive from rank {from}", self.rank)));
        }
        let mut g = self.lock();
        loop {
            if let Some(p) = g.mail.get_mut(&(from, self.rank)).and_then(VecDeque::pop_front) {
                return Ok(p);
            }
            if let Some(r) = g.gone {
                return Err(CommError::PeerGone(r));
            }
            g = self.wait(g);
        }
    }

    fn sum(&self, t: &Tensor) -> Result<Tensor> {
        let all = self.exchange(Payload::Tensor(t.clone()))?;
        let ts = self.tensors(&all)?;
        let mut acc = ts[0].clone();
        for x in &ts[1..] {
            acc = (acc + x)?;
        }
        Ok(acc)
    }
}

impl Drop for ShmComm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Communicator for ShmComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.hub.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.sum(t)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let all = self.exchange(Payload::Tensor(t.clone()))?;
        Ok(Tensor::cat(&self.tensors(&all)?, dim)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let (a, b) = part(t.dim(dim)?, self.hub.world, self.rank);
        Ok(self.sum(t)?.narrow(dim, a, b - a)?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        let mine = if self.rank == root { data.to_vec() } else { Vec::new() };
        let all = self.exchange(Payload::Bytes(Arc::new(mine)))?;
        match all.get(root) {
            Some(Payload::Bytes(b)) => Ok(b.as_ref().clone()),
            _ => Err(CommError::Usage(format!("broadcast from rank {root}: ranks called different collectives"))),
        }
    }

    fn send_bytes(&self, to: usize, data: &[u8]) -> Result<()> {
        self.post(to, Payload::Bytes(Arc::new(data.to_vec())))
    }

    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>> {
        match self.take(from)? {
            Payload::Bytes(b) => Ok(b.as_ref().clone()),
            Payload::Tensor(_) => Err(CommError::Protocol { rank: from, what: "expected bytes, got a tensor".into() }),
        }
    }

    fn send(&self, to: usize, t: &Tensor) -> Result<()> {
        self.post(to, Payload::Tensor(t.clone()))
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        match self.take(from)? {
            Payload::Tensor(t) => Ok(t.to_device(&self.device)?),
            Payload::Bytes(_) => Err(CommError::Protocol { rank: from, what: "expected a tensor, got bytes".into() }),
        }
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let world = self.hub.world;
        if parts.len() != world {
            return Err(CommError::Usage(format!("all_to_all needs {world} parts, got {}", parts.len())));
        }
        let mut own = None;
        for (to, p) in parts.into_iter().enumerate() {
            if to == self.rank {
                own = Some(p);
            } else {
                self.send(to, &p)?;
            }
        }
        (0..world)
            .map(|from| {
                if from == self.rank {
                    own.take().ok_or_else(|| CommError::Usage("own part".into()))
                } else {
                    self.recv(from)
                }
            })
            .collect()
    }

    fn shutdown(&self) {
        let mut g = self.lock();
        g.gone.get_or_insert(self.rank);
        self.hub.inner.1.notify_all();
    }
}
