//! The shape of the code, checked: data flows one way between the library's
//! top-level modules (no cycles), models never reach into the pipeline,
//! every line of timely / differential code is in `dataflow/`, and the
//! binary stays a thin face (small, short functions, no stage logic).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, with its text (tests and `#[cfg(test)]`
/// modules at the end of files cut away).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let in_tests = p.components().any(|c| c.as_os_str() == "tests");
                if name == "tests.rs" || name.ends_with("_tests.rs") || in_tests {
                    continue;
                }
                let text = std::fs::read_to_string(&p).unwrap();
                let code = match text.find("#[cfg(test)]\nmod tests") {
                    Some(cut) => text[..cut].to_string(),
                    None => text,
                };
                // Code only: comments and doc comments may name anything.
                let code: String = code
                    .lines()
                    .map(|l| l.split("//").next().unwrap_or(""))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push((p, code));
            }
        }
    }
    out.sort();
    out
}

/// The top-level module a file of `operators/src` belongs to.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn library_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("operators/src");
    let files = sources(&src);
    let modules: BTreeSet<String> = files
        .iter()
        .map(|(p, _)| module_of(&src, p))
        .filter(|m| m != "lib")
        .collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in &files {
        let m = module_of(&src, path);
        let deps = graph.entry(m.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != m && modules.contains(&name) {
                deps.insert(name);
            }
        }
    }
    graph
}

#[test]
fn the_library_modules_depend_on_each_other_one_way() {
    let graph = library_graph();
    // Depth-first search for a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            return Some(path[i..].iter().map(|s| s.to_string()).collect());
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for d in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(d, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        let cycle = visit(m, &graph, &mut Vec::new(), &mut done);
        assert!(cycle.is_none(), "module cycle: {cycle:?}\n{graph:#?}");
    }
    // Models use only their contract and the file readers: never the
    // pipeline, its stages, the store, the dataflow or the outputs.
    for forbidden in [
        "pipeline", "stages", "state", "dataflow", "outputs", "backends",
    ] {
        assert!(
            !graph["models"].contains(forbidden),
            "models depend on {forbidden}: {:?}",
            graph["models"]
        );
    }
    // The settings and the record types are leaves for the run.
    assert!(!graph["config"].contains("pipeline"));
    assert!(!graph["stages"].contains("pipeline"));
    assert!(!graph["dataflow"].contains("stages"));
}

#[test]
fn timely_and_differential_are_used_in_dataflow_only() {
    for dir in ["operators/src", "src"] {
        for (path, code) in sources(&root().join(dir)) {
            let in_dataflow = path.components().any(|c| c.as_os_str() == "dataflow");
            if in_dataflow {
                continue;
            }
            for word in ["timely::", "differential_dataflow::"] {
                assert!(
                    !code.contains(word),
                    "{} uses {word} outside dataflow/",
                    path.display()
                );
            }
        }
    }
}

/// `(name, first line, lines)` of every function in `code`.
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let indent = l.len() - t.len();
        let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
            .iter()
            .any(|p| t.starts_with(p));
        if !is_fn || t.ends_with(';') {
            continue;
        }
        let name = t
            .split("fn ")
            .nth(1)
            .unwrap_or("")
            .split(['(', '<'])
            .next()
            .unwrap_or("");
        let close = format!("{}}}", " ".repeat(indent));
        if let Some(end) = lines[i + 1..].iter().position(|x| *x == close) {
            out.push((name.to_string(), i + 1, end + 2));
        }
    }
    out
}

#[test]
fn the_binary_is_a_thin_face() {
    let src = root().join("src");
    let files = sources(&src);
    let total: usize = files.iter().map(|(_, c)| c.lines().count()).sum();
    assert!(total <= 2000, "src/ holds {total} lines of code");
    for (path, code) in &files {
        for (name, line, len) in functions(code) {
            assert!(
                len <= 120,
                "{}:{line}: fn {name} is {len} lines long",
                path.display()
            );
        }
        for stage in ["stages::", "StateStore", "KeyHasher", "rl_graph"] {
            assert!(
                !code.contains(stage),
                "{} reaches past the pipeline ({stage})",
                path.display()
            );
        }
    }
}
