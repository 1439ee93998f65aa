//! NIfTI-1 reading and writing on the `nifti` crate (and MetaImage, `.mha`/`.mhd`, and NRRD,
//! `.nrrd`/`.nhdr`, through [`crate::metaimage`] and [`crate::nrrd`], by file ending), with the workarounds of `shared/docs/data.md`
//! §5: multi-member gzip (`MultiGzDecoder`), a clear error for NIfTI-2, our own affine (sform,
//! then qform, then the base affine, as nibabel's `get_best_affine`; no qform panic), scaling
//! applied only for a finite non-zero slope, images as f32 and labels as integers.
//!
//! Arrays are in nnU-Net's order: NIfTI stores x fastest, which is C order for shape
//! `[z, y, x]`, so the file's buffer is used as is; `spacing` is reversed to match.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use nifti::{InMemNiftiObject, NiftiObject, NiftiType};
/// The `nifti` crate's header, as [`Geometry`] holds it.
pub use nifti::NiftiHeader;

/// What can go wrong with a NIfTI file; every variant names it.
#[derive(Debug, thiserror::Error)]
pub enum NiftiIoError {
    /// The file cannot be opened or read.
    #[error("{path}: cannot read: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not a usable NIfTI-1 volume.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, NiftiIoError>;

/// Where a volume sits: extent and spacing in array order `[z, y, x]`, the voxel-to-world affine
/// (NIfTI's, voxel index `(i, j, k)` = `(x, y, z)`), and the header to write outputs with.
#[derive(Debug, Clone)]
pub struct Geometry {
    /// Extent, array order.
    pub shape: [usize; 3],
    /// Voxel size in mm, array order.
    pub spacing: [f64; 3],
    /// Voxel (i, j, k, 1) → world (x, y, z, 1), row-major.
    pub affine: [[f64; 4]; 4],
    /// The source header (copied into files written with this geometry).
    pub header: NiftiHeader,
}

impl Geometry {
    /// Largest difference between two affines' entries, relative to their scale.
    pub fn affine_mismatch(&self, other: &Geometry) -> f64 {
        let mut worst = 0f64;
        for r in 0..3 {
            for c in 0..4 {
                let (a, b) = (self.affine[r][c], other.affine[r][c]);
                worst = worst.max((a - b).abs() / (1.0 + a.abs().max(b.abs())));
            }
        }
        worst
    }

