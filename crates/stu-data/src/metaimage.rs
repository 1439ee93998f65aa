//! MetaImage (`.mha`, and `.mhd` with its data in a file of its own), the format nnU-Net reads
//! through SimpleITK and Grand Challenge distributes: a text header of `Key = Value` lines, then
//! the voxels, raw or zlib-compressed (`CompressedData = True`), x fastest.
//!
//! Geometry: ITK's world is LPS. `TransformMatrix` lists the direction of each voxel axis in
//! turn (the columns of ITK's direction matrix `D`), `ElementSpacing` and `Offset` the spacing
//! and origin, so voxel (i, j, k) sits at `Offset + D·diag(spacing)·(i, j, k)`. The NIfTI affine
//! (RAS) is that with its x and y rows negated, as ITK writes it to NIfTI. The voxel order is
//! NIfTI's, so a volume read here is the one its NIfTI would give (checked against SimpleITK's
//! own conversions, `tests/fixtures/make_itk_fixture.py`).

use std::io::Read;
use std::path::Path;

/// A voxel type of the header's `ElementType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Element {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

impl Element {
    const ALL: [Self; 10] = [Self::I8, Self::U8, Self::I16, Self::U16, Self::I32, Self::U32, Self::I64, Self::U64, Self::F32, Self::F64];

    pub(crate) fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    /// The MetaImage `ElementType`.
    fn name(self) -> &'static str {
        match self {
            Self::I8 => "MET_CHAR",
            Self::U8 => "MET_UCHAR",
            Self::I16 => "MET_SHORT",
            Self::U16 => "MET_USHORT",
            Self::I32 => "MET_INT",
            Self::U32 => "MET_UINT",
            Self::I64 => "MET_LONG_LONG",
            Self::U64 => "MET_ULONG_LONG",
            Self::F32 => "MET_FLOAT",
            Self::F64 => "MET_DOUBLE",
        }
    }
}

/// A MetaImage volume: extent `[nx, ny, nz]`, the NIfTI (RAS) affine, and its voxels as stored
/// (little-endian, x fastest).
pub(crate) struct RawVolume {
    pub(crate) dims: [usize; 3],
    pub(crate) affine: [[f64; 4]; 4],
    pub(crate) element: Element,
    pub(crate) bytes: Vec<u8>,
}

/// The file, and why it cannot be read.
pub(crate) type Error = String;

/// The voxel count of `dims`, refused beyond 2⁴⁰ (a corrupt header must not allocate).
pub(crate) fn voxel_count(dims: [usize; 3]) -> Result<usize, Error> {
    dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).filter(|&n| n <= 1 << 40).ok_or_else(|| format!("extent {dims:?} is too large for a volume"))
}

/// The RAS signs of LPS axes (ITK's world): x and y negated.
pub(crate) const LPS: [f64; 3] = [-1.0, -1.0, 1.0];

/// The NIfTI (RAS) affine of voxel axes given as vectors `columns` (direction times spacing)
/// and an `origin`, both in a space whose axes have the RAS signs `flip`.
pub(crate) fn ras_affine(flip: [f64; 3], columns: &[[f64; 3]], origin: [f64; 3]) -> [[f64; 4]; 4] {
    let mut affine = [[0.0; 4], [0.0; 4], [0.0; 4], [0.0, 0.0, 0.0, 1.0]];
    for r in 0..3 {
        for c in 0..3 {
            affine[r][c] = flip[r] * columns[c][r];
        }
        affine[r][3] = flip[r] * origin[r];
    }
    affine
}

/// The data file `name` a header at `path` points to (beside it).
pub(crate) fn read_beside(path: &Path, name: &str) -> Result<Vec<u8>, Error> {
    let data = path.parent().unwrap_or(Path::new(".")).join(name);
    std::fs::read(&data).map_err(|e| format!("its data file {}: cannot read: {e}", data.display()))
}

/// Decompressed voxel bytes, at most `limit` (no more is read; the capacity grows with what
/// the stream really holds).
pub(crate) fn inflate(mut reader: impl Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(limit.min(1 << 26));
    reader.by_ref().take(limit as u64).read_to_end(&mut out)?;
    Ok(out)
}

