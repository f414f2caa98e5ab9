//! `ops/backup.sh` and `ops/restore.sh` on real PostgreSQL: a backup of a
//! ledger with workflows on it, restored into a fresh database, verifies
//! against the digest signed before the backup; a restore into a database
//! that already holds a ledger is refused, and a dump that was altered is
//! refused before anything is restored.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use agentledger_eventstore::testing::{connect, with_database, TestDatabase};
use agentledger_eventstore::EventStore;

const OPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ops");

fn script(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(Path::new(OPS).join(name))
        .args(args)
        .env("AGENTLEDGER_BIN", env!("CARGO_BIN_EXE_agentledger"))
        .env("RUST_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("AGENTLEDGER_ADMIN_DATABASE_URL");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("bash runs")
}

fn said(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backup_restored_into_a_fresh_database_verifies_against_its_digest() {
    let db = TestDatabase::create().await;
    let store = db.store().await;
    let ids = common::complete_workflows(
        &store,
        &[
            "Summarise the attached quarterly report. Then count the words of the summary.",
            "다음 글을 요약해 주세요. 그다음 단어 수를 세어 주세요.",
        ],
    )
    .await;
    let head = store.head_position().await.unwrap();
    assert!(head > 0 && ids.len() == 2);

    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("backup-{}", uuid::Uuid::new_v4().simple()));
    let backup = script(
        "backup.sh",
        &[dir.to_str().unwrap()],
        &[("AGENTLEDGER_ADMIN_DATABASE_URL", db.admin_url())],
    );
    assert!(backup.status.success(), "{}", said(&backup));
    let dump = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "dump"))
        .expect("a dump was written");
    for extension in ["digest.json", "sha256"] {
        let beside = dump.with_extension(extension);
        assert!(beside.exists(), "{} written", beside.display());
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&dump).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the dump is its owner's alone");
    }
    // Written after the backup: not in it, and not needed to verify it.
    common::complete_workflows(&store, &["Compute (17 * 23) + 4."]).await;

    let server = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let admin = connect(db.admin_url()).await;
    let fresh = format!("{}_restored", db.name());
    admin
        .batch_execute(&format!("CREATE DATABASE {fresh}"))
        .await
        .unwrap();
    let fresh_url = with_database(&server, &fresh, None);
    // The key kept apart from the system: here, the one the digest names
    // (an operator compares it with their own copy).
    let digest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dump.with_extension("digest.json")).unwrap())
            .unwrap();
    let public_key = digest["public_key"].as_str().unwrap().to_string();
    let restore = script(
        "restore.sh",
        &[dump.to_str().unwrap(), &fresh_url],
        &[("AGENTLEDGER_PUBLIC_KEY", &public_key)],
    );
    let restored_said = said(&restore);
    assert!(restore.status.success(), "{restored_said}");
    assert!(
        restored_said.contains(": ok, the") && restored_said.contains("are unchanged since"),
        "verify --digest passed: {restored_said}"
    );
    let restored = connect(&fresh_url).await;
    let count: i64 = restored
        .query_one("SELECT count(*) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as u64, head, "every event up to the backup, no more");
    // The service role works on the restored database as on the original:
    // it reads through its grants and owns subject_keys.
    let service = connect(&with_database(&server, &fresh, Some("agentledger_service"))).await;
    for table in ["events", "subject_keys", "workflow_status", "api_keys"] {
        service
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("the service role reads {table}: {e}"));
    }
    let owner: String = restored
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE tablename = 'subject_keys'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, "agentledger_service");
    drop(service);

    // A second restore into it is refused, and changes nothing.
    let again = script("restore.sh", &[dump.to_str().unwrap(), &fresh_url], &[]);
    assert!(!again.status.success());
    assert!(
        said(&again).contains("already holds a ledger"),
        "{}",
        said(&again)
    );

    // Checked against another key, the digest does not hold.
    let wrong = format!("{}_wrongkey", db.name());
    admin
        .batch_execute(&format!("CREATE DATABASE {wrong}"))
        .await
        .unwrap();
    let wrong_url = with_database(&server, &wrong, None);
    let stranger = "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c";
    let refused = script(
        "restore.sh",
        &[dump.to_str().unwrap(), &wrong_url],
        &[("AGENTLEDGER_PUBLIC_KEY", stranger)],
    );
    assert!(!refused.status.success(), "{}", said(&refused));

    // Without its sums and digest, a dump is not restored unless asked.
    let bare_dir = dir.join("bare");
    std::fs::create_dir_all(&bare_dir).unwrap();
    let bare = bare_dir.join(dump.file_name().unwrap());
    std::fs::copy(&dump, &bare).unwrap();
    let refused = script("restore.sh", &[bare.to_str().unwrap(), &wrong_url], &[]);
    assert!(!refused.status.success());
    assert!(
        said(&refused).contains("cannot be checked"),
        "{}",
        said(&refused)
    );

    // An altered dump is refused before anything is restored.
    let bytes = std::fs::read(&dump).unwrap();
    let mut altered = bytes.clone();
    let middle = altered.len() / 2;
    altered[middle] ^= 0xff;
    std::fs::write(&dump, &altered).unwrap();
    let other = format!("{}_altered", db.name());
    admin
        .batch_execute(&format!("CREATE DATABASE {other}"))
        .await
        .unwrap();
    let other_url = with_database(&server, &other, None);
    let refused = script("restore.sh", &[dump.to_str().unwrap(), &other_url], &[]);
    assert!(!refused.status.success(), "{}", said(&refused));
    let empty: bool = connect(&other_url)
        .await
        .query_one("SELECT to_regclass('public.events') IS NULL", &[])
        .await
        .unwrap()
        .get(0);
    assert!(empty, "nothing restored from an altered dump");

    drop(restored);
    for name in [&fresh, &other, &wrong] {
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
