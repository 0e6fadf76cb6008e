//! A host's GPUs as `nvidia-smi` reports them, which of them are free, and
//! which a server gets.
//!
//! The facts script (`sh/facts.sh`) runs two queries in the same exec as
//! the other figures and prints each line of their CSV after a key:
//!
//! ```text
//! nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu \
//!            --format=csv,noheader,nounits        -> gpu=0, GPU-…, NVIDIA A100-SXM4-40GB, 40960, 4, 0
//! nvidia-smi --query-compute-apps=gpu_uuid,pid,used_memory \
//!            --format=csv,noheader,nounits        -> gpu_app=GPU-…, 31337, 20480
//! ```
//!
//! and before them `nvidia_smi=none` (not on the PATH: the host has no
//! GPUs, which is not an error), `nvidia_smi=ok`, or
//! `nvidia_smi=failed QUERY STATUS` followed by up to five
//! `nvidia_smi_said=LINE` lines of what it printed. [`from_facts`] turns
//! those lines into [`GpuFacts`]. What real cards print, `[N/A]` and
//! `[Not Supported]` fields included, is in `fixtures/gpus/`.
//!
//! A GPU is **free** when no server of ours holds it and no process uses
//! more than `busy_memory_mib` of it ([`gpu_uses`]). Processes are matched
//! to GPUs by UUID, not by pid: a process on a GPU we hold does not change
//! that we hold it, and a process on a GPU we do not hold is, whoever runs
//! it (an ssh user's training job, or a server of ours that ignored its
//! `CUDA_VISIBLE_DEVICES`), using a GPU that is not ours to give.

use std::collections::BTreeSet;

/// The `--query-gpu` fields the facts script asks for, in this order.
pub const GPU_QUERY: &str = "index,uuid,name,memory.total,memory.used,utilization.gpu";
/// The `--query-compute-apps` fields the facts script asks for.
pub const APP_QUERY: &str = "gpu_uuid,pid,used_memory";
/// Seconds each `nvidia-smi` call of the facts may take (`timeout`, where
/// the host has it): a wedged driver makes `nvidia-smi` hang, and the other
/// figures must still come back within `command_timeout`.
pub const NVIDIA_SMI_TIMEOUT_SECS: u32 = 10;
/// How much of what a failing `nvidia-smi` printed its reason keeps.
const MAX_SAID_CHARS: usize = 400;
/// A process using more than this (MiB) makes a GPU taken, until the
/// configuration sets its own amount. A CUDA context alone takes a few
/// hundred MiB, so any process that really uses a GPU is above it.
pub const DEFAULT_BUSY_MEMORY_MIB: u64 = 100;

/// One GPU, a line of `--query-gpu`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Gpu {
    /// `index`: the driver's numbering (PCI order), not stable across hosts.
    pub index: u32,
    /// `uuid` (`GPU-…`): what a server is given, stable across reboots.
    pub uuid: String,
    /// `name`: the model, `NVIDIA A100-SXM4-40GB`.
    pub name: String,
    /// `memory.total` in MiB; `None` when the card says `[N/A]`.
    pub memory_total_mib: Option<u64>,
    /// `memory.used` in MiB; `None` when the card says `[N/A]`.
    pub memory_used_mib: Option<u64>,
    /// `utilization.gpu` in percent; `None` for `[N/A]` (e.g. MIG mode) or
    /// `[Not Supported]` (older GeForce cards).
    pub utilization: Option<u32>,
}

/// One process on a GPU, a line of `--query-compute-apps`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ComputeApp {
    /// The GPU it runs on.
    pub gpu_uuid: String,
    /// Its pid, in the host's pid namespace as `nvidia-smi` sees it.
    pub pid: u32,
    /// `used_memory` in MiB; `None` when `nvidia-smi` says `[N/A]`.
    pub used_memory_mib: Option<u64>,
}

