use super::*;

fn fields<'a>(line: &'a str, n: usize, what: &str) -> Result<Vec<&'a str>, String> {
    let f: Vec<&str> = line.split('\t').collect();
    if f.len() == n {
        Ok(f)
    } else {
        Err(format!(
            "expected {n} tab-separated fields ({what}), got {}: {line:?}",
            f.len()
        ))
    }
}

fn state(s: &str, line: &str) -> Result<AppState, String> {
    s.parse().map_err(|e| format!("{e} in line {line:?}"))
}

fn lines(out: &str) -> impl Iterator<Item = &str> {
    out.lines().filter(|l| !l.trim().is_empty())
}

/// `NAME\tSTATE\tTEMPLATE` per line.
pub fn list(out: &str) -> Result<Vec<AppSummary>, String> {
    lines(out)
        .map(|line| {
            let f = fields(line, 3, "NAME, STATE, TEMPLATE")?;
            Ok(AppSummary {
                name: f[0].to_string(),
                state: state(f[1], line)?,
                template: f[2].to_string(),
            })
        })
        .collect()
}

/// `key\tvalue` per line; `name`, `state` and `template` are required.
pub fn info(out: &str) -> Result<AppInfo, String> {
    let (mut name, mut st, mut template, mut error) = (None, None, None, None);
    let (mut props, mut volumes, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    for line in lines(out) {
        let (k, v) = line
            .split_once('\t')
            .ok_or_else(|| format!("expected KEY<TAB>VALUE, got {line:?}"))?;
        if let Some(p) = k.strip_prefix("prop.") {
            props.push((p.to_string(), v.to_string()));
        } else if let Some(vol) = k.strip_prefix("volume.").filter(|v| !v.contains('.')) {
            let size = v
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("volume {vol}: size {v:?} is not a byte count"))?;
            volumes.push((vol.to_string(), size));
        } else {
            match k {
                "name" => name = Some(v.to_string()),
                "state" => st = Some(state(v, line)?),
                "template" => template = Some(v.to_string()),
                "error" => error = Some(v.to_string()).filter(|e| !e.trim().is_empty()),
                _ => extra.push((k.to_string(), v.to_string())),
            }
        }
    }
    let missing = |k: &str| format!("no `{k}` line");
    Ok(AppInfo {
        name: name.ok_or_else(|| missing("name"))?,
        state: st.ok_or_else(|| missing("state"))?,
        template: template.ok_or_else(|| missing("template"))?,
        error,
        props,
        volumes,
        extra,
    })
}

/// `VOLUME\tSIZE\tblake3:HEX` per line.
pub fn checksum(out: &str) -> Result<Vec<VolumeChecksum>, String> {
    lines(out)
        .map(|line| {
            let f = fields(line, 3, "VOLUME, SIZE, blake3:HEX")?;
            let size = f[1]
                .parse()
                .map_err(|_| format!("size {:?} is not a byte count in {line:?}", f[1]))?;
            let hex = f[2]
                .strip_prefix("blake3:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| format!("expected blake3:<64 hex digits>, got {:?}", f[2]))?;
            Ok(VolumeChecksum {
                volume: f[0].to_string(),
                size,
                blake3: hex.to_ascii_lowercase(),
            })
        })
        .collect()
}

/// `free_bytes\tN`, `template\tNAME`…, `address\tIP`… (other keys ignored).
pub fn grid(out: &str) -> Result<GridSummary, String> {
    let mut g = GridSummary::default();
    let mut free = None;
    for line in lines(out) {
        let f = fields(line, 2, "KEY, VALUE")?;
        match f[0] {
            "free_bytes" => {
                free = Some(
                    f[1].parse()
                        .map_err(|_| format!("free_bytes {:?} is not a byte count", f[1]))?,
                )
            }
            "template" => g.templates.push(f[1].to_string()),
            "address" => g.addresses.push(f[1].to_string()),
            _ => {}
        }
    }
    g.free_bytes = free.ok_or("no `free_bytes` line")?;
    Ok(g)
}

/// One line of `--progress_on_stdout`: `progress DONE TOTAL`. `None` for any other line.
pub fn progress(line: &str) -> Option<(u64, u64)> {
    let mut w = line.split_ascii_whitespace();
    match (w.next(), w.next(), w.next(), w.next()) {
        (Some("progress"), Some(d), Some(t), None) => Some((d.parse().ok()?, t.parse().ok()?)),
        _ => None,
    }
}
