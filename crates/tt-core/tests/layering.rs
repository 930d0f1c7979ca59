//! The layering of tt-core's modules (`docs/engine.md`), checked on the sources themselves.
//!
//! Bottom-up: `quant`, `ops`, `qas`, `ir`, `plan`, `exec` run on the MCU without `alloc`; the
//! compiler (`graph`, `sparse`, `autodiff`, `planner`, `compile`) stands on top. Nothing below
//! imports anything above, so the format the MCU parses carries no compiler. A module's files
//! count as one (`ops/conv.rs` is `ops`); code compiled only for tests (`#[cfg(test)]` items and
//! test modules) may reach any layer and is not counted.
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use proc_macro2::{Delimiter, TokenStream, TokenTree};

/// The compiler: what the runtime modules must never import.
const COMPILER: [&str; 3] = ["autodiff", "planner", "compile"];
/// The format, the executor and everything under them.
const RUNTIME: [&str; 6] = ["plan", "ir", "exec", "ops", "qas", "quant"];
/// Kernels know neither the executor nor the format.
const ABOVE_OPS: [&str; 2] = ["exec", "plan"];

/// One `crate::<module>` reference: the module named and the file it is written in.
#[derive(Clone, Debug)]
struct Ref {
    to: String,
    file: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `#[cfg(test)]` or `#[cfg(all(test, ...))]`: an item that exists only in test builds.
fn is_test_only(attr: &TokenStream) -> bool {
    let s: String = attr.to_string().split_whitespace().collect();
    let Some(pred) = s.strip_prefix("cfg(").and_then(|r| r.strip_suffix(')')) else {
        return false;
    };
    pred == "test"
        || pred
            .strip_prefix("all(")
            .and_then(|r| r.strip_suffix(')'))
            .is_some_and(|args| args.split(',').any(|a| a == "test"))
}

/// The names a `crate::` path reaches first: `crate::a::x` gives `a`, `crate::{a, b::c}` gives
/// `a` and `b`.
fn first_segments(next: Option<&TokenTree>, out: &mut Vec<String>) {
    match next {
        Some(TokenTree::Ident(i)) => out.push(i.to_string()),
        Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
            let mut at_start = true;
            for t in g.stream() {
                match &t {
                    TokenTree::Ident(i) if at_start => {
                        out.push(i.to_string());
                        at_start = false;
                    }
                    TokenTree::Punct(p) if p.as_char() == ',' => at_start = true,
                    _ => at_start = false,
                }
            }
        }
        _ => {}
    }
}

/// Collects `crate::` references (also `$crate::` in macros) outside test-only items, and the
/// out-of-line modules declared test-only (`#[cfg(test)] mod tests;`).
fn scan(ts: TokenStream, refs: &mut Vec<String>, test_mods: &mut Vec<String>) {
    let toks: Vec<TokenTree> = ts.into_iter().collect();
    let mut i = 0;
    while i < toks.len() {
        // `#[cfg(test)]`: skip the item it guards, up to its first `;` or `{ ... }`.
        if let (TokenTree::Punct(p), Some(TokenTree::Group(g))) = (&toks[i], toks.get(i + 1)) {
            if p.as_char() == '#'
                && g.delimiter() == Delimiter::Bracket
                && is_test_only(&g.stream())
            {
                let start = i + 2;
                let mut j = start;
                while j < toks.len() {
                    match &toks[j] {
                        TokenTree::Punct(p) if p.as_char() == ';' => break,
                        TokenTree::Group(g) if g.delimiter() == Delimiter::Brace => break,
                        _ => j += 1,
                    }
                }
                let item: Vec<String> = toks[start..j].iter().map(|t| t.to_string()).collect();
                if let [.., kw, name] = item.as_slice() {
                    if kw == "mod" && matches!(toks.get(j), Some(TokenTree::Punct(_))) {
                        test_mods.push(name.clone());
                    }
                }
                i = j + 1;
                continue;
            }
        }
        match &toks[i] {
            TokenTree::Group(g) => scan(g.stream(), refs, test_mods),
            TokenTree::Ident(id) if id == "crate" => {
                let colons = matches!(
                    (toks.get(i + 1), toks.get(i + 2)),
                    (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                        if a.as_char() == ':' && b.as_char() == ':'
                );
                if colons {
                    first_segments(toks.get(i + 3), refs);
                }
            }
            _ => {}
        }
        i += 1;
    }
}

/// The top-level module a source file belongs to: `src/ops/conv.rs` and `src/ops.rs` are `ops`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next().expect("non-empty path");
    let name = first.as_os_str().to_string_lossy();
    name.strip_suffix(".rs").unwrap_or(&name).to_string()
}

