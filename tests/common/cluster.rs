//! A PostgreSQL server of the test's own: `initdb` into a temporary
//! directory, listening on a free loopback port. For faults that would hurt
//! the other tests on the shared server: stopping it hard and starting it
//! again.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A private server, stopped and removed on drop.
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    /// `postgres` when the tests run as root (initdb refuses root).
    run_as: Option<&'static str>,
}

/// How a test wants its server: lines for `postgresql.conf`, and the whole
/// `pg_hba.conf` (default: trust on loopback).
#[derive(Default)]
pub struct Setup {
    pub conf: String,
    pub hba: Option<String>,
}

impl Cluster {
    /// Creates and starts a server; `None`, with the reason printed, where
    /// this machine has no PostgreSQL server binaries.
    pub fn start() -> Option<Self> {
        Self::start_with(|_| Setup::default())
    }

    /// [`Cluster::start`], after `setup` has written what it needs into the
    /// cluster's directory (certificates, say) and said how to configure it.
    pub fn start_with(setup: impl FnOnce(&Path) -> Setup) -> Option<Self> {
        let Some(bin) = server_binaries() else {
            println!("skipped: no PostgreSQL server binaries (initdb) under /usr/lib/postgresql");
            return None;
        };
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let dir = std::env::temp_dir().join(format!("al-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let cluster = Self {
            port: free_port(),
            dir,
            bin,
            run_as: root.then_some("postgres"),
        };
        let wanted = setup(&cluster.dir);
        cluster.own();
        cluster.run(
            "initdb",
            &[
                "-D",
                &cluster.data().to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        );
        let conf_path = cluster.data().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap();
        conf.push_str(&format!(
            "\nport = {}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 200\nshared_buffers = 32MB\n{}\n",
            cluster.port,
            cluster.dir.display(),
            wanted.conf
        ));
        std::fs::write(&conf_path, conf).unwrap();
        if let Some(hba) = wanted.hba {
            std::fs::write(cluster.data().join("pg_hba.conf"), hba).unwrap();
        }
        cluster.own();
        cluster.start_again();
        Some(cluster)
    }

    /// The cluster's directory (its data directory is `data/` in it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A superuser's connection string to its `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server the way a crash does (`-m immediate`: no
    /// checkpoint, every connection dropped; recovery runs at the next start).
    pub fn crash(&self) {
        self.run(
            "pg_ctl",
            &[
                "stop",
                "-D",
                &self.data().to_string_lossy(),
                "-m",
                "immediate",
                "-w",
            ],
        );
    }

    /// Starts it (again), waiting until it accepts connections.
    pub fn start_again(&self) {
        let log = self.dir.join("server.log");
        let started = self
            .command(&self.bin.join("pg_ctl"))
            .args(["start", "-w", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .output()
            .unwrap();
        assert!(
            started.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&started.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Hands the directory to the server's user, when it is not ours.
    fn own(&self) {
        if let Some(user) = self.run_as {
            let owned = Command::new("chown")
                .args(["-R", &format!("{user}:{user}")])
                .arg(&self.dir)
                .status()
                .unwrap();
            assert!(owned.success(), "chown {user} {}", self.dir.display());
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn command(&self, program: &Path) -> Command {
        match self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(program);
                c
            }
            None => Command::new(program),
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let program = self.bin.join(program);
        let out = self.command(&program).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command(&self.bin.join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(self.data())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest `/usr/lib/postgresql/N/bin` with an `initdb`.
fn server_binaries() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            Path::new(&bin.join("initdb"))
                .exists()
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A small file system mounted from a file (a loop device), for a disk
/// that fills up; unmounted and removed on drop. Needs root.
pub struct SmallDisk {
    image: PathBuf,
    pub mount: PathBuf,
}

impl SmallDisk {
    /// Mounts `megabytes` of ext4 owned by `postgres`; `None`, with the
    /// reason printed, where this machine cannot (not root, no loop devices).
    pub fn mount(megabytes: u64) -> Option<Self> {
        let base = std::env::temp_dir().join(format!("al-disk-{}", uuid::Uuid::new_v4().simple()));
        let disk = Self {
            image: base.with_extension("img"),
            mount: base,
        };
        let steps: [(&str, Vec<String>); 4] = [
            (
                "truncate",
                vec![
                    "-s".into(),
                    format!("{megabytes}M"),
                    disk.image.display().to_string(),
                ],
            ),
            (
                "mkfs.ext4",
                vec!["-q".into(), "-F".into(), disk.image.display().to_string()],
            ),
            ("mkdir", vec![disk.mount.display().to_string()]),
            (
                "mount",
                vec![
                    "-o".into(),
                    "loop".into(),
                    disk.image.display().to_string(),
                    disk.mount.display().to_string(),
                ],
            ),
        ];
        for (program, args) in steps {
            match Command::new(program).args(&args).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => {
                    println!(
                        "skipped: {program} {args:?} failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    return None;
                }
                Err(e) => {
                    println!("skipped: {program} cannot run: {e}");
                    return None;
                }
            }
        }
        let owned = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&disk.mount)
            .status()
            .unwrap();
        assert!(owned.success());
        Some(disk)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mount).output();
        let _ = std::fs::remove_dir(&self.mount);
        let _ = std::fs::remove_file(&self.image);
    }
}
