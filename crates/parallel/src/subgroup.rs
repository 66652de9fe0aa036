//! A communicator over a subset of a parent group's ranks (the tensor-parallel group of one
//! pipeline stage), built on the parent's point-to-point messages. Every member sums and
//! concatenates in member order, so all members get bit-identical results.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::wire::{decode_tensor, encode_tensor};
use crate::{CommError, Communicator, Result};

pub struct SubGroup {
    parent: Arc<dyn Communicator>,
    /// Parent ranks of the members, in member order.
    members: Vec<usize>,
    me: usize,
    device: Device,
}

impl SubGroup {
    /// The members are parent ranks; the parent's own rank must be one of them.
    pub fn new(parent: Arc<dyn Communicator>, members: Vec<usize>, device: Device) -> Result<Self> {
        let me = members.iter().position(|&r| r == parent.rank()).ok_or_else(|| {
            CommError::Usage(format!("rank {} is not a member of the group {members:?}", parent.rank()))
        })?;
        Ok(Self { parent, members, me, device })
    }

    /// Send `msgs[i]` to member `i` and receive one message from every other member.
    fn exchange(&self, msgs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let mut got = vec![Vec::new(); self.members.len()];
        std::thread::scope(|sc| -> Result<()> {
            let senders: Vec<_> = (0..self.members.len())
                .filter(|&i| i != self.me)
                .map(|i| {
                    let (to, msg) = (self.members[i], &msgs[i]);
                    sc.spawn(move || self.parent.send_bytes(to, msg))
                })
                .collect();
            for (i, slot) in got.iter_mut().enumerate() {
                if i != self.me {
                    *slot = self.parent.recv_bytes(self.members[i])?;
                }
            }
            for s in senders {
                s.join().map_err(|_| CommError::Usage("a sender thread panicked".into()))??;
            }
            Ok(())
        })?;
        Ok(got)
    }

    /// Every member's tensor, in member order.
    fn gather_all(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let mine = encode_tensor(t)?;
        let got = self.exchange(&vec![mine; self.members.len()])?;
        got.iter()
            .enumerate()
            .map(|(i, b)| if i == self.me { Ok(t.clone()) } else { decode_tensor(b, &self.device, self.members[i]) })
            .collect()
    }
}

impl Communicator for SubGroup {
    fn rank(&self) -> usize {
        self.me
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.members.len() == 1 {
            return Ok(t.clone());
        }
        let parts = self.gather_all(t)?;
        let mut sum = parts[0].clone();
        for p in &parts[1..] {
            sum = (sum + p)?;
        }
        Ok(sum)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.members.len() == 1 {
            return Ok(t.clone());
        }
        Ok(Tensor::cat(&self.gather_all(t)?, dim)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let sum = self.all_reduce_sum(t)?;
        let (a, b) = crate::part(t.dim(dim)?, self.members.len(), self.me);
        Ok(sum.narrow(dim, a, b - a)?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        let root_rank = *self.members.get(root).ok_or_else(|| CommError::Usage(format!("no member {root}")))?;
        if self.me == root {
            for (i, &m) in self.members.iter().enumerate() {
                if i != root {
                    self.parent.send_bytes(m, data)?;
                }
            }
            Ok(data.to_vec())
        } else {
            self.parent.recv_bytes(root_rank)
        }
    }

    fn send_bytes(&self, to: usize, data: &[u8]) -> Result<()> {
        self.parent.send_bytes(self.members[to], data)
    }

    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>> {
        self.parent.recv_bytes(self.members[from])
    }

    fn send(&self, to: usize, t: &Tensor) -> Result<()> {
        self.parent.send(self.members[to], t)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        self.parent.recv(self.members[from])
    }

    fn shutdown(&self) {
        self.parent.shutdown();
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if parts.len() != self.members.len() {
            return Err(CommError::Usage(format!("all_to_all needs {} parts", self.members.len())));
        }
        let msgs: Vec<Vec<u8>> = parts.iter().map(encode_tensor).collect::<Result<_>>()?;
        let got = self.exchange(&msgs)?;
        got.iter()
            .enumerate()
            .map(
                |(i, b)| {
                    if i == self.me {
                        Ok(parts[i].clone())
                    } else {
                        decode_tensor(b, &self.device, self.members[i])
                    }
                },
            )
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TcpComm;

    #[test]
    fn two_subgroups_of_four_ranks_reduce_independently() {
        let group = TcpComm::local_group(4, Device::Cpu).unwrap();
        let hs: Vec<_> = group
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || {
                    let r = c.rank();
                    let parent: Arc<dyn Communicator> = Arc::new(c);
                    let members = if r < 2 { vec![0, 1] } else { vec![2, 3] };
                    let g = SubGroup::new(parent, members, Device::Cpu).unwrap();
                    let t = Tensor::new(&[r as f32, 1.0], &Device::Cpu).unwrap();
                    let s = g.all_reduce_sum(&t).unwrap().to_vec1::<f32>().unwrap();
                    let cat = g.all_gather(&t, 0).unwrap().to_vec1::<f32>().unwrap();
                    (r, s, cat)
                })
            })
            .collect();
        for h in hs {
            let (r, s, cat) = h.join().unwrap();
            let base = if r < 2 { 0.0 } else { 2.0 };
            assert_eq!(s, vec![2.0 * base + 1.0, 2.0]);
            assert_eq!(cat, vec![base, 1.0, base + 1.0, 1.0]);
        }
    }
}
