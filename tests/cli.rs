//! The admin CLI as a shell user meets it, without any host: output into a
//! pipe that is closed early (`ssh-spawner check | head -1`).

use std::io::Read;
use std::process::{Command, Stdio};

#[test]
fn output_into_a_closed_pipe_ends_the_cli_quietly_not_with_a_panic() {
    let dir = std::env::temp_dir().join(format!("ssh-spawner-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("spawner.toml");
    // Port 1 on loopback: every connection is refused at once.
    std::fs::write(
        &config,
        "known_hosts = \"/nonexistent\"\nkey_path = \"/nonexistent\"\nconnect_timeout = 2.0\n\
         [[hosts]]\naddress = \"127.0.0.1\"\nport = 1\nname = \"a\"\n\
         [[hosts]]\naddress = \"127.0.0.1\"\nport = 1\nname = \"b\"\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ssh-spawner"))
        .args([
            "--config",
            config.to_str().unwrap(),
            "check",
            "--user",
            "alice",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the CLI prints anything.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!stderr.contains("panicked"), "{stderr}");
    // 128 + SIGPIPE, as a shell tool killed by the signal reports it.
    assert_eq!(status.code(), Some(141), "{stderr}");
}
