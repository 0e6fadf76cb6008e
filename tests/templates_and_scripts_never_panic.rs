//! More untrusted text, fuzzed with proptest (bounded: it runs in every
//! `cargo test`): configuration templates filled with hub user names, states
//! from the database shaped like real ones but with hostile values (and the
//! scripts written from them), and what the launch, poll and stop scripts
//! print. Each answers with a value or a clear error, never a panic.

use proptest::prelude::*;
use serde_json::{json, Value};
use ssh_spawner::config::{check_username, fill, Config};
use ssh_spawner::plan::launch::{parse_launch, parse_launch_failure};
use ssh_spawner::plan::poll::{parse_poll, poll_script, Proc};
use ssh_spawner::plan::state;
use ssh_spawner::plan::stop::{parse_stop, stop_script};

/// A template: literal text with `{username}`, stray braces and other
/// placeholders mixed in.
fn template() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "{username}",
        "{",
        "}",
        "{user}",
        "{username",
        "username}",
        "{{username}}",
        "/home/",
        "/keys/",
        "$",
        "`",
        "'",
        "\"",
        " ",
        "\n",
        "\0",
        "é",
        "..",
    ]);
    prop::collection::vec(
        prop_oneof![pieces.prop_map(String::from), "[a-z./_-]{0,6}"],
        0..12,
    )
    .prop_map(|v| v.concat())
}

/// A hub user name: often valid, often just not.
fn username() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9._@+-]{0,20}",
        "[-.][a-z]{0,5}",
        any::<String>(),
        "[a-z]{60,70}",
        prop::sample::select(vec![
            "x$(id)",
            "x`id`",
            "a;id",
            "../../etc",
            "{username}",
            "ünï",
            "a b",
            "-oproxycommand=id",
        ])
        .prop_map(String::from),
    ]
}

/// A JSON value of any of the kinds a forged state could carry.
fn hostile_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(18446744073709551615u64)),
        Just(json!(-1)),
        Just(json!(0)),
        any::<String>().prop_map(Value::from),
        "[a-f0-9]{0,70}".prop_map(Value::from),
        "/[a-z/.]{0,30}".prop_map(Value::from),
        Just(json!("/home/tb-alice/.jupyterhub-ssh/0123456789abcdef")),
        Just(json!("/home/x/'; rm -rf / #/0123456789abcdef")),
        Just(json!([1, 2])),
        Just(json!({"a": 1})),
    ]
}

/// A state shaped like a real one, each field kept, dropped or replaced by a
/// hostile value.
fn forged_state() -> impl Strategy<Value = String> {
    let real = json!({
        "version": 1,
        "username": "tb-alice",
        "host": "node1",
        "address": "198.18.0.11",
        "ssh_port": 22,
        "remote_user": "tb-alice",
        "port": 20001,
        "run_id": "0123456789abcdef",
        "dir": "/home/tb-alice/.jupyterhub-ssh/0123456789abcdef",
        "pid": 4242,
        "pgid": 4241,
        "start_time": 123456,
        "uid": 1001,
        "boot_id": "0f0e0d0c-0b0a-0908-0706-050403020100",
        "enforcement": "none",
    });
    let keys: Vec<String> = real
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let n = keys.len();
    (
        prop::collection::vec(0u8..4, n),
        prop::collection::vec(hostile_value(), n),
    )
        .prop_map(move |(choice, values)| {
            let mut m = real.as_object().cloned().unwrap_or_default();
            for (i, k) in keys.iter().enumerate() {
                match choice[i] {
                    0 => {}
                    1 => {
                        m.remove(k);
                    }
                    _ => {
                        m.insert(k.clone(), values[i].clone());
                    }
                }
            }
            Value::Object(m).to_string()
        })
}

/// What the launch, poll and stop scripts print, and near misses of it.
fn script_output() -> impl Strategy<Value = String> {
    let lines = prop::sample::select(vec![
        "pid=4242",
        "pgid=4241",
        "start_time=123456",
        "uid=1001",
        "boot_id=0f0e0d0c-0b0a-0908-0706-050403020100",
        "pid=",
        "pid=-1",
        "pid=99999999999999999999",
        "start_time=1e9",
        "boot_id=../..",
        "exit_status=3",
        "exit_status=",
        "log-tail",
        "0123456789abcdef running",
        "0123456789abcdef exited 0",
        "0123456789abcdef exited 99999999999",
        "0123456789abcdef gone",
        "0123456789abcdef reused",
        "0123456789abcdef rebooted",
        "0123456789abcdef zombie",
        "0123456789abcdef weird",
        "killed",
        "killed escalated",
        "gone",
        "port-taken",
        "",
        "\0",
    ]);
    prop::collection::vec(
        prop_oneof![lines.prop_map(String::from), any::<String>()],
        0..16,
    )
    .prop_map(|v| v.join("\n"))
}

fn asked() -> Vec<Proc> {
    vec![Proc {
        run_id: "0123456789abcdef".into(),
        pid: 4242,
        pgid: 4241,
        start_time: 123456,
        uid: 1001,
        boot_id: "0f0e0d0c-0b0a-0908-0706-050403020100".into(),
        dir: "/home/tb-alice/.jupyterhub-ssh/0123456789abcdef".into(),
    }]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn template_filling_never_panics(t in template(), name in username()) {
        match fill(&t, &name) {
            Ok(filled) => {
                prop_assert!(check_username(&name).is_ok());
                // Every placeholder went, and only the name came in.
                let n = t.matches("{username}").count();
                prop_assert_eq!(filled.len(), t.len() + n * name.len() - n * "{username}".len());
            }
            Err(e) => {
                prop_assert!(check_username(&name).is_err());
                prop_assert!(e.to_string().contains("user name"), "{}", e);
            }
        }
    }

    #[test]
    fn configured_templates_never_panic(remote in template(), key in template(), name in username()) {
        let cfg = json!({
            "hosts": [{"address": "198.18.0.11"}],
            "remote_user": remote,
            "key_path": key,
        });
        let Ok(c) = Config::from_json(&cfg.to_string()) else {
            return Ok(());
        };
        match c.remote_user_for(&name) {
            Ok(user) => {
                prop_assert!(check_username(&name).is_ok());
                prop_assert!(!user.contains("{username}"), "{:?}", user);
                // What the hub logs in as is itself a safe name.
                prop_assert!(check_username(&user).is_ok(), "{:?}", user);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        let _ = c.identity_for(&name);
    }

    #[test]
    fn forged_states_decode_or_fail_and_their_scripts_never_panic(text in forged_state()) {
        let Ok(s) = state::decode(&text) else {
            return Ok(());
        };
        prop_assert!(s.validate().is_ok());
        if let Some(p) = s.proc() {
            let _ = poll_script(std::slice::from_ref(&p));
            let _ = stop_script(&p, 10, true);
        }
    }

    #[test]
    fn script_output_parsers_never_panic(text in script_output()) {
        if let Ok(l) = parse_launch(&text) {
            prop_assert!(l.pid > 0);
        }
        let _ = parse_launch_failure(&text);
        let _ = parse_stop(&text);
        if let Ok(v) = parse_poll(&text, &asked()) {
            prop_assert_eq!(v.len(), 1);
        }
    }
}
