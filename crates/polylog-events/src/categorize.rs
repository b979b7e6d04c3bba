//! Categorization: device class and browser from the user agent, bots and crawlers flagged as
//! invalid traffic, site category from a configured domain map.
//!
//! User agents are parsed by the `woothee` crate (Project Woothee's shared dataset of
//! browsers, operating systems and crawlers), refined by our own rules where it says too
//! little for ad measurement: connected TVs, tablets (woothee calls them smartphones), and
//! bots it does not know (headless browsers, HTTP libraries, monitors).

use std::collections::BTreeMap;

/// What a user agent says: device class, browser, invalid traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agent {
    /// `desktop`, `mobile`, `tablet`, `ctv`, `bot` or `unknown`.
    pub device: &'static str,
    pub browser: &'static str,
    pub invalid: bool,
}

const BOTS: &[&str] = &[
    "bot",
    "crawler",
    "spider",
    "slurp",
    "headlesschrome",
    "phantomjs",
    "python-requests",
    "python-urllib",
    "curl/",
    "wget/",
    "go-http-client",
    "java/",
    "okhttp",
    "libwww",
    "httpclient",
    "facebookexternalhit",
    "preview",
    "lighthouse",
    "pingdom",
    "uptime",
    "monitor",
    "scrapy",
];

pub fn user_agent(ua: Option<&str>) -> Agent {
    let Some(ua) = ua.filter(|u| !u.trim().is_empty()) else {
        // No user agent at all is not a browser.
        return Agent { device: "unknown", browser: "unknown", invalid: true };
    };
    let u = ua.to_ascii_lowercase();
    let parsed = woothee::parser::Parser::new().parse(ua);
    let category = parsed.as_ref().map_or("UNKNOWN", |p| p.category);
    if category == "crawler" || BOTS.iter().any(|b| u.contains(b)) {
        return Agent { device: "bot", browser: "bot", invalid: true };
    }
    let device = if [
        "smart-tv", "smarttv", "appletv", "roku", "crkey", "tizen", "webos", "bravia", "aft",
        "hbbtv",
    ]
    .iter()
    .any(|t| u.contains(t))
    {
        "ctv"
    } else if u.contains("ipad")
        || (u.contains("android") && !u.contains("mobile"))
        || u.contains("tablet")
    {
        "tablet"
    } else if category == "appliance" {
        "ctv"
    } else if category == "smartphone" || category == "mobilephone" {
        "mobile"
    } else if category == "pc" {
        "desktop"
    } else if u.contains("mobile") || u.contains("iphone") || u.contains("android") {
        "mobile"
    } else if u.contains("windows")
        || u.contains("macintosh")
        || u.contains("x11")
        || u.contains("cros")
    {
        "desktop"
    } else {
        "unknown"
    };
    // Woothee's browser name when it knows one we report, else our rules.
    let known = [
        "Chrome",
        "Safari",
        "Firefox",
        "Edge",
        "Opera",
        "Internet Explorer",
        "Vivaldi",
        "Yandex Browser",
    ];
    let named = parsed.as_ref().and_then(|p| known.iter().find(|k| **k == p.name).copied());
    let browser = if let Some(name) = named {
        name
    } else if u.contains("edg/") || u.contains("edge/") {
        "Edge"
    } else if u.contains("opr/") || u.contains("opera") {
        "Opera"
    } else if u.contains("samsungbrowser") {
        "Samsung Internet"
    } else if u.contains("firefox/") || u.contains("fxios") {
        "Firefox"
    } else if u.contains("chrome/") || u.contains("crios") {
        "Chrome"
    } else if u.contains("safari/") {
        "Safari"
    } else {
        "other"
    };
    Agent { device, browser, invalid: false }
}

/// The category of a site from a map of domains (a domain matches itself and its
/// subdomains; the longest match wins).
pub fn site_category(map: &BTreeMap<String, String>, domain: &str) -> Option<String> {
    let d = domain.trim_end_matches('.').to_ascii_lowercase();
    map.iter()
        .filter(|(k, _)| d == **k || d.ends_with(&format!(".{k}")))
        .max_by_key(|(k, _)| k.len())
        .map(|(_, v)| v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_and_sites() {
        let chrome = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 Safari/537.36";
        assert_eq!(
            user_agent(Some(chrome)),
            Agent { device: "desktop", browser: "Chrome", invalid: false }
        );
        let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.0 Mobile/15E148 Safari/604.1";
        assert_eq!(user_agent(Some(iphone)).device, "mobile");
        assert_eq!(user_agent(Some(iphone)).browser, "Safari");
        let ipad = "Mozilla/5.0 (iPad; CPU OS 16_0 like Mac OS X) AppleWebKit/605.1.15 Version/16.0 Safari/604.1";
        assert_eq!(user_agent(Some(ipad)).device, "tablet");
        assert_eq!(user_agent(Some("Roku/DVP-9.10 (519.10E04111A)")).device, "ctv");
        let bot = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";
        assert!(user_agent(Some(bot)).invalid);
        assert!(user_agent(Some("Mozilla/5.0 HeadlessChrome/119.0")).invalid);
        assert!(user_agent(None).invalid);
        // What the parser crate knows beyond our rules: a crawler without bot in its name,
        // and a browser built on Chrome.
        assert!(user_agent(Some("Mediapartners-Google")).invalid);
        let vivaldi = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36 Vivaldi/6.5.3206.48";
        assert_eq!(user_agent(Some(vivaldi)).browser, "Vivaldi");
        let nintendo = "Mozilla/5.0 (Nintendo WiiU) AppleWebKit/536.30 (KHTML, like Gecko) NX/3.0.4.2.12 NintendoBrowser/4.3.1.11264.US";
        assert_eq!(user_agent(Some(nintendo)).device, "ctv");
        let map: BTreeMap<String, String> =
            [("example.com", "news"), ("sport.example.com", "sports")]
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .into();
        assert_eq!(site_category(&map, "www.example.com").as_deref(), Some("news"));
        assert_eq!(site_category(&map, "live.sport.example.com").as_deref(), Some("sports"));
        assert_eq!(site_category(&map, "notexample.com"), None);
    }
}
