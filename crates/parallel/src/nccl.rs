//! The NCCL back-end (`cuda` feature): tensors move GPU to GPU through NCCL on the serving
//! stream; the rendezvous, the NCCL unique id, byte messages (step plans) and the shapes of
//! point-to-point tensors go over the [`TcpComm`] control channel, so both back-ends meet the
//! same way.
//!
//! - One communicator per rank, each on its own GPU (the caller picks the device).
//! - Collectives, pipeline sends/receives and the MoE all-to-all (grouped sends/receives) all
//!   run on NCCL: no tensor is staged through the host.
//! - A watchdog thread follows every enqueued operation. One that does not finish within the
//!   timeout, or an asynchronous NCCL error (a peer gone), aborts the communicator
//!   (`ncclCommAbort`, which also ends kernels blocked on the dead peer); every later call then
//!   fails at once with the reason, and the control channel is shut so peers fail too.
//! - Not bounded: `ncclCommInitRank` itself, which runs only after the TCP rendezvous has
//!   seen every rank (non-blocking initialisation needs NCCL's config struct, which cudarc's
//!   bindings leave to the caller).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaStream, DevicePtr};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, InplaceOp1, Layout, Shape, Tensor};
use cudarc::nccl::{result as nccl, sys};

use crate::wire;
use crate::{CommError, Communicator, Result, TcpComm};

/// The raw communicator. NCCL calls on it are serialised by `Inner::ops`; `ncclCommAbort` may
/// come from the watchdog thread (NCCL allows it concurrently with a blocked call).
struct Raw(sys::ncclComm_t);

// SAFETY: the handle is used under `Inner::ops`, except by `ncclCommAbort`, which NCCL
// documents as callable from another thread to end a hung operation.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

struct Inner {
    comm: Raw,
    /// Held while enqueueing; `aborted` is read under it, so no call follows an abort.
    ops: Mutex<()>,
    aborted: AtomicBool,
    reason: Mutex<String>,
}

impl Inner {
    /// Abort once: no NCCL call on the handle after this.
    fn abort(&self, why: String) {
        // Wait a little for an enqueue in progress; a call blocked inside NCCL is what the
        // abort is for, so go ahead without the lock after that.
        let deadline = Instant::now() + Duration::from_secs(1);
        let guard = loop {
            match self.ops.try_lock() {
                Ok(g) => break Some(g),
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(_) => break None,
            }
        };
        if self.aborted.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Ok(mut r) = self.reason.lock() {
            *r = why.clone();
        }
        tracing::error!("NCCL communicator aborted: {why}");
        // SAFETY: the handle is live (aborted was false) and is never used after this.
        let _ = unsafe { nccl::comm_abort(self.comm.0) };
        drop(guard);
    }

    fn gone(&self) -> CommError {
        let why = self.reason.lock().map(|r| r.clone()).unwrap_or_default();
        CommError::Usage(format!("the NCCL communicator was aborted: {why}"))
    }

    /// The last asynchronous error NCCL recorded, if any.
    fn async_error(&self) -> Option<String> {
        let mut res = sys::ncclResult_t::ncclSuccess;
        // SAFETY: the handle is live (checked by the caller) and `res` is a valid out-pointer.
        let call = unsafe { sys::ncclCommGetAsyncError(self.comm.0, &mut res) };
        match (call, res) {
            (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclSuccess)
            | (sys::ncclResult_t::ncclSuccess, sys::ncclResult_t::ncclInProgress) => None,
            (c, r) => Some(format!("asynchronous NCCL error {r:?} (query {c:?})")),
        }
    }
}

