//! Keyword colouring for fenced code blocks: keywords, strings, numbers and comments (line
//! comments and block comments spanning lines) for the languages models write most. A full
//! grammar-based highlighter (syntect and its bundled grammars) would cost megabytes for little.
use super::theme::Theme;
use ratatui::style::Style;
use ratatui::text::Span;

struct Lang {
    keywords: &'static [&'static str],
    line_comment: &'static [&'static str],
    block_comment: Option<(&'static str, &'static str)>,
    quotes: &'static [char],
    case_insensitive: bool,
}

const C_BLOCK: Option<(&str, &str)> = Some(("/*", "*/"));

fn lang(name: &str) -> Lang {
    let l = |keywords, line_comment, block_comment, quotes| Lang {
        keywords,
        line_comment,
        block_comment,
        quotes,
        case_insensitive: false,
    };
    match name.to_ascii_lowercase().as_str() {
        "rust" | "rs" => l(
            &[
                "as", "async", "await", "break", "const", "continue", "crate", "dyn", "else",
                "enum", "extern", "false", "fn", "for", "if", "impl", "in", "let", "loop", "match",
                "mod", "move", "mut", "pub", "ref", "return", "self", "Self", "static", "struct",
                "super", "trait", "true", "type", "unsafe", "use", "where", "while",
            ],
            &["//"],
            C_BLOCK,
            &['"'],
        ),
        "python" | "py" | "python3" => l(
            &[
                "and", "as", "assert", "async", "await", "break", "class", "continue", "def",
                "del", "elif", "else", "except", "False", "finally", "for", "from", "global", "if",
                "import", "in", "is", "lambda", "None", "nonlocal", "not", "or", "pass", "raise",
                "return", "True", "try", "while", "with", "yield", "self",
            ],
            &["#"],
            None,
            &['"', '\''],
        ),
        "javascript" | "js" | "typescript" | "ts" | "jsx" | "tsx" => l(
            &[
                "async",
                "await",
                "break",
                "case",
                "catch",
                "class",
                "const",
                "continue",
                "default",
                "delete",
                "do",
                "else",
                "enum",
                "export",
                "extends",
                "false",
                "finally",
                "for",
                "from",
                "function",
                "if",
                "implements",
                "import",
                "in",
                "instanceof",
                "interface",
                "let",
                "new",
                "null",
                "of",
                "return",
                "static",
                "super",
                "switch",
                "this",
                "throw",
                "true",
                "try",
                "type",
                "typeof",
                "undefined",
                "var",
                "void",
                "while",
                "yield",
            ],
            &["//"],
            C_BLOCK,
            &['"', '\'', '`'],
        ),
        "c" | "h" | "cpp" | "c++" | "cc" | "hpp" | "cxx" | "cuda" => l(
            &[
                "auto",
                "bool",
                "break",
                "case",
                "char",
                "class",
                "const",
                "constexpr",
                "continue",
                "default",
                "delete",
                "do",
                "double",
                "else",
                "enum",
                "extern",
                "false",
                "float",
                "for",
                "if",
                "include",
                "define",
                "inline",
                "int",
                "long",
                "namespace",
                "new",
                "nullptr",
                "private",
                "protected",
                "public",
                "return",
                "short",
                "signed",
                "sizeof",
                "static",
                "struct",
                "switch",
                "template",
                "this",
                "true",
                "typedef",
                "typename",
                "union",
                "unsigned",
                "using",
                "virtual",
                "void",
                "volatile",
                "while",
            ],
            &["//"],
            C_BLOCK,
            &['"', '\''],
        ),
        "java" | "kotlin" | "kt" | "c#" | "csharp" | "cs" => l(
            &[
                "abstract",
                "boolean",
                "break",
                "byte",
                "case",
                "catch",
                "char",
                "class",
                "continue",
                "default",
                "do",
                "double",
                "else",
                "enum",
                "extends",
                "final",
                "finally",
                "float",
                "for",
                "fun",
                "if",
                "implements",
                "import",
                "instanceof",
                "int",
                "interface",
                "long",
                "namespace",
                "new",
                "null",
                "override",
                "package",
                "private",
                "protected",
                "public",
                "return",
                "short",
                "static",
                "string",
                "super",
                "switch",
                "this",
                "throw",
                "throws",
                "true",
                "false",
                "try",
                "val",
                "var",
                "void",
                "while",
            ],
            &["//"],
            C_BLOCK,
            &['"', '\''],
        ),
        "go" | "golang" => l(
            &[
                "break",
                "case",
                "chan",
                "const",
                "continue",
                "default",
                "defer",
                "else",
                "fallthrough",
                "false",
                "for",
                "func",
                "go",
                "goto",
                "if",
                "import",
                "interface",
                "map",
                "nil",
                "package",
                "range",
                "return",
                "select",
                "struct",
                "switch",
                "true",
                "type",
                "var",
            ],
            &["//"],
            C_BLOCK,
            &['"', '\'', '`'],
        ),
        "sh" | "bash" | "shell" | "zsh" | "console" => l(
            &[
                "case", "do", "done", "elif", "else", "esac", "exit", "export", "fi", "for",
                "function", "if", "in", "local", "return", "then", "while",
            ],
            &["#"],
            None,
            &['"', '\''],
        ),
        "sql" => Lang {
            case_insensitive: true,
            ..l(
                &[
                    "and", "as", "by", "create", "delete", "desc", "drop", "from", "group",
                    "having", "in", "inner", "insert", "into", "is", "join", "left", "limit",
                    "not", "null", "on", "or", "order", "outer", "right", "select", "set", "table",
                    "update", "values", "where",
                ],
                &["--"],
                C_BLOCK,
                &['\''],
            )
        },
        "json" => l(&["true", "false", "null"], &[], None, &['"']),
        "toml" | "yaml" | "yml" | "ini" => l(&["true", "false"], &["#"], None, &['"', '\'']),
        _ => l(&[], &[], None, &['"']),
    }
}