/// Where the file of an out-of-line child module `name` of `parent` lives.
fn child_files(parent: &Path, name: &str) -> [PathBuf; 2] {
    let stem = parent.file_stem().expect("file name").to_string_lossy();
    let dir = parent.parent().expect("parent dir");
    let dir = if stem == "mod" || stem == "lib" {
        dir.to_path_buf()
    } else {
        dir.join(&*stem)
    };
    [
        dir.join(format!("{name}.rs")),
        dir.join(name).join("mod.rs"),
    ]
}

/// Every top-level module of tt-core and the modules each one references outside tests.
fn references() -> BTreeMap<String, Vec<Ref>> {
    let src = src_dir();
    let mut files = Vec::new();
    rs_files(&src, &mut files);
    let mut scanned = BTreeMap::new();
    let mut test_files = BTreeSet::new();
    for f in &files {
        let text = fs::read_to_string(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let ts: TokenStream = text
            .parse()
            .unwrap_or_else(|e| panic!("{} does not lex: {e:?}", f.display()));
        let (mut refs, mut test_mods) = (Vec::new(), Vec::new());
        scan(ts, &mut refs, &mut test_mods);
        for m in &test_mods {
            test_files.extend(child_files(f, m));
        }
        scanned.insert(f.clone(), refs);
    }
    let modules: BTreeSet<String> = files
        .iter()
        .map(|f| module_of(&src, f))
        .filter(|m| m != "lib")
        .collect();
    let mut out: BTreeMap<String, Vec<Ref>> =
        modules.iter().map(|m| (m.clone(), Vec::new())).collect();
    for (f, refs) in scanned {
        let from = module_of(&src, &f);
        if from == "lib" || test_files.contains(&f) {
            continue;
        }
        let file = f.strip_prefix(&src).unwrap().display().to_string();
        for to in refs {
            if to != from && modules.contains(&to) {
                let entry = out.get_mut(&from).unwrap();
                if !entry.iter().any(|r| r.to == to && r.file == file) {
                    entry.push(Ref {
                        to,
                        file: file.clone(),
                    });
                }
            }
        }
    }
    out
}

fn violations(refs: &BTreeMap<String, Vec<Ref>>, from: &[&str], to: &[&str]) -> Vec<String> {
    let mut bad = Vec::new();
    for m in from {
        for r in refs.get(*m).into_iter().flatten() {
            if to.contains(&r.to.as_str()) {
                bad.push(format!("{m} -> {} (in src/{})", r.to, r.file));
            }
        }
    }
    bad
}

/// A cycle among the modules, as `a -> b -> ... -> a`, if there is one.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(m.to_string(), 1);
        stack.push(m.to_string());
        for n in edges.get(m).into_iter().flatten() {
            match state.get(n.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == n).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(n.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(n, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in edges.keys() {
        if state.get(m.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(c) = visit(m, edges, &mut state, &mut stack) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_runtime_never_imports_the_compiler() {
    let refs = references();
    for m in RUNTIME.iter().chain(&COMPILER) {
        assert!(
            refs.contains_key(*m),
            "no module {m} in src/: update this test"
        );
    }
    let bad = violations(&refs, &RUNTIME, &COMPILER);
    assert!(
        bad.is_empty(),
        "the format, executor and kernels must not import the compiler (docs/engine.md, \
         layering):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn kernels_never_import_the_executor_or_the_format() {
    let bad = violations(&references(), &["ops"], &ABOVE_OPS);
    assert!(
        bad.is_empty(),
        "ops/ must not import exec or plan (docs/engine.md, layering):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn no_import_cycle_among_modules() {
    let refs = references();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, rs) in &refs {
        let e = edges.entry(from.clone()).or_default();
        for r in rs {
            e.insert(r.to.clone());
        }
    }
    if let Some(cycle) = find_cycle(&edges) {
        let hops: Vec<String> = cycle
            .windows(2)
            .map(|w| {
                let files: Vec<String> = refs[&w[0]]
                    .iter()
                    .filter(|r| r.to == w[1])
                    .map(|r| format!("src/{}", r.file))
                    .collect();
                format!("{} -> {} ({})", w[0], w[1], files.join(", "))
            })
            .collect();
        panic!(
            "import cycle among tt-core's modules: {}\n  {}",
            cycle.join(" -> "),
            hops.join("\n  ")
        );
    }
}
