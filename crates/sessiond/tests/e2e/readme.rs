//! The README's walk-through, run as printed against a real server.

use std::process::Command;

use crate::harness::Server;

fn walkthrough() -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find("<!-- walkthrough:start -->")
        .expect("walk-through start marker");
    let end = readme
        .find("<!-- walkthrough:end -->")
        .expect("walk-through end marker");
    let section = &readme[start..end];
    let mut script = String::new();
    let mut inside = false;
    for line in section.lines() {
        if line.starts_with("```") {
            inside = !inside;
            continue;
        }
        if inside {
            script.push_str(line);
            script.push('\n');
        }
    }
    assert!(script.contains("curl"), "the walk-through has commands");
    script
}

async fn the_readme_walkthrough_works_as_printed() {
    if Command::new("jq").arg("--version").output().is_err()
        || Command::new("curl").arg("--version").output().is_err()
    {
        panic!("the README walk-through needs curl and jq on PATH (.ci/run installs them)");
    }
    // The walk-through reads the generated key from ./sessiond-data/api-key, as after the quick start.
    let s = Server::start_without_key();
    let workdir = s.dir.parent().unwrap().to_owned();
    std::fs::rename(&s.dir, workdir.join("sessiond-data")).ok();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &walkthrough()])
        .current_dir(&workdir)
        .env("SESSIOND", &s.base)
        .env_remove("SESSIOND_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "walk-through failed:\n{stdout}\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("__Host-session=sdt_") && lines[0].contains("HttpOnly"),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"user\": \"u-42\"") && stdout.contains("\"device\": \"Firefox\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"revoked\": 1"), "{stdout}");
    assert_eq!(stdout.matches("session_revoked").count(), 2, "{stdout}");
    assert!(stdout.contains("Max-Age=0"), "{stdout}");
}

crate::on_every_store!(the_readme_walkthrough_works_as_printed,);
