//! The README's walk-through, run as printed against a real server.

use std::process::Command;

use crate::harness::Server;

/// The shell of the README section between `<!-- NAME:start -->` and `<!-- NAME:end -->`.
fn section(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .expect("section start marker");
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .expect("section end marker");
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

/// Runs a README section as printed with bash against a fresh server whose generated key is in
/// ./sessiond-data/api-key, as after the quick start; asserts it succeeded and answers its
/// standard output and error.
fn run_section(name: &str) -> (String, String) {
    let s = Server::start_without_key();
    let workdir = s.dir.parent().unwrap().to_owned();
    std::fs::rename(&s.dir, workdir.join("sessiond-data")).ok();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &section(name)])
        .current_dir(&workdir)
        .env("SESSIOND", &s.base)
        .env_remove("SESSIOND_API_KEY")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "README section {name} failed:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

async fn the_readme_walkthrough_works_as_printed() {
    if Command::new("jq").arg("--version").output().is_err()
        || Command::new("curl").arg("--version").output().is_err()
    {
        panic!("the README walk-through needs curl and jq on PATH (.ci/run installs them)");
    }
    let (stdout, _) = run_section("walkthrough");
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

async fn the_readme_token_mode_example_works_as_printed() {
    let (stdout, stderr) = run_section("tokens");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            r#"{"access_token_ttl_s":300,"refresh_token":true,"refresh_reuse_grace_s":10,"issuer":"https://auth.example.com","audience":"api.example.com"}"#,
            "EdDSA",
            "u-7",
            "true"
        ],
        "{stderr}"
    );
}

async fn the_readme_events_example_works_as_printed() {
    let (stdout, stderr) = run_section("events");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            r#"["session.revoked","session.created","security.*"]"#,
            "session.revoked logout 198.51.100.23 -",
            "session.created - 198.51.100.23 true",
        ],
        "{stderr}"
    );
}

crate::on_every_store!(
    the_readme_walkthrough_works_as_printed,
    the_readme_token_mode_example_works_as_printed,
    the_readme_events_example_works_as_printed,
);