    /// Number of voxels.
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A 3-D volume in array order with its geometry.
#[derive(Debug, Clone)]
pub struct Volume<T> {
    /// Values, C order over `geom.shape`.
    pub data: Vec<T>,
    /// Where it sits.
    pub geom: Geometry,
}

fn invalid(path: &Path, reason: impl Into<String>) -> NiftiIoError {
    NiftiIoError::Invalid { path: path.to_path_buf(), reason: reason.into() }
}

/// Reads and decompresses a whole `.nii` / `.nii.gz` file, then parses header and volume.
fn read_object(path: &Path) -> Result<InMemNiftiObject> {
    let file = std::fs::File::open(path).map_err(|source| NiftiIoError::Io { path: path.to_path_buf(), source })?;
    let mut bytes = Vec::new();
    let gz = path.to_string_lossy().ends_with(".gz");
    let read = if gz {
        flate2::read::MultiGzDecoder::new(io::BufReader::new(file)).read_to_end(&mut bytes)
    } else {
        io::BufReader::new(file).read_to_end(&mut bytes)
    };
    read.map_err(|e| invalid(path, if gz { format!("corrupt or truncated gzip stream ({e})") } else { format!("cannot read ({e})") }))?;
    if bytes.len() < 348 {
        return Err(invalid(path, format!("truncated: {} bytes, a NIfTI-1 header alone is 348", bytes.len())));
    }
    let size = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if size == 540 || size.swap_bytes() == 540 {
        return Err(invalid(path, "NIfTI-2 files are not supported; convert to NIfTI-1 (e.g. nibabel's Nifti1Image)"));
    }
    if size != 348 && size.swap_bytes() != 348 {
        return Err(invalid(path, "not a NIfTI-1 file (header size is not 348)"));
    }
    // The sizes first: the `nifti` crate reads them unsigned, so a negative one becomes a huge
    // count, reported only as data that does not fill it.
    let h = NiftiHeader::from_reader(io::Cursor::new(&bytes[..])).map_err(|e| invalid(path, format!("bad NIfTI header: {e}")))?;
    let dim = h.dim.map(|d| d as i16);
    if !(1..=7).contains(&dim[0]) {
        return Err(invalid(path, format!("bad NIfTI header: dim[0] = {}, the number of dimensions, is not in 1..=7", dim[0])));
    }
    let dims = &dim[1..=dim[0] as usize];
    if let Some(d) = dims.iter().position(|&d| d < 1) {
        return Err(invalid(path, format!("bad NIfTI header: dim[{}] = {} is not a size (dims {dims:?})", d + 1, dims[d])));
    }
    InMemNiftiObject::from_reader(io::Cursor::new(bytes)).map_err(|e| invalid(path, format!("bad NIfTI data: {e}")))
}

fn geometry(path: &Path, h: &NiftiHeader) -> Result<Geometry> {
    let ndim = h.dim[0] as usize;
    let extra: usize = (4..=ndim.min(7)).map(|d| h.dim[d] as usize).product();
    if !(3..=7).contains(&ndim) || extra != 1 {
        return Err(invalid(path, format!("expected a 3-D volume, got {ndim}-D with dims {:?} (one file per channel)", &h.dim[1..=ndim.min(7)])));
    }
    let [nx, ny, nz] = [h.dim[1] as usize, h.dim[2] as usize, h.dim[3] as usize];
    if nx == 0 || ny == 0 || nz == 0 {
        return Err(invalid(path, "a dimension is zero"));
    }
    let px = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64].map(f64::abs);
    Ok(Geometry { shape: [nz, ny, nx], spacing: [px[2], px[1], px[0]], affine: best_affine(h), header: h.clone() })
}

/// nibabel's `get_best_affine`: sform if its code is set, else qform, else the base affine.
pub fn best_affine(h: &NiftiHeader) -> [[f64; 4]; 4] {
    let last = [0.0, 0.0, 0.0, 1.0];
    if h.sform_code > 0 {
        let row = |r: [f32; 4]| r.map(|v| v as f64);
        return [row(h.srow_x), row(h.srow_y), row(h.srow_z), last];
    }
    let p = [h.pixdim[1] as f64, h.pixdim[2] as f64, h.pixdim[3] as f64];
    if h.qform_code > 0 {
        let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let a = (1.0 - (b * b + c * c + d * d)).max(0.0).sqrt();
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let r = [
            [a * a + b * b - c * c - d * d, 2.0 * (b * c - a * d), 2.0 * (b * d + a * c)],
            [2.0 * (b * c + a * d), a * a + c * c - b * b - d * d, 2.0 * (c * d - a * b)],
            [2.0 * (b * d - a * c), 2.0 * (c * d + a * b), a * a + d * d - c * c - b * b],
        ];
        let s = [p[0], p[1], p[2] * qfac];
        let o = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
        let row = |i: usize| [r[i][0] * s[0], r[i][1] * s[1], r[i][2] * s[2], o[i]];
        return [row(0), row(1), row(2), last];
    }
    let n = [h.dim[1] as f64, h.dim[2] as f64, h.dim[3] as f64];
    [
        [-p[0], 0.0, 0.0, (n[0] - 1.0) / 2.0 * p[0]],
        [0.0, p[1], 0.0, -(n[1] - 1.0) / 2.0 * p[1]],
        [0.0, 0.0, p[2], -(n[2] - 1.0) / 2.0 * p[2]],
        last,
    ]
}

/// The file's values converted by `f` (unscaled), whatever its integer or float type, without an
/// intermediate copy in a wider type.
fn typed_values<T: Send>(path: &Path, obj: InMemNiftiObject, f: impl Fn(f64) -> T + Sync) -> Result<Vec<T>> {
    let dt = obj.header().data_type().map_err(|e| invalid(path, format!("bad datatype: {e}")))?;
    let vol = obj.into_volume();
    let bad = |e: nifti::NiftiError| invalid(path, format!("cannot decode {dt:?} data: {e}"));
    fn conv<S: Copy + Sync + Into<f64>, T: Send>(v: Vec<S>, f: &(impl Fn(f64) -> T + Sync)) -> Vec<T> {
        use rayon::prelude::*;
        v.par_iter().map(|&x| f(x.into())).collect()
    }
    Ok(match dt {
        NiftiType::Uint8 => conv(vol.into_nifti_typed_data::<u8>().map_err(bad)?, &f),
        NiftiType::Int8 => conv(vol.into_nifti_typed_data::<i8>().map_err(bad)?, &f),
        NiftiType::Uint16 => conv(vol.into_nifti_typed_data::<u16>().map_err(bad)?, &f),
        NiftiType::Int16 => conv(vol.into_nifti_typed_data::<i16>().map_err(bad)?, &f),
        NiftiType::Uint32 => conv(vol.into_nifti_typed_data::<u32>().map_err(bad)?, &f),
        NiftiType::Int32 => conv(vol.into_nifti_typed_data::<i32>().map_err(bad)?, &f),
        NiftiType::Float32 => conv(vol.into_nifti_typed_data::<f32>().map_err(bad)?, &f),
        NiftiType::Float64 => conv(vol.into_nifti_typed_data::<f64>().map_err(bad)?, &f),
        NiftiType::Int64 => vol.into_nifti_typed_data::<i64>().map_err(bad)?.into_iter().map(|v| f(v as f64)).collect(),
        NiftiType::Uint64 => vol.into_nifti_typed_data::<u64>().map_err(bad)?.into_iter().map(|v| f(v as f64)).collect(),
        other => return Err(invalid(path, format!("unsupported datatype {other:?}"))),
    })
}

/// `(slope, intercept)` to apply: only a finite non-zero slope counts (nibabel's rule).
fn scaling(h: &NiftiHeader) -> Option<(f64, f64)> {
    let (s, i) = (h.scl_slope as f64, h.scl_inter as f64);
    (s.is_finite() && s != 0.0 && !(s == 1.0 && i == 0.0)).then_some((s, if i.is_finite() { i } else { 0.0 }))
}

/// The file endings read and written here: NIfTI-1 (gzipped or not), MetaImage and NRRD (`.mhd`
/// and `.nhdr`, whose voxels are in a file of their own, are read but not written).
pub const FILE_ENDINGS: [&str; 6] = [".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr"];

/// `name` without its image file ending, and the ending (`None` for another file).
pub fn split_ending(name: &str) -> Option<(&str, &'static str)> {
    FILE_ENDINGS.iter().find(|e| name.len() > e.len() && name.ends_with(*e)).map(|e| (&name[..name.len() - e.len()], *e))
}

/// The case id and file ending of an image file's path (`None` for another file).
pub fn case_of(path: &Path) -> Option<(String, &'static str)> {
    let name = path.file_name()?.to_string_lossy();
    split_ending(&name).map(|(id, ending)| (id.to_string(), ending))
}

/// The file ending a label map takes for images of `ending` (MetaImage and NRRD keep their
/// format, in their one-file form; NIfTI is written gzipped), as nnU-Net writes its dataset's
/// format.
pub fn label_ending(ending: &str) -> &'static str {
    match ending {
        ".mha" | ".mhd" => ".mha",
        ".nrrd" | ".nhdr" => ".nrrd",
        _ => ".nii.gz",
    }
}

