//! House rules a machine can check (style.md): every Rust module opens with
//! a `//!` doc saying what it is for, and no test is ignored without a reason.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if path.is_dir() && name != "target" && !name.starts_with('.') {
            rust_files(&path, out);
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn workspace_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in [
        "src",
        "tests",
        "domain",
        "eventstore",
        "projections",
        "agents",
        "api",
    ] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} files", files.len());
    files
}

#[test]
fn every_module_opens_with_a_module_doc() {
    let missing: Vec<_> = workspace_files()
        .into_iter()
        .filter(|path| !std::fs::read_to_string(path).unwrap().starts_with("//!"))
        .collect();
    assert!(missing.is_empty(), "modules without a //! doc: {missing:?}");
}

#[test]
fn no_test_is_ignored_without_a_reason() {
    let bare = ["#[ignore]", "#[ignore ]"];
    let offenders: Vec<_> = workspace_files()
        .into_iter()
        .filter(|path| path.file_name().is_some_and(|n| n != "tidy.rs"))
        .filter(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            bare.iter().any(|b| text.contains(b))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "#[ignore] needs a reason (#[ignore = \"why\"]): {offenders:?}"
    );
}
