//! nnU-Net's own `--save_probabilities` files, for Python nnU-Net to read ours
//! (`nnUNetv2_ensemble`, `merge_files`): `{case}.npz` holding `probabilities.npy` (float32,
//! `[class, z, y, x]`, C order, deflated as `np.savez_compressed` writes it) and `{case}.pkl`,
//! the case's properties as nnU-Net's predictor pickles them (`sitk_stuff` with spacing, origin
//! and direction, `spacing`, `shape_before_cropping`, `bbox_used_for_cropping`,
//! `shape_after_cropping_and_before_resampling`). The pickle is written with plain protocol-2
//! opcodes (dicts, lists, tuples, ints, floats, strings); nothing here ever reads one.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, Result, ensure};

/// A `.npy` (version 1.0) header for little-endian float32 in C order of `shape`, padded so the
/// data start at a multiple of 64 bytes, as numpy writes it.
pub fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

/// Writes `path` (atomically) as an `.npz` of one deflated entry `probabilities.npy` of float32
/// `shape`, its values read from `values` (little-endian float32 bytes, C order). Zip64 where
/// the entry passes 4 GB (105 classes of a whole-body CT do).
pub fn write_npz(path: &Path, shape: [usize; 4], values: &mut dyn Read) -> Result<()> {
    let bytes = 4 * shape.iter().product::<usize>() as u64;
    let header = npy_header(&shape);
    stu_core::fs::atomic_with(path, |tmp| {
        let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(tmp)?);
        let mut zip = zip::ZipWriter::new(file);
        // Level 1: most of level 6's size at a fraction of its time on volumes of gigabytes.
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated)
            .compression_level(Some(1))
            .large_file(header.len() as u64 + bytes >= 0xFFFF_0000);
        zip.start_file("probabilities.npy", options).map_err(std::io::Error::other)?;
        zip.write_all(&header)?;
        let copied = std::io::copy(&mut values.take(bytes), &mut zip)?;
        if copied != bytes {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("{copied} of {bytes} bytes of probabilities")));
        }
        zip.finish().map_err(std::io::Error::other)?.flush()
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}

/// A Python value, for [`pickle`].
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    /// `int`.
    Int(i64),
    /// `float`.
    Float(f64),
    /// `str`.
    Str(String),
    /// `tuple`.
    Tuple(Vec<Py>),
    /// `list`.
    List(Vec<Py>),
    /// `dict` with string keys, in order.
    Dict(Vec<(String, Py)>),
}

/// `pickle.dumps(value, protocol=2)` of plain values (no memo: every object written once).
pub fn pickle(value: &Py) -> Vec<u8> {
    fn put(v: &Py, out: &mut Vec<u8>) {
        match v {
            Py::Int(i) => match i32::try_from(*i) {
                Ok(i) => {
                    out.push(b'J'); // BININT
                    out.extend_from_slice(&i.to_le_bytes());
                }
                Err(_) => {
                    out.extend_from_slice(&[0x8a, 8]); // LONG1, 8 bytes
                    out.extend_from_slice(&i.to_le_bytes());
                }
            },
            Py::Float(f) => {
                out.push(b'G'); // BINFLOAT, big-endian
                out.extend_from_slice(&f.to_be_bytes());
            }
            Py::Str(s) => {
                out.push(b'X'); // BINUNICODE
                out.extend_from_slice(&(s.len() as u32).to_le_bytes());
                out.extend_from_slice(s.as_bytes());
            }
            Py::Tuple(items) => {
                out.push(b'('); // MARK
                items.iter().for_each(|i| put(i, out));
                out.push(b't'); // TUPLE
            }
            Py::List(items) => {
                out.extend_from_slice(b"](");
                items.iter().for_each(|i| put(i, out));
                out.push(b'e'); // APPENDS
            }
            Py::Dict(items) => {
                out.extend_from_slice(b"}(");
                for (k, v) in items {
                    put(&Py::Str(k.clone()), out);
                    put(v, out);
                }
                out.push(b'u'); // SETITEMS
            }
        }
    }
    let mut out = vec![0x80, 2]; // PROTO 2
    put(value, &mut out);
    out.push(b'.'); // STOP
    out
}

