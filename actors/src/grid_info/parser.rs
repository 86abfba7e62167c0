//! The grid.info parser: a line-by-line state machine that reports every problem it finds, in file
//! order, and recovers at the next line (the format is described in the parent module). It is one
//! file of about 850 lines on purpose: one state machine whose states and recovery rules read best
//! side by side (its tests are in `parser/tests.rs`).

use super::*;

/// Parses the bytes of a grid.info file; `path` only labels the diagnostics.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<GridInfo, Vec<Diagnostic>> {
    if bytes.len() as u64 > MAX_SIZE {
        return Err(vec![file_level(path, too_large(bytes.len() as u64))]);
    }
    // Editors on Windows may start the file with a byte order mark; it carries no meaning here.
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let lines = split_lines(bytes);
    let mut p = Parser {
        path,
        diags: Vec::new(),
        state: State::Outside,
        ids: HashMap::new(),
        grids: Vec::new(),
        any_header: false,
    };
    let mut encoding = Vec::new();
    let mut last = (0, 0);
    for (i, raw) in lines.iter().enumerate() {
        let no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = match std::str::from_utf8(raw) {
            Ok(s) => Cow::Borrowed(s),
            Err(e) => {
                let good = e.valid_up_to();
                let col = String::from_utf8_lossy(&raw[..good]).chars().count() + 1;
                let message = format!(
                    "byte 0x{:02X} is not valid UTF-8: save the file as UTF-8 (plain ASCII is fine)",
                    raw[good]
                );
                encoding.push((no, col, message));
                // Parse the rest anyway, so the lines after it are still checked.
                String::from_utf8_lossy(raw)
            }
        };
        p.line(no, &text);
        last = (no, text.chars().count() + 1);
    }
    p.end(last);
    let Parser {
        mut diags, grids, ..
    } = p;
    // On a line with bad bytes, the encoding is the problem to fix; what the lossy decoding made of
    // the line is noise.
    let bad_lines: HashSet<usize> = encoding.iter().map(|(no, _, _)| *no).collect();
    diags.retain(|d| !bad_lines.contains(&d.line));
    for (line, col, message) in encoding {
        diags.push(Diagnostic {
            path: path.to_path_buf(),
            line,
            col,
            message,
        });
    }
    if diags.is_empty() {
        return Ok(GridInfo {
            path: path.to_path_buf(),
            grids,
        });
    }
    diags.sort_by_key(|d| (d.line, d.col));
    if diags.len() > MAX_DIAGNOSTICS {
        let total = diags.len();
        diags.truncate(MAX_DIAGNOSTICS);
        diags.push(file_level(
            path,
            format!("{total} problems in all, only the first {MAX_DIAGNOSTICS} shown: is this a grid.info file?"),
        ));
    }
    Err(diags)
}

/// The file's lines without their `\n`; a final newline does not start another line.
pub fn split_lines(bytes: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    lines
}

/// The keys a grid block may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Key {
    Controller,
    Location,
    MigIp,
    AppConfig,
    MigHelperConfig,
}

const KEYS: [(Key, &str); 5] = [
    (Key::Controller, "controller"),
    (Key::Location, "location"),
    (Key::MigIp, "MIG_ip"),
    (Key::AppConfig, "app_config"),
    (Key::MigHelperConfig, "MigHelper_config"),
];

impl Key {
    fn from_name(name: &str) -> Option<Key> {
        KEYS.iter().find(|(_, n)| *n == name).map(|(k, _)| *k)
    }

    fn name(self) -> &'static str {
        KEYS.iter().find(|(k, _)| *k == self).map_or("", |(_, n)| n)
    }
}

/// The closest known key to a misspelt one, compared without case (`mig_ip` → `MIG_ip`).
fn suggest_key(word: &str) -> Option<&'static str> {
    let word = word.to_ascii_lowercase();
    KEYS.iter()
        .map(|(_, k)| (*k, strsim::jaro_winkler(&word, &k.to_ascii_lowercase())))
        .filter(|(_, score)| *score >= 0.8)
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(k, _)| k)
}

/// The properties MigHelper needs to get on the network of the target grid.
const MIGHELPER_REQUIRED: [&str; 4] = ["in_ip", "out_ip", "netmask", "gateway"];

fn valid_grid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Property names as the dialect has them: `[A-Za-z_][A-Za-z0-9_.]*`.
fn valid_prop_name(name: &str) -> bool {
    dialect::validate_prop_name(name).is_ok()
}

