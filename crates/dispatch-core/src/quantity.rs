//! Kubernetes-style quantities for `spec.resources`: bytes (`256Mi`, `1G`, `1048576`) and CPU
//! (`500m`, `1`, `1.5`).

/// Bytes of a quantity such as `256Mi`, `1Gi`, `64M`, `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let units: [(&str, u64); 10] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("K", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("", 1),
    ];
    let bad = || {
        format!("{s:?} is not a size: write a number of bytes or one with Ki, Mi, Gi (e.g. 256Mi)")
    };
    for (suffix, mult) in units {
        if let Some(n) = t.strip_suffix(suffix)
            && !n.is_empty()
            && n.bytes().all(|b| b.is_ascii_digit())
        {
            let n: u64 = n.parse().map_err(|_| bad())?;
            return n.checked_mul(mult).ok_or_else(bad);
        }
    }
    Err(bad())
}

/// `268435456` → `256Mi`.
pub fn human_bytes(n: u64) -> String {
    for (unit, size) in [("Gi", 1u64 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    if n >= 1 << 20 {
        return format!("{:.1}Mi", n as f64 / (1u64 << 20) as f64);
    }
    format!("{n} bytes")
}

/// Thousandths of a core of a CPU quantity such as `500m`, `1`, `1.5`.
pub fn parse_cpu_millis(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a CPU amount: write cores (1, 0.5) or millicores (500m)");
    if let Some(m) = t.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let cores: f64 = t.parse().map_err(|_| bad())?;
    if !cores.is_finite() || cores <= 0.0 || cores > 1024.0 {
        return Err(bad());
    }
    Ok((cores * 1000.0).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cpus() {
        assert_eq!(parse_bytes("256Mi").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("Mi").is_err());
        assert!(parse_bytes("-1Mi").is_err());
        assert!(parse_bytes("1.5Gi").is_err());
        assert!(parse_bytes("99999999999Ti").is_err());
        assert_eq!(parse_cpu_millis("500m").unwrap(), 500);
        assert_eq!(parse_cpu_millis("1.5").unwrap(), 1500);
        assert!(parse_cpu_millis("fast").is_err());
        assert!(parse_cpu_millis("0").is_err());
    }
}
