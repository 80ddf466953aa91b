//! Kubernetes resource quantities (`resources.limits.memory`) as byte counts, for the Docker
//! kubelet's memory limit.

/// A quantity the emulator cannot read (the real apiserver would have rejected it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {0:?}")]
pub struct QuantityError(String);

/// Bytes in a quantity: a decimal number with an optional binary suffix (`Ki` … `Ei`), decimal
/// suffix (`m`, `k`, `M` … `E`) or exponent (`1e6`). Fractions round up, as Kubernetes rounds
/// a memory quantity up to whole bytes.
pub fn parse_bytes(quantity: &str) -> Result<i64, QuantityError> {
    let q = quantity.trim();
    let err = || QuantityError(quantity.to_owned());
    let split = q
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || (i == 0 && (c == '+' || c == '-'))))
        .map_or(q.len(), |(i, _)| i);
    let (number, suffix) = q.split_at(split);
    let n: f64 = number.parse().map_err(|_| err())?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        s if s.starts_with(['e', 'E']) => {
            let exp: i32 = s[1..].parse().map_err(|_| err())?;
            10f64.powi(exp)
        }
        _ => return Err(err()),
    };
    let bytes = (n * factor).ceil();
    if !bytes.is_finite() || bytes > i64::MAX as f64 {
        return Err(err());
    }
    Ok(bytes as i64)
}

/// CPU cores in a quantity (`500m` is half a core, `2` two cores).
pub fn parse_cores(quantity: &str) -> Result<f64, QuantityError> {
    let q = quantity.trim();
    match q.strip_suffix('m') {
        Some(milli) => milli
            .parse::<f64>()
            .map(|m| m / 1000.0)
            .map_err(|_| QuantityError(quantity.to_owned())),
        None => q
            .parse::<f64>()
            .or_else(|_| parse_bytes(q).map(|b| b as f64)),
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_bytes, parse_cores};

    #[test]
    fn cores() {
        assert_eq!(parse_cores("500m"), Ok(0.5));
        assert_eq!(parse_cores("2"), Ok(2.0));
        assert_eq!(parse_cores("1.5"), Ok(1.5));
        assert!(parse_cores("lots").is_err());
    }

    #[test]
    fn binary_suffixes() {
        assert_eq!(parse_bytes("8Mi"), Ok(8 * 1024 * 1024));
        assert_eq!(parse_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_bytes("2Gi"), Ok(2 * 1024 * 1024 * 1024));
        assert_eq!(parse_bytes("1.5Gi"), Ok(1536 * 1024 * 1024));
        assert_eq!(parse_bytes("1Ti"), Ok(1 << 40));
    }

    #[test]
    fn decimal_suffixes_and_plain_bytes() {
        assert_eq!(parse_bytes("128974848"), Ok(128_974_848));
        assert_eq!(parse_bytes("129M"), Ok(129_000_000));
        assert_eq!(parse_bytes("64k"), Ok(64_000));
        assert_eq!(parse_bytes("1G"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("123e6"), Ok(123_000_000));
        assert_eq!(parse_bytes("1E3"), Ok(1000));
        // Millibytes round up to whole bytes.
        assert_eq!(parse_bytes("1500m"), Ok(2));
        assert_eq!(parse_bytes(" 512Mi "), Ok(512 << 20));
    }

    #[test]
    fn rejects_what_kubernetes_rejects() {
        for bad in ["", "Mi", "8MB", "8 Mi", "abc", "1.2.3", "8mi", "1e"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