/// A line `nvidia-smi` printed that is not a GPU or a process, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// The line as printed.
    pub line: String,
    /// What is wrong with it.
    pub reason: String,
}

/// What `nvidia-smi` said on a host where it ran.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct GpuReport {
    /// The GPUs, in the order printed (by index).
    pub gpus: Vec<Gpu>,
    /// Every compute process on them, whoever runs it.
    pub apps: Vec<ComputeApp>,
    /// Lines of either query that were neither.
    pub skipped: Vec<Skipped>,
}

/// A host's GPUs, as its facts say.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "nvidia_smi")]
pub enum GpuFacts {
    /// No `nvidia-smi` on the PATH: the host has no GPUs to give. (Also a
    /// report from before the facts read GPUs.)
    #[default]
    None,
    /// `nvidia-smi` answered both queries.
    Ok(GpuReport),
    /// `nvidia-smi` is there but failed (driver not loaded, version
    /// mismatch, no answer): the host has GPUs nobody can be given now.
    Failed {
        /// Which query, its exit status, and the first lines it printed.
        reason: String,
    },
}

impl GpuFacts {
    /// The GPUs (none unless `nvidia-smi` answered).
    pub fn gpus(&self) -> &[Gpu] {
        match self {
            GpuFacts::Ok(r) => &r.gpus,
            _ => &[],
        }
    }
}

/// A field `nvidia-smi` prints for "no value": `[N/A]`, `[Not Supported]`
/// (and `N/A` without brackets, as some drivers print it). Any other
/// bracketed text (`[GPU is lost]`, `[Unknown Error]`) is a fault, not a
/// missing value.
fn is_no_value(field: &str) -> bool {
    matches!(field, "[N/A]" | "N/A" | "[Not Supported]")
}

/// A number field: `Ok(None)` for a "no value" field, `Err` with the reason
/// for anything else that is not a number.
fn number<T: std::str::FromStr>(field: &str, what: &str) -> Result<Option<T>, String> {
    if is_no_value(field) {
        return Ok(None);
    }
    field
        .parse()
        .map(Some)
        .map_err(|_| format!("{what} is {field:?}, not a number"))
}