/// The image file of case `id` in `dir` (any of [`FILE_ENDINGS`]), if any.
pub fn find_case(dir: &Path, id: &str) -> Option<PathBuf> {
    FILE_ENDINGS.iter().map(|e| dir.join(format!("{id}{e}"))).find(|p| p.exists())
}

/// The ITK-style format of `path` (read into a [`crate::metaimage::RawVolume`]), by its ending.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Itk {
    Meta,
    Nrrd,
}

fn itk_format(path: &Path) -> Option<Itk> {
    match split_ending(&path.to_string_lossy()) {
        Some((_, ".mha" | ".mhd")) => Some(Itk::Meta),
        Some((_, ".nrrd" | ".nhdr")) => Some(Itk::Nrrd),
        _ => None,
    }
}

/// A file read into memory, either format.
enum Loaded {
    Nifti(InMemNiftiObject),
    Itk(crate::metaimage::RawVolume),
}

fn load(path: &Path) -> Result<(Loaded, Geometry)> {
    if let Some(format) = itk_format(path) {
        let m = match format {
            Itk::Meta => crate::metaimage::read(path),
            Itk::Nrrd => crate::nrrd::read(path),
        }
        .map_err(|e| invalid(path, e))?;
        let g = meta_geometry(path, &m)?;
        return Ok((Loaded::Itk(m), g));
    }
    let obj = read_object(path)?;
    let g = geometry(path, obj.header())?;
    Ok((Loaded::Nifti(obj), g))
}

