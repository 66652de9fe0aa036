//! The physical paged KV cache: per layer, one key and one value tensor of
//! `[num_blocks * block_size, num_kv_heads, head_dim]`. Slot `b * block_size + i` is
//! position `i` of block `b`. Which block belongs to which sequence is decided by the
//! engine; this type only holds the memory.

use candle_core::{DType, Device, Storage, Tensor};

use crate::{ModelError, Result};

/// Zeroed cache memory. On the CPU the pages are the allocator's zeroed ones, untouched
/// until a block is first written: the resident size grows with the tokens cached, not with
/// the budget (candle fills f16/bf16 zeros element by element, touching every page).
fn zeros(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2;
    Ok(match (device.is_cpu(), dtype) {
        (true, DType::F16) => Tensor::from_vec(zeroed_u16::<half::f16>(n), shape, device)?,
        (true, DType::BF16) => Tensor::from_vec(zeroed_u16::<half::bf16>(n), shape, device)?,
        _ => Tensor::zeros(shape, dtype, device)?,
    })
}

/// A vector of `n` zero values of a 16-bit float type, from a zero-allocated `u16` vector.
fn zeroed_u16<T: Copy>(n: usize) -> Vec<T> {
    assert!(std::mem::size_of::<T>() == 2 && std::mem::align_of::<T>() == 2);
    let mut v = std::mem::ManuallyDrop::new(vec![0u16; n]);
    // SAFETY: `T` is f16 or bf16 (`repr(transparent)` over u16: same size and alignment,
    // and all-zero bits are the value 0.0); the allocation is handed over whole.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// Paged key/value memory for every layer of one model (one rank's share). A clone shares
/// the memory (a second handle, e.g. for the KV-transfer service).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<(Tensor, Tensor)>,
    block_size: usize,
    num_blocks: usize,
}

impl KvCache {
    /// Allocate zeroed cache memory.
    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        let mut layers = Vec::with_capacity(num_layers);
        for _ in 0..num_layers {
            let k = zeros((slots, num_kv_heads, head_dim), dtype, device)?;
            let v = zeros((slots, num_kv_heads, head_dim), dtype, device)?;
            layers.push((k, v));
        }
        Ok(Self { layers, block_size, num_blocks })
    }

    /// Bytes needed for one block across all layers (keys and values).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        num_kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * block_size * num_kv_heads * head_dim * dtype.size_in_bytes()
    }

    /// Key and value tensors of one layer.
    pub fn layer(&self, idx: usize) -> &(Tensor, Tensor) {
        &self.layers[idx]
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Bytes of one block of one layer's keys (the same for its values).
    pub fn block_bytes(&self) -> usize {
        let k = &self.layers[0].0;
        let (_, heads, hd) = k.dims3().unwrap_or((0, 0, 0));
        self.block_size * heads * hd * k.dtype().size_in_bytes()
    }

    fn check_blocks(&self, layer: usize, blocks: &[u32]) -> Result<()> {
        if layer >= self.layers.len() {
            return Err(ModelError::Config(format!("KV layer {layer} out of range ({} layers)", self.layers.len())));
        }
        match blocks.iter().find(|&&b| b as usize >= self.num_blocks) {
            Some(b) => Err(ModelError::Config(format!("KV block {b} out of range ({} blocks)", self.num_blocks))),
            None => Ok(()),
        }
    }

    /// Append the bytes of `blocks` of one layer to `out`: the keys of every block in order,
    /// then their values (native-endian elements of the cache dtype).
    pub fn read_blocks(&self, layer: usize, blocks: &[u32], out: &mut Vec<u8>) -> Result<()> {
        self.check_blocks(layer, blocks)?;
        let bb = self.block_bytes();
        out.reserve(2 * bb * blocks.len());
        let (k, v) = &self.layers[layer];
        // One tensor at a time: attention takes the key then the value lock.
        for t in [k, v] {
            if t.device().is_cpu() {
                copy_out(t, blocks.iter().map(|&b| b as usize * bb), bb, out)?;
            } else {
                // Staged through the host block by block.
                for &b in blocks {
                    let host = t.narrow(0, b as usize * self.block_size, self.block_size)?.to_device(&Device::Cpu)?;
                    copy_out(&host, [0], bb, out)?;
                }
            }
        }
        Ok(())
    }

    /// Write `data` (laid out as [`Self::read_blocks`] produces it) into `blocks` of one layer.
    pub fn write_blocks(&self, layer: usize, blocks: &[u32], data: &[u8]) -> Result<()> {
        self.check_blocks(layer, blocks)?;
        let bb = self.block_bytes();
        if data.len() != 2 * bb * blocks.len() {
            return Err(ModelError::Config(format!(
                "KV data for {} blocks must be {} bytes, got {}",
                blocks.len(),
                2 * bb * blocks.len(),
                data.len()
            )));
        }
        let (k, v) = &self.layers[layer];
        let (_, heads, hd) = k.dims3()?;
        for (t, half) in [k, v].into_iter().zip(data.chunks_exact(bb * blocks.len())) {
            if t.device().is_cpu() {
                t.inplace_op1(&BlockWrite { blocks, data: half, bb })?;
                continue;
            }
            for (&b, bytes) in blocks.iter().zip(half.chunks_exact(bb)) {
                let src = Tensor::from_raw_buffer(bytes, t.dtype(), &[self.block_size, heads, hd], t.device())?;
                t.slice_set(&src, 0, b as usize * self.block_size)?;
            }
        }
        Ok(())
    }
}

