//! What a spawn and a user ask for, as the JupyterHub class hands it over
//! in JSON: the spawn request, and the user's options checked against the
//! admin's bounds (`plan::form`).

use pyo3::prelude::*;

use super::{py_err, SpawnerError};
use crate::error::Error;
use crate::plan::form;
use crate::plan::hosts::Requirements;
use crate::plan::limits::Limits;
use crate::spawner::SpawnRequest;

/// The spawn request's JSON (see `Core.prepare`).
pub(super) fn request_from(json: &str) -> PyResult<SpawnRequest> {
    #[derive(serde::Deserialize)]
    struct Req {
        username: String,
        #[serde(default)]
        server_name: String,
        #[serde(default)]
        mem_guarantee: Option<u64>,
        #[serde(default)]
        cpu_guarantee: Option<f64>,
        #[serde(default)]
        gpus: u32,
        #[serde(default)]
        mem_limit: Option<u64>,
        #[serde(default)]
        cpu_limit: Option<f64>,
        #[serde(default)]
        host: Option<String>,
        #[serde(default)]
        exclude: Vec<String>,
    }
    let r: Req = serde_json::from_str(json)
        .map_err(|e| SpawnerError::new_err(format!("invalid spawn request: {e}")))?;
    Ok(SpawnRequest {
        username: r.username,
        server_name: r.server_name,
        requirements: Requirements {
            mem_guarantee: r.mem_guarantee,
            cpu_guarantee: r.cpu_guarantee,
            gpus: r.gpus,
        },
        limits: Limits {
            mem: r.mem_limit,
            cpu: r.cpu_limit,
        },
        host: r.host,
        exclude: r.exclude,
    })
}

/// The bounds `Core.form_bounds` made, read back.
pub(super) fn parse_bounds(json: &str) -> PyResult<form::Bounds> {
    serde_json::from_str(json)
        .map_err(|e| SpawnerError::new_err(format!("invalid options form bounds: {e}")))
}

/// Validate a user's options (JSON: form fields or a REST body) against the
/// admin's bounds (JSON of `plan::form::Bounds`); returns the choice as JSON
/// (`host`, `mem_limit` bytes, `cpu_limit` cores, each possibly null, and
/// `gpus` when the user asked).
#[pyfunction]
pub(super) fn validate_options(options_json: &str, bounds_json: &str) -> PyResult<String> {
    let bounds = parse_bounds(bounds_json)?;
    let value: serde_json::Value = serde_json::from_str(options_json).map_err(|e| {
        py_err(Error::Invalid {
            what: "server options".into(),
            reason: format!("not JSON: {e}"),
        })
    })?;
    let choice = form::fields_from_json(&value)
        .and_then(|f| form::parse(&f, &bounds))
        .map_err(py_err)?;
    serde_json::to_string(&choice).map_err(|e| SpawnerError::new_err(e.to_string()))
}