/// The voxels (NIfTI's scaled by its slope and intercept) through `f`.
fn values<T: Send>(path: &Path, loaded: Loaded, f: impl Fn(f64) -> T + Sync) -> Result<Vec<T>> {
    match loaded {
        Loaded::Nifti(obj) => match scaling(obj.header()) {
            Some((s, i)) => typed_values(path, obj, |v| f(v * s + i)),
            None => typed_values(path, obj, f),
        },
        Loaded::Itk(m) => Ok(m.values(f)),
    }
}

/// A MetaImage's or NRRD's geometry, with a NIfTI header of the same affine (sform) for NIfTI
/// outputs.
fn meta_geometry(path: &Path, m: &crate::metaimage::RawVolume) -> Result<Geometry> {
    let a = m.affine;
    let sp = crate::metaimage::spacing(&a);
    if !sp.iter().all(|s| s.is_finite() && *s > 0.0) {
        return Err(invalid(path, format!("voxel spacing {sp:?} (from its axis directions) is not positive")));
    }
    let [nx, ny, nz] = m.dims;
    let dim = |n: usize| u16::try_from(n).ok().filter(|&d| d <= i16::MAX as u16).ok_or_else(|| invalid(path, format!("extent {n} is beyond NIfTI-1's 32767")));
    let row = |r: usize| [a[r][0] as f32, a[r][1] as f32, a[r][2] as f32, a[r][3] as f32];
    let header = NiftiHeader {
        dim: [3, dim(nx)?, dim(ny)?, dim(nz)?, 1, 1, 1, 1],
        pixdim: [1.0, sp[0] as f32, sp[1] as f32, sp[2] as f32, 1.0, 1.0, 1.0, 1.0],
        sform_code: 1,
        qform_code: 0,
        xyzt_units: 2, // mm
        srow_x: row(0),
        srow_y: row(1),
        srow_z: row(2),
        ..NiftiHeader::default()
    };
    Ok(Geometry { shape: [nz, ny, nx], spacing: [sp[2], sp[1], sp[0]], affine: a, header })
}

/// Reads an image channel (NIfTI or MetaImage) as f32, scaled.
pub fn read_image(path: &Path) -> Result<Volume<f32>> {
    let (loaded, geom) = load(path)?;
    let data = values(path, loaded, |v| v as f32)?;
    Ok(Volume { data, geom })
}

/// Reads a 3-D image, or each volume of a 4-D one (the Medical Segmentation Decathlon stores its
/// modalities so), as f32, scaled. Each channel's geometry is the file's spatial one, its
/// header a 3-D copy without the scaling (its values are scaled already).
pub fn read_channels(path: &Path) -> Result<Vec<Volume<f32>>> {
    if itk_format(path).is_some() {
        return Ok(vec![read_image(path)?]);
    }
    let obj = read_object(path)?;
    let h = obj.header().clone();
    let ndim = h.dim[0] as usize;
    let t = if ndim >= 4 { h.dim[4] as usize } else { 1 };
    let beyond: usize = (5..=ndim.min(7)).map(|d| h.dim[d] as usize).product();
    if !(3..=7).contains(&ndim) || beyond != 1 || t == 0 {
        return Err(invalid(path, format!("expected a 3-D or 4-D volume, got {ndim}-D with dims {:?}", &h.dim[1..=ndim.min(7)])));
    }
    let mut h3 = h.clone();
    h3.dim = [3, h.dim[1], h.dim[2], h.dim[3], 1, 1, 1, 1];
    h3.pixdim[4] = 1.0;
    h3.scl_slope = 1.0;
    h3.scl_inter = 0.0;
    let geom = geometry(path, &h3)?;
    let (s, i) = scaling(&h).unwrap_or((1.0, 0.0));
    let data = typed_values(path, obj, |v| (v * s + i) as f32)?;
    let n = geom.voxels();
    if data.len() != n * t {
        return Err(invalid(path, format!("{} values for {t} volume(s) of {:?}", data.len(), geom.shape)));
    }
    // The file's order is x fastest, then y, z, t: each volume is one contiguous run.
    Ok(data.chunks_exact(n).map(|c| Volume { data: c.to_vec(), geom: geom.clone() }).collect())
}