fn numbers(key: &str, value: &str, n: usize) -> Result<Vec<f64>, Error> {
    let v: Vec<f64> = value.split_whitespace().map(str::parse).collect::<Result<_, _>>().map_err(|_| format!("`{key} = {value}`: not {n} numbers"))?;
    if v.len() != n || v.iter().any(|x| !x.is_finite()) {
        return Err(format!("`{key} = {value}`: expected {n} finite numbers"));
    }
    Ok(v)
}

fn truth(key: &str, value: &str) -> Result<bool, Error> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("`{key} = {value}`: expected True or False")),
    }
}

/// Reads a `.mha` / `.mhd` file (the error names no file; the caller adds it).
pub(crate) fn read(path: &Path) -> Result<RawVolume, Error> {
    let file = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    // The header: text lines up to `ElementDataFile`, which ends it.
    let (mut pos, mut fields) = (0usize, Vec::<(String, String)>::new());
    let mut data_file = None;
    while pos < file.len() {
        let end = file[pos..].iter().position(|&b| b == b'\n').map_or(file.len(), |i| pos + i);
        let line = std::str::from_utf8(&file[pos..end]).map_err(|_| "not a MetaImage file (its header is not text)".to_string())?.trim();
        pos = (end + 1).min(file.len());
        if line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').ok_or_else(|| format!("not a MetaImage file (header line `{}` is not `Key = Value`)", line.chars().take(60).collect::<String>()))?;
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        if key == "ElementDataFile" {
            data_file = Some(value);
            break;
        }
        fields.push((key, value));
    }
    let data_file = data_file.ok_or("no `ElementDataFile` line: not a MetaImage file, or a truncated header")?;
    let get = |names: &[&str]| fields.iter().rev().find(|(k, _)| names.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v.as_str()));
    if let Some((k, v)) = get(&["ObjectType"]).filter(|(_, v)| *v != "Image") {
        return Err(format!("`{k} = {v}`: only images are read"));
    }
    let (k, v) = get(&["NDims"]).ok_or("no `NDims`")?;
    let ndims: usize = v.parse().map_err(|_| format!("`{k} = {v}`: not a number"))?;
    let (k, v) = get(&["DimSize"]).ok_or("no `DimSize`")?;
    let size = numbers(k, v, ndims)?;
    if !(ndims == 3 || ndims == 4 && size[3] == 1.0) || size.iter().any(|&d| d < 1.0 || d.fract() != 0.0) {
        return Err(format!("`DimSize = {v}`: expected a 3-D volume (one file per channel)"));
    }
    let dims = [size[0] as usize, size[1] as usize, size[2] as usize];
    if let Some((k, v)) = get(&["ElementNumberOfChannels"]).filter(|(_, v)| *v != "1") {
        return Err(format!("`{k} = {v}`: one channel per file expected"));
    }
    let sub = |v: Vec<f64>| -> Vec<f64> { v.into_iter().take(3).collect() };
    let spacing = match get(&["ElementSpacing", "ElementSize"]) {
        Some((k, v)) => sub(numbers(k, v, ndims)?),
        None => vec![1.0; 3],
    };
    if spacing.iter().any(|&s| s <= 0.0) {
        return Err(format!("`ElementSpacing`: {spacing:?} is not positive"));
    }
    let origin = match get(&["Offset", "Origin", "Position"]) {
        Some((k, v)) => sub(numbers(k, v, ndims)?),
        None => vec![0.0; 3],
    };
    // Axis i's direction: values 3i..3i+3 of the matrix (the first three rows of a 4-D one).
    let axes: Vec<[f64; 3]> = match get(&["TransformMatrix", "Rotation", "Orientation"]) {
        Some((k, v)) => {
            let m = numbers(k, v, ndims * ndims)?;
            (0..3).map(|i| [m[i * ndims], m[i * ndims + 1], m[i * ndims + 2]]).collect()
        }
        None => vec![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
    };
    let columns: Vec<[f64; 3]> = (0..3).map(|c| axes[c].map(|v| v * spacing[c])).collect();
    let affine = ras_affine(LPS, &columns, [origin[0], origin[1], origin[2]]);
    let (k, v) = get(&["ElementType"]).ok_or("no `ElementType`")?;
    let n = voxel_count(dims)?;
    let element = match v {
        // (MetaIO's `long` is 4 bytes; one of 8 is told by the data's length below.)
        "MET_LONG" => Element::I32,
        "MET_ULONG" => Element::U32,
        _ => Element::ALL.into_iter().find(|e| e.name() == v).ok_or_else(|| format!("`{k} = {v}`: unsupported element type"))?,
    };
    let long = matches!(v, "MET_LONG" | "MET_ULONG");
    let msb = match get(&["BinaryDataByteOrderMSB", "ElementByteOrderMSB"]) {
        Some((k, v)) => truth(k, v)?,
        None => false,
    };
    if let Some((k, v)) = get(&["BinaryData"])
        && !truth(k, v)?
    {
        return Err(format!("`{k} = {v}`: ASCII voxel data is not read"));
    }
    let compressed = match get(&["CompressedData"]) {
        Some((k, v)) => truth(k, v)?,
        None => false,
    };
    let raw: Vec<u8> = if data_file == "LOCAL" {
        file[pos..].to_vec()
    } else if data_file.contains('%') || data_file.starts_with("LIST") || data_file.contains(' ') {
        return Err(format!("`ElementDataFile = {data_file}`: only LOCAL or one data file is read"));
    } else {
        read_beside(path, &data_file)?
    };
    let mut element = element;
    let bytes = if compressed {
        inflate(flate2::read::ZlibDecoder::new(&raw[..]), n * 8 + 1).map_err(|e| format!("corrupt or truncated zlib data ({e})"))?
    } else {
        // `HeaderSize` bytes precede the voxels in a separate data file (-1: they are its end).
        let skip = match get(&["HeaderSize"]) {
            Some((k, v)) => match v.parse::<i64>() {
                Ok(-1) => raw.len().saturating_sub(n * element.size()),
                Ok(h) if h >= 0 => h as usize,
                _ => return Err(format!("`{k} = {v}`: not a size")),
            },
            None => 0,
        };
        raw.get(skip..).unwrap_or(&[]).to_vec()
    };
    if long && bytes.len() == n * 8 {
        element = if element == Element::I32 { Element::I64 } else { Element::U64 };
    }
    RawVolume::new(dims, affine, element, bytes, msb, element.name())
}

