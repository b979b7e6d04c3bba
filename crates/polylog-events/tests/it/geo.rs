//! Country lookup against MaxMind DB files written here by a small writer of the format
//! (record sizes 24, 28 and 32, IPv6 trees with IPv4 inside, and an IPv4-only tree), and
//! damaged files: no country, no crash.

use std::net::IpAddr;

use polylog_events::geo::GeoDb;

/// Encodes a control byte and size for `kind` (extended types above 7).
fn head(out: &mut Vec<u8>, kind: u8, size: usize) {
    let small = |s: usize| {
        if s < 29 {
            s as u8
        } else if s < 285 {
            29
        } else {
            30
        }
    };
    if kind <= 7 {
        out.push(kind << 5 | small(size));
    } else {
        out.push(small(size));
        out.push(kind - 7);
    }
    if (29..285).contains(&size) {
        out.push((size - 29) as u8);
    } else if size >= 285 {
        out.extend_from_slice(&((size - 285) as u16).to_be_bytes());
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    head(out, 2, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn uint(out: &mut Vec<u8>, kind: u8, v: u64) {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take_while(|&&b| b == 0).count();
    head(out, kind, 8 - skip);
    out.extend_from_slice(&bytes[skip..]);
}

/// A record as GeoIP2 Country has it, with a pointer to a shared continent map.
fn country_record(out: &mut Vec<u8>, iso: &str, registered_only: bool, continent_at: usize) {
    head(out, 7, 2);
    string(out, if registered_only { "registered_country" } else { "country" });
    head(out, 7, 2);
    string(out, "iso_code");
    string(out, iso);
    string(out, "names");
    head(out, 7, 1);
    string(out, "en");
    string(out, &format!("Country {iso} with a name long enough to need a longer size byte ...."));
    string(out, "continent");
    // A pointer (size bits 0) to the continent map at `continent_at` of the data section.
    out.push(1 << 5 | ((continent_at >> 8) as u8 & 7));
    out.push(continent_at as u8);
}

/// Writes a database mapping networks (address, prefix length, ISO code) to countries.
fn write(networks: &[(&str, u32, &str)], record_size: usize, ipv6: bool) -> Vec<u8> {
    #[derive(Clone, Copy)]
    enum Rec {
        Empty,
        Node(usize),
        Data(usize),
    }
    let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty; 2]];
    let mut data = Vec::new();
    // The shared continent map first: pointers reach it.
    let continent_at = data.len();
    head(&mut data, 7, 1);
    string(&mut data, "code");
    string(&mut data, "EU");
    for (i, (addr, len, iso)) in networks.iter().enumerate() {
        let at = data.len();
        country_record(&mut data, iso, i % 2 == 1, continent_at);
        let ip: IpAddr = addr.parse().expect("address");
        let bits: u128 = match ip {
            IpAddr::V4(v) if ipv6 => u32::from(v) as u128,
            IpAddr::V4(v) => (u32::from(v) as u128) << 96,
            IpAddr::V6(v) => u128::from(v),
        };
        let len = if matches!(ip, IpAddr::V4(_)) && ipv6 { len + 96 } else { *len };
        let mut node = 0;
        for d in 0..len {
            let bit = (bits >> (127 - d) & 1) as usize;
            if d + 1 == len {
                nodes[node][bit] = Rec::Data(at);
            } else {
                node = match nodes[node][bit] {
                    Rec::Node(n) => n,
                    _ => {
                        nodes.push([Rec::Empty; 2]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Rec::Node(n);
                        n
                    }
                };
            }
        }
    }
    let n = nodes.len();
    let value = |r: Rec| match r {
        Rec::Empty => n,
        Rec::Node(i) => i,
        Rec::Data(off) => n + 16 + off,
    };
    let mut out = Vec::new();
    for [l, r] in nodes {
        let (l, r) = (value(l) as u64, value(r) as u64);
        match record_size {
            24 => {
                out.extend_from_slice(&l.to_be_bytes()[5..]);
                out.extend_from_slice(&r.to_be_bytes()[5..]);
            }
            28 => {
                out.extend_from_slice(&l.to_be_bytes()[5..]);
                out.push(((l >> 24) as u8 & 0x0f) << 4 | ((r >> 24) as u8 & 0x0f));
                out.extend_from_slice(&r.to_be_bytes()[5..]);
            }
            _ => {
                out.extend_from_slice(&l.to_be_bytes()[4..]);
                out.extend_from_slice(&r.to_be_bytes()[4..]);
            }
        }
    }
    out.extend_from_slice(&[0; 16]);
    out.extend_from_slice(&data);
    out.extend_from_slice(b"\xAB\xCD\xEFMaxMind.com");
    head(&mut out, 7, 7);
    string(&mut out, "node_count");
    uint(&mut out, 6, n as u64);
    string(&mut out, "record_size");
    uint(&mut out, 5, record_size as u64);
    string(&mut out, "ip_version");
    uint(&mut out, 5, if ipv6 { 6 } else { 4 });
    string(&mut out, "database_type");
    string(&mut out, "Polylog-Test-Country");
    string(&mut out, "binary_format_major_version");
    uint(&mut out, 5, 2);
    string(&mut out, "build_epoch");
    uint(&mut out, 9, 1_795_000_000);
    string(&mut out, "languages");
    head(&mut out, 11, 1);
    string(&mut out, "en");
    out
}

const NETWORKS: &[(&str, u32, &str)] = &[
    ("192.0.2.0", 24, "FR"),
    ("198.51.100.128", 25, "DE"),
    ("203.0.113.7", 32, "JP"),
    ("2001:db8:1::", 48, "US"),
    ("2001:db8:ff00::", 40, "BR"),
];

#[test]
fn countries_are_found_in_every_record_size_and_tree() {
    for record_size in [24, 28, 32] {
        let db = GeoDb::from_bytes(write(NETWORKS, record_size, true)).expect("opens");
        let c = |ip: &str| db.country(ip.parse().expect("ip"));
        assert_eq!(c("192.0.2.77").as_deref(), Some("FR"), "{record_size}");
        assert_eq!(c("198.51.100.200").as_deref(), Some("DE"));
        assert_eq!(c("198.51.100.127"), None);
        assert_eq!(c("203.0.113.7").as_deref(), Some("JP"));
        assert_eq!(c("203.0.113.8"), None);
        assert_eq!(c("2001:db8:1:abcd::1").as_deref(), Some("US"));
        assert_eq!(c("2001:db8:ff12::9").as_deref(), Some("BR"));
        assert_eq!(c("2001:db8:2::1"), None);
        assert_eq!(c("10.0.0.1"), None);
        // The pointer to the shared map is followed.
        let r = db.lookup("192.0.2.1".parse().expect("ip")).expect("record");
        assert!(format!("{r:?}").contains("\"EU\""), "{r:?}");
    }
    let v4 = GeoDb::from_bytes(write(&NETWORKS[..3], 24, false)).expect("IPv4 tree");
    assert_eq!(v4.country("192.0.2.9".parse().expect("ip")).as_deref(), Some("FR"));
    assert_eq!(v4.country("2001:db8:1::1".parse().expect("ip")), None);
}

#[test]
fn damaged_files_give_an_error_or_no_country_never_a_crash() {
    assert!(GeoDb::from_bytes(b"not a database".to_vec())
        .expect_err("refused")
        .contains("not a MaxMind DB"));
    let good = write(NETWORKS, 24, true);
    for cut in [0, 10, good.len() / 2, good.len() - 5] {
        let _ = GeoDb::from_bytes(good[..cut].to_vec());
    }
    let mut rng = polylog_testkit::Rng::from_env("geo_flips");
    let ips: Vec<IpAddr> =
        ["192.0.2.77", "198.51.100.200", "203.0.113.7", "2001:db8:1::1", "8.8.8.8"]
            .map(|i| i.parse().expect("ip"))
            .to_vec();
    for _ in 0..3_000 {
        let mut bad = good.clone();
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(bad.len() as u64) as usize;
            bad[i] ^= 1 << rng.below(8);
        }
        if let Ok(db) = GeoDb::from_bytes(bad) {
            for ip in &ips {
                let _ = db.country(*ip);
            }
        }
    }
}

#[test]
fn the_collector_stores_the_country_of_the_address_it_then_cuts() {
    use polylog_log::Log;
    let dir = polylog_testkit::TempDir::new("geo-collector");
    let log: std::sync::Arc<dyn Log> = std::sync::Arc::new(
        polylog_log::EmbeddedLog::open(dir.path().join("log"), polylog_log::LogOptions::default())
            .expect("log"),
    );
    let mut opts = polylog_events::CollectorOptions::new("events");
    opts.geo = Some(std::sync::Arc::new(GeoDb::from_bytes(write(NETWORKS, 28, true)).expect("db")));
    let c =
        polylog_events::Collector::new(opts, std::sync::Arc::clone(&log), &dir.path().join("keys"))
            .expect("collector");
    let now = polylog_log::now_ms();
    let body: String = ["192.0.2.77", "2001:db8:1::5", "8.8.8.8"]
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "{{\"type\":\"impression\",\"ts\":{now},\"impression_id\":\"i{i}\",\"campaign_id\":\"c\",\"site_domain\":\"example.com\",\"ip\":\"{ip}\"}}\n"
            )
        })
        .collect();
    assert_eq!(c.ingest(body.as_bytes(), false, now).status, 200);
    let mut countries = Vec::new();
    for p in 0..log.describe_topic("events").expect("topic").partitions.len() as u32 {
        let mut r = log.reader("events", p, polylog_log::StartAt::Beginning).expect("reader");
        for rec in r.poll(100, std::time::Duration::ZERO).expect("poll") {
            let e: polylog_events::Event =
                serde_json::from_slice(&rec.value.expect("value")).expect("event");
            countries.push((e.ip_prefix.expect("prefix"), e.country));
        }
    }
    countries.sort();
    assert_eq!(
        countries,
        vec![
            ("192.0.2.0/24".to_string(), Some("FR".to_string())),
            ("2001:db8:1::/48".to_string(), Some("US".to_string())),
            ("8.8.8.0/24".to_string(), None),
        ]
    );
}