/// A UUID as `nvidia-smi` prints them (`GPU-` and hex groups): letters,
/// digits and `-` only, so that a list of them joined by `,` is a safe
/// value for `CUDA_VISIBLE_DEVICES`. A saved state's GPUs are held to
/// the same shape.
pub fn valid_uuid(uuid: &str) -> bool {
    !uuid.is_empty()
        && uuid.len() <= 64
        && uuid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The comma-separated fields of one line, trimmed (`nvidia-smi` puts a
/// space after each comma).
fn fields(line: &str) -> Vec<&str> {
    line.split(',').map(str::trim).collect()
}

fn gpu_line(line: &str) -> Result<Gpu, String> {
    let f = fields(line);
    let [index, uuid, name, total, used, util] = f[..] else {
        return Err(format!("{} fields, expected 6 ({GPU_QUERY})", f.len()));
    };
    let index = index
        .parse()
        .map_err(|_| format!("index is {index:?}, not a number"))?;
    if !valid_uuid(uuid) {
        return Err(format!("uuid {uuid:?} is not a GPU UUID"));
    }
    if name.is_empty() {
        return Err("no name".into());
    }
    Ok(Gpu {
        index,
        uuid: uuid.to_string(),
        name: name.to_string(),
        memory_total_mib: number(total, "memory.total")?,
        memory_used_mib: number(used, "memory.used")?,
        utilization: number(util, "utilization.gpu")?,
    })
}

fn app_line(line: &str) -> Result<ComputeApp, String> {
    let f = fields(line);
    let [uuid, pid, used] = f[..] else {
        return Err(format!("{} fields, expected 3 ({APP_QUERY})", f.len()));
    };
    if !valid_uuid(uuid) {
        return Err(format!("gpu_uuid {uuid:?} is not a GPU UUID"));
    }
    let pid = pid
        .parse()
        .map_err(|_| format!("pid is {pid:?}, not a number"))?;
    Ok(ComputeApp {
        gpu_uuid: uuid.to_string(),
        pid,
        used_memory_mib: number(used, "used_memory")?,
    })
}

/// Parse `--query-gpu=`[`GPU_QUERY`]` --format=csv,noheader,nounits`
/// output. Blank lines are ignored; any other line that is not a GPU is
/// skipped with its reason (a warning `nvidia-smi` printed, a GPU that
/// reports a fault in a field: such a GPU is never given). A UUID printed
/// twice keeps its first line.
pub fn parse_gpus(csv: &str) -> (Vec<Gpu>, Vec<Skipped>) {
    let mut gpus: Vec<Gpu> = Vec::new();
    let mut skipped = Vec::new();
    for line in csv.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match gpu_line(line) {
            Ok(g) if gpus.iter().any(|o| o.uuid == g.uuid) => skipped.push(Skipped {
                line: line.into(),
                reason: format!("uuid {} printed twice", g.uuid),
            }),
            Ok(g) => gpus.push(g),
            Err(reason) => skipped.push(Skipped {
                line: line.into(),
                reason,
            }),
        }
    }
    (gpus, skipped)
}

/// Parse `--query-compute-apps=`[`APP_QUERY`]` --format=csv,noheader,nounits`
/// output (empty when no process uses a GPU). Lines that are not a process
/// are skipped with their reason; [`gpu_uses`] counts a GPU whose UUID
/// appears in such a line as taken.
pub fn parse_compute_apps(csv: &str) -> (Vec<ComputeApp>, Vec<Skipped>) {
    let mut apps = Vec::new();
    let mut skipped = Vec::new();
    for line in csv.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match app_line(line) {
            Ok(a) => apps.push(a),
            Err(reason) => skipped.push(Skipped {
                line: line.into(),
                reason,
            }),
        }
    }
    (apps, skipped)
}

/// [`GpuFacts`] from the facts' lines: the `nvidia_smi=` status (`None`
/// when the report has none), and the values of the `gpu=`, `gpu_app=` and
/// `nvidia_smi_said=` lines, in order.
pub fn from_facts(status: Option<&str>, gpu: &str, gpu_app: &str, said: &[&str]) -> GpuFacts {
    let status = match status {
        None | Some("none") => return GpuFacts::None,
        Some(s) => s,
    };
    if status == "ok" {
        let (gpus, mut skipped) = parse_gpus(gpu);
        let (apps, more) = parse_compute_apps(gpu_app);
        skipped.extend(more);
        return GpuFacts::Ok(GpuReport {
            gpus,
            apps,
            skipped,
        });
    }
    let mut words = status.split_whitespace();
    let reason = match (words.next(), words.next(), words.next()) {
        (Some("failed"), Some(query), Some("124")) => {
            format!("nvidia-smi --{query} did not answer within {NVIDIA_SMI_TIMEOUT_SECS} s")
        }
        // `timeout -k` kills what ignores its SIGTERM.
        (Some("failed"), Some(query), Some("137")) => format!(
            "nvidia-smi --{query} was killed (status 137: no answer within \
             {NVIDIA_SMI_TIMEOUT_SECS} s and SIGTERM ignored, or another SIGKILL)"
        ),
        (Some("failed"), Some(query), Some(code)) => {
            format!("nvidia-smi --{query} exited with status {code}")
        }
        _ => format!("nvidia-smi reported {status:?}"),
    };
    let said: Vec<&str> = said
        .iter()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .collect();
    // What a host printed goes into messages and `check`: a few lines, not
    // a page.
    let said = crate::error::clipped(&said.join(" "), MAX_SAID_CHARS);
    GpuFacts::Failed {
        reason: if said.is_empty() {
            reason
        } else {
            format!("{reason}: {said}")
        },
    }
}

