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

impl Cluster {
    /// Creates and starts a server; `None`, with the reason printed, where
    /// this machine has no PostgreSQL server binaries.
    pub fn start() -> Option<Self> {
        let Some(bin) = server_binaries() else {
            println!("skipped: no PostgreSQL server binaries (initdb) under /usr/lib/postgresql");
            return None;
        };
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let dir = std::env::temp_dir().join(format!("al-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let cluster = Self {
            port: free_port(),
            dir,
            bin,
            run_as: root.then_some("postgres"),
        };
        if root {
            let owned = Command::new("chown")
                .arg("postgres:postgres")
                .arg(&cluster.dir)
                .status()
                .unwrap();
            assert!(owned.success(), "chown postgres {}", cluster.dir.display());
        }
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
        cluster.start_again();
        Some(cluster)
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
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c max_connections=200 -c shared_buffers=32MB",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "start",
                "-D",
                &self.data().to_string_lossy(),
                "-o",
                &options,
                "-l",
                &self.dir.join("server.log").to_string_lossy(),
                "-w",
            ],
        );
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
