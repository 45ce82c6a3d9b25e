//! The configs the project ships must load, so they can never rot: every
//! `examples/*.yaml` (and `*.json`), and the benchmark templates in
//! `benches/` rendered with sample values.

// Helpers may panic too: in a test, a panic is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use almond_config::{load_proxy, load_proxy_file, Protocol};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every config file in `examples/`, sorted.
fn example_configs() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .expect("examples/ exists")
        .map(|entry| entry.expect("readable entry").path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_example_config_is_valid() {
    let files = example_configs();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in ["proxy.yaml", "proxy-minimal.yaml"] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples/{expected} is missing"
        );
    }
    let broken: Vec<String> = files
        .iter()
        .filter_map(|p| load_proxy_file(p).err().map(|e| e.to_string()))
        .collect();
    assert!(broken.is_empty(), "invalid example configs:\n{broken:#?}");
}

#[test]
fn the_full_example_is_the_contract_example_in_static_mode() {
    let config = load_proxy_file(&root().join("examples/proxy.yaml")).expect("valid");
    assert!(config.control.is_none(), "static mode: no control plane");
    let orders = &config.services["orders"];
    assert_eq!(orders.protocol, Protocol::Http2);
    assert_eq!(orders.endpoints.len(), 2);
    assert_eq!(
        orders
            .split
            .as_ref()
            .map(|s| (s.weights["v1"], s.weights["v2"])),
        Some((90, 10))
    );
    assert_eq!(config.listeners[1].service.as_deref(), Some("orders"));
}

#[test]
fn check_config_accepts_every_example() {
    for file in example_configs() {
        let out = Command::new(env!("CARGO_BIN_EXE_almond"))
            .arg("check-config")
            .arg(&file)
            .output()
            .expect("run almond check-config");
        assert!(
            out.status.success(),
            "almond check-config {}: {}\n{}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `benches/almond.yaml.tmpl` with its placeholders filled as the bench
/// harness fills them.
fn render_bench_template(proto: &str) -> String {
    render_template("benches/almond.yaml.tmpl", proto)
}

/// A bench template (path from the root) rendered as the harness does.
fn render_template(path: &str, proto: &str) -> String {
    let template =
        std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let rendered = template
        .replace("{admin_port}", "18149")
        .replace("{port}", "18140")
        .replace("{proto}", proto)
        .replace(
            "{endpoints_flow}",
            r#"[{ addr: "127.0.0.1:18081" }, { addr: "127.0.0.1:18082" }]"#,
        );
    assert!(
        !rendered.contains("{admin_port}") && !rendered.contains("{port}"),
        "unfilled placeholder left in:\n{rendered}"
    );
    rendered
}

#[test]
fn the_bench_template_loads_for_both_protocols() {
    for (proto, expected) in [("http1", Protocol::Http1), ("http2", Protocol::Http2)] {
        let text = render_bench_template(proto);
        let config = load_proxy(&text, &format!("almond.yaml.tmpl ({proto})"))
            .unwrap_or_else(|e| panic!("{e}\n--- rendered ---\n{text}"));
        assert_eq!(config.admin.port(), 18149);
        assert_eq!(config.listeners.len(), 1);
        assert_eq!(config.listeners[0].bind.port(), 18140);
        assert_eq!(config.listeners[0].service.as_deref(), Some("bench"));
        let bench = &config.services["bench"];
        assert_eq!(bench.protocol, expected);
        assert_eq!(bench.endpoints.len(), 2);
    }
}

#[test]
fn the_tracing_bench_templates_load() {
    for (name, otlp) in [("off", false), ("1pct", true), ("100pct", true)] {
        let path = format!("benches/tracing/almond-{name}.yaml.tmpl");
        let text = render_template(&path, "http1");
        let config = load_proxy(&text, &path).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(config.tracing.otlp.is_some(), otlp, "{path}");
        assert_eq!(config.services["bench"].endpoints.len(), 2);
    }
}
