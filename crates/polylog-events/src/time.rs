//! Calendar arithmetic in UTC (buckets, monthly partitions, report ranges) without a date crate.

pub use polylog_postgres::calendar::{civil_from_days, days_from_civil};

/// `2026-11-26T12:34:00Z` for ms since the epoch.
pub fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!("{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z", s / 3600, s / 60 % 60, s % 60)
}

/// The first ms of the month holding `ms`, and of the month after.
pub fn month_bounds(ms: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(ms.div_euclid(86_400_000));
    let start = days_from_civil(y, m, 1) * 86_400_000;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1) * 86_400_000)
}

/// Parses a report bound: `now`, `now-15m` (`s`, `m`, `h`, `d`, `w`; `mo` = 30 days), ms since
/// the epoch, `2026-05-01`, or `2026-05-01T10:00[:00][Z|+02:00]`.
pub fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let ms = parse_unbounded(s, now_ms)?;
    // From 1970 to the end of 9999: no arithmetic on it can overflow.
    if !(0..=253_402_300_799_999).contains(&ms) {
        return Err(format!("{s:?} is outside 1970 to 9999"));
    }
    Ok(ms)
}

fn parse_unbounded(s: &str, now_ms: i64) -> Result<i64, String> {
    let bad = || {
        format!(
            "{s:?} is not a time: use now, now-6h (s, m, h, d, w, mo), ms since the epoch, \
             2026-05-01 or 2026-05-01T10:00:00Z"
        )
    };
    if let Some(rest) = s.strip_prefix("now") {
        if rest.is_empty() {
            return Ok(now_ms);
        }
        let rest = rest.strip_prefix('-').ok_or_else(bad)?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let n: i64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit = match &rest[digits..] {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            "w" => 7 * 86_400_000,
            "mo" => 30 * 86_400_000,
            _ => return Err(bad()),
        };
        return n.checked_mul(unit).and_then(|d| now_ms.checked_sub(d)).ok_or_else(bad);
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse().map_err(|_| bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r).and_then(|t| t.parse().ok()).ok_or_else(bad)
    };
    if s.len() < 10 || s.as_bytes()[4] != b'-' || s.as_bytes()[7] != b'-' {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let days_in_month = match mo {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month {
        return Err(bad());
    }
    let mut ms = days_from_civil(y, mo as u32, d as u32) * 86_400_000;
    let rest = &s[10..];
    if rest.is_empty() {
        return Ok(ms);
    }
    let rest = rest.strip_prefix(['T', ' ']).ok_or_else(bad)?;
    let time_len = rest.find(['Z', '+', '-']).unwrap_or(rest.len());
    let (time, zone) = rest.split_at(time_len);
    let parts: Vec<&str> = time.split(':').collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(bad());
    }
    let field = |p: &str, max: f64| -> Result<f64, String> {
        p.parse::<f64>().ok().filter(|v| (0.0..max).contains(v)).ok_or_else(bad)
    };
    ms +=
        (field(parts[0], 24.0)? * 3_600_000.0) as i64 + (field(parts[1], 60.0)? * 60_000.0) as i64;
    if let Some(sec) = parts.get(2) {
        ms += (field(sec, 61.0)? * 1000.0).round() as i64;
    }
    match zone {
        "" | "Z" => {}
        z => {
            // Exactly +HH:MM or -HH:MM.
            let sign = match z.as_bytes()[0] {
                b'-' => 1,
                b'+' => -1,
                _ => return Err(bad()),
            };
            let (h, m) = z[1..].split_once(':').ok_or_else(bad)?;
            let h: i64 =
                h.parse().ok().filter(|h| (0..=23).contains(h) && z.len() == 6).ok_or_else(bad)?;
            let m: i64 = m.parse().ok().filter(|m| (0..=59).contains(m)).ok_or_else(bad)?;
            ms += sign * (h * 60 + m) * 60_000;
        }
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_parse() {
        for z in -800_000..800_000 {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z);
        }
        assert_eq!(format_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(parse_time("2026-11-26T12:34:56Z", 0).expect("parses"), 1_795_696_496_000);
        assert_eq!(format_ms(1_795_696_496_000), "2026-11-26T12:34:56Z");
        assert_eq!(parse_time("2026-11-26T14:34:56+02:00", 0).expect("parses"), 1_795_696_496_000);
        assert_eq!(parse_time("2026-11-26", 0).expect("parses"), 1_795_651_200_000);
        assert_eq!(parse_time("now-2h", 10_000_000).expect("parses"), 10_000_000 - 7_200_000);
        assert_eq!(parse_time("1795696496000", 0).expect("parses"), 1_795_696_496_000);
        assert_eq!(month_bounds(1_795_696_496_000).0, parse_time("2026-11-01", 0).expect("parses"));
        assert_eq!(month_bounds(1_795_696_496_000).1, parse_time("2026-12-01", 0).expect("parses"));
        assert_eq!(parse_time("2024-02-29", 0).expect("leap day"), 1_709_164_800_000);
        for bad in [
            "",
            "yesterday",
            "now+1h",
            "2026-13-01",
            "2026-02-29",
            "2026-04-31",
            "2026-11-26T25:00",
            "2026-11-26T10:00Z05:00",
            "2026-11-26T10:00+99:00",
            "now-3y",
            "now-99999999999999mo",
            "99999999999999999999",
            "1969-12-31",
        ] {
            assert!(parse_time(bad, 0).is_err(), "{bad}");
        }
    }
}
