//! The NCCL back-end (`cuda` feature): tensors move GPU to GPU through `cudarc::nccl`; the
//! rendezvous, the NCCL unique id and byte messages (step plans) go over the [`TcpComm`]
//! control channel, so both back-ends meet the same way.

use std::sync::Mutex;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::{CommError, Communicator, Result, TcpComm};

/// An NCCL communicator, used by one thread at a time.
struct Nccl(Comm);

// SAFETY: an NCCL communicator may be driven from any thread as long as calls on it are not
// concurrent; every use goes through the `Mutex` in `NcclComm`, which serialises them.
unsafe impl Send for Nccl {}

/// One rank of an NCCL group on its own GPU.
pub struct NcclComm {
    ctrl: TcpComm,
    nccl: Mutex<Nccl>,
    device: CudaDevice,
}

fn nccl_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {e:?}"))
}

impl NcclComm {
    /// Join the group at `leader` on GPU `ordinal`: TCP rendezvous first, then rank 0's NCCL
    /// unique id is broadcast over it and every rank initialises its communicator.
    pub fn join(rank: usize, world: usize, leader: &str, timeout: Duration, ordinal: usize) -> Result<Self> {
        let device = match Device::new_cuda(ordinal)? {
            Device::Cuda(d) => d,
            _ => return Err(CommError::Usage(format!("GPU {ordinal} is not a CUDA device"))),
        };
        let ctrl = TcpComm::join(rank, world, leader, timeout, Device::Cuda(device.clone()))?;
        let mine: Vec<u8> = if rank == 0 {
            Id::new().map_err(nccl_err)?.internal().iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let bytes = ctrl.broadcast_bytes(&mine, 0)?;
        let mut raw = [0 as std::ffi::c_char; 128];
        if bytes.len() != raw.len() {
            return Err(CommError::Protocol { rank: 0, what: format!("NCCL id of {} bytes", bytes.len()) });
        }
        for (r, b) in raw.iter_mut().zip(&bytes) {
            *r = *b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(device.cuda_stream(), rank, world, Id::uninit(raw)).map_err(nccl_err)?;
        Ok(Self { ctrl, nccl: Mutex::new(Nccl(comm)), device })
    }

    fn with<T>(&self, f: impl FnOnce(&Comm) -> candle_core::Result<T>) -> Result<T> {
        let g = self.nccl.lock().map_err(|_| CommError::Usage("the NCCL lock is poisoned".into()))?;
        Ok(f(&g.0)?)
    }
}

/// The collectives as candle custom ops, so they run on the tensor's own CUDA storage.
enum Op<'a> {
    AllReduce(&'a Comm),
    /// All-gather along dim 0 of equally sized parts.
    AllGather(&'a Comm),
}

macro_rules! run_typed {
    ($op:expr, $s:expr, $l:expr, $($dt:ident => $t:ty),*) => {{
        let (a, b) = $l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("NCCL needs contiguous tensors".into()))?;
        let dev = $s.device().clone();
        match $s.dtype() {
            $(DType::$dt => {
                let src = $s.as_cuda_slice::<$t>()?.slice(a..b);
                let (out, shape) = match $op {
                    Op::AllReduce(c) => {
                        // SAFETY: every element is written by the all-reduce before it is read.
                        let mut dst = unsafe { dev.alloc::<$t>(b - a)? };
                        c.all_reduce(&src, &mut dst, &ReduceOp::Sum).map_err(nccl_err)?;
                        (dst, $l.shape().clone())
                    }
                    Op::AllGather(c) => {
                        let world = c.world_size();
                        // SAFETY: the all-gather writes all `world` parts.
                        let mut dst = unsafe { dev.alloc::<$t>((b - a) * world)? };
                        c.all_gather(&src, &mut dst).map_err(nccl_err)?;
                        let mut dims = $l.shape().dims().to_vec();
                        dims.insert(0, world);
                        (dst, Shape::from(dims))
                    }
                };
                Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
            })*
            other => Err(candle_core::Error::Msg(format!("NCCL collectives do not take {other:?}"))),
        }
    }};
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::AllReduce(_) => "nccl-all-reduce",
            Op::AllGather(_) => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors (use the TCP back-end on CPU)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        run_typed!(self, s, l, F32 => f32, BF16 => half::bf16, F16 => half::f16)
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.ctrl.rank()
    }

    fn world_size(&self) -> usize {
        self.ctrl.world_size()
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        self.with(|c| t.apply_op1_no_bwd(&Op::AllReduce(c)))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        // Gather along a leading axis, then lay the parts side by side along `dim`.
        let t = t.contiguous()?;
        let g = self.with(|c| t.apply_op1_no_bwd(&Op::AllGather(c)))?;
        let parts: Vec<Tensor> = (0..self.world_size()).map(|i| g.get(i)).collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    fn reduce_scatter_sum(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let sum = self.all_reduce_sum(t)?;
        let (start, end) = crate::part(t.dim(dim)?, self.world_size(), self.rank());
        Ok(sum.narrow(dim, start, end - start)?)
    }

    fn broadcast_bytes(&self, data: &[u8], root: usize) -> Result<Vec<u8>> {
        self.ctrl.broadcast_bytes(data, root)
    }

    fn send_bytes(&self, to: usize, data: &[u8]) -> Result<()> {
        self.ctrl.send_bytes(to, data)
    }

    fn recv_bytes(&self, from: usize) -> Result<Vec<u8>> {
        self.ctrl.recv_bytes(from)
    }

    fn send(&self, to: usize, t: &Tensor) -> Result<()> {
        // Point-to-point traffic is activations between pipeline stages: small next to the
        // collectives, so it rides the control channel (staged through the host).
        self.ctrl.send(to, t)
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        Ok(self.ctrl.recv(from)?.to_device(&Device::Cuda(self.device.clone()))?)
    }

    fn shutdown(&self) {
        self.ctrl.shutdown();
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let out = self.ctrl.all_to_all(parts)?;
        out.into_iter().map(|t| Ok(t.to_device(&Device::Cuda(self.device.clone()))?)).collect()
    }
}