/// Reads only the header and geometry (decompresses `.gz`; reads a MetaImage whole).
pub fn read_geometry(path: &Path) -> Result<Geometry> {
    Ok(load(path)?.1)
}

/// Reads a label map: every value must be a non-negative integer below 65536.
pub fn read_label(path: &Path) -> Result<Volume<u16>> {
    let (loaded, geom) = load(path)?;
    // Out-of-range values become the sentinel u32::MAX, found afterwards to name the voxel.
    let raw: Vec<u32> = values(path, loaded, |v| if (0.0..65536.0).contains(&v) && v.fract() == 0.0 { v as u32 } else { u32::MAX })?;
    if let Some(i) = raw.iter().position(|&v| v == u32::MAX) {
        let v = values(path, load(path)?.0, |v| v)?[i];
        let [_, ny, nx] = geom.shape;
        let (z, y, x) = (i / (ny * nx), i / nx % ny, i % nx);
        return Err(invalid(path, format!("label value {v} at voxel (x={x}, y={y}, z={z}) is not a non-negative integer < 65536")));
    }
    Ok(Volume { data: raw.into_iter().map(|v| v as u16).collect(), geom })
}

/// Writes a label map with `geom`'s header (so shape, sform and qform match the source), as
/// uint8 when every value fits, else uint16; gzip level 6 for `.nii.gz`. Atomic: a temporary
/// file in the same folder is renamed into place.
pub fn write_label(path: &Path, data: &[u16], geom: &Geometry) -> Result<()> {
    write_label_as(path, data, geom, data.iter().any(|&v| v > u8::MAX as u16))
}

/// Writes a label map as uint16 when `wide`, else uint8 (values must fit).
pub fn write_label_as(path: &Path, data: &[u16], geom: &Geometry, wide: bool) -> Result<()> {
    let [nz, ny, nx] = geom.shape;
    if !wide && data.iter().any(|&v| v > u8::MAX as u16) {
        return Err(invalid(path, "label values above 255 need uint16"));
    }
    if data.len() != nz * ny * nx {
        return Err(invalid(path, format!("{} values for shape {:?}", data.len(), geom.shape)));
    }
    let small: Vec<u8> = if wide { Vec::new() } else { data.iter().map(|&v| v as u8).collect() };
    if itk_format(path).is_some() {
        let voxels = if wide { crate::metaimage::Voxels::U16(data) } else { crate::metaimage::Voxels::U8(&small) };
        return write_itk(path, geom, voxels, 6);
    }
    write_nifti_atomic(path, |tmp| {
        let opts = nifti::writer::WriterOptions::new(tmp)
            .reference_header(&geom.header)
            .compression_level(flate2::Compression::new(6));
        if !wide {
            let view = ndarray::ArrayView3::from_shape([nz, ny, nx], &small).expect("length checked");
            opts.write_nifti(&view.reversed_axes())
        } else {
            let view = ndarray::ArrayView3::from_shape([nz, ny, nx], data).expect("length checked");
            opts.write_nifti(&view.reversed_axes())
        }
    })
}

/// Writes a `.mha` (zlib `level`) or `.nrrd` (gzip) at `geom` (`.mhd` and `.nhdr`, a header with
/// a data file beside it, are only read).
fn write_itk(path: &Path, geom: &Geometry, voxels: crate::metaimage::Voxels<'_>, level: u32) -> Result<()> {
    let [nz, ny, nx] = geom.shape;
    let written = match split_ending(&path.to_string_lossy()) {
        Some((_, ".mha")) => crate::metaimage::write(path, [nx, ny, nz], &geom.affine, voxels, level),
        Some((_, ".nrrd")) => crate::nrrd::write(path, [nx, ny, nz], &geom.affine, voxels, level),
        _ => return Err(invalid(path, "written as .mha or .nrrd (header and voxels in one file), not as a header with a data file (.mhd, .nhdr)")),
    };
    written.map_err(|e| invalid(path, format!("cannot write: {e}")))
}

