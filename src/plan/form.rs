//! The spawn options form: what a user may choose (a host, memory, CPU),
//! rendered as HTML and validated on the server.
//!
//! Values arrive two ways: from the form (a map of field names to lists of
//! strings) and through the REST API (any JSON the user sends as
//! `user_options`). Both go through [`parse`], once when the options are
//! submitted and again when the server starts, so nothing a user sends can
//! reach a host unless it lies within what the admin allows.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use std::collections::BTreeSet;

use super::gpus::{self, GpuFacts};
use super::hosts::{self, human_bytes, parse_size};
use crate::error::{Error, Result};

/// Form fields as a browser sends them: name → values.
pub type Fields = BTreeMap<String, Vec<String>>;

/// The host choice that lets the spawner choose.
pub const AUTO: &str = "auto";

/// Less memory than this cannot run a Jupyter server: refused even if the
/// admin's maximum allows it.
pub const MIN_MEM: u64 = 128 << 20;

/// Fewer cores than this is refused.
pub const MIN_CPU: f64 = 0.1;

/// Field names the form uses (and the REST API accepts).
pub const FIELDS: [&str; 4] = ["host", "mem_limit", "cpu_limit", "gpus"];

/// What the admin lets users choose.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// Hosts (display names) a user may pin the server to.
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Most memory a user may ask for (bytes); unset: memory is not a choice.
    #[serde(default)]
    pub mem_limit_max: Option<u64>,
    /// Most cores a user may ask for; unset: CPU is not a choice.
    #[serde(default)]
    pub cpu_limit_max: Option<f64>,
    /// The admin's `mem_limit`, used when the user leaves memory empty.
    #[serde(default)]
    pub mem_limit_default: Option<u64>,
    /// The admin's `cpu_limit`, used when the user leaves CPU empty.
    #[serde(default)]
    pub cpu_limit_default: Option<f64>,
    /// Most GPUs a user may ask for (`user_gpus_max`); 0: GPUs are not a
    /// choice (the admin's `gpus` applies).
    #[serde(default)]
    pub gpus_max: u32,
    /// The admin's `gpus`, what the form's GPU field starts at.
    #[serde(default)]
    pub gpus_default: u32,
}

/// What a user chose, validated. `None` everywhere: the admin's defaults.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// Pin the server to this host; `None`: the spawner chooses.
    pub host: Option<String>,
    /// Memory limit in bytes.
    pub mem_limit: Option<u64>,
    /// CPU limit in cores.
    pub cpu_limit: Option<f64>,
    /// GPUs; `None` (absent from the JSON): the admin's `gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
}

fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::Invalid {
        what: what.into(),
        reason: reason.into(),
    }
}

/// A user's options sent as JSON (REST API body, or stored `user_options`),
/// as form fields. `null` is an empty object; strings and numbers become
/// one value, lists of them several; anything else is refused.
pub fn fields_from_json(value: &serde_json::Value) -> Result<Fields> {
    use serde_json::Value;
    let map = match value {
        Value::Null => return Ok(Fields::new()),
        Value::Object(m) => m,
        other => {
            return Err(invalid(
                "server options",
                format!(
                    "expected a JSON object of option names, got {}",
                    kind(other)
                ),
            ))
        }
    };
    let scalar = |key: &str, v: &Value| -> Result<Option<String>> {
        match v {
            Value::String(s) => Ok(Some(s.clone())),
            Value::Number(n) => Ok(Some(n.to_string())),
            Value::Null => Ok(None),
            other => Err(invalid(
                format!("option {key:?}"),
                format!("expected a string or a number, got {}", kind(other)),
            )),
        }
    };
    let mut fields = Fields::new();
    for (key, v) in map {
        let values = match v {
            Value::Array(items) => items
                .iter()
                .map(|i| scalar(key, i))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .collect(),
            other => scalar(key, other)?.into_iter().collect(),
        };
        fields.insert(key.clone(), values);
    }
    Ok(fields)
}

fn kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "true/false",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// One value of a field; empty or absent is `None`.
fn single<'a>(fields: &'a Fields, key: &str) -> Result<Option<&'a str>> {
    match fields.get(key).map(Vec::as_slice) {
        None | Some([]) => Ok(None),
        Some([v]) => {
            let v = v.trim();
            Ok((!v.is_empty()).then_some(v))
        }
        Some(_) => Err(invalid(
            format!("option {key:?}"),
            "give one value, not several",
        )),
    }
}