/// Whether a GPU can be given to a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuUse {
    /// Nobody holds or uses it.
    Free,
    /// A server of ours holds it.
    Held,
    /// Some process not ours uses it: the words say which.
    Busy(String),
}

/// Each GPU of `report` with its use: held when its UUID is in `held` (the
/// GPUs our servers on this host hold), busy when a process on it uses more
/// than `busy_memory_mib` (or an amount `nvidia-smi` does not report), or
/// when a line of the process list that could not be read names it.
pub fn gpu_uses<'a>(
    report: &'a GpuReport,
    held: &BTreeSet<String>,
    busy_memory_mib: u64,
) -> Vec<(&'a Gpu, GpuUse)> {
    report
        .gpus
        .iter()
        .map(|g| {
            if held.contains(&g.uuid) {
                return (g, GpuUse::Held);
            }
            let mut busy: Vec<String> = report
                .apps
                .iter()
                .filter(|a| a.gpu_uuid == g.uuid)
                .filter_map(|a| match a.used_memory_mib {
                    Some(m) if m <= busy_memory_mib => None,
                    Some(m) => Some(format!("pid {} uses {m} MiB", a.pid)),
                    None => Some(format!("pid {} uses an unreported amount", a.pid)),
                })
                .collect();
            if report
                .skipped
                .iter()
                .any(|s| s.line.split(',').next().map(str::trim) == Some(g.uuid.as_str()))
            {
                busy.push("a process line nvidia-smi printed could not be read".into());
            }
            if busy.is_empty() {
                (g, GpuUse::Free)
            } else {
                (g, GpuUse::Busy(busy.join(", ")))
            }
        })
        .collect()
}

/// The free GPUs of `report`, least used first ([`choose`]'s order).
pub fn free_gpus<'a>(
    report: &'a GpuReport,
    held: &BTreeSet<String>,
    busy_memory_mib: u64,
) -> Vec<&'a Gpu> {
    let mut free: Vec<&Gpu> = gpu_uses(report, held, busy_memory_mib)
        .into_iter()
        .filter(|(_, u)| *u == GpuUse::Free)
        .map(|(g, _)| g)
        .collect();
    // Least used: memory in use, then utilization (a figure the card does
    // not report counts as more than any it does), then the index, so that
    // the same facts always give the same GPUs.
    free.sort_by_key(|g| {
        (
            g.memory_used_mib.unwrap_or(u64::MAX),
            g.utilization.unwrap_or(u32::MAX),
            g.index,
        )
    });
    free
}

/// `n` free GPUs of a host, least used first; when it has fewer, the words
/// for the spawn page say how many it has and why the others are not free.
pub fn choose<'a>(
    facts: &'a GpuFacts,
    held: &BTreeSet<String>,
    busy_memory_mib: u64,
    n: usize,
) -> Result<Vec<&'a Gpu>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let report = match facts {
        GpuFacts::None => return Err("no GPUs (no nvidia-smi)".into()),
        GpuFacts::Failed { reason } => return Err(format!("GPUs unknown ({reason})")),
        GpuFacts::Ok(r) => r,
    };
    let mut free = free_gpus(report, held, busy_memory_mib);
    if free.len() >= n {
        free.truncate(n);
        return Ok(free);
    }
    let taken: Vec<String> = gpu_uses(report, held, busy_memory_mib)
        .into_iter()
        .filter_map(|(g, u)| match u {
            GpuUse::Free => None,
            GpuUse::Held => Some(format!("GPU {} held by a server", g.index)),
            GpuUse::Busy(why) => Some(format!("GPU {} busy: {why}", g.index)),
        })
        .collect();
    let mut why = format!(
        "{} of {} GPU{} free",
        free.len(),
        report.gpus.len(),
        if report.gpus.len() == 1 { "" } else { "s" }
    );
    if !taken.is_empty() {
        why.push_str(&format!(" ({})", taken.join("; ")));
    }
    Err(why)
}

