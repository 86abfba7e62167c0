//! An operation through a MIG's API as a lab test sees it: started as the page starts it, read
//! back as JSON, its steps looked up by name.

use serde_json::Value;

use crate::data::curl;

/// Starts an operation of `kind` through the API (as the page does: with the instance's CSRF
/// token) and returns its id.
pub fn start_op(mig_url: &str, kind: &str, target_grid: &str, target_app: &str) -> String {
    let csrf: Value =
        serde_json::from_slice(&curl(&[&format!("{mig_url}/api/v1/csrf")]).unwrap()).unwrap();
    let body =
        serde_json::json!({"kind": kind, "target_app": target_app, "target_grid": target_grid});
    let out = curl(&[
        "--max-time",
        "30",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "-H",
        &format!("x-mig-csrf: {}", csrf["csrf"].as_str().unwrap()),
        "--data",
        &body.to_string(),
        &format!("{mig_url}/api/v1/ops"),
    ])
    .expect("POST /api/v1/ops");
    let v: Value = serde_json::from_slice(&out).unwrap();
    v["id"].as_str().unwrap().to_string()
}

/// The operation as the instance at `url` knows it, if it answers.
pub fn op_at(url: &str, id: &str) -> Option<Value> {
    curl(&[&format!("{url}/api/v1/ops/{id}")]).and_then(|b| serde_json::from_slice(&b).ok())
}

/// The step `name` of any monitor of `op`; fails the test, showing the operation, when none is.
pub fn step<'a>(op: &'a Value, name: &str) -> &'a Value {
    op["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["steps"].as_array().unwrap())
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {op:#}"))
}
