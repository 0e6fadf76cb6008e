//! A lab's `spawner.toml` (`fixtures/config`, the admin CLI's configuration
//! of the lab whose `jupyterhub_config.py` sits beside it), loaded with the
//! crate's own loader, `Config::from_toml_file`, as `ssh-spawner --config`
//! does. `tests/e2e/test_lab_config_fixture.py` checks that the JupyterHub
//! class sends the same options from the `jupyterhub_config.py`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ssh_spawner::config::{Config, HostConfig};
use ssh_spawner::plan::hosts::Strategy;
use ssh_spawner::plan::limits::EnforcementMode;
use ssh_spawner::plan::ports::PortRange;
use ssh_spawner::ssh::{HostKeyPolicy, Identity};

fn path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/config")
        .join(name)
}

fn lab() -> Config {
    Config::from_toml_file(&path("spawner.toml")).unwrap()
}

#[test]
fn the_labs_options_load_as_written() {
    let c = lab();
    assert_eq!(c.known_hosts, Path::new("/etc/jupyterhub/ssh/known_hosts"));
    assert_eq!(
        c.key_path.as_deref(),
        Some("/etc/jupyterhub/ssh/hub_ed25519")
    );
    assert_eq!(c.host_selection, Strategy::LeastLoaded);
    assert_eq!(
        c.port_range,
        PortRange {
            start: 21000,
            end: 21999
        }
    );
    assert_eq!(c.state_dir, "~/.jupyterhub-ssh");
    assert_eq!(c.prologue, ["source /opt/conda/bin/activate jupyter"]);
    assert_eq!(c.enforcement, EnforcementMode::Auto);
    assert_eq!(c.stop_grace, 15.0);
    assert!(c.keep_log);
    assert_eq!(c.connect_timeout, 5.0);
    assert_eq!(c.command_timeout, 60.0);
    assert_eq!(c.max_sessions_per_connection, 8);
    assert_eq!(
        c.command,
        ["/opt/conda/envs/jupyter/bin/jupyterhub-singleuser"]
    );
    let plain = |address: &str, max_servers, drain| HostConfig {
        address: address.into(),
        port: 22,
        name: None,
        max_servers,
        prologue: vec![],
        drain,
    };
    assert_eq!(
        c.hosts,
        [
            plain("node1.lab.example.org", None, false),
            plain("node2.lab.example.org", None, false),
            plain("node3.lab.example.org", Some(20), true),
            HostConfig {
                address: "10.0.0.13".into(),
                port: 2222,
                name: Some("gpu1".into()),
                max_servers: Some(4),
                prologue: vec!["module load cuda/12.2".into()],
                drain: false,
            },
        ]
    );
    assert_eq!(
        c.hosts.iter().map(|h| h.display_name()).collect::<Vec<_>>(),
        [
            "node1.lab.example.org",
            "node2.lab.example.org",
            "node3.lab.example.org",
            "gpu1"
        ]
    );
    assert_eq!(c.host("gpu1").map(|h| h.port), Some(2222));
}

#[test]
fn what_the_file_leaves_out_gets_the_defaults() {
    let c = lab();
    assert_eq!(c.remote_user, "{username}");
    assert_eq!(c.host_key_policy, HostKeyPolicy::Strict);
    assert_eq!(c.auth_timeout, 10.0);
    assert_eq!(c.ready_timeout, 60.0);
    assert_eq!(c.max_connections_per_host, 4);
    assert!(!c.tunnel && !c.hub_tunnel);
    assert_eq!(c.remote_user_for("alice").unwrap(), "alice");
    assert_eq!(
        c.identity_for("alice").unwrap(),
        Identity::KeyFile("/etc/jupyterhub/ssh/hub_ed25519".into())
    );
    let pool = c.pool_options();
    assert_eq!(pool.connect.connect_timeout, Duration::from_secs(5));
    assert_eq!(pool.connect.auth_timeout, Duration::from_secs(10));
    assert_eq!(pool.max_sessions_per_connection, 8);
    assert_eq!(pool.max_connections_per_target, 4);
}

#[test]
fn a_mistake_in_the_file_is_named() {
    // The lab's file with one typo'd key: refused, naming the key and file.
    let text = std::fs::read_to_string(path("spawner.toml"))
        .unwrap()
        .replace("stop_grace = ", "stop_grase = ");
    let dir = std::env::temp_dir().join(format!("fixtures-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("spawner.toml");
    std::fs::write(&bad, text).unwrap();
    let err = Config::from_toml_file(&bad).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(err.contains("stop_grase"), "{err}");
    assert!(err.contains(&bad.display().to_string()), "{err}");
}
