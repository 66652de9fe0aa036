//! Byte encodings: length-prefixed frames, and tensors as (dtype, shape, little-endian data).

use std::io::{Read, Write};

use candle_core::{DType, Device, Tensor};

use crate::{CommError, Result};

pub(crate) fn write_frame(w: &mut impl Write, data: &[u8]) -> std::io::Result<()> {
    w.write_all(&(data.len() as u64).to_le_bytes())?;
    w.write_all(data)?;
    w.flush()
}

/// Largest frame accepted (a corrupt length must not allocate the machine away).
const MAX_FRAME: u64 = 1 << 36;

pub(crate) fn read_frame(r: &mut impl Read, peer: usize) -> Result<Vec<u8>> {
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| gone_or_io(peer, "read", e))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(CommError::Protocol { rank: peer, what: format!("frame of {len} bytes") });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).map_err(|e| gone_or_io(peer, "read", e))?;
    Ok(buf)
}

pub(crate) fn gone_or_io(peer: usize, what: &str, e: std::io::Error) -> CommError {
    use std::io::ErrorKind::*;
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => CommError::PeerGone(peer),
        _ => CommError::Io { rank: peer, what: what.into(), source: e },
    }
}

/// A tensor's values as f32 (the CPU back-end reduces in f32).
pub(crate) fn f32s(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; v.len() * 4];
    for (o, x) in out.chunks_exact_mut(4).zip(v) {
        o.copy_from_slice(&x.to_le_bytes());
    }
    out
}

pub(crate) fn bytes_f32(b: &[u8], peer: usize) -> Result<Vec<f32>> {
    if !b.len().is_multiple_of(4) {
        return Err(CommError::Protocol { rank: peer, what: format!("{} bytes is not a list of f32", b.len()) });
    }
    let mut out = vec![0f32; b.len() / 4];
    for (o, c) in out.iter_mut().zip(b.chunks_exact(4)) {
        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    Ok(out)
}

fn dtype_code(d: DType) -> Result<u8> {
    Ok(match d {
        DType::F32 => 0,
        DType::F16 => 1,
        DType::BF16 => 2,
        DType::U32 => 3,
        DType::I64 => 4,
        DType::U8 => 5,
        other => return Err(CommError::Usage(format!("cannot send tensors of {other:?}"))),
    })
}

fn code_dtype(c: u8, peer: usize) -> Result<DType> {
    Ok(match c {
        0 => DType::F32,
        1 => DType::F16,
        2 => DType::BF16,
        3 => DType::U32,
        4 => DType::I64,
        5 => DType::U8,
        _ => return Err(CommError::Protocol { rank: peer, what: format!("dtype code {c}") }),
    })
}

/// `[dtype u8][rank u8][dims u64…]`: a tensor's type and shape.
pub(crate) fn encode_header(dtype: DType, dims: &[usize]) -> Result<Vec<u8>> {
    let rank = u8::try_from(dims.len()).map_err(|_| CommError::Usage(format!("a tensor of rank {}", dims.len())))?;
    let mut out = vec![dtype_code(dtype)?, rank];
    for &d in dims {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    Ok(out)
}

/// The type and shape of [`encode_header`], and where the data starts.
pub(crate) fn decode_header(b: &[u8], peer: usize) -> Result<(DType, Vec<usize>, usize)> {
    let bad = |what: &str| CommError::Protocol { rank: peer, what: what.into() };
    if b.len() < 2 {
        return Err(bad("short tensor header"));
    }
    let dtype = code_dtype(b[0], peer)?;
    let n = b[1] as usize;
    let data_at = 2 + 8 * n;
    if b.len() < data_at {
        return Err(bad("short tensor shape"));
    }
    let dims = (0..n).map(|i| u64::from_le_bytes(b[2 + 8 * i..10 + 8 * i].try_into().unwrap_or([0; 8])) as usize);
    Ok((dtype, dims.collect(), data_at))
}

/// `[header][data]`; floats travel as f32, integers as themselves.
pub(crate) fn encode_tensor(t: &Tensor) -> Result<Vec<u8>> {
    let mut out = encode_header(t.dtype(), t.dims())?;
    let flat = t.flatten_all()?;
    match t.dtype() {
        DType::U32 => out.extend(flat.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes())),
        DType::I64 => out.extend(flat.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes())),
        DType::U8 => out.extend(flat.to_vec1::<u8>()?),
        _ => out.extend(f32_bytes(&f32s(&flat)?)),
    }
    Ok(out)
}

pub(crate) fn decode_tensor(b: &[u8], device: &Device, peer: usize) -> Result<Tensor> {
    let bad = |what: &str| CommError::Protocol { rank: peer, what: what.into() };
    let (dtype, dims, data_at) = decode_header(b, peer)?;
    let data = &b[data_at..];
    let count: usize = dims.iter().product();
    let t = match dtype {
        DType::U32 => {
            let v: Vec<u32> = data.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (v.len() == count).then(|| Tensor::from_vec(v, dims.as_slice(), device))
        }
        DType::I64 => {
            let v: Vec<i64> =
                data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            (v.len() == count).then(|| Tensor::from_vec(v, dims.as_slice(), device))
        }
        DType::U8 => (data.len() == count).then(|| Tensor::from_vec(data.to_vec(), dims.as_slice(), device)),
        _ => {
            let v = bytes_f32(data, peer)?;
            (v.len() == count).then(|| Tensor::from_vec(v, dims.as_slice(), device).and_then(|t| t.to_dtype(dtype)))
        }
    };
    Ok(t.ok_or_else(|| bad("tensor data does not match its shape"))??)
}
