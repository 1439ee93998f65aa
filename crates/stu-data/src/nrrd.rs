//! NRRD (`.nrrd`, and `.nhdr` with a data file), the format of 3D Slicer that nnU-Net reads
//! through SimpleITK: a `NRRD000N` magic line, `field: value` lines (`key:=value` pairs and `#`
//! comments skipped) up to an empty line, then the voxels, raw or gzip, x fastest.
//!
//! Geometry: `space directions` gives each voxel axis's vector (direction times spacing) in the
//! `space` (LPS by default; RAS and LAS are turned around), `space origin` the first voxel's
//! position; the NIfTI affine is their RAS form, as ITK writes it to NIfTI (checked against
//! SimpleITK, `tests/fixtures/make_itk_fixture.py`). The volume is the same
//! [`RawVolume`](crate::metaimage::RawVolume) a MetaImage gives.

use std::path::Path;

use crate::metaimage::{Element, Error, LPS, RawVolume, Voxels, ras_affine, read_beside};

fn element(t: &str) -> Option<Element> {
    Some(match t {
        "signed char" | "int8" | "int8_t" => Element::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => Element::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => Element::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => Element::U16,
        "int" | "signed int" | "int32" | "int32_t" => Element::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => Element::U32,
        "longlong" | "long long" | "long long int" | "signed long long" | "signed long long int" | "int64" | "int64_t" => Element::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => Element::U64,
        "float" => Element::F32,
        "double" => Element::F64,
        _ => return None,
    })
}

fn type_name(e: Element) -> &'static str {
    match e {
        Element::I8 => "signed char",
        Element::U8 => "unsigned char",
        Element::I16 => "short",
        Element::U16 => "unsigned short",
        Element::I32 => "int",
        Element::U32 => "unsigned int",
        Element::I64 => "long long",
        Element::U64 => "unsigned long long",
        Element::F32 => "float",
        Element::F64 => "double",
    }
}

/// `(a,b,c)` → three numbers.
fn vector(field: &str, v: &str) -> Result<[f64; 3], Error> {
    let inner = v.trim().strip_prefix('(').and_then(|v| v.strip_suffix(')')).ok_or_else(|| format!("`{field}: {v}`: not a vector `(x,y,z)`"))?;
    let n: Vec<f64> = inner.split(',').map(|x| x.trim().parse()).collect::<Result<_, _>>().map_err(|_| format!("`{field}: {v}`: not numbers"))?;
    match n[..] {
        [a, b, c] if n.iter().all(|x| x.is_finite()) => Ok([a, b, c]),
        _ => Err(format!("`{field}: {v}`: expected three finite numbers")),
    }
}