impl RawVolume {
    /// The volume of `dims` voxels of `element` from the first of `bytes` (big-endian ones
    /// swapped); fewer bytes than the voxels need is an error that names the type as
    /// `type_name`.
    pub(crate) fn new(dims: [usize; 3], affine: [[f64; 4]; 4], element: Element, mut bytes: Vec<u8>, big_endian: bool, type_name: &str) -> Result<Self, Error> {
        let want = dims.iter().product::<usize>() * element.size();
        if bytes.len() < want {
            return Err(format!("truncated: {} bytes of voxel data, {dims:?} {type_name} voxels need {want}", bytes.len()));
        }
        bytes.truncate(want);
        if big_endian && element.size() > 1 {
            for c in bytes.chunks_exact_mut(element.size()) {
                c.reverse();
            }
        }
        Ok(Self { dims, affine, element, bytes })
    }

    /// The voxels through `f`, x fastest.
    pub(crate) fn values<T: Send>(&self, f: impl Fn(f64) -> T + Sync) -> Vec<T> {
        use rayon::prelude::*;
        let s = self.element.size();
        let b = &self.bytes;
        let at = |i: usize| -> f64 {
            let c = &b[i * s..i * s + s];
            match self.element {
                Element::I8 => c[0] as i8 as f64,
                Element::U8 => c[0] as f64,
                Element::I16 => i16::from_le_bytes([c[0], c[1]]) as f64,
                Element::U16 => u16::from_le_bytes([c[0], c[1]]) as f64,
                Element::I32 => i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                Element::U32 => u32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                Element::I64 => i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                Element::U64 => u64::from_le_bytes(c.try_into().expect("8 bytes")) as f64,
                Element::F32 => f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64,
                Element::F64 => f64::from_le_bytes(c.try_into().expect("8 bytes")),
            }
        };
        (0..b.len() / s).into_par_iter().map(|i| f(at(i))).collect()
    }
}