/// One line of spans per line of `code`.
pub fn highlight(lang_name: &str, code: &str, theme: &Theme) -> Vec<Vec<Span<'static>>> {
    let lang = lang(lang_name);
    let mut in_block = false;
    code.lines()
        .map(|line| highlight_line(&lang, line, theme, &mut in_block))
        .collect()
}

fn highlight_line(
    lang: &Lang,
    line: &str,
    theme: &Theme,
    in_block: &mut bool,
) -> Vec<Span<'static>> {
    let mut out = Spans::default();
    let mut i = 0;
    while i < line.len() {
        let rest = &line[i..];
        if *in_block {
            let end = lang.block_comment.map_or("", |(_, e)| e);
            let len = rest.find(end).map_or(rest.len(), |p| {
                *in_block = false;
                p + end.len()
            });
            out.push(&rest[..len], theme.comment);
            i += len;
            continue;
        }
        if lang.line_comment.iter().any(|m| rest.starts_with(m)) {
            out.push(rest, theme.comment);
            break;
        }
        if let Some((start, _)) = lang.block_comment.filter(|(s, _)| rest.starts_with(s)) {
            *in_block = true;
            out.push(start, theme.comment);
            i += start.len();
            continue;
        }
        let c = rest.chars().next().expect("i is inside the line");
        let len = if lang.quotes.contains(&c) {
            let len = string_len(rest, c);
            out.push(&rest[..len], theme.string);
            len
        } else if c.is_ascii_digit() {
            let len = rest
                .find(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_' || ch == '.'))
                .unwrap_or(rest.len());
            out.push(&rest[..len], theme.number);
            len
        } else if c.is_alphabetic() || c == '_' {
            let len = rest
                .find(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                .unwrap_or(rest.len());
            let word = &rest[..len];
            let keyword = if lang.case_insensitive {
                lang.keywords.contains(&word.to_ascii_lowercase().as_str())
            } else {
                lang.keywords.contains(&word)
            };
            out.push(word, if keyword { theme.keyword } else { Style::new() });
            len
        } else {
            out.push(&rest[..c.len_utf8()], Style::new());
            c.len_utf8()
        };
        i += len;
    }
    out.0
}

/// Length of the string literal at the start of `s` (to the closing quote, else the line end).
fn string_len(s: &str, quote: char) -> usize {
    let mut escaped = false;
    for (i, c) in s.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == quote => return i + c.len_utf8(),
            _ => {}
        }
    }
    s.len()
}

/// Spans that merge neighbours of the same style.
#[derive(Default)]
struct Spans(Vec<Span<'static>>);

impl Spans {
    fn push(&mut self, text: &str, style: Style) {
        match self.0.last_mut() {
            Some(last) if last.style == style => last.content.to_mut().push_str(text),
            _ => self.0.push(Span::styled(text.to_string(), style)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(lang: &str, code: &str) -> Vec<Vec<(String, &'static str)>> {
        let t = Theme::dark();
        let name = |s: Style| match s {
            s if s == t.keyword => "kw",
            s if s == t.string => "str",
            s if s == t.comment => "com",
            s if s == t.number => "num",
            _ => "",
        };
        highlight(lang, code, &t)
            .into_iter()
            .map(|l| {
                l.into_iter()
                    .map(|s| (s.content.to_string(), name(s.style)))
                    .collect()
            })
            .collect()
    }

    fn pair(s: &str, c: &'static str) -> (String, &'static str) {
        (s.to_string(), c)
    }

    #[test]
    fn rust_keywords_strings_numbers_and_comments() {
        let got = classes("rust", "let x = \"a\\\"b\" + 42; // done");
        assert_eq!(
            got[0],
            vec![
                pair("let", "kw"),
                pair(" x = ", ""),
                pair("\"a\\\"b\"", "str"),
                pair(" + ", ""),
                pair("42", "num"),
                pair("; ", ""),
                pair("// done", "com"),
            ]
        );
    }

    #[test]
    fn block_comments_span_lines() {
        let got = classes("c", "int a; /* one\ntwo */ return a;");
        assert_eq!(
            got[0],
            vec![pair("int", "kw"), pair(" a; ", ""), pair("/* one", "com")]
        );
        assert_eq!(
            got[1],
            vec![
                pair("two */", "com"),
                pair(" ", ""),
                pair("return", "kw"),
                pair(" a;", "")
            ]
        );
    }

    #[test]
    fn python_hash_comments_and_unknown_languages() {
        let got = classes("py", "def f(): # x");
        assert_eq!(got[0][0], pair("def", "kw"));
        assert_eq!(got[0].last().unwrap(), &pair("# x", "com"));
        // unknown: no keywords, "#" is text
        let got = classes("brainfuck", "def # 1");
        assert_eq!(got[0], vec![pair("def # ", ""), pair("1", "num")]);
        // SQL keywords in any case
        assert_eq!(classes("sql", "SELECT 1")[0][0], pair("SELECT", "kw"));
    }
}