/// Enqueued operations the watchdog follows: (done-event, deadline, what).
type Pending = (CudaEvent, Instant, &'static str);

fn watchdog(inner: Arc<Inner>, rx: mpsc::Receiver<Pending>, ctrl: Arc<TcpComm>) {
    while let Ok((event, deadline, what)) = rx.recv() {
        let mut polls = 0u32;
        loop {
            if inner.aborted.load(Ordering::SeqCst) {
                return;
            }
            match event.try_is_complete() {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => {
                    inner.abort(format!("{what}: CUDA error {e:?}"));
                    ctrl.shutdown();
                    return;
                }
            }
            polls += 1;
            let failed = if polls.is_multiple_of(64) { inner.async_error() } else { None };
            let late = Instant::now() > deadline;
            if failed.is_some() || late {
                inner.abort(failed.unwrap_or_else(|| format!("{what} did not complete within the timeout")));
                ctrl.shutdown();
                return;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// One rank of an NCCL group on its own GPU.
pub struct NcclComm {
    ctrl: Arc<TcpComm>,
    inner: Arc<Inner>,
    device: CudaDevice,
    stream: Arc<CudaStream>,
    timeout: Duration,
    watch: Mutex<mpsc::Sender<Pending>>,
}

fn nccl_err(e: nccl::NcclError) -> candle_core::Error {
    candle_core::Error::Msg(format!("NCCL: {:?}", e.0))
}

fn nccl_type(d: DType) -> candle_core::Result<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Ok(match d {
        DType::F32 => T::ncclFloat32,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::F64 => T::ncclFloat64,
        DType::U8 => T::ncclUint8,
        DType::U32 => T::ncclUint32,
        DType::I64 => T::ncclInt64,
        other => candle_core::bail!("NCCL does not move {other:?} tensors"),
    })
}

/// The device address of a contiguous tensor's elements, and their count.
fn address(s: &CudaStorage, l: &Layout, stream: &CudaStream) -> candle_core::Result<(u64, usize)> {
    let (a, b) =
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("NCCL needs contiguous tensors".into()))?;
    macro_rules! at {
        ($($dt:ident => $t:ty),*) => {
            match s.dtype() {
                $(DType::$dt => {
                    let (p, _sync) = s.as_cuda_slice::<$t>()?.device_ptr(stream);
                    p + (a * std::mem::size_of::<$t>()) as u64
                })*
                other => candle_core::bail!("NCCL does not move {other:?} tensors"),
            }
        };
    }
    let p = at!(F32 => f32, F16 => half::f16, BF16 => half::bf16, F64 => f64, U8 => u8, U32 => u32, I64 => i64);
    Ok((p, b - a))
}

impl NcclComm {
    /// Join the group at `leader` on `device` (this rank's own GPU): the TCP rendezvous first,
    /// then rank 0's NCCL unique id is broadcast over it and every rank initialises its
    /// communicator. Each later operation must finish within `op_timeout`.
    pub fn join(
        rank: usize,
        world: usize,
        leader: &str,
        join_timeout: Duration,
        op_timeout: Duration,
        device: &Device,
    ) -> Result<Self> {
        let Device::Cuda(dev) = device else {
            return Err(CommError::Usage(format!("NCCL needs a CUDA device, not {device:?}")));
        };
        let ctrl = Arc::new(TcpComm::join(rank, world, leader, join_timeout, device.clone())?);
        let mine: Vec<u8> = if rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| CommError::Usage(format!("NCCL unique id: {:?}", e.0)))?;
            id.internal.iter().map(|&c| c as u8).collect()
        } else {
            Vec::new()
        };
        let bytes = ctrl.broadcast_bytes(&mine, 0)?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        if bytes.len() != id.internal.len() {
            return Err(CommError::Protocol { rank: 0, what: format!("NCCL id of {} bytes", bytes.len()) });
        }
        for (r, b) in id.internal.iter_mut().zip(&bytes) {
            *r = *b as std::ffi::c_char;
        }
        let stream = dev.cuda_stream();
        stream.context().bind_to_thread().map_err(|e| CommError::Usage(format!("CUDA: {e:?}")))?;
        let mut comm = std::mem::MaybeUninit::uninit();
        let n = |v: usize| i32::try_from(v).map_err(|_| CommError::Usage(format!("{v} ranks")));
        // SAFETY: `comm` is a valid out-pointer; the id came from rank 0's ncclGetUniqueId.
        unsafe { nccl::comm_init_rank(comm.as_mut_ptr(), n(world)?, id, n(rank)?) }
            .map_err(|e| CommError::Usage(format!("ncclCommInitRank: {:?}", e.0)))?;
        // SAFETY: initialised by the successful call above.
        let comm = Raw(unsafe { comm.assume_init() });
        let inner =
            Arc::new(Inner { comm, ops: Mutex::new(()), aborted: AtomicBool::new(false), reason: Mutex::default() });
        let (tx, rx) = mpsc::channel();
        let (w_inner, w_ctrl) = (inner.clone(), ctrl.clone());
        std::thread::Builder::new()
            .name(format!("tessera-nccl-watch-{rank}"))
            .spawn(move || watchdog(w_inner, rx, w_ctrl))
            .map_err(|e| CommError::Usage(format!("the NCCL watchdog: {e}")))?;
        Ok(Self { ctrl, inner, device: dev.clone(), stream, timeout: op_timeout, watch: Mutex::new(tx) })
    }

    /// Enqueue NCCL work under the lock (failing at once after an abort), then hand the
    /// stream's progress past it to the watchdog.
    fn enqueue<T>(&self, what: &'static str, f: impl FnOnce(sys::ncclComm_t) -> candle_core::Result<T>) -> Result<T> {
        let out = {
            let _g = self.inner.ops.lock().map_err(|_| CommError::Usage("the NCCL lock is poisoned".into()))?;
            if self.inner.aborted.load(Ordering::SeqCst) {
                return Err(self.inner.gone());
            }
            f(self.inner.comm.0)?
        };
        let event = self.stream.record_event(None).map_err(|e| CommError::Usage(format!("CUDA event: {e:?}")))?;
        if let Ok(tx) = self.watch.lock() {
            let _ = tx.send((event, Instant::now() + self.timeout, what));
        }
        Ok(out)
    }

    fn cuda(&self) -> Device {
        Device::Cuda(self.device.clone())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.inner.abort("the communicator was dropped".into());
    }
}

/// The collectives as candle custom ops, so they run on the tensor's own CUDA storage.
enum Op<'a> {
    AllReduce(&'a NcclComm, sys::ncclComm_t),
    /// All-gather along a new leading axis of equally sized parts.
    AllGather(&'a NcclComm, sys::ncclComm_t),
}

impl CustomOp1 for Op<'_> {
    fn name(&self) -> &'static str {
        match self {
            Op::AllReduce(..) => "nccl-all-reduce",
            Op::AllGather(..) => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors (use the TCP back-end on CPU)")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (Op::AllReduce(c, comm) | Op::AllGather(c, comm)) = self;
        let world = c.world_size();
        let shape = match self {
            Op::AllReduce(..) => l.shape().clone(),
            Op::AllGather(..) => {
                let mut dims = l.shape().dims().to_vec();
                dims.insert(0, world);
                Shape::from(dims)
            }
        };
        // SAFETY: the collective writes every element of `out`.
        let out = unsafe { s.device().alloc_uninit(&shape, s.dtype())? };
        let (src, n) = address(s, l, &c.stream)?;
        let (dst, _) = address(&out, &Layout::contiguous(&shape), &c.stream)?;
        let dt = nccl_type(s.dtype())?;
        let stream = c.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: `src` holds `n` elements and `dst` `n` (reduce) or `n · world` (gather) of
        // type `dt`, both on this communicator's device; the stream is the tensors' own.
        unsafe {
            match self {
                Op::AllReduce(..) => {
                    nccl::all_reduce(src as *const _, dst as *mut _, n, dt, sys::ncclRedOp_t::ncclSum, *comm, stream)
                }
                Op::AllGather(..) => nccl::all_gather(src as *const _, dst as *mut _, n, dt, *comm, stream),
            }
        }
        .map_err(nccl_err)?;
        Ok((out, shape))
    }
}

/// Receive into a tensor's storage in place from `peer`.
struct Recv(sys::ncclComm_t, i32, Arc<CudaStream>);

impl InplaceOp1 for Recv {
    fn name(&self) -> &'static str {
        "nccl-recv"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL receives into CUDA tensors")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let (dst, n) = address(s, l, &self.2)?;
        let dt = nccl_type(s.dtype())?;
        // SAFETY: `dst` holds `n` elements of `dt` on this device; the sender sends exactly
        // that many (its header said so).
        unsafe { nccl::recv(dst as *mut _, n, dt, self.1, self.0, self.2.cu_stream() as sys::cudaStream_t) }
            .map_err(nccl_err)?;
        Ok(())
    }
}