/// Runs a `nifti` writer on a temporary sibling of `path` and renames it into place.
fn write_nifti_atomic(path: &Path, write: impl FnOnce(&Path) -> std::result::Result<(), nifti::NiftiError>) -> Result<()> {
    stu_core::fs::atomic_with(path, |tmp| write(tmp).map_err(io::Error::other)).map_err(|e| invalid(path, format!("cannot write: {e}")))
}

/// Writes an image with `geom`'s header: as int16 when every value is an integer in its range
/// (CT in HU: lossless and half the bytes), else float32; gzip level 1 for `.nii.gz` (images
/// are large and compress poorly). Atomic, as [`write_label`].
pub fn write_image(path: &Path, data: &[f32], geom: &Geometry) -> Result<()> {
    let [nz, ny, nx] = geom.shape;
    if data.len() != nz * ny * nx {
        return Err(invalid(path, format!("{} values for shape {:?}", data.len(), geom.shape)));
    }
    let as_i16 = data.iter().all(|v| v.fract() == 0.0 && (i16::MIN as f32..=i16::MAX as f32).contains(v));
    let ints: Vec<i16> = if as_i16 { data.iter().map(|&v| v as i16).collect() } else { Vec::new() };
    if itk_format(path).is_some() {
        let voxels = if as_i16 { crate::metaimage::Voxels::I16(&ints) } else { crate::metaimage::Voxels::F32(data) };
        return write_itk(path, geom, voxels, 1);
    }
    write_nifti_atomic(path, |tmp| {
        let opts = nifti::writer::WriterOptions::new(tmp).reference_header(&geom.header).compression_level(flate2::Compression::new(1));
        if as_i16 {
            opts.write_nifti(&ndarray::ArrayView3::from_shape([nz, ny, nx], &ints).expect("length checked").reversed_axes())
        } else {
            opts.write_nifti(&ndarray::ArrayView3::from_shape([nz, ny, nx], data).expect("length checked").reversed_axes())
        }
    })
}

