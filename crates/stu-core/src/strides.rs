//! Per-stage strides as nnU-Net plans give them, and the text form used on the command line.
//!
//! A stride list has one `[d0, d1, d2]` entry per downsampling, in nnU-Net's array axis order.
//! The text form is `1,2,2:2,2,2:…`: stages separated by `:`, axes by `,`.

/// One stride per axis.
pub type Stride = [usize; 3];

/// Parses `"1,2,2:2,2,2"`.
pub fn parse(text: &str) -> Result<Vec<Stride>, String> {
    text.split(':')
        .map(|stage| {
            let axes: Vec<&str> = stage.split(',').map(str::trim).collect();
            if axes.len() != 3 {
                return Err(format!(
                    "stride `{stage}` must have 3 comma-separated axes (e.g. 2,2,2)"
                ));
            }
            let mut s = [0usize; 3];
            for (slot, a) in s.iter_mut().zip(&axes) {
                *slot = a
                    .parse()
                    .ok()
                    .filter(|v| *v >= 1)
                    .ok_or_else(|| format!("stride `{stage}`: `{a}` is not a positive integer"))?;
            }
            Ok(s)
        })
        .collect()
}

/// Formats a stride list in the text form [`parse`] reads.
pub fn format(strides: &[Stride]) -> String {
    strides
        .iter()
        .map(|s| format!("{},{},{}", s[0], s[1], s[2]))
        .collect::<Vec<_>>()
        .join(":")
}

/// STU-Net's rule for plan strides: keep the first `n`, pad with `[1,1,1]` to exactly `n`.
pub fn fit(strides: &[Stride], n: usize) -> Vec<Stride> {
    let mut out: Vec<Stride> = strides.iter().copied().take(n).collect();
    out.resize(n, [1, 1, 1]);
    out
}

/// Per-axis product of the strides: what an input must be divisible by.
pub fn divisor(strides: &[Stride]) -> Stride {
    strides
        .iter()
        .fold([1; 3], |acc, s| [acc[0] * s[0], acc[1] * s[1], acc[2] * s[2]])
}

/// Output extent of a convolution along one axis.
pub fn conv_out(n: usize, kernel: usize, stride: usize, pad: usize) -> usize {
    (n + 2 * pad - kernel) / stride + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_fit() {
        let s = parse("1,2,2:2,2,2:2,2,2:1,2,2:1,1,1").unwrap();
        assert_eq!(s.len(), 5);
        assert_eq!(s[0], [1, 2, 2]);
        assert_eq!(format(&s), "1,2,2:2,2,2:2,2,2:1,2,2:1,1,1");
        assert_eq!(divisor(&s), [4, 16, 16]);
        assert!(parse("2,2").is_err());
        assert!(parse("2,0,2").is_err());
        assert_eq!(fit(&s[..2], 5)[4], [1, 1, 1]);
        assert_eq!(fit(&[[2, 2, 2]; 7], 5).len(), 5);
        assert_eq!(conv_out(128, 3, 2, 1), 64);
        assert_eq!(conv_out(7, 1, 2, 0), 4);
    }
}