/// Voxels to write, x fastest.
pub(crate) enum Voxels<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    I16(&'a [i16]),
    F32(&'a [f32]),
}

impl Voxels<'_> {
    /// The element type and the little-endian bytes.
    pub(crate) fn encode(&self) -> (Element, Vec<u8>) {
        match self {
            Voxels::U8(v) => (Element::U8, v.to_vec()),
            Voxels::U16(v) => (Element::U16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Voxels::I16(v) => (Element::I16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            Voxels::F32(v) => (Element::F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
        }
    }
}

/// Each voxel axis's spacing (the length of its affine column).
pub(crate) fn spacing(affine: &[[f64; 4]; 4]) -> [f64; 3] {
    std::array::from_fn(|c| (0..3).map(|r| affine[r][c] * affine[r][c]).sum::<f64>().sqrt())
}

/// Spacing and the LPS direction of each voxel axis, from a NIfTI (RAS) affine.
pub(crate) fn lps_axes(affine: &[[f64; 4]; 4]) -> ([f64; 3], [[f64; 3]; 3]) {
    let spacing = spacing(affine);
    let axes = std::array::from_fn(|c| std::array::from_fn(|r| if spacing[c] > 0.0 { LPS[r] * affine[r][c] / spacing[c] } else { (r == c) as u8 as f64 }));
    (spacing, axes)
}

/// Writes a zlib-compressed `.mha` (`level` 1–9) of `dims` (`[nx, ny, nz]`) at the NIfTI affine
/// `affine`, the header as SimpleITK writes it. Atomic (a temporary sibling renamed into place).
pub(crate) fn write(path: &Path, dims: [usize; 3], affine: &[[f64; 4]; 4], voxels: Voxels<'_>, level: u32) -> std::io::Result<()> {
    use std::io::Write;
    let (element, bytes) = voxels.encode();
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(level));
    z.write_all(&bytes)?;
    let packed = z.finish()?;
    // Spacing, direction and origin from the RAS affine.
    let (spacing, axes) = lps_axes(affine);
    let join = |v: &[f64]| v.iter().map(|x| format!("{}", x + 0.0)).collect::<Vec<_>>().join(" ");
    let header = format!(
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = True\nCompressedDataSize = {}\nTransformMatrix = {}\nOffset = {}\nCenterOfRotation = 0 0 0\nElementSpacing = {}\nDimSize = {} {} {}\nElementType = {}\nElementDataFile = LOCAL\n",
        packed.len(),
        join(&axes.concat()),
        join(&[0, 1, 2].map(|r| LPS[r] * affine[r][3])),
        join(&spacing),
        dims[0],
        dims[1],
        dims[2],
        element.name()
    );
    stu_core::fs::atomic_with(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        f.write_all(header.as_bytes())?;
        f.write_all(&packed)?;
        f.flush()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `ElementType` reads as its element; MetaIO's `long` is 4 bytes, or 8 when the data
    /// say so.
    #[test]
    fn every_element_type_reads_by_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.mha");
        let read_as = |name: &str, bytes: usize| {
            let mut file = format!("ObjectType = Image\nNDims = 3\nDimSize = 1 1 1\nElementType = {name}\nElementDataFile = LOCAL\n").into_bytes();
            file.extend(vec![0u8; bytes]);
            std::fs::write(&p, file).unwrap();
            read(&p).map(|v| v.element)
        };
        for e in Element::ALL {
            assert_eq!(read_as(e.name(), e.size()), Ok(e));
        }
        assert_eq!(read_as("MET_LONG", 4), Ok(Element::I32));
        assert_eq!(read_as("MET_ULONG", 8), Ok(Element::U64));
        assert!(read_as("MET_FLOAT16", 2).unwrap_err().contains("unsupported element type"));
    }
}