/// Append `len` bytes at each byte offset of a host tensor's data to `out`.
fn copy_out(t: &Tensor, offsets: impl IntoIterator<Item = usize>, len: usize, out: &mut Vec<u8>) -> Result<()> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(ModelError::Config("KV cache copy to host failed".into()));
    };
    let bytes = host_bytes(cpu)?;
    let base = layout.start_offset() * t.dtype().size_in_bytes();
    for at in offsets {
        out.extend_from_slice(&bytes[base + at..base + at + len]);
    }
    Ok(())
}

/// Copy whole blocks into a host cache tensor in place (one memcpy per block).
struct BlockWrite<'a> {
    blocks: &'a [u32],
    data: &'a [u8],
    bb: usize,
}

impl candle_core::InplaceOp1 for BlockWrite<'_> {
    fn name(&self) -> &'static str {
        "tessera-kv-block-write"
    }

    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        fn cast<T>(s: &mut [T]) -> &mut [u8] {
            // SAFETY: as in `host_bytes`; every byte pattern is a valid f16/bf16/f32.
            unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr() as *mut u8, std::mem::size_of_val(s)) }
        }
        let (bytes, elem) = match storage {
            C::F16(s) => (cast(s), 2),
            C::BF16(s) => (cast(s), 2),
            C::F32(s) => (cast(s), 4),
            _ => candle_core::bail!("only f16, bf16 and f32 KV caches can be transferred"),
        };
        let base = layout.start_offset() * elem;
        for (&b, src) in self.blocks.iter().zip(self.data.chunks_exact(self.bb)) {
            let at = base + b as usize * self.bb;
            match bytes.get_mut(at..at + self.bb) {
                Some(dst) => dst.copy_from_slice(src),
                None => candle_core::bail!("KV block {b} is outside the cache"),
            }
        }
        Ok(())
    }
}

/// The bytes of a host tensor's storage.
fn host_bytes(cpu: &candle_core::CpuStorage) -> Result<&[u8]> {
    use candle_core::CpuStorage as C;
    fn cast<T>(s: &[T]) -> &[u8] {
        // SAFETY: plain float elements with no padding; u8 has alignment 1, and the length
        // covers exactly the same memory.
        unsafe { std::slice::from_raw_parts(s.as_ptr() as *const u8, std::mem::size_of_val(s)) }
    }
    Ok(match cpu {
        C::F16(s) => cast(s),
        C::BF16(s) => cast(s),
        C::F32(s) => cast(s),
        _ => return Err(ModelError::Config("only f16, bf16 and f32 KV caches can be transferred".into())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_between_caches_and_leave_neighbours_alone() -> Result<()> {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let (layers, blocks, bs, heads, hd) = (2, 6, 4, 2, 8);
            let src = KvCache::new(layers, blocks, bs, heads, hd, dtype, &Device::Cpu)?;
            // Fill the source with distinct values per element.
            for l in 0..layers {
                let n = blocks * bs * heads * hd;
                for (i, t) in [&src.layer(l).0, &src.layer(l).1].into_iter().enumerate() {
                    let vals = Tensor::arange(0f32, n as f32, &Device::Cpu)?
                        .affine(1.0 / 64.0, (l * 2 + i) as f64)?
                        .reshape((blocks * bs, heads, hd))?
                        .to_dtype(dtype)?;
                    t.slice_set(&vals, 0, 0)?;
                }
            }
            let dst = KvCache::new(layers, blocks, bs, heads, hd, dtype, &Device::Cpu)?;
            let (from, to) = ([1u32, 4], [5u32, 0]);
            for l in 0..layers {
                let mut bytes = Vec::new();
                src.read_blocks(l, &from, &mut bytes)?;
                assert_eq!(bytes.len(), 2 * 2 * src.block_bytes());
                dst.write_blocks(l, &to, &bytes)?;
                for (s, d) in [(&src.layer(l).0, &dst.layer(l).0), (&src.layer(l).1, &dst.layer(l).1)] {
                    for (&f, &t) in from.iter().zip(&to) {
                        let a =
                            s.narrow(0, f as usize * bs, bs)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        let b =
                            d.narrow(0, t as usize * bs, bs)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        assert_eq!(a, b, "{dtype:?} layer {l} block {f} -> {t}");
                    }
                    // Blocks not written stay zero.
                    for other in [1usize, 2, 3, 4] {
                        let z =
                            d.narrow(0, other * bs, bs)?.to_dtype(DType::F32)?.abs()?.sum_all()?.to_scalar::<f32>()?;
                        assert_eq!(z, 0.0, "{dtype:?} block {other} untouched");
                    }
                }
            }
            assert!(src.read_blocks(0, &[6], &mut Vec::new()).is_err(), "out-of-range block");
            assert!(dst.write_blocks(0, &[0], &[0u8; 3]).is_err(), "short data");
        }
        Ok(())
    }
}