impl NcclComm {
    /// Enqueue a send of `t` to `peer` (the caller sent its header).
    fn nccl_send(&self, comm: sys::ncclComm_t, peer: usize, t: &Tensor) -> candle_core::Result<()> {
        let (g, l) = t.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*g else { candle_core::bail!("NCCL sends CUDA tensors") };
        let (src, n) = address(s, l, &self.stream)?;
        let dt = nccl_type(s.dtype())?;
        let peer = i32::try_from(peer).map_err(|_| candle_core::Error::Msg("peer rank".into()))?;
        // SAFETY: `src` holds `n` elements of `dt`; the receiver expects exactly that many.
        unsafe { nccl::send(src as *const _, n, dt, peer, comm, self.stream.cu_stream() as sys::cudaStream_t) }
            .map_err(nccl_err)?;
        Ok(())
    }

    /// A zeroed tensor of the header's shape, received into from `peer`.
    fn nccl_recv(&self, comm: sys::ncclComm_t, peer: usize, header: &[u8]) -> candle_core::Result<Tensor> {
        let (dtype, dims, _) = wire::decode_header(header, peer).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t = Tensor::zeros(dims, dtype, &self.cuda())?;
        let peer = i32::try_from(peer).map_err(|_| candle_core::Error::Msg("peer rank".into()))?;
        t.inplace_op1(&Recv(comm, peer, self.stream.clone()))?;
        Ok(t)
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
        self.enqueue("all-reduce", |c| t.apply_op1_no_bwd(&Op::AllReduce(self, c)))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        // Shapes may differ along `dim` between ranks: equal parts go through NCCL's
        // all-gather, anything else as a grouped exchange. The sizes are gathered on the GPU
        // too (one tiny collective, not a TCP round trip per rank on every step).
        let t = t.contiguous()?;
        let mine = Tensor::new(&[t.dim(dim)? as u32], &self.cuda())?;
        let sizes = self.enqueue("all-gather", |c| mine.apply_op1_no_bwd(&Op::AllGather(self, c)))?;
        let sizes: Vec<u32> = sizes.flatten_all()?.to_vec1()?;
        let equal = sizes.windows(2).all(|w| w[0] == w[1]);
        let parts: Vec<Tensor> = if equal {
            let g = self.enqueue("all-gather", |c| t.apply_op1_no_bwd(&Op::AllGather(self, c)))?;
            (0..self.world_size()).map(|i| g.get(i)).collect::<candle_core::Result<_>>()?
        } else {
            self.all_to_all(vec![t.clone(); self.world_size()])?
        };
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
        // The header (type and shape) over the control channel, the elements GPU to GPU.
        let t = t.to_device(&self.cuda())?.contiguous()?;
        self.ctrl.send_bytes(to, &wire::encode_header(t.dtype(), t.dims())?)?;
        self.enqueue("send", |c| self.nccl_send(c, to, &t))
    }