/// The environment that gives a server exactly `gpus`, by UUID (indices
/// change when a card is added or fails): `CUDA_VISIBLE_DEVICES` for CUDA
/// programs, `NVIDIA_VISIBLE_DEVICES` for a container the server starts
/// with NVIDIA's container toolkit. With no GPUs, CUDA sees none (`""`) and
/// the toolkit mounts none (`void`).
pub fn visible_devices(gpus: &[&Gpu]) -> [(&'static str, String); 2] {
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    visible_devices_by_uuid(&uuids)
}

/// [`visible_devices`] from the UUIDs alone (as a saved state records them).
pub fn visible_devices_by_uuid(uuids: &[&str]) -> [(&'static str, String); 2] {
    let list = uuids.join(",");
    let nvidia = if list.is_empty() {
        "void".to_string()
    } else {
        list.clone()
    };
    [
        ("CUDA_VISIBLE_DEVICES", list),
        ("NVIDIA_VISIBLE_DEVICES", nvidia),
    ]
}

/// The progress line of a spawn given `gpus` on `host`: `GPUs assigned on
/// node1: GPU 0 (NVIDIA A100-SXM4-40GB), GPU 3 (NVIDIA A100-SXM4-40GB)`.
pub fn assigned(host: &str, gpus: &[Gpu]) -> String {
    let list: Vec<String> = gpus
        .iter()
        .map(|g| format!("GPU {} ({})", g.index, g.name))
        .collect();
    format!("GPUs assigned on {host}: {}", list.join(", "))
}

/// A host's GPUs in a line: how many, of which models, how many free.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GpuSummary {
    /// GPUs `nvidia-smi` listed.
    pub count: usize,
    /// Each model and how many of it, in the order first listed.
    pub models: Vec<(String, usize)>,
    /// GPUs free ([`gpu_uses`]).
    pub free: usize,
    /// Each GPU that is not free, and why (`GPU 2 busy: pid 31337 uses
    /// 20480 MiB`), then each line that was skipped.
    pub notes: Vec<String>,
}

/// [`GpuSummary`] of a host's facts; `None` when it has no `nvidia-smi`,
/// `Err` with the reason when `nvidia-smi` failed.
pub fn summary(
    facts: &GpuFacts,
    held: &BTreeSet<String>,
    busy_memory_mib: u64,
) -> Option<Result<GpuSummary, String>> {
    let report = match facts {
        GpuFacts::None => return None,
        GpuFacts::Failed { reason } => return Some(Err(reason.clone())),
        GpuFacts::Ok(r) => r,
    };
    let mut models: Vec<(String, usize)> = Vec::new();
    for g in &report.gpus {
        match models.iter_mut().find(|(m, _)| *m == g.name) {
            Some((_, n)) => *n += 1,
            None => models.push((g.name.clone(), 1)),
        }
    }
    let uses = gpu_uses(report, held, busy_memory_mib);
    let free = uses.iter().filter(|(_, u)| *u == GpuUse::Free).count();
    let mut notes: Vec<String> = uses
        .iter()
        .filter_map(|(g, u)| match u {
            GpuUse::Free => None,
            GpuUse::Held => Some(format!("GPU {} held by a server", g.index)),
            GpuUse::Busy(why) => Some(format!("GPU {} busy: {why}", g.index)),
        })
        .collect();
    notes.extend(
        report
            .skipped
            .iter()
            .map(|s| format!("skipped {:?}: {}", s.line, s.reason)),
    );
    Some(Ok(GpuSummary {
        count: report.gpus.len(),
        models,
        free,
        notes,
    }))
}

impl GpuSummary {
    /// `4 × NVIDIA A100-SXM4-40GB, 1 × Tesla T4`.
    pub fn models_text(&self) -> String {
        self.models
            .iter()
            .map(|(m, n)| format!("{n} × {m}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A100: &str = include_str!("../../fixtures/gpus/a100x4-one-busy/query-gpu.csv");
    const A100_APPS: &str =
        include_str!("../../fixtures/gpus/a100x4-one-busy/query-compute-apps.csv");
    const NA: &str = include_str!("../../fixtures/gpus/na-fields/query-gpu.csv");
    const NA_APPS: &str = include_str!("../../fixtures/gpus/na-fields/query-compute-apps.csv");

    fn report(gpu: &str, apps: &str) -> GpuReport {
        match from_facts(Some("ok"), gpu, apps, &[]) {
            GpuFacts::Ok(r) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parses_a_100_lines_with_spaces_after_commas() {
        let (gpus, skipped) = parse_gpus(A100);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(gpus.len(), 4);
        assert_eq!(
            gpus[0],
            Gpu {
                index: 0,
                uuid: "GPU-4f8c2a1e-9b3d-4e6f-a2c1-7d5e8b9f0a12".into(),
                name: "NVIDIA A100-SXM4-40GB".into(),
                memory_total_mib: Some(40960),
                memory_used_mib: Some(4),
                utilization: Some(0),
            }
        );
        let (apps, skipped) = parse_compute_apps(A100_APPS);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].used_memory_mib, Some(20480));
    }

    #[test]
    fn na_and_not_supported_are_no_value_not_garbage() {
        let (gpus, skipped) = parse_gpus(NA);
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(gpus.len(), 2);
        assert_eq!(gpus[0].utilization, None, "[N/A] in MIG mode");
        assert_eq!(gpus[1].utilization, None, "[Not Supported]");
        assert_eq!(gpus[1].memory_used_mib, Some(180));
        let (apps, _) = parse_compute_apps(NA_APPS);
        assert_eq!(apps[0].used_memory_mib, None);
    }

    #[test]
    fn garbage_lines_are_skipped_with_a_reason() {
        let text = "WARNING: infoROM is corrupted at gpu 0000:00:04.0\n\
                    0, GPU-aa, Tesla T4, 15360, 0, 0\n\
                    1, GPU-bb, Tesla T4, 15360, [GPU is lost], 0\n\
                    x, GPU-cc, Tesla T4, 15360, 0, 0\n\
                    2, GPU-d;d, Tesla T4, 15360, 0, 0\n\
                    3, GPU-aa, Tesla T4, 15360, 0, 0\n\n";
        let (gpus, skipped) = parse_gpus(text);
        assert_eq!(gpus.len(), 1);
        let reasons: Vec<&str> = skipped.iter().map(|s| s.reason.as_str()).collect();
        assert_eq!(
            reasons,
            [
                "1 fields, expected 6 (index,uuid,name,memory.total,memory.used,utilization.gpu)",
                "memory.used is \"[GPU is lost]\", not a number",
                "index is \"x\", not a number",
                "uuid \"GPU-d;d\" is not a GPU UUID",
                "uuid GPU-aa printed twice",
            ]
        );
    }

    #[test]
    fn a_process_over_the_amount_or_unreadable_takes_its_gpu() {
        let r = report(A100, A100_APPS);
        let uses = gpu_uses(&r, &BTreeSet::new(), DEFAULT_BUSY_MEMORY_MIB);
        let busy: Vec<(u32, &GpuUse)> = uses
            .iter()
            .filter(|(_, u)| *u != GpuUse::Free)
            .map(|(g, u)| (g.index, u))
            .collect();
        assert_eq!(
            busy,
            [(2, &GpuUse::Busy("pid 31337 uses 20480 MiB".into()))]
        );
        // Above the amount only: with a larger one, GPU 2 is free.
        assert_eq!(free_gpus(&r, &BTreeSet::new(), 20480).len(), 4);
        // A line naming a GPU that could not be read takes it.
        let apps = format!("{A100_APPS}GPU-4f8c2a1e-9b3d-4e6f-a2c1-7d5e8b9f0a12, 99, lots\n");
        let r = report(A100, &apps);
        let free: Vec<u32> = free_gpus(&r, &BTreeSet::new(), 100)
            .iter()
            .map(|g| g.index)
            .collect();
        assert_eq!(free, [1, 3]);
    }

    #[test]
    fn held_gpus_are_not_free_and_choice_is_least_used_then_index() {
        let r = report(A100, A100_APPS);
        let facts = GpuFacts::Ok(r.clone());
        let none = BTreeSet::new();
        let pick = |held: &BTreeSet<String>, n| -> Vec<u32> {
            choose(&facts, held, 100, n)
                .unwrap()
                .iter()
                .map(|g| g.index)
                .collect()
        };
        // The fixture: GPU 0 uses 4 MiB, 1 and 3 use 0 MiB (3 at 3 %), 2 busy.
        assert_eq!(pick(&none, 3), [1, 3, 0]);
        let held: BTreeSet<String> = [r.gpus[1].uuid.clone()].into();
        assert_eq!(pick(&held, 2), [3, 0]);
        let err = choose(&facts, &held, 100, 3).unwrap_err();
        assert_eq!(
            err,
            "2 of 4 GPUs free (GPU 1 held by a server; GPU 2 busy: pid 31337 uses 20480 MiB)"
        );
        assert_eq!(pick(&none, 0), Vec::<u32>::new());
    }

    #[test]
    fn no_nvidia_smi_or_a_failing_one_gives_no_gpus() {
        let none = BTreeSet::new();
        assert_eq!(from_facts(None, "", "", &[]), GpuFacts::None);
        assert_eq!(from_facts(Some("none"), "", "", &[]), GpuFacts::None);
        assert_eq!(
            choose(&GpuFacts::None, &none, 100, 1).unwrap_err(),
            "no GPUs (no nvidia-smi)"
        );
        let failed = from_facts(
            Some("failed query-gpu 9"),
            "",
            "",
            &["NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."],
        );
        let GpuFacts::Failed { reason } = &failed else {
            panic!("{failed:?}")
        };
        assert_eq!(
            reason,
            "nvidia-smi --query-gpu exited with status 9: NVIDIA-SMI has failed because it \
             couldn't communicate with the NVIDIA driver."
        );
        assert!(choose(&failed, &none, 100, 1)
            .unwrap_err()
            .starts_with("GPUs unknown (nvidia-smi --query-gpu exited with status 9"));
        assert_eq!(choose(&failed, &none, 100, 0).unwrap(), Vec::<&Gpu>::new());
        let GpuFacts::Failed { reason } =
            from_facts(Some("failed query-compute-apps 124"), "", "", &[])
        else {
            panic!()
        };
        assert_eq!(
            reason,
            "nvidia-smi --query-compute-apps did not answer within 10 s"
        );
        let long = "x".repeat(1000);
        let GpuFacts::Failed { reason } =
            from_facts(Some("failed query-gpu 137"), "", "", &[&long])
        else {
            panic!()
        };
        assert!(reason.starts_with("nvidia-smi --query-gpu was killed (status 137"));
        assert!(reason.ends_with("xxx…") && reason.len() < 600, "{reason}");
    }

    #[test]
    fn visible_devices_by_uuid() {
        let r = report(A100, "");
        let two = [&r.gpus[3], &r.gpus[1]];
        let [(c, cv), (n, nv)] = visible_devices(&two);
        assert_eq!((c, n), ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"));
        let want = format!("{},{}", r.gpus[3].uuid, r.gpus[1].uuid);
        assert_eq!((cv.as_str(), nv.as_str()), (want.as_str(), want.as_str()));
        let [(_, cv), (_, nv)] = visible_devices(&[]);
        assert_eq!((cv.as_str(), nv.as_str()), ("", "void"));
    }
}
