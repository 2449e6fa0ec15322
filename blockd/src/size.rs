//! Human sizes: parsing `10G`, `4K`, `1.5T`, `512` (bytes) and printing them back.

use crate::error::{Error, Result};

const UNITS: [(&str, u64); 6] = [
    ("K", 1 << 10),
    ("M", 1 << 20),
    ("G", 1 << 30),
    ("T", 1 << 40),
    ("P", 1 << 50),
    ("E", 1 << 60),
];

/// Parses a size with an optional binary unit (K, M, G, T, P, E; `KiB`, `KB` and `k` are
/// read the same). Zero is refused: no volume, pool or block has size zero.
pub fn parse_size(text: &str) -> Result<u64> {
    let bad = |why: &str| Error::InvalidArgument(format!("size {text:?}: {why}"));
    let t = text.trim();
    if t.is_empty() {
        return Err(bad("empty"));
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let unit_up = unit.trim().to_ascii_uppercase();
    let unit_core = unit_up
        .strip_suffix("IB")
        .or_else(|| unit_up.strip_suffix('B'))
        .unwrap_or(&unit_up);
    let mult = if unit_core.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit_core)
            .map(|(_, m)| *m)
            .ok_or_else(|| bad(&format!("unknown unit {unit:?} (use K, M, G, T, P)")))?
    };
    let value: u128 = if let Some((int, frac)) = num.split_once('.') {
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad("not a number"))?
        };
        if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("not a number"));
        }
        let scale = 10u128.pow(frac.len() as u32);
        let f: u128 = frac.parse().map_err(|_| bad("not a number"))?;
        int.checked_mul(scale)
            .and_then(|v| v.checked_add(f))
            .and_then(|v| v.checked_mul(mult as u128))
            .ok_or_else(|| bad("too large"))?
            / scale
    } else {
        num.parse::<u128>()
            .map_err(|_| bad("not a number"))?
            .checked_mul(mult as u128)
            .ok_or_else(|| bad("too large"))?
    };
    if value == 0 {
        return Err(bad("must be greater than zero"));
    }
    u64::try_from(value).map_err(|_| bad("too large"))
}

/// Prints a byte count with the largest binary unit that keeps one decimal honest.
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = "B";
    let mut div = 1u64;
    for (u, m) in UNITS {
        if bytes >= m {
            unit = u;
            div = m;
        }
    }
    let v = bytes as f64 / div as f64;
    if bytes.is_multiple_of(div) {
        format!("{} {unit}iB", bytes / div)
    } else {
        format!("{v:.1} {unit}iB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_numbers_are_refused_not_overflowed() {
        for t in [
            "99999999999999999999999999999999999999P",
            "340282366920938463463374607431768211455",
            "99999999999999999999999999999999999.5P",
            "18446744073709551616",
        ] {
            let err = parse_size(t).unwrap_err().to_string();
            assert!(
                err.contains("too large") || err.contains("not a number"),
                "{t}: {err}"
            );
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("10GiB").unwrap(), 10 << 30);
        assert_eq!(parse_size("10GB").unwrap(), 10 << 30);
        assert_eq!(parse_size("1T").unwrap(), 1 << 40);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 2M ").unwrap(), 2 << 20);
    }

    #[test]
    fn refuses_bad_sizes() {
        for bad in [
            "",
            "0",
            "0G",
            "10X",
            "G",
            "1..5G",
            "-1G",
            "1.G",
            "99999999E",
        ] {
            let err = parse_size(bad).unwrap_err().to_string();
            assert!(err.contains("size"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(10), "10 B");
        assert_eq!(format_size(10 << 30), "10 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
