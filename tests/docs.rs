//! The documentation cannot rot: the README's front page stays short; every shell block of
//! the README and `docs/` is either run here (`sh run`) or names the test or CI script
//! that exercises it (`sh checked-by=<file>`); every relative link and anchor resolves; and
//! the configuration reference lists every setting of `config/default.toml` with its
//! variable and its default, and nothing else.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::store::repo_path;

const FRONT_PAGE_LIMIT: usize = 8 * 1024;

fn documents() -> Vec<PathBuf> {
    let mut files = vec![repo_path("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(repo_path("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

fn relative(path: &Path) -> String {
    path.strip_prefix(repo_path("")).unwrap().display().to_string()
}

/// A fenced block: its info string, its first line's number, its text.
struct Block {
    info: String,
    line: usize,
    text: String,
}

fn blocks(markdown: &str) -> Vec<Block> {
    let mut found = Vec::new();
    let mut open: Option<(Block, usize)> = None;
    for (n, line) in markdown.lines().enumerate() {
        // Fences may be indented (in a list item); so is their content.
        let indent = line.len() - line.trim_start().len();
        match (&mut open, line.trim_start().strip_prefix("```")) {
            (None, Some(info)) => {
                let block = Block {
                    info: info.trim().to_string(),
                    line: n + 1,
                    text: String::new(),
                };
                open = Some((block, indent));
            }
            (Some(_), Some("")) => found.push(open.take().unwrap().0),
            (Some((block, fence_indent)), _) => {
                block.text.push_str(&line[indent.min(*fence_indent)..]);
                block.text.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    found
}

/// The programs a shell block runs: each command line's first word after its variable
/// assignments (`cargo run` runs the bridge).
fn programs(script: &str) -> Vec<String> {
    let mut programs = Vec::new();
    for line in script.replace("\\\n", " ").lines() {
        let line = line.split(" #").next().unwrap().trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = shell_words(line).into_iter().skip_while(|w| {
            w.split_once('=').is_some_and(|(name, _)| {
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            })
        });
        if let Some(program) = words.next() {
            let program = if program == "cargo" && words.next().as_deref() == Some("run") {
                "nsbridge".to_string()
            } else {
                program
            };
            programs.push(program);
        }
    }
    programs
}

/// Words of a command line, quotes removed (enough for the documentation's commands).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, ' ') => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

#[test]
fn the_front_page_fits_on_two_screens() {
    let size = std::fs::metadata(repo_path("README.md")).unwrap().len() as usize;
    assert!(
        size <= FRONT_PAGE_LIMIT,
        "README.md is {size} bytes, over {FRONT_PAGE_LIMIT}"
    );
}

#[test]
fn every_shell_block_is_run_here_or_names_what_exercises_it() {
    let bridge_dir = Path::new(env!("CARGO_BIN_EXE_nsbridge"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bridge_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    let mut checked = 0;
    for file in documents() {
        let text = std::fs::read_to_string(&file).unwrap();
        for block in blocks(&text) {
            let mut info = block.info.split_whitespace();
            if !matches!(info.next(), Some("sh" | "bash" | "shell" | "console")) {
                continue;
            }
            let at = format!("{}:{}", relative(&file), block.line);
            let programs = programs(&block.text);
            assert!(!programs.is_empty(), "{at}: a shell block without a command");
            match info.next() {
                Some("run") => {
                    let started = Instant::now();
                    let mut command = Command::new("bash");
                    command
                        .args(["-euo", "pipefail", "-c", &block.text])
                        .current_dir(repo_path(""))
                        .env("PATH", &path);
                    for (name, _) in std::env::vars() {
                        if name.starts_with("NSBRIDGE_") || name.starts_with("MONGO") || name == "API_SECRET"
                        {
                            command.env_remove(name);
                        }
                    }
                    let output = command.output().unwrap();
                    assert!(
                        output.status.success(),
                        "{at}: the block failed ({}):\n{}\n{}",
                        output.status,
                        String::from_utf8_lossy(&output.stdout),
                        String::from_utf8_lossy(&output.stderr)
                    );
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "{at}: too slow for a doc"
                    );
                    ran += 1;
                }
                Some(checked_by) if checked_by.starts_with("checked-by=") => {
                    let exerciser = &checked_by["checked-by=".len()..];
                    let exerciser_text = std::fs::read_to_string(repo_path(exerciser))
                        .unwrap_or_else(|e| panic!("{at}: checked-by {exerciser}: {e}"));
                    for program in programs.iter().filter(|p| !SHELL_UTILITIES.contains(&p.as_str())) {
                        assert!(
                            mentions(&exerciser_text, program),
                            "{at}: {exerciser} does not exercise {program:?}"
                        );
                    }
                    checked += 1;
                }
                other => panic!(
                    "{at}: mark the block `sh run` or `sh checked-by=<test or CI file>` (found {other:?})"
                ),
            }
        }
    }
    assert!(ran >= 2 && checked >= 5, "ran {ran}, checked {checked}");
}

/// Commands too plain to need a test of their own.
const SHELL_UTILITIES: &[&str] = &["cp", "cd", "export", "echo", "mkdir"];

/// Whether `text` names `program` as a word of its own.
fn mentions(text: &str, program: &str) -> bool {
    let word = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    text.match_indices(program).any(|(at, _)| {
        !word(text[..at].chars().next_back()) && !word(text[at + program.len()..].chars().next())
    })
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == ' ' || *c == '-' || *c == '_')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

fn anchors(markdown: &str) -> Vec<String> {
    let mut in_code = false;
    markdown
        .lines()
        .filter(|line| {
            if line.starts_with("```") {
                in_code = !in_code;
            }
            !in_code
        })
        .filter_map(|line| line.strip_prefix('#'))
        .map(|rest| slug(rest.trim_start_matches('#')))
        .collect()
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let link = |text: &str| -> Vec<String> {
        let mut targets = Vec::new();
        let mut rest = text;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            if let Some(end) = rest.find(')') {
                targets.push(rest[..end].to_string());
            }
        }
        targets
    };
    let mut files = documents();
    files.push(repo_path("BENCHMARKS.md"));
    let mut count = 0;
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for target in link(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((&target, ""));
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                file.parent().unwrap().join(path)
            };
            assert!(resolved.exists(), "{}: link to missing {target}", relative(&file));
            if !anchor.is_empty() {
                let linked = std::fs::read_to_string(&resolved).unwrap();
                assert!(
                    anchors(&linked).iter().any(|a| a == anchor),
                    "{}: no heading #{anchor} in {path}",
                    relative(&file)
                );
            }
            count += 1;
        }
    }
    assert!(count > 20, "only {count} links found");
}

/// The settings of `config/default.toml`: `key` or `section.key`, and the default as text.
fn default_settings() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo_path("config/default.toml")).unwrap();
    let table: toml::Table = text.parse().unwrap();
    let mut settings = BTreeMap::new();
    let show = |value: &toml::Value| match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (key, value) in &table {
        match value {
            toml::Value::Table(section) => {
                for (inner, value) in section {
                    settings.insert(format!("{key}.{inner}"), show(value));
                }
            }
            value => {
                settings.insert(key.clone(), show(value));
            }
        }
    }
    settings
}

#[test]
fn the_configuration_reference_lists_every_setting_with_its_variable_and_default() {
    let reference = std::fs::read_to_string(repo_path("docs/configuration.md")).unwrap();
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in reference.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<String> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect();
        let key = cells[0].split('`').nth(1).unwrap().to_string();
        assert!(rows.insert(key.clone(), cells).is_none(), "{key} listed twice");
    }
    let settings = default_settings();
    assert!(settings.len() > 30, "{settings:?}");
    for (key, default) in &settings {
        let cells = rows
            .get(key)
            .unwrap_or_else(|| panic!("docs/configuration.md does not list `{key}`"));
        assert_eq!(
            cells.len(),
            4,
            "{key}: setting | environment | Nightscout variable | default"
        );
        let variable = format!("`NSBRIDGE_{}`", key.replace('.', "__").to_uppercase());
        assert!(
            cells[1].contains(&variable),
            "{key}: its variable is {variable}, not {}",
            cells[1]
        );
        if default.is_empty() {
            assert!(
                cells[3].contains("empty") || cells[3].contains("required") || cells[3].contains("the URI"),
                "{key}: an empty default, not {}",
                cells[3]
            );
        } else {
            assert!(
                cells[3].contains(&format!("`{default}`")),
                "{key}: default `{default}`, not {}",
                cells[3]
            );
        }
    }
    for key in rows.keys() {
        assert!(
            settings.contains_key(key),
            "docs/configuration.md lists `{key}`, which config/default.toml does not have"
        );
    }
}

#[test]
fn programs_of_a_block_skip_assignments_comments_and_continuations() {
    assert_eq!(
        programs(
            "A='x y' B=2 cargo run --release\n# note\ndocker run -d \\\n  --env-file f nsbridge\nC=1 \\\n  nsbridge check-config\nscripts/test  # all\n"
        ),
        ["nsbridge", "docker", "nsbridge", "scripts/test"]
    );
    assert_eq!(
        slug("Where the bridge listens, and how clients reach it"),
        "where-the-bridge-listens-and-how-clients-reach-it"
    );
    assert_eq!(
        slug("1000 subscribers × a 300-document burst"),
        "1000-subscribers--a-300-document-burst"
    );
}
