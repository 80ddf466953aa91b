//! The command line itself, without a server: what a mistyped command exits with and says.

use std::process::{Command, Output, Stdio};

fn cohort(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(args)
        .env_remove("PREFECT_API_URL")
        .stdin(Stdio::null())
        .output()
        .expect("run cohort")
}

/// Bad flags are usage errors (64, as the README says, like bad settings), each with clap's
/// message naming what is wrong; help and version are not errors.
#[test]
fn bad_flags_exit_64_with_a_message() {
    let cases: [(&[&str], &str); 5] = [
        (
            &["worker", "start", "--pool", "p", "--no-such-flag"],
            "--no-such-flag",
        ),
        (&["worker", "start"], "--pool"),
        (
            &["worker", "start", "--pool", "p", "--limit", "many"],
            "many",
        ),
        (&["flow", "serve"], "ENTRYPOINT"),
        (&["no-such-command"], "no-such-command"),
    ];
    for (args, expect) in cases {
        let out = cohort(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in {stderr}"
        );
    }
    for args in [
        &["--help"][..],
        &["worker", "start", "--help"],
        &["--version"],
    ] {
        let out = cohort(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(!out.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}