/// What nnU-Net's `{case}.pkl` holds for a predicted case.
pub struct CaseProperties {
    /// The input's NIfTI affine (its SimpleITK geometry is derived from it).
    pub affine: [[f64; 4]; 4],
    /// nnU-Net's `spacing`: the input's spacing in its array order `[z, y, x]`.
    pub spacing: [f64; 3],
    /// Shape before cropping (preprocessing's transposed order, as nnU-Net keeps it).
    pub shape_before_cropping: [usize; 3],
    /// The crop's half-open box.
    pub bbox_used_for_cropping: [[usize; 2]; 3],
    /// Shape after cropping.
    pub shape_after_cropping_and_before_resampling: [usize; 3],
}

/// Writes `path` (atomically): the pickled properties nnU-Net's `merge_files` reads beside an
/// `.npz` (`SimpleITKIO.write_seg` takes `sitk_stuff`).
pub fn write_pkl(path: &Path, p: &CaseProperties) -> Result<()> {
    let floats = |v: &[f64]| v.iter().map(|&x| Py::Float(x)).collect::<Vec<_>>();
    let ints = |v: &[usize]| v.iter().map(|&x| Py::Int(x as i64)).collect::<Vec<_>>();
    let (spacing, origin, direction) = stu_data::nifti_io::itk_geometry(&p.affine);
    ensure!(spacing.iter().chain(&origin).chain(&direction).all(|v| v.is_finite()), "{}: the image geometry is not finite", path.display());
    let value = Py::Dict(vec![
        ("sitk_stuff".into(), Py::Dict(vec![("spacing".into(), Py::Tuple(floats(&spacing))), ("origin".into(), Py::Tuple(floats(&origin))), ("direction".into(), Py::Tuple(floats(&direction)))])),
        ("spacing".into(), Py::List(floats(&p.spacing))),
        ("shape_before_cropping".into(), Py::Tuple(ints(&p.shape_before_cropping))),
        ("bbox_used_for_cropping".into(), Py::List(p.bbox_used_for_cropping.iter().map(|b| Py::List(ints(b))).collect())),
        ("shape_after_cropping_and_before_resampling".into(), Py::Tuple(ints(&p.shape_after_cropping_and_before_resampling))),
    ]);
    stu_core::fs::write_atomic(path, &pickle(&value)).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes of CPython 3.11's `pickle.dumps(v, protocol=2)` where it takes the same opcodes,
    /// and the npy header numpy 2.4 writes for `np.zeros((3, 4, 5, 6), '<f4')`.
    #[test]
    fn pickle_and_npy_header_bytes() {
        // pickle.dumps({'a': (1, 2.5), 'b': ['x']}, 2) with memo opcodes removed.
        let v = Py::Dict(vec![("a".into(), Py::Tuple(vec![Py::Int(1), Py::Float(2.5)])), ("b".into(), Py::List(vec![Py::Str("x".into())]))]);
        let mut want = vec![0x80, 2, b'}', b'('];
        want.extend_from_slice(b"X\x01\x00\x00\x00a(J\x01\x00\x00\x00G\x40\x04\x00\x00\x00\x00\x00\x00t");
        want.extend_from_slice(b"X\x01\x00\x00\x00b](X\x01\x00\x00\x00xeu.");
        assert_eq!(pickle(&v), want);
        let big = pickle(&Py::Int(1 << 40));
        assert_eq!(&big[2..4], &[0x8a, 8]);
        let h = npy_header(&[3, 4, 5, 6]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..10], b"\x93NUMPY\x01\x00\x76\x00");
        assert!(String::from_utf8_lossy(&h[10..]).starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4, 5, 6), }"));
        assert_eq!(*h.last().unwrap(), b'\n');
    }
}
