//! A realistic event generator (`polylog gen events`): impressions with viewability
//! measurements and the odd click, over campaigns, sites and users drawn with a long tail (a
//! few get most of the traffic), from real-looking browsers, phones, tablets, TVs, and bots
//! and crawlers. Deterministic for a seed.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use polylog_testkit::Rng;

/// User agents and how often each is seen (per mille).
const AGENTS: &[(&str, u64)] = &[
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36", 300),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15", 90),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0", 40),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.2478.51", 60),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1", 220),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.6367.82 Mobile Safari/537.36", 150),
    ("Mozilla/5.0 (iPad; CPU OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1", 50),
    ("Mozilla/5.0 (Linux; Android 13; SM-X700) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36", 20),
    ("Mozilla/5.0 (SMART-TV; LINUX; Tizen 7.0) AppleWebKit/537.36 (KHTML, like Gecko) 6.0 TV Safari/537.36", 20),
    ("Roku/DVP-12.5 (12.5.0.4178-88)", 10),
    ("Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)", 15),
    ("Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)", 8),
    ("Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)", 5),
    ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/124.0.0.0 Safari/537.36", 7),
    ("python-requests/2.31.0", 5),
];

const WORDS: &[&str] = &[
    "daily", "tech", "sport", "food", "travel", "auto", "money", "style", "game", "music", "home",
    "health",
];
const KINDS: &[&str] =
    &["news", "hub", "times", "post", "world", "zone", "wire", "life", "review", "today"];
const SIZES: &[&str] = &["300x250", "728x90", "320x50", "160x600", "300x600", "970x250"];

/// The site category of a generated domain (by its first word), for `site_categories`.
pub fn site_categories() -> Vec<(String, String)> {
    let cat = |w: &str| match w {
        "daily" | "money" => "news",
        "tech" | "game" => "technology",
        "sport" => "sports",
        "food" | "health" | "home" => "lifestyle",
        "travel" | "auto" => "travel",
        _ => "entertainment",
    };
    let mut out = Vec::new();
    for w in WORDS {
        for k in KINDS {
            out.push((format!("{w}{k}.com"), cat(w).to_string()));
        }
    }
    out
}

#[derive(Debug, Clone)]
pub struct GenOptions {
    pub campaigns: u64,
    pub sites: u64,
    pub users: u64,
    pub seed: u64,
}

impl Default for GenOptions {
    fn default() -> Self {
        GenOptions { campaigns: 10_000, sites: 2_000, users: 1_000_000, seed: 1 }
    }
}

pub struct Generator {
    opts: GenOptions,
    rng: Rng,
    impressions: u64,
}

impl Generator {
    pub fn new(opts: GenOptions) -> Generator {
        Generator { rng: Rng::new(opts.seed), opts, impressions: 0 }
    }

    /// An index below `n`, mostly small ones: a long tail.
    fn skewed(&mut self, n: u64) -> u64 {
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((u * u * u * n as f64) as u64).min(n.saturating_sub(1))
    }

    fn domain(&self, site: u64) -> String {
        let w = WORDS[(site % WORDS.len() as u64) as usize];
        let k = KINDS[(site / WORDS.len() as u64 % KINDS.len() as u64) as usize];
        let n = site / (WORDS.len() * KINDS.len()) as u64;
        if n == 0 {
            format!("{w}{k}.com")
        } else {
            format!("{w}{k}{n}.com")
        }
    }

    /// The events of one impression at `ts_ms`, appended to `out` as NDJSON lines; returns
    /// how many.
    pub fn impression(&mut self, ts_ms: i64, out: &mut Vec<u8>) -> u64 {
        self.impressions += 1;
        let imp = format!("{:x}-{}", self.opts.seed, self.impressions);
        let campaign = self.skewed(self.opts.campaigns);
        let site = self.skewed(self.opts.sites);
        let user = self.skewed(self.opts.users);
        let mut pick = self.rng.below(1000);
        let mut ua = AGENTS[0].0;
        for (a, share) in AGENTS {
            if pick < *share {
                ua = a;
                break;
            }
            pick -= share;
        }
        let domain = self.domain(site);
        let ip = if user.is_multiple_of(10) {
            format!("2001:db8:{:x}:{:x}::{:x}", user >> 16 & 0xffff, user & 0xffff, user % 97 + 1)
        } else {
            format!(
                "{}.{}.{}.{}",
                11 + user % 200,
                user >> 8 & 0xff,
                user >> 16 & 0xff,
                user % 250 + 1
            )
        };
        let size = SIZES[(campaign % SIZES.len() as u64) as usize];
        let video = campaign.is_multiple_of(5);
        let common = format!(
            r#""impression_id":"{imp}","campaign_id":"c-{campaign}","creative_id":"cr-{campaign}-{}","placement_id":"pl-{site}-{}","site_domain":"{domain}","page_url":"https://{domain}/articles/{}?utm_source=feed&uid={user}","ip":"{ip}","user_agent":"{ua}","user_id":"user-{user}""#,
            self.rng.below(3),
            self.rng.below(4),
            self.rng.below(5000),
        );
        let mut n = 1;
        let _ = writeln!(out, r#"{{"type":"impression","ts":{ts_ms},{common}}}"#);
        if self.rng.chance(85) {
            let pct = self.rng.below(101);
            let ms =
                if self.rng.chance(60) { 500 + self.rng.below(6000) } else { self.rng.below(1500) };
            let _ = writeln!(
                out,
                r#"{{"type":"viewability","ts":{},{common},"ad_format":"{}","ad_size":"{size}","in_view_pct":{pct},"in_view_ms":{ms}}}"#,
                ts_ms + 1 + self.rng.below(900) as i64,
                if video { "video" } else { "display" },
            );
            n += 1;
        }
        if self.rng.below(1000) < 4 {
            let _ = writeln!(
                out,
                r#"{{"type":"click","ts":{},{common}}}"#,
                ts_ms + 2 + self.rng.below(900) as i64
            );
            n += 1;
        }
        n
    }

    /// NDJSON for about `n` events spread evenly over `[from_ms, to_ms)` in time order (as
    /// traffic arrives); returns it and the number of events.
    pub fn batch(&mut self, n: u64, from_ms: i64, to_ms: i64) -> (Vec<u8>, u64) {
        let mut out = Vec::with_capacity(n as usize * 600);
        let mut count = 0;
        let span = (to_ms - from_ms).max(1) as i128;
        while count < n {
            let ts = from_ms + (span * count as i128 / n as i128) as i64;
            count += self.impression(ts, &mut out);
        }
        (out, count)
    }
}

/// Posts one NDJSON body to a collector (`host:port`); the answer's status and body.
pub fn post(addr: &str, body: &[u8]) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "POST /v1/events HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}