/// A netmask is a run of ones then a run of zeros (255.255.255.0, not 255.0.255.0).
fn contiguous_mask(mask: Ipv4Addr) -> bool {
    let m = u32::from(mask);
    m.leading_ones() + m.trailing_zeros() == 32
}

/// The 1-based column of byte offset `at` in `text`.
fn col(text: &str, at: usize) -> usize {
    text[..at].chars().count() + 1
}

/// Spaces and tabs separate tokens on a line; every other character is content.
fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Where the comment starts in an unquoted value `rest` (its length when there is none): at the
/// first `#` that follows a blank (`after_blank`: the character before `rest` is one). In a
/// property list (`list`), a `#` inside single or double inner quotes is part of the value.
fn comment_start(rest: &str, after_blank: bool, list: bool) -> usize {
    let mut prev_blank = after_blank;
    let mut quote: Option<char> = None;
    for (i, c) in rest.char_indices() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if list && (c == '\'' || c == '"') => quote = Some(c),
            None if c == '#' && prev_blank => return i,
            None => {}
        }
        prev_blank = is_blank(c);
    }
    rest.len()
}

/// A value as written after `=`, unquoted, each character with the column it came from.
struct Value {
    chars: Vec<(char, usize)>,
    /// Column of the value's first character (its opening quote when quoted).
    col: usize,
}

impl Value {
    fn text(&self) -> String {
        self.chars.iter().map(|(c, _)| c).collect()
    }

    /// Column of the character at `i`, or just past the value.
    fn col_at(&self, i: usize) -> usize {
        match self.chars.get(i) {
            Some((_, c)) => *c,
            None => self.chars.last().map_or(self.col, |(_, c)| c + 1),
        }
    }
}

/// A grid block being read.
struct Block {
    /// None when the header's id was unusable (already reported).
    id: Option<String>,
    line: usize,
    col: usize,
    /// Where `{` should go on the header line: just past `grid ID:`.
    brace_col: usize,
    /// Line of `{` (of `grid` when `{` was missing).
    open_line: usize,
    seen: HashMap<Key, usize>,
    controller: Option<Controller>,
    location: Option<String>,
    mig_ip: Option<HostPort>,
    app_config: Option<Vec<(String, String)>>,
    mighelper_config: Option<Vec<(String, String)>>,
}

impl Block {
    /// The header as it should read, for messages.
    fn header(&self) -> String {
        format!("grid {}:", self.id.as_deref().unwrap_or("ID"))
    }

    fn label(&self) -> String {
        match &self.id {
            Some(id) => format!("grid {id}"),
            None => format!("the grid at line {}", self.line),
        }
    }
}

enum State {
    Outside,
    /// `grid ID:` read, `{` not yet.
    Header(Block),
    Open(Block),
}

struct Parser<'a> {
    path: &'a Path,
    diags: Vec<Diagnostic>,
    state: State,
    /// Grid id → line of its first definition.
    ids: HashMap<String, usize>,
    grids: Vec<Grid>,
    any_header: bool,
}