/// SimpleITK's geometry of an image with NIfTI affine `affine` (what `sitk.ReadImage` reports,
/// ITK's LPS frame): spacing `(sx, sy, sz)`, origin, and the direction matrix row-major (column
/// `c` is voxel axis `c`'s direction), as nnU-Net keeps them in its `sitk_stuff`.
pub fn itk_geometry(affine: &[[f64; 4]; 4]) -> ([f64; 3], [f64; 3], [f64; 9]) {
    let (spacing, axes) = crate::metaimage::lps_axes(affine);
    let origin = [0, 1, 2].map(|r| crate::metaimage::LPS[r] * affine[r][3] + 0.0);
    let direction = std::array::from_fn(|i| axes[i % 3][i / 3] + 0.0);
    (spacing, origin, direction)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SimpleITK 2.x's `GetSpacing`, `GetOrigin`, `GetDirection` of the shared CTs (one with its
    /// y axis flipped, one with x and y flipped), as nnU-Net keeps them in its `sitk_stuff`.
    #[test]
    fn itk_geometry_is_simpleitks() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/Dataset801_TotalSegExampleCT/imagesTr");
        for (file, spacing, origin, direction) in [
            ("ts_ct_dicom_0000.nii.gz", [0.9765625, 0.9765625, 2.0], [-249.51171875, 61.51171875, -804.5], [1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]),
            ("ts_ct_full_0000.nii.gz", [3.0, 3.0, 3.0], [177.95632934570312, -11.319000244140625, 94.3017578125], [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0]),
        ] {
            let g = read_geometry(&shared.join(file)).unwrap();
            let (s, o, d) = itk_geometry(&g.affine);
            let close = |a: &[f64], b: &[f64], tol: f64| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol);
            assert!(close(&s, &spacing, 1e-6) && close(&o, &origin, 1e-4) && close(&d, &direction, 1e-6), "{file}: {s:?} {o:?} {d:?}");
        }
    }

    /// A small oblique volume written as `.mha` or `.nrrd`.
    fn written(dir: &Path, ending: &str, labels: bool) -> PathBuf {
        let theta: f64 = 0.4;
        let affine = [[theta.cos() * 0.8, -theta.sin() * 0.9, 0.0, 10.5], [theta.sin() * 0.8, theta.cos() * 0.9, 0.0, -20.0], [0.0, 0.0, 2.5, 7.25], [0.0, 0.0, 0.0, 1.0]];
        let m = crate::metaimage::RawVolume { dims: [5, 4, 3], affine, element: crate::metaimage::Element::U8, bytes: vec![0; 60] };
        let geom = meta_geometry(Path::new("x"), &m).unwrap();
        let p = dir.join(format!("v{ending}"));
        if labels {
            write_label(&p, &(0..60).map(|i| (i % 5) as u16).collect::<Vec<_>>(), &geom).unwrap();
        } else {
            write_image(&p, &(0..60).map(|i| i as f32 * 0.37 - 4.0).collect::<Vec<_>>(), &geom).unwrap();
        }
        p
    }

    /// The nasty header values of [`every_header_value_of_a_damaged_file_fails_cleanly`].
    const NASTY: [&str; 17] = [
        "999999999 999999999 999999999",
        "4294967296 4294967296 2",
        "-1",
        "0 0 0",
        "1e308 1 1",
        "nan nan nan",
        "(0,0,0) (0,0,0) (0,0,0)",
        "(1,0,0) (0,1,0)",
        "5 4 3 2",
        "MET_LONG",
        "unsigned long long",
        "bzip2",
        "ascii",
        "LIST",
        "big",
        "",
        "(1,2,3",
    ];

    /// Reads `p` (as labels or an image); an error must name the file.
    fn read_cleanly(p: &Path, labels: bool) -> std::result::Result<(), String> {
        let read = if labels { read_label(p).map(|v| v.data.len()) } else { read_image(p).map(|v| v.data.len()) };
        match read {
            Err(e) if !e.to_string().contains("v.") => Err(e.to_string()),
            _ => Ok(()),
        }
    }

    /// Every header line of a MetaImage and a NRRD file (labels and images, compressed) set to
    /// every nasty value: a clean read or an error naming the file, never a panic or an
    /// allocation the file cannot back (huge extents with compressed data).
    #[test]
    fn every_header_value_of_a_damaged_file_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        for (ending, sep) in [(".mha", " = "), (".nrrd", ": ")] {
            for labels in [false, true] {
                let p = written(dir.path(), ending, labels);
                let bytes = std::fs::read(&p).unwrap();
                let end = bytes.windows(2).position(|w| w == b"\n\n").map_or_else(|| bytes.windows(6).position(|w| w == b"LOCAL\n").unwrap() + 6, |e| e + 1);
                let header = String::from_utf8(bytes[..end].to_vec()).unwrap();
                for (i, line) in header.lines().enumerate() {
                    let Some(at) = line.find(sep) else { continue };
                    for value in NASTY {
                        let mut lines: Vec<String> = header.lines().map(String::from).collect();
                        lines[i] = format!("{}{value}", &line[..at + sep.len()]);
                        let mut damaged = (lines.join("\n") + "\n").into_bytes();
                        damaged.extend_from_slice(&bytes[end..]);
                        std::fs::write(&p, &damaged).unwrap();
                        read_cleanly(&p, labels).unwrap_or_else(|e| panic!("{ending} `{}`: {e}", lines[i]));
                    }
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]
        /// A MetaImage or NRRD file cut short or with a byte changed never panics: it reads,
        /// or it is an error that names the file.
        #[test]
        fn damaged_metaimage_and_nrrd_files_fail_cleanly(
            nrrd in proptest::bool::ANY,
            labels in proptest::bool::ANY,
            cut in proptest::bool::ANY,
            at in 0.0f64..1.0,
            byte in proptest::num::u8::ANY,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = written(dir.path(), if nrrd { ".nrrd" } else { ".mha" }, labels);
            let mut bytes = std::fs::read(&p).unwrap();
            let i = ((at * bytes.len() as f64) as usize).min(bytes.len() - 1);
            if cut {
                bytes.truncate(i);
            } else {
                bytes[i] = byte;
            }
            std::fs::write(&p, &bytes).unwrap();
            if let Err(e) = read_cleanly(&p, labels) {
                proptest::prop_assert!(false, "{e}");
            }
        }
    }
}