/// Reads a `.nrrd` / `.nhdr` file (the error names no file; the caller adds it).
pub(crate) fn read(path: &Path) -> Result<RawVolume, Error> {
    let file = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if !file.starts_with(b"NRRD000") {
        return Err("not a NRRD file (no NRRD000N magic line)".into());
    }
    let (mut pos, mut fields) = (0usize, Vec::<(String, String)>::new());
    let mut ended = false;
    let mut first = true;
    while pos < file.len() {
        let end = file[pos..].iter().position(|&b| b == b'\n').map_or(file.len(), |i| pos + i);
        let line = std::str::from_utf8(&file[pos..end]).map_err(|_| "its header is not text".to_string())?.trim_end_matches('\r');
        pos = (end + 1).min(file.len());
        if std::mem::take(&mut first) {
            continue; // the magic line
        }
        if line.is_empty() {
            ended = true;
            break;
        }
        if line.starts_with('#') || line.contains(":=") {
            continue;
        }
        let (k, v) = line.split_once(": ").ok_or_else(|| format!("header line `{}` is not `field: value`", line.chars().take(60).collect::<String>()))?;
        fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |names: &[&str]| fields.iter().find(|(k, _)| names.contains(&k.as_str())).map(|(k, v)| (k.as_str(), v.as_str()));
    let (k, v) = get(&["dimension"]).ok_or("no `dimension`")?;
    let ndims: usize = v.parse().map_err(|_| format!("`{k}: {v}`: not a number"))?;
    let (k, v) = get(&["sizes"]).ok_or("no `sizes`")?;
    let sizes: Vec<usize> = v.split_whitespace().map(str::parse).collect::<Result<_, _>>().map_err(|_| format!("`{k}: {v}`: not sizes"))?;
    if ndims != 3 || sizes.len() != 3 || sizes.contains(&0) {
        return Err(format!("`dimension: {ndims}`, `sizes: {v}`: expected a 3-D volume (one file per channel)"));
    }
    let dims = [sizes[0], sizes[1], sizes[2]];
    let (k, v) = get(&["type"]).ok_or("no `type`")?;
    let element = element(v).ok_or_else(|| format!("`{k}: {v}`: unsupported type"))?;
    // The space's axes as RAS signs: LPS (ITK's and the default) flips x and y.
    let flip = match get(&["space"]).map(|(_, v)| v.to_ascii_lowercase()) {
        None => LPS,
        Some(s) => match s.as_str() {
            "left-posterior-superior" | "lps" => LPS,
            "right-anterior-superior" | "ras" => [1.0, 1.0, 1.0],
            "left-anterior-superior" | "las" => [-1.0, 1.0, 1.0],
            other => return Err(format!("`space: {other}`: only LPS, RAS and LAS spaces are read")),
        },
    };
    if get(&["space dimension"]).is_some_and(|(_, v)| v != "3") {
        return Err("`space dimension` is not 3".into());
    }
    let axes: Vec<[f64; 3]> = match get(&["space directions"]) {
        Some((k, v)) => {
            let parts: Vec<&str> = v.split_whitespace().collect();
            if parts.len() != 3 || parts.contains(&"none") {
                return Err(format!("`{k}: {v}`: expected three axis vectors (a vector or list axis is not a 3-D volume)"));
            }
            parts.into_iter().map(|p| vector(k, p)).collect::<Result<_, _>>()?
        }
        None => {
            let sp: Vec<f64> = match get(&["spacings"]) {
                Some((k, v)) => v.split_whitespace().map(str::parse).collect::<Result<_, _>>().map_err(|_| format!("`{k}: {v}`: not numbers"))?,
                None => vec![1.0; 3],
            };
            if sp.len() != 3 {
                return Err("`spacings`: expected three numbers".into());
            }
            (0..3).map(|i| std::array::from_fn(|r| if r == i { sp[i] } else { 0.0 })).collect()
        }
    };
    let origin = match get(&["space origin"]) {
        Some((k, v)) => vector(k, v)?,
        None => [0.0; 3],
    };
    let affine = ras_affine(flip, &axes, origin);
    let encoding = get(&["encoding"]).map_or("raw", |(_, v)| v);
    let big = get(&["endian"]).is_some_and(|(_, v)| v == "big");
    let raw: Vec<u8> = match get(&["data file", "datafile"]) {
        Some((k, v)) => {
            if v.split_whitespace().count() != 1 || v.starts_with("LIST") {
                return Err(format!("`{k}: {v}`: only one data file is read"));
            }
            read_beside(path, v)?
        }
        None if ended => file[pos..].to_vec(),
        None => return Err("truncated: the header has no end (an empty line) and names no data file".into()),
    };
    let n = crate::metaimage::voxel_count(dims)?;
    let want = n * element.size();
    let skip = match get(&["byte skip", "byteskip"]) {
        Some((k, v)) => match v.parse::<i64>() {
            Ok(-1) if encoding == "raw" => raw.len().saturating_sub(want),
            Ok(b) if (0..1 << 40).contains(&b) => b as usize,
            _ => return Err(format!("`{k}: {v}`: not a byte count")),
        },
        None => 0,
    };
    let bytes = match encoding {
        "raw" => raw.get(skip..).unwrap_or(&[]).to_vec(),
        "gzip" | "gz" => {
            let out = crate::metaimage::inflate(flate2::read::MultiGzDecoder::new(&raw[..]), want + skip + 1).map_err(|e| format!("corrupt or truncated gzip data ({e})"))?;
            out.get(skip..).unwrap_or(&[]).to_vec()
        }
        other => return Err(format!("`encoding: {other}`: only raw and gzip are read")),
    };
    RawVolume::new(dims, affine, element, bytes, big, type_name(element))
}

/// Writes a gzip-compressed `.nrrd` (`level` 1–9) of `dims` (`[nx, ny, nz]`) at the NIfTI affine
/// `affine`, in LPS as ITK writes it. Atomic (a temporary sibling renamed into place).
pub(crate) fn write(path: &Path, dims: [usize; 3], affine: &[[f64; 4]; 4], voxels: Voxels<'_>, level: u32) -> std::io::Result<()> {
    use std::io::Write;
    let (element, bytes) = voxels.encode();
    let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
    z.write_all(&bytes)?;
    let packed = z.finish()?;
    let (spacing, axes) = crate::metaimage::lps_axes(affine);
    let num = |x: f64| format!("{}", x + 0.0);
    let dirs: Vec<String> = (0..3).map(|c| format!("({},{},{})", num(axes[c][0] * spacing[c]), num(axes[c][1] * spacing[c]), num(axes[c][2] * spacing[c]))).collect();
    let header = format!(
        "NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\ntype: {}\ndimension: 3\nspace: left-posterior-superior\nsizes: {} {} {}\nspace directions: {}\nkinds: domain domain domain\nendian: little\nencoding: gzip\nspace origin: ({},{},{})\n\n",
        type_name(element),
        dims[0],
        dims[1],
        dims[2],
        dirs.join(" "),
        num(LPS[0] * affine[0][3]),
        num(LPS[1] * affine[1][3]),
        num(LPS[2] * affine[2][3])
    );
    stu_core::fs::atomic_with(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        f.write_all(header.as_bytes())?;
        f.write_all(&packed)?;
        f.flush()
    })
}
