//! Colouring for fenced code blocks: keywords, strings, numbers and comments, from the scopes
//! of syntect's bundled Sublime Text grammars (about 75 languages, parsed with a pure-Rust
//! regex engine) mapped onto the chat's [`Theme`], so code follows the chat's colours rather
//! than a syntect theme. A language the grammars do not know is shown plain.
use super::theme::Theme;
use ratatui::style::Style;
use ratatui::text::Span;
use std::sync::OnceLock;
use syntect::parsing::{ParseState, Scope, ScopeStack, SyntaxSet};

/// The bundled grammars, read once (about a millisecond; each grammar's regexes compile on
/// first use).
fn syntaxes() -> &'static SyntaxSet {
    static SET: OnceLock<SyntaxSet> = OnceLock::new();
    SET.get_or_init(SyntaxSet::load_defaults_newlines)
}

#[derive(Clone, Copy, PartialEq)]
enum Class {
    Keyword,
    String,
    Number,
    Comment,
}

/// Scope prefixes and what they show as; the innermost scope that has one decides.
fn classes() -> &'static [(Scope, Class)] {
    static CLASSES: OnceLock<Vec<(Scope, Class)>> = OnceLock::new();
    CLASSES.get_or_init(|| {
        [
            ("comment", Class::Comment),
            ("string", Class::String),
            ("constant.numeric", Class::Number),
            ("constant.language", Class::Keyword),
            ("keyword", Class::Keyword),
            ("storage.type", Class::Keyword),
            ("storage.modifier", Class::Keyword),
        ]
        .into_iter()
        .map(|(s, c)| (Scope::new(s).expect("a valid scope"), c))
        .collect()
    })
}

fn class_of(stack: &ScopeStack, text: &str) -> Option<Class> {
    let keyword_operator = Scope::new("keyword.operator").expect("a valid scope");
    stack.as_slice().iter().rev().find_map(|scope| {
        let (_, class) = classes().iter().find(|(p, _)| p.is_prefix_of(*scope))?;
        // `=`, `+`, `&&` are keyword.operator too: only worded ones (`and`, `in`) are keywords
        if keyword_operator.is_prefix_of(*scope)
            && !text.trim().chars().all(|c| c.is_alphanumeric() || c == '_')
        {
            return None;
        }
        Some(*class)
    })
}

fn style_of(class: Option<Class>, theme: &Theme) -> Style {
    match class {
        Some(Class::Keyword) => theme.keyword,
        Some(Class::String) => theme.string,
        Some(Class::Number) => theme.number,
        Some(Class::Comment) => theme.comment,
        None => Style::new(),
    }
}

/// `code`'s lines as styled spans; `info` is the fence's info string (`rust`, `py`,
/// `rust,ignore`, `python title="x"`), matched against the grammars' names and extensions.
pub fn highlight(info: &str, code: &str, theme: &Theme) -> Vec<Vec<Span<'static>>> {
    let set = syntaxes();
    let token = info
        .split(|c: char| c == ',' || c == '{' || c.is_whitespace())
        .next()
        .unwrap_or("");
    let syntax = (!token.is_empty())
        .then(|| set.find_syntax_by_token(token))
        .flatten();
    let Some(syntax) = syntax else {
        return code
            .lines()
            .map(|l| vec![Span::raw(l.to_string())])
            .collect();
    };
    let mut state = ParseState::new(syntax);
    let mut stack = ScopeStack::new();
    let mut failed = false;
    code.lines()
        .map(|line| {
            let mut out = Spans::default();
            // the grammars expect each line with its newline
            let ops = if failed {
                None
            } else {
                state.parse_line(&format!("{line}\n"), set).ok()
            };
            let Some(ops) = ops else {
                // a grammar that fails on a line: the rest of the block plain
                failed = true;
                out.push(line, Style::new());
                return out.0;
            };
            let mut at = 0;
            for (pos, op) in ops {
                let pos = pos.min(line.len());
                if pos > at {
                    let text = &line[at..pos];
                    out.push(text, style_of(class_of(&stack, text), theme));
                    at = pos;
                }
                if stack.apply(&op).is_err() {
                    failed = true;
                }
            }
            let text = &line[at..];
            out.push(text, style_of(class_of(&stack, text), theme));
            out.0
        })
        .collect()
}

/// Spans that merge neighbours of the same style.
#[derive(Default)]
struct Spans(Vec<Span<'static>>);

impl Spans {
    fn push(&mut self, text: &str, style: Style) {
        if text.is_empty() {
            return;
        }
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
        // a language no grammar knows: plain, and "#" is text
        let got = classes("brainfuck", "def # 1");
        assert_eq!(got[0], vec![pair("def # 1", "")]);
        assert_eq!(classes("", "def # 1")[0], vec![pair("def # 1", "")]);
        // SQL keywords in any case
        assert_eq!(classes("sql", "SELECT 1")[0][0], pair("SELECT", "kw"));
    }

    #[test]
    fn grammars_know_what_keyword_lists_did_not() {
        // a Python docstring spans lines; `in` is a worded operator, `=` is not a keyword
        let got = classes("python", "x = \"\"\"one\ntwo\"\"\" if a in b else 0x1F");
        assert_eq!(got[0], vec![pair("x = ", ""), pair("\"\"\"one", "str")]);
        assert_eq!(
            got[1],
            vec![
                pair("two\"\"\"", "str"),
                pair(" ", ""),
                pair("if", "kw"),
                pair(" a ", ""),
                pair("in", "kw"),
                pair(" b ", ""),
                pair("else", "kw"),
                pair(" ", ""),
                pair("0x1F", "num"),
            ]
        );
        // the fence's info string: the first word names the language
        assert_eq!(classes("rust,ignore", "fn f() {}")[0][0], pair("fn", "kw"));
        assert_eq!(
            classes("python title=\"a.py\"", "pass")[0],
            vec![pair("pass", "kw")]
        );
        // languages the keyword lists never had
        assert_eq!(
            classes("haskell", "-- note")[0],
            vec![pair("-- note", "com")]
        );
        assert_eq!(
            classes("yaml", "a: 'b' # c")[0].last().unwrap(),
            &pair("# c", "com")
        );
    }
}
