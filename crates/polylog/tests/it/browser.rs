//! The dashboard in headless Chromium: `polylog quickstart` runs with an API token, then
//! `tests/browser/dashboard.py` (Selenium over Debian's chromium and chromedriver) signs in and
//! checks every page: it loads, its key elements show the data the API answers, and its
//! interactions work (the change feed's filters, search, the reports' range, metric and
//! breakdown). Screenshots of every page are left in `target/screenshots/`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use polylog_testkit::TempDir;

use crate::{polylog, until_running};

/// The quickstart, stopped with SIGTERM (it then stops its Postgres) however the test ends.
struct Quickstart(Child);

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn every_dashboard_page_loads_shows_real_data_and_responds() {
    let d = TempDir::new("dashboard");
    let listen = format!("127.0.0.1:{}", polylog_testkit::free_port().expect("a free port"));
    let token = "dashboard-test-token";
    let mut child = polylog(d.path())
        .args(["quickstart", "--seconds", "600", "--listen", &listen])
        .env("POLYLOG_API_TOKEN", token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("quickstart");
    let stdout = child.stdout.take().expect("stdout");
    let _running = Quickstart(child);
    let printed = until_running(&mut BufReader::new(stdout).lines());
    assert!(printed.contains("3. Running"), "{printed}");
    assert!(printed.contains(&format!("http://{listen}/")), "the dashboard's address: {printed}");
    // Events take a few seconds to reach the rollup: the reports page needs some.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rollup_has_events(&listen, token) {
        assert!(Instant::now() < deadline, "the rollup never counted events");
        std::thread::sleep(Duration::from_millis(500));
    }
    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser/dashboard.py");
    let out = Command::new("python3")
        .arg(&script)
        .args([&format!("http://{listen}"), token])
        .arg(&shots)
        .output()
        .expect("python3 runs the browser test (scripts/test installs selenium and chromium)");
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    assert!(out.status.success(), "the dashboard failed a check:\n{text}");
    for page in ["pipelines", "changes", "search", "reports"] {
        let png = shots.join(format!("{page}.png"));
        let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{} is a screenshot ({size} bytes)", png.display());
    }
}

fn rollup_has_events(listen: &str, token: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(listen) else { return false };
    let req = format!(
        "GET /v1/status HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    let json: serde_json::Value =
        serde_json::from_str(body.split("\r\n\r\n").nth(1).unwrap_or("")).unwrap_or_default();
    json["rollups"]["viewability"]["events"].as_u64().unwrap_or(0) > 0
        && json["sources"]["demo"]["state"] == "streaming"
}