impl Parser<'_> {
    fn err(&mut self, line: usize, col: usize, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            path: self.path.to_path_buf(),
            line,
            col,
            message: message.into(),
        });
    }

    fn line(&mut self, no: usize, text: &str) {
        let start = text.len() - text.trim_start_matches(is_blank).len();
        let body = &text[start..];
        if body.is_empty() || body.starts_with('#') {
            return;
        }
        if body.starts_with('{') {
            self.open_brace(no, text, start);
        } else if body.starts_with('}') {
            self.close_brace(no, text, start);
        } else if is_header(body) {
            self.header(no, text, start);
        } else {
            self.key_line(no, text, start);
        }
    }

    /// Reports anything but blanks or a comment from byte `at` on.
    fn trailing(&mut self, no: usize, text: &str, at: usize, after: &str, fix: &str) {
        let rest = &text[at..];
        let skip = rest.len() - rest.trim_start_matches(is_blank).len();
        let rest = &rest[skip..];
        if !rest.is_empty() && !rest.starts_with('#') {
            let message = format!("unexpected text after {after}: {fix}");
            self.err(no, col(text, at + skip), message);
        }
    }

    fn missing_open_brace(&mut self, b: &Block) {
        let message = format!(
            "expected `{{` after `{}`, on the same line or the next",
            b.header()
        );
        self.err(b.line, b.brace_col, message);
    }

    fn not_closed(&mut self, b: &Block, line: usize, col: usize, where_: &str) {
        let message = format!(
            "{} opened at line {} is not closed: missing `}}`; add it {where_}",
            b.label(),
            b.open_line
        );
        self.err(line, col, message);
    }

    /// Leaves the current block (if any) because a new `grid` header starts at `no`.
    fn leave(&mut self, no: usize, col: usize) {
        match std::mem::replace(&mut self.state, State::Outside) {
            State::Outside => {}
            State::Header(b) => self.missing_open_brace(&b),
            State::Open(b) => {
                self.not_closed(&b, no, col, "before this line");
                self.finish(b);
            }
        }
    }

    fn end(&mut self, (last_line, last_col): (usize, usize)) {
        match std::mem::replace(&mut self.state, State::Outside) {
            State::Outside => {}
            State::Header(b) => self.missing_open_brace(&b),
            State::Open(b) => {
                self.not_closed(&b, last_line, last_col, "at the end of the file");
                self.finish(b);
            }
        }
        if !self.any_header {
            self.diags.push(file_level(
                self.path,
                "no grid defined: add a `grid ID:` block; conf/sample.grid.info shows one".into(),
            ));
        }
    }

    fn header(&mut self, no: usize, text: &str, start: usize) {
        let grid_col = col(text, start);
        self.leave(no, grid_col);
        self.any_header = true;
        let after_word = start + "grid".len();
        let rest = &text[after_word..];
        let id_at = after_word + rest.len() - rest.trim_start_matches(is_blank).len();
        let id_len = text[id_at..]
            .find(|c: char| is_blank(c) || c == ':' || c == '{' || c == '#')
            .unwrap_or(text.len() - id_at);
        let id = &text[id_at..id_at + id_len];
        if id.is_empty() {
            self.err(
                no,
                col(text, id_at),
                "expected a grid id after `grid`, e.g. `grid g1:`",
            );
        } else if !valid_grid_id(id) {
            let message = format!("invalid grid id `{id}`: use 1-64 letters, digits, '-' and '_'");
            self.err(no, col(text, id_at), message);
        } else if let Some(first) = self.ids.get(id) {
            let message = format!(
                "duplicate grid id `{id}`: already defined at line {first}; give each grid its own id"
            );
            self.err(no, col(text, id_at), message);
        } else {
            self.ids.insert(id.to_string(), no);
        }
        let mut at = id_at + id_len;
        at += text[at..].len() - text[at..].trim_start_matches(is_blank).len();
        if text[at..].starts_with(':') {
            at += 1;
        } else {
            let shown = if id.is_empty() { "ID" } else { id };
            let message = format!("expected `:` after `grid {shown}`");
            self.err(no, col(text, at), message);
        }
        let block = Block {
            // A duplicate's block is still checked, under its id, but never becomes a Grid.
            id: valid_grid_id(id).then(|| id.to_string()),
            line: no,
            col: grid_col,
            brace_col: col(text, at),
            open_line: no,
            seen: HashMap::new(),
            controller: None,
            location: None,
            mig_ip: None,
            app_config: None,
            mighelper_config: None,
        };
        let skip = text[at..].len() - text[at..].trim_start_matches(is_blank).len();
        if text[at + skip..].starts_with('{') {
            let brace = at + skip + 1;
            self.trailing(
                no,
                text,
                brace,
                "`{`",
                "put each `key = value` on its own line",
            );
            self.state = State::Open(block);
        } else {
            let after = format!("`{}`", block.header());
            self.trailing(no, text, at, &after, "only `{` or a comment may follow");
            self.state = State::Header(block);
        }
    }

    fn open_brace(&mut self, no: usize, text: &str, start: usize) {
        match std::mem::replace(&mut self.state, State::Outside) {
            State::Outside => {
                self.err(
                    no,
                    col(text, start),
                    "`{` without a `grid ID:` line before it",
                );
            }
            State::Header(mut b) => {
                b.open_line = no;
                self.state = State::Open(b);
            }
            State::Open(b) => {
                let message = format!(
                    "unexpected `{{`: {} is already open since line {}; close it with `}}` first",
                    b.label(),
                    b.open_line
                );
                self.err(no, col(text, start), message);
                self.state = State::Open(b);
            }
        }
        self.trailing(
            no,
            text,
            start + 1,
            "`{`",
            "put each `key = value` on its own line",
        );
    }

    fn close_brace(&mut self, no: usize, text: &str, start: usize) {
        match std::mem::replace(&mut self.state, State::Outside) {
            State::Outside => {
                self.err(no, col(text, start), "unmatched `}`: no grid block is open");
            }
            State::Header(b) => {
                self.missing_open_brace(&b);
                self.finish(b);
            }
            State::Open(b) => self.finish(b),
        }
        self.trailing(
            no,
            text,
            start + 1,
            "`}`",
            "start the next grid on its own line",
        );
    }

    fn key_line(&mut self, no: usize, text: &str, start: usize) {
        let mut block = match std::mem::replace(&mut self.state, State::Outside) {
            State::Outside => {
                self.err(
                    no,
                    col(text, start),
                    "expected `grid ID:`: settings go inside a grid block, between `{` and `}`",
                );
                return;
            }
            State::Header(b) => {
                // Most likely only the `{` was forgotten: read the keys as the block's.
                self.missing_open_brace(&b);
                b
            }
            State::Open(b) => b,
        };
        self.key_value(&mut block, no, text, start);
        self.state = State::Open(block);
    }

    fn key_value(&mut self, b: &mut Block, no: usize, text: &str, start: usize) {
        let key_col = col(text, start);
        let Some(eq) = text[start..].find('=').map(|i| start + i) else {
            self.err(no, key_col, "expected `key = value`, `}` or a comment");
            return;
        };
        let name = text[start..eq].trim_end_matches(is_blank);
        if name.is_empty() {
            self.err(no, key_col, "missing key before `=`");
            return;
        }
        let Some(key) = Key::from_name(name) else {
            let message = match suggest_key(name) {
                Some(k) => format!("unknown key `{name}`: did you mean `{k}`?"),
                None => format!(
                    "unknown key `{name}`: use controller, location, MIG_ip, app_config or MigHelper_config"
                ),
            };
            self.err(no, key_col, message);
            return;
        };
        if let Some(first) = b.seen.get(&key) {
            let message =
                format!("duplicate key `{name}`: already set at line {first}; keep only one");
            self.err(no, key_col, message);
            return;
        }
        // Counted as present from here on, even if its value is bad: that is reported once, below.
        b.seen.insert(key, no);
        let Some(value) = self.value(no, text, eq + 1, name) else {
            return;
        };
        match key {
            Key::Controller => {
                let s = value.text();
                match s.parse::<Controller>() {
                    Ok(c) if validate_host(&c.host).is_ok() => b.controller = Some(c),
                    _ => {
                        let message = format!(
                            "invalid controller `{}`: use host, host:port or user@host[:port], \
                             e.g. root@10.0.0.5:22",
                            s.escape_debug()
                        );
                        self.err(no, value.col, message);
                    }
                }
            }
            Key::Location => {
                if let Some(i) = value.chars.iter().position(|(c, _)| c.is_control()) {
                    let message = format!(
                        "control character {:?} in location: remove it",
                        value.chars[i].0
                    );
                    self.err(no, value.col_at(i), message);
                } else {
                    b.location = Some(value.text());
                }
            }
            Key::MigIp => {
                let s = value.text();
                match s.parse::<HostPort>() {
                    Ok(hp) => b.mig_ip = Some(hp),
                    Err(e) => {
                        let message = format!("invalid MIG_ip: {}", e.reason.escape_debug());
                        let at = value.col_at(e.offset);
                        self.err(no, at, message);
                    }
                }
            }
            Key::AppConfig => {
                let (props, ok) = self.prop_list(no, &value, key);
                if ok {
                    b.app_config = Some(props.into_iter().map(|p| (p.name, p.value)).collect());
                }
            }
            Key::MigHelperConfig => {
                let (props, ok) = self.prop_list(no, &value, key);
                let mut good = ok;
                for need in MIGHELPER_REQUIRED {
                    let Some(p) = props.iter().find(|p| p.name == need) else {
                        good = false;
                        let message =
                            format!("MigHelper_config has no `{need}`: add {need}=A.B.C.D");
                        self.err(no, value.col, message);
                        continue;
                    };
                    let Some(v) = &p.checked else { continue };
                    match v.parse::<Ipv4Addr>() {
                        Ok(mask) if need == "netmask" && !contiguous_mask(mask) => {
                            good = false;
                            let message = format!(
                                "netmask `{v}` is not a contiguous mask: use e.g. 255.255.255.0"
                            );
                            self.err(no, p.value_col, message);
                        }
                        Ok(_) => {}
                        Err(_) => {
                            good = false;
                            let message = format!(
                                "`{need}` = `{}` is not an IPv4 address: write A.B.C.D",
                                v.escape_debug()
                            );
                            self.err(no, p.value_col, message);
                        }
                    }
                }
                if good {
                    let props = props.into_iter().map(|p| (p.name, p.value)).collect();
                    b.mighelper_config = Some(props);
                }
            }
        }
    }

    /// Reads the value after `=` at byte `at`, unquoting it.
    fn value(&mut self, no: usize, text: &str, at: usize, key: &str) -> Option<Value> {
        let skip = text[at..].len() - text[at..].trim_start_matches(is_blank).len();
        let at = at + skip;
        let mut rest = &text[at..];
        let first_col = col(text, at);
        if !rest.starts_with('"') {
            // A `#` after a blank starts a comment, as at the end of any other line; `a#b` and a
            // `#` inside a property list's inner quotes are part of the value.
            let after_blank = text[..at].ends_with(is_blank);
            let list = key == Key::AppConfig.name() || key == Key::MigHelperConfig.name();
            rest = &rest[..comment_start(rest, after_blank, list)];
        }
        if rest.trim_end_matches(is_blank).is_empty() {
            let message = format!("`{key}` has no value after `=`");
            self.err(no, first_col, message);
            return None;
        }
        let mut chars = Vec::new();
        if !rest.starts_with('"') {
            let rest = rest.trim_end_matches(is_blank);
            chars.extend(rest.chars().zip(first_col..));
            return Some(Value {
                chars,
                col: first_col,
            });
        }
        let mut ok = true;
        let mut it = rest.char_indices().zip(first_col..).skip(1).peekable();
        while let Some(((i, c), c_col)) = it.next() {
            match c {
                '"' => {
                    self.trailing(
                        no,
                        text,
                        at + i + 1,
                        "the closing quote",
                        "quote the whole value, or start a comment with `#`",
                    );
                    return ok.then_some(Value {
                        chars,
                        col: first_col,
                    });
                }
                '\\' => match it.peek() {
                    Some(&((_, e), _)) if e == '"' || e == '\\' => {
                        chars.push((e, c_col));
                        it.next();
                    }
                    Some(&((_, e), _)) => {
                        ok = false;
                        let message = format!(
                            "unknown escape `\\{}` in a quoted value: only `\\\"` and `\\\\` are allowed",
                            e.escape_debug()
                        );
                        self.err(no, c_col, message);
                    }
                    None => {}
                },
                _ => chars.push((c, c_col)),
            }
        }
        self.err(
            no,
            first_col,
            "unterminated quote: add the closing `\"` at the end of the value, on this line",
        );
        None
    }

    /// Splits a property list into `name=value` pairs, reporting each bad one. Returns what could
    /// be read (so that a later check does not call a present property missing) and whether all
    /// of it was fine.
    fn prop_list(&mut self, no: usize, v: &Value, key: Key) -> (Vec<ListProp>, bool) {
        let cs = &v.chars;
        let mut props: Vec<ListProp> = Vec::new();
        // Name → column of its first setting (a map: a list may hold many thousands).
        let mut first_at: HashMap<String, usize> = HashMap::new();
        let mut ok = true;
        let mut i = 0;
        let owner = key.name();
        while i < cs.len() {
            if is_blank(cs[i].0) {
                i += 1;
                continue;
            }
            let name_start = i;
            while i < cs.len() && cs[i].0 != '=' && !is_blank(cs[i].0) {
                i += 1;
            }
            let name: String = cs[name_start..i].iter().map(|(c, _)| c).collect();
            let name_col = v.col_at(name_start);
            if i == cs.len() || cs[i].0 != '=' {
                ok = false;
                let message = format!(
                    "expected NAME=VALUE in {owner}, found `{}`",
                    name.escape_debug()
                );
                self.err(no, name_col, message);
                continue;
            }
            i += 1; // '='
            let value_col = v.col_at(i);
            let mut value = String::new();
            let mut value_ok = true;
            // The first control character and its column, to point at it.
            let mut control = None;
            let push = |value: &mut String, control: &mut Option<(char, usize)>, (c, at)| {
                value.push(c);
                if c.is_control() && control.is_none() {
                    *control = Some((c, at));
                }
            };
            if let Some(&(q, q_col)) = cs.get(i).filter(|(c, _)| *c == '\'' || *c == '"') {
                i += 1;
                while i < cs.len() && cs[i].0 != q {
                    push(&mut value, &mut control, cs[i]);
                    i += 1;
                }
                if i == cs.len() {
                    let message = format!(
                        "unterminated quote in {owner}: add the closing `{q}` after the value of `{}`",
                        name.escape_debug()
                    );
                    self.err(no, q_col, message);
                    return (props, false);
                }
                i += 1; // closing quote
                if i < cs.len() && !is_blank(cs[i].0) {
                    ok = false;
                    value_ok = false;
                    let message = format!(
                        "text right after the closing `{q}` in {owner}: put a space between properties"
                    );
                    self.err(no, v.col_at(i), message);
                    while i < cs.len() && !is_blank(cs[i].0) {
                        i += 1;
                    }
                }
            } else {
                while i < cs.len() && !is_blank(cs[i].0) {
                    push(&mut value, &mut control, cs[i]);
                    i += 1;
                }
            }
            if name == ".name" && key == Key::AppConfig {
                ok = false;
                self.err(
                    no,
                    name_col,
                    "app_config must not set `.name`: MIG names the target application itself; remove it",
                );
                continue;
            }
            if !valid_prop_name(&name) {
                ok = false;
                let message = format!(
                    "invalid property name `{}` in {owner}: use letters, digits, '_' and '.', \
                     starting with a letter or '_'",
                    name.escape_debug()
                );
                self.err(no, name_col, message);
                continue;
            }
            if let Some(first) = first_at.get(&name) {
                ok = false;
                let message = format!(
                    "property `{name}` is set twice in {owner} (first at column {first}); keep only one"
                );
                self.err(no, name_col, message);
                continue;
            }
            first_at.insert(name.clone(), name_col);
            if let Some((c, at)) = control {
                ok = false;
                value_ok = false;
                let message = format!(
                    "control character {c:?} in the value of `{name}` in {owner}: remove it"
                );
                self.err(no, at, message);
            }
            props.push(ListProp {
                checked: value_ok.then(|| value.clone()),
                name,
                value,
                value_col,
            });
        }
        (props, ok)
    }

    /// Checks a finished block and keeps it as a [`Grid`] when it is complete.
    fn finish(&mut self, b: Block) {
        for (key, what) in [
            (
                Key::Controller,
                "`controller = HOST` (host, host:port or user@host[:port])",
            ),
            (
                Key::MigIp,
                "`MIG_ip = HOST:PORT` (where MIG's GUI listens on this grid)",
            ),
            (
                Key::MigHelperConfig,
                "`MigHelper_config = \"in_ip=… out_ip=… netmask=… gateway=…\"`",
            ),
        ] {
            if !b.seen.contains_key(&key) {
                let message = format!("{} has no {}: add {what}", b.label(), key.name());
                self.err(b.line, b.col, message);
            }
        }
        let Some(id) = b.id else { return };
        if self.ids.get(&id) != Some(&b.line) {
            return; // a duplicate, already reported
        }
        if let (Some(controller), Some(mig_ip), Some(mighelper_config)) =
            (b.controller, b.mig_ip, b.mighelper_config)
        {
            let app_config = match (b.seen.contains_key(&Key::AppConfig), b.app_config) {
                (true, None) => return, // present but bad, already reported
                (_, a) => a.unwrap_or_default(),
            };
            self.grids.push(Grid {
                id,
                controller,
                location: b.location,
                mig_ip,
                app_config,
                mighelper_config,
                line: b.line,
            });
        }
    }
}

/// One pair of a property list, with where it came from.
struct ListProp {
    name: String,
    value: String,
    /// The value when it had no problem of its own (so it is worth checking further).
    checked: Option<String>,
    value_col: usize,
}

/// `grid` as a word at the start of a line, and not a key named `grid`.
fn is_header(body: &str) -> bool {
    let Some(rest) = body.strip_prefix("grid") else {
        return false;
    };
    match rest.chars().next() {
        None | Some(':') => true,
        Some(c) if is_blank(c) => !rest.trim_start_matches(is_blank).starts_with('='),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