/// Shorten what a user typed for an error message (it may be anything).
fn shown(v: &str) -> String {
    format!("{:?}", crate::error::clipped(v, 40))
}

/// Validate a user's options against the admin's bounds.
///
/// Field names starting with `_` (the form's `_xsrf`) are ignored; any other
/// unknown field is refused, naming it. The error names the field, the value
/// and what is allowed.
pub fn parse(fields: &Fields, bounds: &Bounds) -> Result<Choice> {
    for key in fields.keys() {
        if !key.starts_with('_') && !FIELDS.contains(&key.as_str()) {
            return Err(invalid(
                format!("option {}", shown(key)),
                format!(
                    "not an option of this hub; the options are {}",
                    FIELDS.join(", ")
                ),
            ));
        }
    }
    let host = match single(fields, "host")? {
        None => None,
        Some(h) if h.eq_ignore_ascii_case(AUTO) => None,
        Some(h) => {
            if !bounds.hosts.iter().any(|b| b == h) {
                return Err(invalid(
                    format!("host {}", shown(h)),
                    if bounds.hosts.is_empty() {
                        "this hub lets the spawner choose the host".to_string()
                    } else {
                        format!(
                            "not one you may choose; choose one of {} or {AUTO} (let the spawner choose)",
                            bounds.hosts.join(", ")
                        )
                    },
                ));
            }
            Some(h.to_string())
        }
    };
    let mem_limit = match single(fields, "mem_limit")? {
        None => None,
        Some(v) => {
            let what = format!("memory (mem_limit) {}", shown(v));
            let Some(max) = bounds.mem_limit_max else {
                return Err(invalid(what, "memory is not a choice on this hub"));
            };
            let bytes = parse_size(v)
                .map_err(|_| invalid(&what, "write it like 2G or 512M (K, M, G or T)"))?;
            if bytes < MIN_MEM || bytes > max {
                return Err(invalid(
                    what,
                    format!(
                        "must be between {} and {}",
                        human_bytes(MIN_MEM),
                        human_bytes(max)
                    ),
                ));
            }
            Some(bytes)
        }
    };
    let cpu_limit = match single(fields, "cpu_limit")? {
        None => None,
        Some(v) => {
            let what = format!("CPU cores (cpu_limit) {}", shown(v));
            let Some(max) = bounds.cpu_limit_max else {
                return Err(invalid(what, "CPU is not a choice on this hub"));
            };
            let cores = v
                .parse::<f64>()
                .ok()
                .filter(|c| c.is_finite())
                .ok_or_else(|| invalid(&what, "write a number of cores like 1 or 0.5"))?;
            if !(MIN_CPU..=max).contains(&cores) {
                return Err(invalid(
                    what,
                    format!("must be between {MIN_CPU} and {max}"),
                ));
            }
            Some(cores)
        }
    };
    let gpus = match single(fields, "gpus")? {
        None => None,
        Some(v) => {
            let what = format!("GPUs (gpus) {}", shown(v));
            if bounds.gpus_max == 0 {
                return Err(invalid(what, "GPUs are not a choice on this hub"));
            }
            let max = bounds.gpus_max;
            let n =
                v.parse::<u32>().ok().filter(|n| *n <= max).ok_or_else(|| {
                    invalid(&what, format!("must be a whole number from 0 to {max}"))
                })?;
            Some(n)
        }
    };
    Ok(Choice {
        host,
        mem_limit,
        cpu_limit,
        gpus,
    })
}

/// What the form shows about one host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostRow {
    /// Display name.
    pub name: String,
    /// Live figures, or why there are none (the host cannot be chosen then).
    pub status: std::result::Result<HostLoad, String>,
}

/// Live figures of a host, as read through the pool.
#[derive(Debug, Clone, PartialEq)]
pub struct HostLoad {
    /// Available memory in bytes.
    pub mem_available: u64,
    /// One-minute load.
    pub load1: f64,
    /// Cores.
    pub cpus: u32,
    /// Servers of all users on the host.
    pub servers: usize,
    /// Its GPUs as `nvidia-smi` reported them (or that it has none, or why
    /// `nvidia-smi` failed).
    pub gpus: GpuFacts,
    /// The GPUs (UUIDs) this hub's servers held there when the row was
    /// made: not free, as placement counts them.
    pub held_gpus: BTreeSet<String>,
    /// `gpu_busy_memory_mib`: a process using more makes a GPU taken.
    pub gpu_busy_memory_mib: u64,
}

