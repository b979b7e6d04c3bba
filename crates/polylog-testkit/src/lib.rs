//! Throwaway Postgres clusters for Polylog's tests: a real server per test, never a mock.
//!
//! [`PgCluster::start`] runs `initdb` into a fresh temporary directory, configures it for
//! logical replication (`wal_level = logical`, replication slots and WAL senders), starts it on a
//! free port on 127.0.0.1, and stops and removes it when dropped. Run as root, it runs the
//! server as the `postgres` user (Postgres refuses to run as root). When the server binaries are
//! missing, it fails with the command that installs them: tests never skip silently.

pub mod videos;

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A fresh directory under the system's temp dir, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `polylog-<tag>-<pid>-<n>`; panics if it cannot (tests have nothing better to do).
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("polylog-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        if let Err(e) = std::fs::create_dir_all(&p) {
            panic!("cannot create {}: {e}", p.display());
        }
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Where Debian and Ubuntu install the Postgres 15 server binaries.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Overrides [`DEFAULT_PG_BIN`].
pub const PG_BIN_ENV: &str = "POLYLOG_PG_BIN";
const INSTALL_HINT: &str =
    "install them with `apt-get install -y postgresql` (Debian/Ubuntu), or set \
     POLYLOG_PG_BIN to the directory that holds initdb, pg_ctl and psql";
const START_ATTEMPTS: usize = 3;

/// What went wrong setting up or talking to a test cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestkitError(pub String);

impl fmt::Display for TestkitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for TestkitError {}

type Result<T> = std::result::Result<T, TestkitError>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(TestkitError(msg.into()))
}

/// Finds the Postgres server binaries: `dir` if given, else `$POLYLOG_PG_BIN`, else
/// [`DEFAULT_PG_BIN`]. The error says how to install them.
pub fn find_pg_bin(dir: Option<&Path>) -> Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => std::env::var_os(PG_BIN_ENV)
            .map_or_else(|| PathBuf::from(DEFAULT_PG_BIN), PathBuf::from),
    };
    let missing: Vec<&str> = ["initdb", "pg_ctl", "postgres", "psql"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        Ok(dir)
    } else {
        err(format!(
            "Postgres server binaries not found: {} missing in {}; {INSTALL_HINT}",
            missing.join(", "),
            dir.display()
        ))
    }
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

fn run(cmd: &mut Command, what: &str) -> Result<Output> {
    let out = cmd.output().map_err(|e| TestkitError(format!("{what}: cannot run {cmd:?}: {e}")))?;
    if !out.status.success() {
        return err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(out)
}

/// A CA, a server certificate for `localhost` it signs, and an unrelated CA.
fn make_certificates(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| TestkitError(e.to_string()))?;
    let openssl = |args: &[&str]| -> Result<()> {
        run(
            Command::new("openssl").args(args).current_dir(dir),
            "openssl (apt-get install -y openssl)",
        )
        .map(|_| ())
    };
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for ca in ["ca", "other-ca"] {
        let (key, crt, subj) =
            (format!("{ca}.key"), format!("{ca}.crt"), format!("/CN=polylog test {ca}"));
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", &key, "-out", &crt, "-days", "3", "-subj", &subj]);
        openssl(&args)?;
    }
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"]);
    openssl(&args)?;
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .map_err(|e| TestkitError(e.to_string()))?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "3",
        "-extfile",
        "ext.cnf",
    ])?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600))
        .map_err(|e| TestkitError(e.to_string()))
}

/// A TCP port on 127.0.0.1 that nothing listens on (at the moment of asking).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| TestkitError(format!("no free port: {e}")))?;
    l.local_addr().map(|a| a.port()).map_err(|e| TestkitError(e.to_string()))
}

/// A running throwaway Postgres cluster; stopped and deleted on drop.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
    running: bool,
    settings: String,
}

impl PgCluster {
    /// Starts a cluster with the binaries [`find_pg_bin`] finds.
    pub fn start() -> Result<PgCluster> {
        Self::start_with(find_pg_bin(None)?, "")
    }

    /// Starts a cluster whose `postgresql.conf` ends with `settings` (which override ours,
    /// e.g. `wal_level = replica`).
    pub fn start_with_settings(settings: &str) -> Result<PgCluster> {
        Self::start_inner(find_pg_bin(None)?, settings, false)
    }

    /// Starts a cluster that accepts TLS with a certificate for `localhost` signed by a
    /// throwaway CA ([`PgCluster::tls_ca`]); another CA that did not sign it is at
    /// [`PgCluster::tls_other_ca`]. Needs the `openssl` command.
    pub fn start_tls() -> Result<PgCluster> {
        Self::start_inner(find_pg_bin(None)?, "", true)
    }

