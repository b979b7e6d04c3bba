//! `polylog gen wide-rows`: realistic wide summary rows (a campaign's numbers per day and
//! placement) as CSV, with the schema file that creates their table. Every supported type
//! appears, with NULLs, and text holds commas, quotes, tabs, newlines, backslashes and
//! non-ASCII characters.

use std::fmt::Write as _;
use std::io::{self, Write};

/// The types columns cycle through after the first three (`id`, `day`, `updated_at`).
const CYCLE: &[(&str, &str)] = &[
    ("impressions", "bigint"),
    ("clicks", "integer"),
    ("spend", "numeric(14,2)"),
    ("ctr", "double precision"),
    ("campaign", "text"),
    ("viewable", "boolean"),
    ("site", "varchar(64)"),
    ("revenue", "numeric"),
    ("creative_uuid", "uuid"),
    ("first_seen", "timestamp"),
    ("frequency", "smallint"),
    ("score", "real"),
    ("currency", "char(3)"),
    ("attrs", "jsonb"),
    ("checksum", "bytea"),
    ("report_date", "date"),
    ("local_hour", "time"),
    ("budget", "numeric(28,6)"),
];

/// Column names and types of a wide table of `columns` columns (at least 3).
pub fn wide_columns(columns: usize) -> Vec<(String, &'static str)> {
    let mut cols = vec![
        ("id".to_string(), "bigint"),
        ("day".to_string(), "date"),
        ("updated_at".to_string(), "timestamptz"),
    ];
    let mut i = 0;
    while cols.len() < columns.max(3) {
        let (name, ty) = CYCLE[i % CYCLE.len()];
        cols.push((format!("{name}_{}", i / CYCLE.len() + 1), ty));
        i += 1;
    }
    cols
}

/// The schema file for `polylog load --schema`: the table, range-partitioned by `day` per
/// month when `partitioned`.
pub fn schema_toml(columns: usize, partitioned: bool) -> String {
    let mut s = String::from(
        "# Created by `polylog gen wide-rows`: the table `polylog load --schema` creates.\n",
    );
    if partitioned {
        s.push_str("partition = { column = \"day\", interval = \"month\" }\n");
    }
    for (name, ty) in wide_columns(columns) {
        let nn = if name == "id" || name == "day" { "\nnot_null = true" } else { "" };
        let _ = write!(s, "\n[[columns]]\nname = \"{name}\"\ntype = \"{ty}\"{nn}\n");
    }
    s
}

/// splitmix64: small, fast, and the same everywhere.
#[derive(Debug, Clone)]
pub struct Rand(u64);