impl HostLoad {
    /// Whether `nvidia-smi` is on the host (answering or not).
    fn has_gpus(&self) -> bool {
        !matches!(self.gpus, GpuFacts::None)
    }
}

/// Escape text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line describing a host's live figures.
pub fn describe(load: &HostLoad) -> String {
    format!(
        "{} free, load {:.1} on {} cores, {} server{}",
        human_bytes(load.mem_available),
        load.load1,
        load.cpus,
        load.servers,
        if load.servers == 1 { "" } else { "s" }
    )
}

/// What a host row says of its GPUs, counted as placement counts them
/// ([`gpus::summary`]: a GPU a server of ours holds, or that another
/// process uses, is not free): `GPUs: 3 of 4 free (NVIDIA A100-SXM4-40GB)`,
/// every model with its count when they differ, `GPUs unknown (why)` when
/// `nvidia-smi` failed. A host without `nvidia-smi` says nothing, or
/// `no GPUs` when `others_have_gpus` (another row has them).
pub fn describe_gpus(load: &HostLoad, others_have_gpus: bool) -> Option<String> {
    match gpus::summary(&load.gpus, &load.held_gpus, load.gpu_busy_memory_mib) {
        None => others_have_gpus.then(|| "no GPUs".to_string()),
        Some(Err(reason)) => Some(format!("GPUs unknown ({reason})")),
        Some(Ok(s)) if s.count == 0 => Some("no GPUs (nvidia-smi lists none)".to_string()),
        Some(Ok(s)) => {
            let models = match &s.models[..] {
                [(one, _)] => one.clone(),
                _ => s.models_text(),
            };
            Some(format!("GPUs: {} of {} free ({models})", s.free, s.count))
        }
    }
}

/// Refuse a submitted form that asks for more GPUs than any host it may
/// use (the pinned one, else every row) had free in `rows`, the figures
/// the user was shown; in the words of placement's refusal (`no host has 2
/// free GPUs: node1: 1 of 4 GPUs free (GPU 2 busy: ...), 2 asked, ...`).
/// `Ok` when some host had them, when the choice asks for none, or when the
/// rows say nothing of the host asked for: the spawn's own placement
/// decides then, and always has the last word.
pub fn refuse_gpus(rows: &[HostRow], choice: &Choice) -> Result<()> {
    let n = choice.gpus.unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    let rows: Vec<&HostRow> = rows
        .iter()
        .filter(|r| choice.host.as_deref().is_none_or(|h| h == r.name))
        .collect();
    if rows.is_empty() {
        return Ok(());
    }
    let mut reasons = Vec::new();
    for row in rows {
        let why = match &row.status {
            Ok(load) => {
                match hosts::gpus_unfit(&load.gpus, &load.held_gpus, load.gpu_busy_memory_mib, n) {
                    None => return Ok(()),
                    Some(why) => why,
                }
            }
            Err(e) => hosts::unread(e),
        };
        reasons.push(format!("{}: {why}", row.name));
    }
    let req = hosts::Requirements {
        gpus: n,
        ..hosts::Requirements::default()
    };
    match (hosts::no_host(&req, &reasons), &choice.host) {
        (Error::NoHost { detail }, Some(h)) => Err(Error::NoHost {
            detail: hosts::pinned_refusal(h, &detail),
        }),
        (e, _) => Err(e),
    }
}

