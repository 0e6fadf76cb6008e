//! Everything that reads untrusted text (state from the hub database, what a
//! host prints, known_hosts files, user names from the hub) must answer with a
//! value or a clear error on any input, never a panic in the hub process.

use proptest::prelude::*;
use std::collections::BTreeSet;

use ssh_spawner::config::{check_username, fill, parse_size};
use ssh_spawner::plan::gpus::{self, GpuFacts};
use ssh_spawner::plan::hosts::{parse_facts, parse_list};
use ssh_spawner::plan::ports::listening_ports;
use ssh_spawner::plan::state;
use ssh_spawner::ssh::known_hosts;

/// Text that looks like what these parsers expect, with garbage mixed in.
fn near_miss() -> impl Strategy<Value = String> {
    let pieces = prop::sample::select(vec![
        "{",
        "}",
        "\"",
        ":",
        ",",
        "[",
        "]",
        "=",
        "\n",
        " ",
        "\t",
        "\0",
        "0A",
        "00000000:4E21",
        "pid",
        "version",
        "run_id",
        "dir",
        "home=/h",
        "uid=",
        "cpus=",
        "load1=",
        "servers=",
        "mem_available_kb=",
        "--- proc-net-tcp",
        "ssh-spawner-run:",
        "ssh-ed25519",
        "|1|",
        "@revoked",
        "-1",
        "18446744073709551616",
        "18014398509481984",
        "1e309",
        "NaN",
        "é",
        "\u{202e}",
        "/",
        "..",
        "~/",
    ]);
    prop::collection::vec(
        prop_oneof![pieces.prop_map(String::from), any::<String>()],
        0..40,
    )
    .prop_map(|v| v.concat())
}

/// Lines of `key=value` as the facts script prints them, with nasty values.
fn report_lines() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "hostname",
        "home",
        "uid",
        "mem_total_kb",
        "mem_available_kb",
        "cpus",
        "load1",
        "boot_id",
        "servers",
        "systemd_user",
        "prlimit",
        "command",
        "nvidia_smi",
        "nvidia_smi_said",
        "gpu",
        "gpu_app",
        "other",
    ]);
    let values = prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "/home/u",
            "-1",
            "18014398509481984",
            "18446744073709551615",
            "4294967296",
            "1e309",
            "NaN",
            "inf",
            "",
            "yes",
            " 2",
            "3.5",
            "ok",
            "none",
            "failed query-gpu 9",
            "failed query-compute-apps 124",
            "failed",
            "0, GPU-1a-2b, NVIDIA A100-SXM4-40GB, 40960, 4, 0",
            "1, GPU-1a-2b, X, [N/A], [Not Supported], [GPU is lost]",
            "GPU-1a-2b, 31337, 20480",
            "GPU-1a-2b, 1, [N/A]",
            "GPU-1a-2b,,",
            ",,,,,",
        ])
        .prop_map(String::from),
        any::<String>(),
    ];
    prop::collection::vec((keys, values), 0..16).prop_map(|kv| {
        kv.into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect::<String>()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn state_decoding_never_panics(text in prop_oneof![any::<String>(), near_miss()]) {
        if let Ok(s) = state::decode(&text) {
            // Whatever loads is valid and round-trips.
            prop_assert!(s.validate().is_ok());
            prop_assert_eq!(state::decode(&state::encode(&s).unwrap()).unwrap(), s);
        }
    }

    #[test]
    fn host_reports_never_panic(text in prop_oneof![any::<String>(), near_miss(), report_lines()]) {
        if let Ok(f) = parse_facts(&text) {
            prop_assert!(f.home.starts_with('/') && f.cpus > 0);
        }
        for l in parse_list(&text) {
            prop_assert!(!l.run_id.is_empty());
        }
        let _ = listening_ports(&text);
        // What `list` reads of the run directories: bounded, UUIDs only.
        let held = ssh_spawner::plan::holders::parse_run_gpus(&text);
        prop_assert!(held.by_run.len() <= ssh_spawner::plan::holders::MAX_RUNS);
        for uuids in held.by_run.values() {
            prop_assert!(uuids.len() <= ssh_spawner::plan::holders::MAX_GPUS_PER_RUN);
            prop_assert!(uuids.iter().all(|u| ssh_spawner::plan::gpus::valid_uuid(u)));
        }
    }

    #[test]
    fn gpu_reports_never_panic(
        text in prop_oneof![any::<String>(), near_miss(), report_lines()],
        n in 0usize..6,
        busy in prop_oneof![Just(0u64), Just(100), any::<u64>()],
    ) {
        let facts = match parse_facts(&text) {
            Ok(f) => f.gpus,
            Err(_) => gpus::from_facts(Some("ok"), &text, &text, &[]),
        };
        for g in facts.gpus() {
            // What a server may be given is a safe CUDA_VISIBLE_DEVICES word.
            prop_assert!(!g.uuid.is_empty());
            prop_assert!(g.uuid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
        }
        let held: BTreeSet<String> = facts.gpus().iter().take(1).map(|g| g.uuid.clone()).collect();
        if let GpuFacts::Ok(r) = &facts {
            let _ = gpus::gpu_uses(r, &held, busy);
        }
        if let Ok(chosen) = gpus::choose(&facts, &held, busy, n) {
            prop_assert_eq!(chosen.len(), n);
            prop_assert!(chosen.iter().all(|g| !held.contains(&g.uuid)));
            let _ = gpus::visible_devices(&chosen);
        }
        let _ = gpus::summary(&facts, &held, busy);
    }

    #[test]
    fn known_hosts_parsing_never_panics(text in prop_oneof![any::<String>(), near_miss()]) {
        let (entries, _skipped) = known_hosts::parse(&text);
        for e in entries {
            prop_assert!(e.line >= 1);
        }
    }

    #[test]
    fn names_and_sizes_never_panic(text in prop_oneof![any::<String>(), near_miss()]) {
        match check_username(&text) {
            // An accepted name fills a template without leaving the path or the shell.
            Ok(()) => {
                let filled = fill("/keys/{username}", &text).unwrap();
                prop_assert!(!filled["/keys/".len()..].contains(['/', ' ', '$', '`', ';', '\n', '\0']));
                prop_assert!(!text.starts_with('.') && !text.starts_with('-'));
            }
            Err(e) => prop_assert!(e.to_string().contains("user name")),
        }
        let _ = parse_size(&text);
    }
}
