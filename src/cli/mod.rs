//! Command-line front ends of `vsmclient` and `tlctl`: flag parsing, calling the master, and
//! turning replies into tables or JSON.
//!
//! Invariant: output for people goes to stdout, problems to stderr with a non-zero exit; the
//! `--json` forms print exactly one JSON document on stdout so scripts can parse them.

pub mod hawatch;
pub mod tlctl;
pub mod vsmclient;
pub mod vsmserver;

/// Runs a client's main future on a single-threaded runtime; exit status 2 if none can start.
pub fn block_on(program: &str, f: impl std::future::Future<Output = std::process::ExitCode>) -> std::process::ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("{program}: cannot start: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// Renders rows as left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.iter().map(|s| s.as_str()).collect()));
        out.push('\n');
    }
    out
}

/// Age as people read it: `42 s`, `5 min`, `3 h`, `11 day(s)`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min", s / 60)
    } else if s < 86400 {
        format!("{} h", s / 3600)
    } else {
        format!("{} day(s)", s / 86400)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(&["USER", "DISPLAY"], &[vec!["alice".into(), "10".into()], vec!["bo".into(), "11".into()]]);
        assert_eq!(t, "USER   DISPLAY\nalice  10\nbo     11\n");
    }

    #[test]
    fn ages() {
        assert_eq!(age(5_000), "5 s");
        assert_eq!(age(300_000), "5 min");
        assert_eq!(age(7_200_000), "2 h");
        assert_eq!(age(11 * 86_400_000), "11 day(s)");
    }
}