    /// The CA certificate (PEM) that signed the server's certificate (with [`Self::start_tls`]).
    pub fn tls_ca(&self) -> PathBuf {
        self.root.join("tls").join("ca.crt")
    }

    /// A CA certificate that did not sign the server's.
    pub fn tls_other_ca(&self) -> PathBuf {
        self.root.join("tls").join("other-ca.crt")
    }

    /// Starts a cluster with the binaries in `bin`.
    pub fn start_with(bin: PathBuf, settings: &str) -> Result<PgCluster> {
        Self::start_inner(bin, settings, false)
    }

    fn start_inner(bin: PathBuf, settings: &str, tls: bool) -> Result<PgCluster> {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let root = std::env::temp_dir().join(format!("polylog-pg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)
            .map_err(|e| TestkitError(format!("creating {}: {e}", root.display())))?;
        let mut c = PgCluster {
            root,
            bin,
            port: 0,
            as_postgres: running_as_root(),
            running: false,
            settings: settings.to_string(),
        };
        if tls {
            let dir = c.root.join("tls");
            make_certificates(&dir)?;
            c.settings.push_str(&format!(
                "\nssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                dir.join("server.crt").display(),
                dir.join("server.key").display()
            ));
        }
        if c.as_postgres {
            run(
                Command::new("chown").arg("-R").arg("postgres:").arg(&c.root),
                "chown to the postgres user",
            )?;
        }
        let data = c.data_dir();
        c.server_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"])
            .output()
            .map_err(|e| TestkitError(format!("cannot run initdb: {e}")))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    err(format!("initdb failed: {}", String::from_utf8_lossy(&o.stderr)))
                }
            })?;
        let mut last = None;
        for _ in 0..START_ATTEMPTS {
            c.port = free_port()?;
            match c.configure_and_start() {
                Ok(()) => {
                    c.running = true;
                    return Ok(c);
                }
                // Another process may have taken the port between our probe and the bind.
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| TestkitError("the server did not start".into())))
    }

    /// `fsync = off` keeps tests fast and still survives a crash of the server process (the OS
    /// keeps its writes); commits stay synchronous, so a committed transaction is in the WAL
    /// before the client hears of it, which crash tests and logical decoding rely on.
    fn configure_and_start(&mut self) -> Result<()> {
        let conf = format!(
            "\n# polylog-testkit\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 32\nmax_wal_senders = 32\n\
             fsync = off\nfull_page_writes = off\n{}\n",
            self.port,
            self.root.display(),
            self.settings
        );
        std::fs::write(self.data_dir().join("polylog-testkit.conf"), conf)
            .map_err(|e| TestkitError(format!("writing the server config: {e}")))?;
        let main_conf = self.data_dir().join("postgresql.conf");
        let text = std::fs::read_to_string(&main_conf).map_err(|e| TestkitError(e.to_string()))?;
        if !text.contains("include 'polylog-testkit.conf'") {
            std::fs::write(&main_conf, format!("{text}\ninclude 'polylog-testkit.conf'\n"))
                .map_err(|e| TestkitError(e.to_string()))?;
        }
        self.pg_ctl_start()
    }

    fn pg_ctl_start(&self) -> Result<()> {
        let log = self.root.join("server.log");
        let out = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .output()
            .map_err(|e| TestkitError(format!("cannot run pg_ctl: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let server_log = std::fs::read_to_string(&log).unwrap_or_default();
        err(format!(
            "pg_ctl start failed: {}\nserver log:\n{server_log}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }

    /// A server binary run as the user that owns the cluster.
    fn server_cmd(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory of the server binaries in use (for `pg_recvlogical` and the like).
    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// A connection URL for `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL through `psql` and returns its unaligned, tuples-only output (`|` between
    /// columns, one row per line). Stops at the first error, which is returned.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let out = run(
            Command::new(self.bin.join("psql"))
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db, "-c", sql]),
            &format!("psql on {db}"),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_string())
    }

    /// Puts `lines` at the top of `pg_hba.conf` (so they win over the trust rules below) and
    /// reloads the configuration.
    pub fn prepend_hba(&self, lines: &str) -> Result<()> {
        let path = self.data_dir().join("pg_hba.conf");
        let old = std::fs::read_to_string(&path).map_err(|e| TestkitError(e.to_string()))?;
        std::fs::write(&path, format!("{lines}\n{old}"))
            .map_err(|e| TestkitError(e.to_string()))?;
        self.psql("postgres", "SELECT pg_reload_conf()").map(|_| ())
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) -> Result<()> {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\"")).map(|_| ())
    }

    /// Stops the server the way a crash does (`pg_ctl stop -m immediate`).
    pub fn crash(&mut self) -> Result<()> {
        self.stop_with("immediate")
    }

    /// Stops the server cleanly (`pg_ctl stop -m fast`): clients are told it is shutting down.
    pub fn stop(&mut self) -> Result<()> {
        self.stop_with("fast")
    }

    /// Starts a stopped server again on the same port.
    pub fn restart(&mut self) -> Result<()> {
        if !self.running {
            self.pg_ctl_start()?;
            self.running = true;
        }
        Ok(())
    }

    fn stop_with(&mut self, mode: &str) -> Result<()> {
        if self.running {
            run(
                self.server_cmd("pg_ctl")
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-m", mode, "-w", "stop"]),
                "pg_ctl stop",
            )?;
            self.running = false;
        }
        Ok(())
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.stop_with("immediate");
        // Give the postmaster's children a moment to exit before their files go.
        std::thread::sleep(Duration::from_millis(10));
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// SplitMix64: small, seeded, good enough to drive randomized tests reproducibly.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `POLYLOG_TEST_SEED` when set, else from the clock; the seed is printed so a
    /// failure can be replayed.
    pub fn from_env(test: &str) -> Rng {
        let seed = std::env::var("POLYLOG_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: POLYLOG_TEST_SEED={seed}");
        Rng(seed)
    }
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// Random bytes, fewer than `n` of them.
    pub fn bytes_below(&mut self, n: u64) -> Vec<u8> {
        let len = self.below(n) as usize;
        self.bytes(len)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A throwaway Kafka-protocol broker: `tansu` with in-memory storage on a free port
/// (`cargo install tansu --features dynostore`, done by `scripts/test`). Its binary is looked
/// up as `POLYLOG_TANSU`, then on `PATH`, then in `~/.cargo/bin`. Killed when dropped.
pub struct KafkaBroker {
    child: std::process::Child,
    port: u16,
}

impl KafkaBroker {
    pub fn start() -> Result<KafkaBroker> {
        let bin = std::env::var_os("POLYLOG_TANSU")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths).map(|d| d.join("tansu")).find(|p| p.is_file())
                })
            })
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|h| PathBuf::from(h).join(".cargo/bin/tansu"))
                    .filter(|p| p.is_file())
            });
        let Some(bin) = bin else {
            return err(
                "the Kafka tests need the tansu broker: cargo install tansu --features dynostore \
                 (scripts/test installs it)",
            );
        };
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| TestkitError(format!("cannot start {}: {e}", bin.display())))?;
        let mut broker = KafkaBroker { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = broker.child.try_wait() {
                return err(format!("tansu exited before listening: {status}"));
            }
            if std::time::Instant::now() > deadline {
                return err("tansu did not listen within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(broker)
    }

    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker (its in-memory topics are gone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads `n` records of `topic` from the beginning with the `confluent-kafka` Python client (a
/// standard Kafka client over a recent librdkafka; `pip install confluent-kafka`, done by
/// `scripts/test`): one JSON object per record, as text: `key`, `value` (UTF-8 strings or
/// null), `offset`, `partition`, `headers` (`[[name, value], ...]`).
pub fn confluent_read(brokers: &str, topic: &str, n: usize) -> Result<Vec<String>> {
    const SCRIPT: &str = r#"
import json, sys
from confluent_kafka import Consumer
brokers, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = Consumer({"bootstrap.servers": brokers, "group.id": "python-reader",
              "auto.offset.reset": "earliest", "enable.auto.commit": False})
c.subscribe([topic])
got = 0
import time
deadline = time.time() + 60
while got < n and time.time() < deadline:
    m = c.poll(1.0)
    if m is None:
        continue
    if m.error():
        raise SystemExit("consumer error: %s" % m.error())
    dec = lambda b: None if b is None else b.decode("utf-8", "backslashreplace")
    print(json.dumps({"key": dec(m.key()), "value": dec(m.value()), "offset": m.offset(),
                      "partition": m.partition(),
                      "headers": [[k, dec(v)] for k, v in (m.headers() or [])]}))
    got += 1
c.close()
"#;
    let out = Command::new("python3")
        .args(["-c", SCRIPT, brokers, topic, &n.to_string()])
        .output()
        .map_err(|e| TestkitError(format!("python3: {e}")))?;
    if !out.status.success() {
        return err(format!(
            "the confluent-kafka reader failed (pip install confluent-kafka): {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect())
}
