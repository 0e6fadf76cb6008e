//! The options form reads whatever a user sends (form fields, or any JSON
//! through the REST API): it answers with a choice or a clear error, never a
//! panic, and a choice it accepts always lies within the admin's bounds.

use proptest::prelude::*;
use std::collections::BTreeSet;

use ssh_spawner::plan::form::{self, Bounds, Fields, MIN_CPU, MIN_MEM};
use ssh_spawner::plan::gpus::{ComputeApp, Gpu, GpuFacts, GpuReport};

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        prop::sample::select(vec![
            "",
            " ",
            "auto",
            "AUTO",
            "node1",
            "node2",
            "node9",
            "2G",
            "8G",
            "9G",
            "64G",
            "1M",
            "128M",
            "127M",
            "1e400",
            "-1",
            "-1G",
            "NaN",
            "inf",
            "0",
            "0.1",
            "0.09",
            "4",
            "4.0001",
            "1.5",
            "1e-300",
            "18446744073709551615",
            "99999999999999999999T",
            "2g",
            "G",
            "..",
        ])
        .prop_map(str::to_string),
        (
            0u64..u64::MAX,
            prop::sample::select(vec!["", "K", "M", "G", "T", "X"])
        )
            .prop_map(|(n, u)| format!("{n}{u}")),
        any::<f64>().prop_map(|f| f.to_string()),
    ]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec!["host", "mem_limit", "cpu_limit", "gpus", "_xsrf"]).prop_map(str::to_string),
        1 => any::<String>(),
    ]
}

fn fields() -> impl Strategy<Value = Fields> {
    prop::collection::btree_map(key(), prop::collection::vec(value(), 0..3), 0..5)
}

fn bounds() -> impl Strategy<Value = Bounds> {
    (
        prop::collection::vec(
            prop::sample::select(vec!["node1", "node2", "gpu 1", "<x>"]),
            0..4,
        ),
        prop::option::of(0u64..(1 << 42)),
        prop::option::of(0.0f64..64.0),
        0u32..9,
    )
        .prop_map(|(hosts, mem, cpu, gpus)| Bounds {
            hosts: hosts.into_iter().map(str::to_string).collect(),
            mem_limit_max: mem,
            cpu_limit_max: cpu,
            mem_limit_default: mem.map(|m| m / 2),
            cpu_limit_default: cpu,
            gpus_max: gpus,
            gpus_default: gpus / 2,
        })
}

fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        value().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(key(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn assert_within(choice: &form::Choice, b: &Bounds) {
    if let Some(h) = &choice.host {
        assert!(b.hosts.contains(h), "host {h:?} not in {:?}", b.hosts);
    }
    if let Some(m) = choice.mem_limit {
        let max = b.mem_limit_max.expect("memory accepted without a maximum");
        assert!(
            (MIN_MEM..=max).contains(&m),
            "memory {m} outside {MIN_MEM}..={max}"
        );
    }
    if let Some(c) = choice.cpu_limit {
        let max = b.cpu_limit_max.expect("CPU accepted without a maximum");
        assert!(
            c.is_finite() && (MIN_CPU..=max).contains(&c),
            "cpu {c} outside"
        );
    }
    if let Some(g) = choice.gpus {
        assert!(
            b.gpus_max > 0 && g <= b.gpus_max,
            "{g} GPUs outside 0..={}",
            b.gpus_max
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn form_fields_never_panic_and_accepted_values_lie_within_bounds(f in fields(), b in bounds()) {
        match form::parse(&f, &b) {
            Ok(choice) => assert_within(&choice, &b),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn any_json_never_panics_and_accepted_values_lie_within_bounds(v in json(), b in bounds()) {
        if let Ok(f) = form::fields_from_json(&v) {
            if let Ok(choice) = form::parse(&f, &b) {
                assert_within(&choice, &b);
                // What is stored as user_options validates again to the same choice.
                let stored = serde_json::to_value(&choice).unwrap();
                let again = form::parse(&form::fields_from_json(&stored).unwrap(), &b).unwrap();
                prop_assert_eq!(again, choice);
            }
        }
    }

    #[test]
    fn rendering_never_panics_and_never_lets_markup_through(
        names in prop::collection::vec(any::<String>(), 0..6),
        why in any::<String>(),
        model in any::<String>(),
        gpus_asked in prop::option::of(0u32..9),
        b in bounds(),
    ) {
        // "<zq" starts no tag of the form's own: if it shows up, markup got through.
        // Rows take turns: not answering, no GPUs, GPUs (one of them held,
        // one busy, the model is the host's text), nvidia-smi failed.
        let uuid = |i: usize| format!("GPU-{i}");
        let gpu = |i: usize| Gpu {
            index: i as u32,
            uuid: uuid(i),
            name: format!("<zq{model}"),
            memory_total_mib: Some(1),
            memory_used_mib: None,
            utilization: None,
        };
        let rows: Vec<form::HostRow> = names
            .iter()
            .enumerate()
            .map(|(i, n)| form::HostRow {
                name: format!("<zq{n}"),
                status: if i % 4 == 0 { Err(format!("<zq{why}")) } else {
                    Ok(form::HostLoad {
                        mem_available: 1,
                        load1: f64::NAN,
                        cpus: 0,
                        servers: 0,
                        gpus: match i % 4 {
                            1 => GpuFacts::None,
                            2 => GpuFacts::Ok(GpuReport {
                                gpus: (0..3).map(gpu).collect(),
                                apps: vec![ComputeApp { gpu_uuid: uuid(1), pid: 1, used_memory_mib: None }],
                                skipped: Vec::new(),
                            }),
                            _ => GpuFacts::Failed { reason: format!("<zq{why}") },
                        },
                        held_gpus: BTreeSet::from([uuid(0)]),
                        gpu_busy_memory_mib: 100,
                    })
                },
            })
            .collect();
        let current = form::Choice {
            host: names.first().map(|n| format!("<zq{n}")),
            gpus: gpus_asked,
            ..Default::default()
        };
        let html = form::render(&rows, &b, &current);
        prop_assert!(!html.contains("<zq"), "{}", html);
        // The refusal of a GPU count never panics either, and a host with
        // a free GPU (the third row: 1 of 3) takes one.
        let refused = form::refuse_gpus(&rows, &current);
        if gpus_asked == Some(1) && current.host.is_none() && rows.len() > 2 {
            prop_assert!(refused.is_ok(), "{:?}", refused);
        }
    }
}