    fn recv(&self, from: usize) -> Result<Tensor> {
        let header = self.ctrl.recv_bytes(from)?;
        self.enqueue("recv", |c| self.nccl_recv(c, from, &header))
    }

    fn shutdown(&self) {
        self.inner.abort("this rank shut its links".into());
        self.ctrl.shutdown();
    }

    fn all_to_all(&self, parts: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let (me, world) = (self.rank(), self.world_size());
        if parts.len() != world {
            return Err(CommError::Usage(format!("all-to-all of {} parts over {world} ranks", parts.len())));
        }
        let parts: Vec<Tensor> =
            parts.into_iter().map(|p| p.to_device(&self.cuda())?.contiguous()).collect::<candle_core::Result<_>>()?;
        // Headers first (all of them, over TCP), then one NCCL group of every send and receive.
        for (peer, p) in parts.iter().enumerate().filter(|(peer, _)| *peer != me) {
            self.ctrl.send_bytes(peer, &wire::encode_header(p.dtype(), p.dims())?)?;
        }
        let mut headers = Vec::with_capacity(world);
        for peer in 0..world {
            headers.push(if peer == me { Vec::new() } else { self.ctrl.recv_bytes(peer)? });
        }
        let received = self.enqueue("all-to-all", |c| {
            nccl::group_start().map_err(nccl_err)?;
            let run = || -> candle_core::Result<Vec<Option<Tensor>>> {
                let mut out = Vec::with_capacity(world);
                for peer in 0..world {
                    if peer == me {
                        out.push(None);
                        continue;
                    }
                    self.nccl_send(c, peer, &parts[peer])?;
                    out.push(Some(self.nccl_recv(c, peer, &headers[peer])?));
                }
                Ok(out)
            };
            let out = run();
            let end = nccl::group_end().map_err(nccl_err);
            let out = out?;
            end?;
            Ok(out)
        })?;
        Ok(received.into_iter().zip(parts).map(|(r, own)| r.unwrap_or(own)).collect())
    }
}