/// The form's HTML (JupyterHub wraps it in a `<form>` with a submit
/// button). `current` preselects earlier choices. Everything inserted is
/// escaped; a host with an error is shown "not answering" and disabled.
pub fn render(rows: &[HostRow], bounds: &Bounds, current: &Choice) -> String {
    let mut h = String::new();
    let checked = |yes: bool| if yes { " checked" } else { "" };
    h.push_str("<div class=\"ssh-spawner-options\">\n");
    let any_gpus = rows
        .iter()
        .any(|r| r.status.as_ref().is_ok_and(HostLoad::has_gpus));
    if !rows.is_empty() {
        h.push_str(
            "<fieldset class=\"form-group\" id=\"ssh-spawner-hosts\">\n<legend>Host</legend>\n",
        );
        let _ = writeln!(
            h,
            "<div class=\"form-check\"><input class=\"form-check-input\" type=\"radio\" name=\"host\" id=\"host-{AUTO}\" value=\"{AUTO}\"{}>\
             <label class=\"form-check-label\" for=\"host-{AUTO}\">Let the spawner choose (recommended)</label></div>",
            checked(current.host.is_none())
        );
        for (i, row) in rows.iter().enumerate() {
            let name = escape(&row.name);
            let (detail, disabled) = match &row.status {
                Ok(load) => {
                    let mut d = describe(load);
                    if let Some(g) = describe_gpus(load, any_gpus) {
                        d = format!("{d}; {g}");
                    }
                    (escape(&d), "")
                }
                // Marked down for every user (plan::health): say since when;
                // drained by the admin: say so.
                Err(why)
                    if why.starts_with("down since")
                        || why.starts_with("answering again")
                        || why.starts_with("draining") =>
                {
                    (escape(why), " disabled")
                }
                Err(why) => (format!("not answering ({})", escape(why)), " disabled"),
            };
            let picked = current.host.as_deref() == Some(row.name.as_str()) && disabled.is_empty();
            let _ = writeln!(
                h,
                "<div class=\"form-check\"><input class=\"form-check-input\" type=\"radio\" name=\"host\" id=\"host-{i}\" value=\"{name}\"{}{disabled}>\
                 <label class=\"form-check-label\" for=\"host-{i}\"><strong>{name}</strong>: {detail}</label></div>",
                checked(picked)
            );
        }
        h.push_str("</fieldset>\n");
    }
    if let Some(max) = bounds.mem_limit_max {
        let default = bounds
            .mem_limit_default
            .map(|d| format!("; default {}", human_bytes(d)))
            .unwrap_or_else(|| "; empty: no limit".into());
        let value = current.mem_limit.map(human_bytes).unwrap_or_default();
        let _ = writeln!(
            h,
            "<div class=\"form-group\"><label for=\"ssh-mem-limit\">Memory (from {} to {}{})</label>\
             <input class=\"form-control\" type=\"text\" id=\"ssh-mem-limit\" name=\"mem_limit\" value=\"{}\" placeholder=\"{}\"></div>",
            human_bytes(MIN_MEM),
            human_bytes(max),
            escape(&default),
            escape(&value),
            escape(&bounds.mem_limit_default.map(human_bytes).unwrap_or_else(|| "e.g. 2G".into())),
        );
    }
    if let Some(max) = bounds.cpu_limit_max {
        let default = bounds
            .cpu_limit_default
            .map(|d| format!("; default {d}"))
            .unwrap_or_else(|| "; empty: no limit".into());
        let value = current.cpu_limit.map(|c| c.to_string()).unwrap_or_default();
        let _ = writeln!(
            h,
            "<div class=\"form-group\"><label for=\"ssh-cpu-limit\">CPU cores (from {MIN_CPU} to {max}{})</label>\
             <input class=\"form-control\" type=\"text\" id=\"ssh-cpu-limit\" name=\"cpu_limit\" value=\"{}\" placeholder=\"{}\"></div>",
            escape(&default),
            escape(&value),
            escape(&bounds.cpu_limit_default.map(|c| c.to_string()).unwrap_or_else(|| "e.g. 1".into())),
        );
    }
    if bounds.gpus_max > 0 {
        let (max, default) = (bounds.gpus_max, bounds.gpus_default);
        // An admin's `gpus` above the users' maximum cannot be typed in:
        // the field starts empty then, which keeps the admin's count.
        let value = current
            .gpus
            .or(Some(default))
            .filter(|n| *n <= max)
            .map(|n| n.to_string())
            .unwrap_or_default();
        let _ = writeln!(
            h,
            "<div class=\"form-group\"><label for=\"ssh-gpus\">GPUs (from 0 to {max}; default {default})</label>\
             <input class=\"form-control\" type=\"number\" id=\"ssh-gpus\" name=\"gpus\" min=\"0\" max=\"{max}\" step=\"1\" value=\"{value}\" placeholder=\"{default}\"></div>",
        );
    }
    h.push_str("</div>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds() -> Bounds {
        Bounds {
            hosts: vec!["node1".into(), "node2".into()],
            mem_limit_max: Some(8 << 30),
            cpu_limit_max: Some(4.0),
            mem_limit_default: Some(2 << 30),
            cpu_limit_default: None,
            gpus_max: 2,
            gpus_default: 0,
        }
    }

    fn fields(pairs: &[(&str, &str)]) -> Fields {
        let mut f = Fields::new();
        for (k, v) in pairs {
            f.entry(k.to_string()).or_default().push(v.to_string());
        }
        f
    }

    #[test]
    fn empty_form_means_the_admins_defaults() {
        assert_eq!(parse(&Fields::new(), &bounds()).unwrap(), Choice::default());
        let f = fields(&[
            ("host", "auto"),
            ("mem_limit", ""),
            ("cpu_limit", " "),
            ("_xsrf", "x"),
        ]);
        assert_eq!(parse(&f, &bounds()).unwrap(), Choice::default());
    }

    #[test]
    fn values_within_bounds_are_accepted() {
        let f = fields(&[("host", "node2"), ("mem_limit", "4G"), ("cpu_limit", "1.5")]);
        assert_eq!(
            parse(&f, &bounds()).unwrap(),
            Choice {
                host: Some("node2".into()),
                mem_limit: Some(4 << 30),
                cpu_limit: Some(1.5),
                gpus: None,
            }
        );
    }

    #[test]
    fn refusals_name_the_field_and_what_is_allowed() {
        let cases = [
            (
                fields(&[("host", "node9")]),
                "host \"node9\"",
                "node1, node2",
            ),
            (
                fields(&[("mem_limit", "64G")]),
                "memory (mem_limit) \"64G\"",
                "between 128M and 8G",
            ),
            (
                fields(&[("mem_limit", "1M")]),
                "memory (mem_limit)",
                "between 128M and 8G",
            ),
            (
                fields(&[("mem_limit", "lots")]),
                "memory (mem_limit) \"lots\"",
                "like 2G",
            ),
            (
                fields(&[("cpu_limit", "16")]),
                "CPU cores (cpu_limit) \"16\"",
                "between 0.1 and 4",
            ),
            (
                fields(&[("cpu_limit", "NaN")]),
                "CPU cores",
                "number of cores",
            ),
            (
                fields(&[("cpu_limit", "inf")]),
                "CPU cores",
                "number of cores",
            ),
            (
                fields(&[("image", "x")]),
                "option \"image\"",
                "host, mem_limit, cpu_limit, gpus",
            ),
            (fields(&[("gpus", "9")]), "GPUs (gpus) \"9\"", "from 0 to 2"),
            (
                fields(&[("gpus", "-1")]),
                "GPUs (gpus) \"-1\"",
                "from 0 to 2",
            ),
            (
                fields(&[("gpus", "1.5")]),
                "GPUs (gpus) \"1.5\"",
                "from 0 to 2",
            ),
            (
                fields(&[("host", "node1"), ("host", "node2")]),
                "option \"host\"",
                "one value",
            ),
        ];
        for (f, what, allowed) in cases {
            let msg = parse(&f, &bounds()).unwrap_err().to_string();
            assert!(msg.contains(what), "{msg:?} lacks {what:?}");
            assert!(msg.contains(allowed), "{msg:?} lacks {allowed:?}");
        }
    }

    #[test]
    fn a_resource_without_a_maximum_is_not_a_choice() {
        let b = Bounds {
            hosts: vec!["node1".into()],
            ..Bounds::default()
        };
        let msg = parse(&fields(&[("mem_limit", "1G")]), &b)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a choice"), "{msg}");
        let msg = parse(&fields(&[("cpu_limit", "1")]), &b)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("not a choice"), "{msg}");
        let msg = parse(&fields(&[("gpus", "1")]), &b)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("GPUs are not a choice"), "{msg}");
    }

    #[test]
    fn json_options_become_fields_and_round_trip() {
        let choice = Choice {
            host: Some("node1".into()),
            mem_limit: Some(3 << 30),
            cpu_limit: Some(0.5),
            gpus: Some(2),
        };
        let json = serde_json::to_value(&choice).unwrap();
        let f = fields_from_json(&json).unwrap();
        assert_eq!(parse(&f, &bounds()).unwrap(), choice);
        assert_eq!(
            fields_from_json(&serde_json::Value::Null).unwrap(),
            Fields::new()
        );
        let msg = fields_from_json(&serde_json::json!({"host": {"a": 1}}))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("\"host\"") && msg.contains("an object"),
            "{msg}"
        );
        assert!(fields_from_json(&serde_json::json!([1])).is_err());
    }

    #[test]
    fn the_form_escapes_everything_and_disables_hosts_that_do_not_answer() {
        let rows = vec![
            HostRow {
                name: "node1".into(),
                status: Ok(HostLoad {
                    mem_available: 3 << 30,
                    load1: 0.3,
                    cpus: 2,
                    servers: 1,
                    ..load(GpuFacts::None)
                }),
            },
            HostRow {
                name: "<b>\"x'&".into(),
                status: Err("timed out <script>".into()),
            },
        ];
        let html = render(&rows, &bounds(), &Choice::default());
        assert!(
            html.contains("3G free, load 0.3 on 2 cores, 1 server<"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;&quot;x&#39;&amp;"), "{html}");
        assert!(
            !html.contains("<script>") && !html.contains("<b>"),
            "{html}"
        );
        assert!(
            html.contains("value=\"&lt;b&gt;&quot;x&#39;&amp;\" disabled"),
            "{html}"
        );
        assert!(
            html.contains("not answering (timed out &lt;script&gt;)"),
            "{html}"
        );
        let down_rows = vec![HostRow {
            name: "node3".into(),
            status: Err("down since 09:00:01 UTC (12 s ago): no answer within 10s".into()),
        }];
        let down = render(&down_rows, &bounds(), &Choice::default());
        assert!(
            down.contains(
                "<strong>node3</strong>: down since 09:00:01 UTC (12 s ago): no answer within 10s"
            ),
            "{down}"
        );
        assert!(down.contains("value=\"node3\" disabled"), "{down}");
        let drained = render(
            &[HostRow {
                name: "node2".into(),
                status: Err(crate::plan::hosts::DRAINING.into()),
            }],
            &bounds(),
            &Choice {
                host: Some("node2".into()),
                ..Choice::default()
            },
        );
        assert!(
            drained.contains("<strong>node2</strong>: draining (no new servers"),
            "{drained}"
        );
        assert!(drained.contains("value=\"node2\" disabled>"), "{drained}");
        assert!(html.contains("value=\"auto\" checked"), "{html}");
        assert!(html.contains("from 128M to 8G; default 2G"), "{html}");
        assert!(html.contains("name=\"cpu_limit\""), "{html}");
        assert!(html.contains("from 0.1 to 4; empty: no limit"), "{html}");
        let none = Bounds {
            hosts: vec!["node1".into()],
            ..Bounds::default()
        };
        let html = render(&rows[..1], &none, &Choice::default());
        assert!(
            !html.contains("mem_limit") && !html.contains("cpu_limit"),
            "{html}"
        );
    }

    #[test]
    fn an_earlier_choice_is_preselected() {
        let rows = vec![HostRow {
            name: "node1".into(),
            status: Ok(HostLoad {
                mem_available: 1 << 30,
                load1: 0.0,
                cpus: 1,
                servers: 0,
                ..load(GpuFacts::None)
            }),
        }];
        let c = Choice {
            host: Some("node1".into()),
            mem_limit: Some(1 << 30),
            cpu_limit: None,
            gpus: None,
        };
        let html = render(&rows, &bounds(), &c);
        assert!(html.contains("value=\"node1\" checked"), "{html}");
        assert!(html.contains("value=\"auto\">"), "{html}");
        assert!(html.contains("name=\"mem_limit\" value=\"1G\""), "{html}");
    }

    const A100: &str = include_str!("../../fixtures/gpus/a100x4-one-busy/query-gpu.csv");
    const A100_APPS: &str =
        include_str!("../../fixtures/gpus/a100x4-one-busy/query-compute-apps.csv");
    const RTX: &str = include_str!("../../fixtures/gpus/rtx4090x2-idle/query-gpu.csv");
    const MIXED: &str = include_str!("../../fixtures/gpus/mixed/query-gpu.csv");
    const MIXED_APPS: &str = include_str!("../../fixtures/gpus/mixed/query-compute-apps.csv");
    const DRIVER: &str = include_str!("../../fixtures/gpus/fails-driver/output.txt");

    fn load(gpus: GpuFacts) -> HostLoad {
        HostLoad {
            mem_available: 8 << 30,
            load1: 0.5,
            cpus: 8,
            servers: 2,
            gpus,
            held_gpus: BTreeSet::new(),
            gpu_busy_memory_mib: gpus::DEFAULT_BUSY_MEMORY_MIB,
        }
    }

    fn ok(gpu: &str, apps: &str) -> GpuFacts {
        gpus::from_facts(Some("ok"), gpu, apps, &[])
    }

    /// node1: 4 A100s, GPU 2 busy; node2: 2 idle 4090s; node3: no
    /// nvidia-smi; node4: nvidia-smi fails; node5: four models, two busy.
    fn gpu_rows() -> Vec<HostRow> {
        let row = |name: &str, gpus| HostRow {
            name: name.into(),
            status: Ok(load(gpus)),
        };
        vec![
            row("node1", ok(A100, A100_APPS)),
            row("node2", ok(RTX, "")),
            row("node3", GpuFacts::None),
            row(
                "node4",
                gpus::from_facts(Some("failed query-gpu 9"), "", "", &[DRIVER]),
            ),
            row("node5", ok(MIXED, MIXED_APPS)),
        ]
    }

    fn label<'a>(html: &'a str, host: &str) -> &'a str {
        let start = html
            .find(&format!("<strong>{host}</strong>"))
            .unwrap_or_else(|| panic!("no row for {host}: {html}"));
        let rest = &html[start..];
        &rest[..rest.find("</label>").unwrap_or(rest.len())]
    }

    #[test]
    fn each_host_row_says_its_free_gpus_and_model_as_placement_counts_them() {
        let mut rows = gpu_rows();
        let html = render(&rows, &bounds(), &Choice::default());
        assert_eq!(
            label(&html, "node1"),
            "<strong>node1</strong>: 8G free, load 0.5 on 8 cores, 2 servers; \
             GPUs: 3 of 4 free (NVIDIA A100-SXM4-40GB)"
        );
        assert!(
            label(&html, "node2").ends_with("; GPUs: 2 of 2 free (NVIDIA GeForce RTX 4090)"),
            "{html}"
        );
        assert!(
            label(&html, "node3").ends_with("2 servers; no GPUs"),
            "{html}"
        );
        assert!(
            label(&html, "node4").ends_with(
                "; GPUs unknown (nvidia-smi --query-gpu exited with status 9: NVIDIA-SMI has \
                 failed because it couldn&#39;t communicate with the NVIDIA driver. Make sure \
                 that the latest NVIDIA driver is installed and running.)"
            ),
            "{html}"
        );
        assert!(
            label(&html, "node5").ends_with(
                "; GPUs: 2 of 4 free (1 × NVIDIA H100 80GB HBM3, 1 × NVIDIA A100-PCIE-40GB, \
                 1 × NVIDIA L40S, 1 × Tesla T4)"
            ),
            "{html}"
        );
        // A GPU a server of this hub holds is not free, as for placement.
        if let Ok(l) = &mut rows[1].status {
            l.held_gpus.insert(l.gpus.gpus()[0].uuid.clone());
        }
        let html = render(&rows, &bounds(), &Choice::default());
        assert!(label(&html, "node2").ends_with("; GPUs: 1 of 2 free (NVIDIA GeForce RTX 4090)"));
        // With no GPUs anywhere, rows say nothing of GPUs.
        let html = render(&rows[2..3], &bounds(), &Choice::default());
        assert!(label(&html, "node3").ends_with("2 servers"), "{html}");
    }

    #[test]
    fn a_model_name_is_escaped() {
        let gpu = "0, GPU-1, <img src=x onerror=alert(1)>, 100, 0, 0\n";
        let html = render(
            &[HostRow {
                name: "node1".into(),
                status: Ok(load(ok(gpu, ""))),
            }],
            &bounds(),
            &Choice::default(),
        );
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("(&lt;img src=x onerror=alert(1)&gt;)"),
            "{html}"
        );
    }

    #[test]
    fn the_gpu_field_is_there_when_users_may_choose_gpus() {
        let b = Bounds {
            gpus_max: 4,
            gpus_default: 1,
            ..bounds()
        };
        let html = render(&gpu_rows(), &b, &Choice::default());
        assert!(
            html.contains(
                "<label for=\"ssh-gpus\">GPUs (from 0 to 4; default 1)</label>\
                 <input class=\"form-control\" type=\"number\" id=\"ssh-gpus\" name=\"gpus\" \
                 min=\"0\" max=\"4\" step=\"1\" value=\"1\" placeholder=\"1\">"
            ),
            "{html}"
        );
        let earlier = Choice {
            gpus: Some(3),
            ..Choice::default()
        };
        assert!(render(&gpu_rows(), &b, &earlier).contains("value=\"3\" placeholder=\"1\""));
        // An admin's count above the users' maximum: empty, it keeps it.
        let above = Bounds {
            gpus_default: 6,
            ..b.clone()
        };
        let html = render(&gpu_rows(), &above, &Choice::default());
        assert!(html.contains("value=\"\" placeholder=\"6\""), "{html}");
        let none = Bounds { gpus_max: 0, ..b };
        assert!(!render(&gpu_rows(), &none, &Choice::default()).contains("name=\"gpus\""));
    }

    fn asking(n: u32, host: Option<&str>) -> Choice {
        Choice {
            gpus: Some(n),
            host: host.map(str::to_string),
            ..Choice::default()
        }
    }

    #[test]
    fn a_count_no_host_had_free_is_refused_naming_it_and_every_host() {
        let rows = gpu_rows();
        let msg = refuse_gpus(&rows, &asking(4, None))
            .unwrap_err()
            .to_string();
        assert!(
            msg.starts_with(
                "no host has 4 free GPUs: node1: 3 of 4 GPUs free (GPU 2 busy: pid 31337 uses \
                 20480 MiB), 4 asked, node2: 2 of 2 GPUs free, 4 asked, node3: no GPUs (no \
                 nvidia-smi), 4 asked, node4: GPUs unknown (nvidia-smi --query-gpu exited with \
                 status 9: NVIDIA-SMI has failed"
            ),
            "{msg}"
        );
        assert!(msg.contains(", node5: 2 of 4 GPUs free ("), "{msg}");
        for n in [0, 1, 3] {
            refuse_gpus(&rows, &asking(n, None)).unwrap();
        }
        refuse_gpus(&rows, &Choice::default()).unwrap();
        // Pinned: that host alone, said as placement says it.
        let msg = refuse_gpus(&rows, &asking(3, Some("node2")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "node2, the host you chose, cannot take the server now (no host has 3 free GPUs: \
             node2: 2 of 2 GPUs free, 3 asked); choose another host or let the spawner choose"
        );
        refuse_gpus(&rows, &asking(3, Some("node1"))).unwrap();
        // Rows that say nothing of the host asked for: placement decides.
        refuse_gpus(&rows, &asking(3, Some("node9"))).unwrap();
        refuse_gpus(&[], &asking(3, None)).unwrap();
        // A host down or drained gives nothing, and says why.
        let down = [
            HostRow {
                name: "node1".into(),
                status: Err("no answer within 3s".into()),
            },
            HostRow {
                name: "node2".into(),
                status: Err(hosts::DRAINING.into()),
            },
        ];
        assert_eq!(
            refuse_gpus(&down, &asking(1, None))
                .unwrap_err()
                .to_string(),
            format!(
                "no host has 1 free GPU: node1: down (no answer within 3s), node2: {}",
                hosts::DRAINING
            )
        );
    }

    #[test]
    fn the_refusal_says_what_placement_says_over_the_same_figures() {
        let rows = gpu_rows();
        let report = "hostname=h\nhome=/h\nuid=1\nmem_total_kb=1\nmem_available_kb=1\ncpus=8\n\
                      load1=0.5\nboot_id=b\nservers=2\nsystemd_user=no\nprlimit=yes\n";
        let facts: Vec<hosts::HostFacts> = rows
            .iter()
            .map(|r| {
                let mut f = hosts::parse_facts(report).unwrap();
                f.gpus = r.status.as_ref().unwrap().gpus.clone();
                f
            })
            .collect();
        let candidates: Vec<hosts::Candidate> = rows
            .iter()
            .zip(&facts)
            .map(|(r, f)| hosts::Candidate {
                name: &r.name,
                max_servers: None,
                draining: false,
                facts: Ok(f),
                held_gpus: BTreeSet::new(),
                gpu_busy_memory_mib: gpus::DEFAULT_BUSY_MEMORY_MIB,
            })
            .collect();
        let req = hosts::Requirements {
            gpus: 4,
            ..Default::default()
        };
        let placement = hosts::rank(
            &candidates,
            &req,
            hosts::Strategy::Random,
            0,
            &mut rand::rng(),
        )
        .unwrap_err();
        let form = refuse_gpus(&rows, &asking(4, None)).unwrap_err();
        assert_eq!(form.to_string(), placement.to_string());
    }
}
