//! A private PostgreSQL server for tests that need what the machine's shared one does not
//! give: `wal_level = logical` (change data capture) and a server the test can stop,
//! restart or kill. Each [`PgServer`] is a fresh cluster (`initdb`) in a temporary
//! directory on a free port, removed when dropped.
//!
//! `initdb` refuses to run as root, so as root the cluster belongs to the `postgres`
//! user (made by the Debian package) and every server command runs as that user.
//! `scripts/test` installs the server binaries when a machine lacks them.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A PostgreSQL cluster of the test's own.
pub struct PgServer {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
    running: bool,
}

/// The directory of `initdb`, `pg_ctl` and `psql`: the newest installed version.
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (scripts/test installs them)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| p.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
    versions.pop().expect("an installed PostgreSQL with initdb")
}

fn as_root() -> bool {
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl PgServer {
    /// Makes a cluster with `wal_level = logical` and starts it.
    pub fn start() -> PgServer {
        let bin = bin_dir();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let server = PgServer { port, bin, dir, running: false };
        if as_root() {
            let status = Command::new("chown").arg("-R").arg("postgres:postgres").arg(server.dir.path()).status();
            assert!(status.unwrap().success(), "chown of the cluster directory");
        }
        let out = server.command("initdb", &["-D", &server.data(), "-U", "postgres", "-A", "trust", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n\
             fsync = off\nfull_page_writes = off\nshared_buffers = 64MB\nlog_min_messages = warning\n",
            server.dir.path().display()
        );
        let conf_path = Path::new(&server.data()).join("postgresql.auto.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap_or_default();
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing).unwrap();
        let mut server = server;
        server.start_again();
        server
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs one of the server's binaries (as `postgres` when this process is root).
    fn command(&self, program: &str, args: &[&str]) -> Output {
        let path = self.bin.join(program);
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        cmd.args(args).output().unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Starts the server (again) and waits until it takes connections.
    pub fn start_again(&mut self) {
        let log = self.dir.path().join("server.log").display().to_string();
        let out = self.command("pg_ctl", &["-D", &self.data(), "-l", &log, "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        self.running = true;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.try_psql("select 1").is_err() {
            assert!(Instant::now() < deadline, "the server did not take connections");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown: clients are disconnected, nothing is lost).
    pub fn stop(&mut self) {
        let out = self.command("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
    }

    /// Kills the server the hard way (`immediate`: no shutdown checkpoint; crash
    /// recovery at the next start).
    pub fn crash(&mut self) {
        let out = self.command("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop -m immediate: {}", String::from_utf8_lossy(&out.stderr));
        self.running = false;
    }

    /// A connection URL for database `postgres` as user `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with psql; returns its unaligned, tuples-only output, or psql's error.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres"])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// Runs SQL with psql, panicking on an error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| panic!("psql {sql}: {e}"))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self.command("pg_ctl", &["-D", &self.data(), "-m", "immediate", "stop"]);
        }
    }
}