impl Rand {
    pub fn new(seed: u64) -> Rand {
        Rand(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Options of the generator.
#[derive(Debug, Clone)]
pub struct WideRows {
    pub columns: usize,
    pub rows: u64,
    /// Rows spread over this many days from 2026-01-01, in order.
    pub days: u64,
    /// Percent of NULLs in nullable columns.
    pub null_percent: u64,
    pub seed: u64,
}

const WORDS: &[&str] = &[
    "spring",
    "sale",
    "Brand \"Lift\"",
    "retarget",
    "CTV",
    "video, 15s",
    "Crème brûlée",
    "東京",
    "back\\slash",
    "tab\there",
    "new\nline",
    "promo",
    "holiday",
    "always-on",
    "Ünïcödé",
    "50% off",
];
const SITES: &[&str] =
    &["news.example.com", "video.example.org", "sports.example.net", "recipes.example.com"];

impl WideRows {
    /// Writes the CSV (with a header line) to `out`.
    pub fn write_csv(&self, out: &mut dyn Write) -> io::Result<()> {
        let cols = wide_columns(self.columns);
        let mut line = String::with_capacity(self.columns * 16);
        for (i, (name, _)) in cols.iter().enumerate() {
            if i > 0 {
                line.push(',');
            }
            line.push_str(name);
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
        let mut r = Rand::new(self.seed);
        let start_day = crate::types::days_from_civil(2026, 1, 1);
        for row in 0..self.rows {
            line.clear();
            let day = start_day + (row * self.days.max(1) / self.rows.max(1)) as i64;
            for (i, (_, ty)) in cols.iter().enumerate() {
                if i > 0 {
                    line.push(',');
                }
                if i >= 2 && r.below(100) < self.null_percent {
                    continue; // NULL: an unquoted empty field
                }
                match (i, *ty) {
                    (0, _) => {
                        let _ = write!(line, "{}", row + 1);
                    }
                    (1, _) => line.push_str(&crate::types::format_date(day as i32)),
                    (2, _) => {
                        let us = day * 86_400_000_000 + r.below(86_400_000_000) as i64;
                        line.push_str(&crate::types::format_timestamp(us));
                        line.push_str(["+00", "+02:00", "-05:30", "Z"][r.below(4) as usize]);
                    }
                    (_, "bigint") => {
                        let _ = write!(line, "{}", r.below(10_000_000_000) as i64 - 1_000);
                    }
                    (_, "integer") => {
                        let _ = write!(line, "{}", r.below(2_000_000) as i64 - 1_000_000);
                    }
                    (_, "smallint") => {
                        let _ = write!(line, "{}", r.below(65_536) as i64 - 32_768);
                    }
                    (_, "numeric(14,2)") => {
                        let _ = write!(
                            line,
                            "{}.{:02}",
                            r.below(1_000_000_000_000) as i64 - 5_000,
                            r.below(100)
                        );
                    }
                    (_, "numeric(28,6)") => {
                        let _ = write!(
                            line,
                            "-{}{:010}.{:06}",
                            r.below(1_000_000_000),
                            r.below(10_000_000_000),
                            r.below(1_000_000)
                        );
                    }
                    (_, "numeric") => match r.below(20) {
                        0 => line.push_str("NaN"),
                        1 => line.push_str("0.000000000000000000001"),
                        2 => line.push_str("-123456789012345678901234567890.5"),
                        _ => {
                            let _ = write!(line, "{}.{}", r.below(1_000_000), r.below(1000));
                        }
                    },
                    (_, "double precision") => {
                        let v = f64::from_bits(r.next_u64() >> 2) % 1e6;
                        let _ =
                            write!(line, "{}", if r.below(50) == 0 { f64::NAN } else { v / 7.0 });
                    }
                    (_, "real") => {
                        let _ = write!(line, "{:?}", (r.below(1 << 24) as f32) / 1024.0 - 3.3);
                    }
                    (_, "boolean") => line.push_str(if r.below(2) == 0 { "t" } else { "false" }),
                    (_, "text") => {
                        let mut s = String::new();
                        for k in 0..1 + r.below(4) {
                            if k > 0 {
                                s.push(' ');
                            }
                            s.push_str(WORDS[r.below(WORDS.len() as u64) as usize]);
                        }
                        if r.below(30) == 0 {
                            s.clear(); // an empty string, not NULL
                        }
                        csv_quoted(&mut line, &s);
                    }
                    (_, "varchar(64)") => {
                        let _ = write!(line, "{}/p{}", SITES[r.below(4) as usize], r.below(500));
                    }
                    (_, "uuid") => {
                        let (a, b) = (r.next_u64(), r.next_u64());
                        let _ = write!(
                            line,
                            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                            a >> 32,
                            a >> 16 & 0xffff,
                            a & 0xfff,
                            b >> 52,
                            b & 0xffff_ffff_ffff
                        );
                    }
                    (_, "timestamp") => {
                        let us = (day - r.below(400) as i64) * 86_400_000_000
                            + r.below(86_400_000_000) as i64;
                        line.push_str(&crate::types::format_timestamp(us));
                    }
                    (_, "char(3)") => {
                        line.push_str(["EUR", "USD", "JPY", "GB"][r.below(4) as usize])
                    }
                    (_, "jsonb") => {
                        let s = format!(
                            "{{\"placement\": {}, \"tags\": [\"{}\", \"a,b\"], \"ratio\": 0.{}}}",
                            r.below(1000),
                            ["ctv", "mobile", "desktop"][r.below(3) as usize],
                            r.below(100)
                        );
                        csv_quoted(&mut line, &s);
                    }
                    (_, "bytea") => {
                        line.push_str("\\x");
                        for _ in 0..r.below(12) {
                            let _ = write!(line, "{:02x}", r.below(256));
                        }
                    }
                    (_, "date") => {
                        line.push_str(&crate::types::format_date((day - r.below(30) as i64) as i32))
                    }
                    (_, "time") => {
                        line.push_str(&crate::types::format_time(r.below(86_400_000_000) as i64))
                    }
                    _ => {}
                }
            }
            line.push('\n');
            out.write_all(line.as_bytes())?;
        }
        out.flush()
    }
}

fn csv_quoted(line: &mut String, s: &str) {
    line.push('"');
    for c in s.chars() {
        if c == '"' {
            line.push('"');
        }
        line.push(c);
    }
    line.push('"');
}
