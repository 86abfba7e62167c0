//! The documents an operator reads stay true: the README opens with the two commands, every local
//! link resolves, the walkthrough's commands are the ones `scripts/demo --auto` runs, and the
//! properties table lists exactly the properties MIG knows.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(p: &str) -> String {
    std::fs::read_to_string(root().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// `[text](target)` and `![alt](target)` targets in a Markdown text.
fn links(md: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = md;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].to_string());
        }
    }
    out
}

#[test]
fn the_readme_opens_with_exactly_the_two_commands() {
    let readme = read("README.md");
    let first_block = readme
        .split("```")
        .nth(1)
        .expect("the README has a code block");
    let commands: Vec<&str> = first_block
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split('#').next().unwrap().trim())
        .collect();
    assert_eq!(commands, ["scripts/demo", "scripts/test"]);
    let before: &str = readme.split("```").next().unwrap();
    assert!(
        before
            .lines()
            .all(|l| l.starts_with('#') || l.trim().is_empty()),
        "only the title comes before them"
    );
}

#[test]
fn every_local_link_in_the_readme_and_docs_resolves() {
    let mut docs = vec![PathBuf::from("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "md") {
            docs.push(e.path().strip_prefix(root()).unwrap().to_path_buf());
        }
    }
    let mut checked = 0;
    for doc in &docs {
        let text = read(doc.to_str().unwrap());
        let dir = doc.parent().unwrap_or(Path::new(""));
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") || link.starts_with('#')
            {
                continue;
            }
            let target = root().join(dir).join(link.split('#').next().unwrap());
            assert!(
                target.exists(),
                "{}: link {link:?} points at nothing",
                doc.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 8,
        "only {checked} local links found: is the parser broken?"
    );
}

#[test]
fn the_walkthrough_commands_are_the_ones_the_demo_runs() {
    let readme = read("README.md");
    let demo = read("scripts/demo");
    let shown: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("target/debug/mig "))
        .collect();
    assert!(shown.len() >= 2, "the walkthrough shows the CLI");
    for args in shown {
        let args = args.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(
            demo.contains(&format!("\"$mig\" {args}")),
            "README shows `mig {args}`, which scripts/demo does not run"
        );
    }
}

#[test]
fn the_properties_table_lists_every_property_and_no_other() {
    let readme = read("README.md");
    let table: Vec<String> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| name | default | meaning |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.split('`').nth(1).unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        table,
        actors::properties::NAMES,
        "README's properties table"
    );
}

/// The route table in README names every route the server has (`actors::api::ROUTES`), each as
/// `` `METHOD PATH `` at the start of a row (or in a row's text, for the timeline page).
#[test]
fn the_routes_table_lists_every_route_the_server_has() {
    let readme = read("README.md");
    let table: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("| route | what |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    for r in actors::api::ROUTES {
        let named = format!("`{} {}", r.method.as_str(), r.path);
        assert!(
            table.iter().any(|row| row.contains(&named)),
            "README's routes table does not name {named}`"
        );
    }
}
