//! The tokenizers of InternVL 2.5 checkpoints, giving exactly the ids and text of the
//! reference's slow tokenizers.
//!
//! Reference: `AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=False)` in
//! transformers 4.47, i.e. `Qwen2Tokenizer` or the remote-code `InternLM2Tokenizer`, used as
//! `tokenizer(text).input_ids` and `tokenizer.decode(ids, skip_special_tokens=...)`.
//! Layouts, in order of preference:
//! - `tokenizer.json`: loaded with `tokenizers` (the fast twin of `Qwen2Tokenizer`);
//! - `vocab.json` + `merges.txt`: a `tokenizers` pipeline built here the way `Qwen2Tokenizer`
//!   works (NFC, Qwen2's split regex, byte-level BPE);
//! - `tokenizer.model`: sentencepiece BPE ([`super::sentencepiece`]) inside the slow-tokenizer
//!   flow of `InternLM2Tokenizer` (added tokens split out first, each chunk encoded on its own,
//!   BOS prepended).
//!
//! Added and special tokens come from `tokenizer_config.json` (`added_tokens_decoder` and the
//! special-token attributes); only when it has no `added_tokens_decoder` do `added_tokens.json`
//! and `special_tokens_map.json` count, as in `PreTrainedTokenizerBase._from_pretrained`.
//! Decoding follows `PreTrainedTokenizer._decode` for both families, including its quirks:
//! non-special added tokens (and special ones past the model vocabulary) are decoded on their
//! own, `InternLM2Tokenizer` joins those pieces with spaces and always applies
//! `clean_up_tokenization`. Ids that are in neither vocabulary decode to nothing (the reference
//! raises).
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::sentencepiece::{SentencePiece, SentencePieceError};
use crate::files::MAX_METADATA_BYTES;

/// `Qwen2Tokenizer`'s pre-tokenisation pattern (`PRETOKENIZE_REGEX`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(
        "no tokenizer in {}: expected tokenizer.json, vocab.json+merges.txt, or tokenizer.model",
        dir.display()
    )]
    Missing { dir: PathBuf },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not valid: {what}", path.display())]
    Invalid { path: PathBuf, what: String },
    #[error(transparent)]
    SentencePiece(#[from] SentencePieceError),
    #[error("cannot encode {text_len} bytes of text: {what}")]
    Encode { text_len: usize, what: String },
}

/// One entry of `added_tokens_decoder`.
#[derive(Debug, Clone)]
struct AddedSpec {
    id: u32,
    content: String,
    special: bool,
    lstrip: bool,
    rstrip: bool,
    single_word: bool,
    normalized: bool,
}

/// What the tokenizer files say besides the model itself.
#[derive(Debug, Default)]
struct Config {
    /// `added_tokens_decoder`, or `added_tokens.json` when that is absent.
    added: Vec<AddedSpec>,
    /// Special-token attributes by name (`bos_token`…, `None` for an explicit null).
    attributes: HashMap<String, Option<String>>,
    additional: Vec<String>,
    add_bos_token: Option<bool>,
    add_eos_token: Option<bool>,
    clean_up_tokenization_spaces: bool,
    tokenizer_class: Option<String>,
}

/// The slow tokenizer class whose behaviour a layout reproduces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    /// `Qwen2Tokenizer`: byte-level BPE.
    Qwen2,
    /// `InternLM2Tokenizer`: sentencepiece.
    InternLm2,
}

impl Family {
    /// Constructor defaults of the special-token attributes.
    fn default_attribute(self, name: &str) -> Option<&'static str> {
        match (self, name) {
            (Family::Qwen2, "unk_token" | "eos_token" | "pad_token") => Some("<|endoftext|>"),
            (Family::InternLm2, "unk_token") => Some("<unk>"),
            (Family::InternLm2, "bos_token") => Some("<s>"),
            (Family::InternLm2, "eos_token" | "pad_token") => Some("</s>"),
            _ => None,
        }
    }
}

const SPECIAL_ATTRIBUTES: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

#[derive(Clone)]
enum Model {
    /// Both BPE layouts.
    ByteLevel {
        inner: Box<tokenizers::Tokenizer>,
        /// GPT-2 byte-level alphabet: character -> byte.
        byte_decoder: HashMap<char, u8>,
    },
    SentencePiece(Box<SentencePiece>),
}

/// What [`Tokenizer::min_tokens`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinTokens {
    /// The text's length after normalization.
    pub bytes: usize,
    /// The most bytes one token covers.
    pub max_token_bytes: usize,
    /// At least this many tokens: `bytes / max_token_bytes`, rounded up.
    pub tokens: usize,
}

/// A tokenizer loaded from a checkpoint folder. Cloning copies the vocabularies.
#[derive(Clone)]
pub struct Tokenizer {
    model: Model,
    /// `_added_tokens_decoder` / `_added_tokens_encoder`.
    added_by_id: HashMap<u32, String>,
    added_by_content: HashMap<String, u32>,
    /// The slow tokenizer's added-token trie (the BPE layouts split inside `tokenizers`).
    splitter: AddedSplitter,
    /// `all_special_ids`: what `skip_special_tokens` drops.
    special_ids: HashSet<u32>,
    /// Added tokens `_decode` writes out on their own instead of through the model.
    standalone_ids: HashSet<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    clean_up_tokenization_spaces: bool,
    vocab_size: usize,
    /// The most bytes of normalized text one token covers (`None`: no bound, see
    /// [`Tokenizer::min_tokens`]).
    max_token_bytes: Option<usize>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let family = match self.model {
            Model::ByteLevel { .. } => "Qwen2Tokenizer",
            Model::SentencePiece(_) => "InternLM2Tokenizer",
        };
        f.debug_struct("Tokenizer")
            .field("family", &family)
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .finish_non_exhaustive()
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, TokenizerError> {
    let text = match crate::files::read_to_string(path, MAX_METADATA_BYTES, "a tokenizer file") {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| TokenizerError::Invalid {
            path: path.to_owned(),
            what: e.to_string(),
        })
}

/// A token in a config: a string, `{"content": ...}`, or null.
fn token_content(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

impl Config {
    fn load(dir: &Path) -> Result<Config, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let invalid = |path: &Path, what: String| TokenizerError::Invalid {
            path: path.to_owned(),
            what,
        };
        let config = read_json(&config_path)?.unwrap_or(Value::Object(Default::default()));
        let config = config
            .as_object()
            .ok_or_else(|| invalid(&config_path, "not a JSON object".into()))?;
        let mut out = Config {
            add_bos_token: config.get("add_bos_token").and_then(Value::as_bool),
            add_eos_token: config.get("add_eos_token").and_then(Value::as_bool),
            clean_up_tokenization_spaces: config
                .get("clean_up_tokenization_spaces")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            tokenizer_class: config
                .get("tokenizer_class")
                .and_then(Value::as_str)
                .map(str::to_owned),
            ..Config::default()
        };
        out.read_special(config);
        if let Some(decoder) = config.get("added_tokens_decoder") {
            let decoder = decoder.as_object().ok_or_else(|| {
                invalid(&config_path, "added_tokens_decoder is not an object".into())
            })?;
            for (id, token) in decoder {
                let bad = |what: &str| {
                    invalid(&config_path, format!("added_tokens_decoder[{id}]: {what}"))
                };
                let id = id.parse().map_err(|_| bad("the key is not a token id"))?;
                let content = token_content(token).ok_or_else(|| bad("no content"))?;
                let flag = |name: &str, default: bool| {
                    token.get(name).and_then(Value::as_bool).unwrap_or(default)
                };
                out.added.push(AddedSpec {
                    id,
                    content,
                    special: flag("special", false),
                    lstrip: flag("lstrip", false),
                    rstrip: flag("rstrip", false),
                    single_word: flag("single_word", false),
                    normalized: flag("normalized", true),
                });
            }
        } else {
            // legacy files: special_tokens_map.json overrides, added_tokens.json lists the tokens
            let map_path = dir.join("special_tokens_map.json");
            if let Some(map) = read_json(&map_path)? {
                let map = map
                    .as_object()
                    .ok_or_else(|| invalid(&map_path, "not a JSON object".into()))?;
                out.read_special(map);
            }
            let added_path = dir.join("added_tokens.json");
            if let Some(added) = read_json(&added_path)? {
                let added = added
                    .as_object()
                    .ok_or_else(|| invalid(&added_path, "not a JSON object".into()))?;
                let specials = out.special_tokens();
                for (content, id) in added {
                    let id = id
                        .as_u64()
                        .and_then(|id| u32::try_from(id).ok())
                        .ok_or_else(|| {
                            invalid(&added_path, format!("{content:?} has no token id"))
                        })?;
                    let special = specials.contains(content);
                    out.added.push(AddedSpec {
                        id,
                        content: content.clone(),
                        special,
                        lstrip: false,
                        rstrip: false,
                        single_word: false,
                        normalized: !special,
                    });
                }
            }
        }
        out.added.sort_by_key(|t| t.id);
        Ok(out)
    }

    /// Takes the special-token attributes present in `map` (later maps override).
    fn read_special(&mut self, map: &serde_json::Map<String, Value>) {
        for name in SPECIAL_ATTRIBUTES {
            if let Some(value) = map.get(name) {
                self.attributes
                    .insert(name.to_owned(), token_content(value));
            }
        }
        if let Some(list) = map
            .get("additional_special_tokens")
            .and_then(Value::as_array)
        {
            self.additional = list.iter().filter_map(token_content).collect();
        }
    }

    /// The special-token attribute `name`, falling back to the class default when absent.
    fn attribute(&self, family: Family, name: &str) -> Option<String> {
        match self.attributes.get(name) {
            Some(value) => value.clone(),
            None => family.default_attribute(name).map(str::to_owned),
        }
    }

    /// `all_special_tokens` as configured, without class defaults.
    fn special_tokens(&self) -> HashSet<String> {
        self.attributes
            .values()
            .flatten()
            .chain(&self.additional)
            .cloned()
            .collect()
    }
}

/// Splits text on added tokens, leftmost match first and the longest token at that position
/// (what `transformers`' `Trie.split` does for these vocabularies).
#[derive(Clone)]
struct AddedSplitter {
    by_first: HashMap<char, Vec<(String, u32)>>,
}

enum Chunk<'a> {
    Text(&'a str),
    Added(u32),
}

impl AddedSplitter {
    fn new(tokens: &HashMap<String, u32>) -> AddedSplitter {
        let mut by_first: HashMap<char, Vec<(String, u32)>> = HashMap::new();
        for (content, &id) in tokens {
            if let Some(first) = content.chars().next() {
                by_first
                    .entry(first)
                    .or_default()
                    .push((content.clone(), id));
            }
        }
        for list in by_first.values_mut() {
            list.sort_by_key(|(content, _)| std::cmp::Reverse(content.len()));
        }
        AddedSplitter { by_first }
    }

    fn split<'a>(&self, text: &'a str) -> Vec<Chunk<'a>> {
        let mut chunks = Vec::new();
        let mut start = 0;
        let mut pos = 0;
        while let Some(c) = text[pos..].chars().next() {
            let found = self.by_first.get(&c).and_then(|list| {
                list.iter()
                    .find(|(content, _)| text[pos..].starts_with(content.as_str()))
            });
            match found {
                Some((content, id)) => {
                    if start < pos {
                        chunks.push(Chunk::Text(&text[start..pos]));
                    }
                    chunks.push(Chunk::Added(*id));
                    pos += content.len();
                    start = pos;
                }
                None => pos += c.len_utf8(),
            }
        }
        if start < text.len() {
            chunks.push(Chunk::Text(&text[start..]));
        }
        chunks
    }
}

/// GPT-2's `bytes_to_unicode`, reversed: the character byte-level BPE writes for each byte.
fn byte_decoder() -> HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let c = if printable(b) {
                char::from(b)
            } else {
                next += 1;
                char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
            };
            (c, b)
        })
        .collect()
}

/// `PreTrainedTokenizerBase.clean_up_tokenization`.
fn clean_up_tokenization(text: &str) -> String {
    text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// Reads `vocab.json` and `merges.txt` the way `Qwen2Tokenizer.__init__` does.
fn read_vocab_merges(
    vocab_path: &Path,
    merges_path: &Path,
) -> Result<(Vocab, Merges), TokenizerError> {
    let invalid = |path: &Path, what: String| TokenizerError::Invalid {
        path: path.to_owned(),
        what,
    };
    let vocab = read_json(vocab_path)?.ok_or_else(|| invalid(vocab_path, "missing".into()))?;
    let vocab = vocab
        .as_object()
        .ok_or_else(|| invalid(vocab_path, "not a JSON object".into()))?
        .iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| invalid(vocab_path, format!("{token:?} has no token id")))
        })
        .collect::<Result<Vocab, _>>()?;
    let text = crate::files::read_to_string(merges_path, MAX_METADATA_BYTES, "a tokenizer file")
        .map_err(|source| TokenizerError::Read {
            path: merges_path.to_owned(),
            source,
        })?;
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if (i == 0 && line.starts_with("#version:")) || line.is_empty() {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>()[..] {
            [a, b] => merges.push((a.to_owned(), b.to_owned())),
            _ => {
                return Err(invalid(
                    merges_path,
                    format!("line {} is not a pair", i + 1),
                ))
            }
        }
    }
    Ok((vocab, merges))
}

impl Model {
    fn byte_level(inner: tokenizers::Tokenizer) -> Model {
        Model::ByteLevel {
            inner: Box::new(inner),
            byte_decoder: byte_decoder(),
        }
    }
}

/// The `Qwen2Tokenizer` pipeline over `vocab.json` + `merges.txt`.
fn build_qwen2(dir: &Path) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let (vocab_path, merges_path) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let (vocab, merges) = read_vocab_merges(&vocab_path, &merges_path)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::Invalid {
            path: merges_path.clone(),
            what: e.to_string(),
        })?;
    let split = Split::new(
        SplitPattern::Regex(QWEN2_SPLIT.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| TokenizerError::Invalid {
        path: vocab_path.clone(),
        what: format!("split pattern: {e}"),
    })?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer
        .with_normalizer(Some(NFC))
        .with_pre_tokenizer(Some(Sequence::new(vec![
            split.into(),
            ByteLevel::new(false, false, false).into(),
        ])));
    Ok(tokenizer)
}

impl Tokenizer {
    /// Loads the tokenizer of a checkpoint folder (see the module docs for the layouts).
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let config = Config::load(dir)?;
        // the class named in tokenizer_config.json decides; without one, the files present do
        let class = match config.tokenizer_class.as_deref() {
            None => None,
            Some(c) if c.starts_with("Qwen2Tokenizer") => Some(Family::Qwen2),
            Some(c) if c.starts_with("InternLM2Tokenizer") => Some(Family::InternLm2),
            Some(c) => {
                return Err(TokenizerError::Invalid {
                    path: dir.join("tokenizer_config.json"),
                    what: format!(
                    "tokenizer_class {c:?} is not supported (Qwen2Tokenizer or InternLM2Tokenizer)"
                ),
                })
            }
        };
        let bpe = class != Some(Family::InternLm2);
        let json_path = dir.join("tokenizer.json");
        let spm_path = dir.join("tokenizer.model");
        let (model, family) = if bpe && json_path.is_file() {
            let bytes = crate::files::read(&json_path, MAX_METADATA_BYTES, "a tokenizer file")
                .map_err(|source| TokenizerError::Read {
                    path: json_path.clone(),
                    source,
                })?;
            let mut inner =
                tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Invalid {
                    path: json_path.clone(),
                    what: e.to_string(),
                })?;
            inner.with_padding(None);
            inner
                .with_truncation(None)
                .map_err(|e| TokenizerError::Invalid {
                    path: json_path.clone(),
                    what: e.to_string(),
                })?;
            (Model::byte_level(inner), Family::Qwen2)
        } else if bpe && dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            let mut inner = build_qwen2(dir)?;
            for t in &config.added {
                let token = AddedToken::from(t.content.clone(), t.special)
                    .lstrip(t.lstrip)
                    .rstrip(t.rstrip)
                    .single_word(t.single_word)
                    .normalized(t.normalized);
                if t.special {
                    inner.add_special_tokens(&[token]);
                } else {
                    inner.add_tokens(&[token]);
                }
            }
            (Model::byte_level(inner), Family::Qwen2)
        } else if class != Some(Family::Qwen2) && spm_path.is_file() {
            let sp = SentencePiece::from_file(&spm_path)?;
            if let Some(t) = config
                .added
                .iter()
                .find(|t| t.lstrip || t.rstrip || t.single_word)
            {
                return Err(TokenizerError::Invalid {
                    path: dir.join("tokenizer_config.json"),
                    what: format!(
                        "added token {:?} strips spaces or matches single words, which is not supported with tokenizer.model",
                        t.content
                    ),
                });
            }
            (Model::SentencePiece(Box::new(sp)), Family::InternLm2)
        } else {
            return Err(TokenizerError::Missing {
                dir: dir.to_owned(),
            });
        };
        Tokenizer::assemble(dir, model, family, config)
    }

    /// Adds the configured added and special tokens to a loaded model.
    fn assemble(
        dir: &Path,
        model: Model,
        family: Family,
        config: Config,
    ) -> Result<Tokenizer, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let mut tokenizer = Tokenizer {
            model,
            added_by_id: HashMap::new(),
            added_by_content: HashMap::new(),
            splitter: AddedSplitter::new(&HashMap::new()),
            special_ids: HashSet::new(),
            standalone_ids: HashSet::new(),
            bos_id: None,
            eos_id: None,
            add_bos: family == Family::InternLm2 && config.add_bos_token.unwrap_or(true),
            add_eos: family == Family::InternLm2 && config.add_eos_token.unwrap_or(false),
            clean_up_tokenization_spaces: config.clean_up_tokenization_spaces,
            vocab_size: 0,
            max_token_bytes: None,
        };
        let mut specials: Vec<String> = SPECIAL_ATTRIBUTES
            .iter()
            .filter_map(|name| config.attribute(family, name))
            .collect();
        specials.extend(config.additional.iter().cloned());
        let special_set: HashSet<&str> = specials.iter().map(String::as_str).collect();
        for t in &config.added {
            if let Model::ByteLevel { inner, .. } = &tokenizer.model {
                // the BPE layouts hold the added tokens themselves: they must agree
                let got = inner.token_to_id(&t.content);
                if got != Some(t.id) {
                    return Err(TokenizerError::Invalid {
                        path: config_path,
                        what: format!(
                            "added token {:?} has id {} but the tokenizer gives {got:?}",
                            t.content, t.id
                        ),
                    });
                }
            }
            tokenizer.added_by_id.insert(t.id, t.content.clone());
            tokenizer.added_by_content.insert(t.content.clone(), t.id);
            if !special_set.contains(t.content.as_str()) {
                tokenizer.standalone_ids.insert(t.id);
            }
        }
        // special tokens that are not added tokens yet become added tokens with their vocabulary id
        for content in &specials {
            if tokenizer.added_by_content.contains_key(content) {
                continue;
            }
            let id =
                tokenizer
                    .model_token_to_id(content)
                    .ok_or_else(|| TokenizerError::Invalid {
                        path: config_path.clone(),
                        what: format!("special token {content:?} is in no vocabulary"),
                    })?;
            if let Model::ByteLevel { inner, .. } = &mut tokenizer.model {
                // so that `tokenizers` splits it out of text as the slow tokenizer's trie does
                inner.add_special_tokens(&[AddedToken::from(content.clone(), true)]);
            }
            tokenizer.added_by_id.insert(id, content.clone());
            tokenizer.added_by_content.insert(content.clone(), id);
        }
        let base_size = tokenizer.model_size();
        for content in &specials {
            let id = tokenizer.added_by_content[content];
            tokenizer.special_ids.insert(id);
            if config.additional.contains(content) && id as usize >= base_size {
                tokenizer.standalone_ids.insert(id);
            }
        }
        let max_added = tokenizer
            .added_by_id
            .keys()
            .max()
            .map_or(0, |&id| id as usize + 1);
        tokenizer.vocab_size = base_size.max(max_added);
        // InternLM2Tokenizer takes BOS/EOS ids from the sentencepiece model
        let id_of = |name| {
            config
                .attribute(family, name)
                .and_then(|t| tokenizer.token_to_id(&t))
        };
        let (bos_id, eos_id) = match &tokenizer.model {
            Model::SentencePiece(sp) => (sp.bos_id(), sp.eos_id()),
            Model::ByteLevel { .. } => (id_of("bos_token"), id_of("eos_token")),
        };
        (tokenizer.bos_id, tokenizer.eos_id) = (bos_id, eos_id);
        tokenizer.splitter = AddedSplitter::new(&tokenizer.added_by_content);
        tokenizer.max_token_bytes = tokenizer.longest_token();
        if tokenizer.add_bos && tokenizer.bos_id.is_none() {
            return Err(TokenizerError::Invalid {
                path: config_path,
                what: "add_bos_token is set but the model has no BOS piece".into(),
            });
        }
        if tokenizer.add_eos && tokenizer.eos_id.is_none() {
            return Err(TokenizerError::Invalid {
                path: config_path,
                what: "add_eos_token is set but the model has no EOS piece".into(),
            });
        }
        Ok(tokenizer)
    }

    /// Number of ids of the model itself (`vocab_size` of the slow tokenizer).
    fn model_size(&self) -> usize {
        match &self.model {
            Model::ByteLevel { inner, .. } => inner.get_vocab_size(false),
            Model::SentencePiece(sp) => sp.piece_count(),
        }
    }

    fn model_token_to_id(&self, token: &str) -> Option<u32> {
        match &self.model {
            Model::ByteLevel { inner, .. } => inner.token_to_id(token),
            Model::SentencePiece(sp) => sp.piece_to_id(token),
        }
    }

    /// `tokenizer(text).input_ids`, BOS included when the reference adds it.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let mut ids = Vec::new();
        match &self.model {
            Model::ByteLevel { inner, .. } => {
                let encoding =
                    inner
                        .encode_fast(text, false)
                        .map_err(|e| TokenizerError::Encode {
                            text_len: text.len(),
                            what: e.to_string(),
                        })?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Model::SentencePiece(sp) => {
                ids.extend(self.bos_id.filter(|_| self.add_bos));
                for chunk in self.splitter.split(text) {
                    match chunk {
                        Chunk::Added(id) => ids.push(id),
                        Chunk::Text(text) => ids.extend(sp.encode(text)),
                    }
                }
                ids.extend(self.eos_id.filter(|_| self.add_eos));
            }
        }
        Ok(ids)
    }

    /// `tokenizer.decode(ids, skip_special_tokens=...)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> String {
        self.decode_with(ids, skip_special_tokens, true)
    }

    /// [`Tokenizer::decode`] without any `clean_up_tokenization` (for the stream decoder).
    pub(crate) fn decode_uncleaned(&self, ids: &[u32]) -> String {
        self.decode_with(ids, true, false)
    }

    /// Whether [`Tokenizer::decode`] removes spaces with `clean_up_tokenization`.
    pub(crate) fn cleans_up(&self) -> bool {
        self.clean_up_tokenization_spaces || matches!(self.model, Model::SentencePiece(_))
    }

    /// `PreTrainedTokenizer._decode`.
    fn decode_with(&self, ids: &[u32], skip_special_tokens: bool, clean: bool) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut run: Vec<u32> = Vec::new();
        for &id in ids {
            if skip_special_tokens && self.special_ids.contains(&id) {
                continue;
            }
            if self.standalone_ids.contains(&id) {
                if !run.is_empty() {
                    let text = self.tokens_to_string(&run, clean);
                    if !text.is_empty() {
                        parts.push(text);
                    }
                    run.clear();
                }
                parts.push(self.added_by_id[&id].clone());
            } else if self.added_by_id.contains_key(&id) || (id as usize) < self.model_size() {
                run.push(id);
            }
        }
        if !run.is_empty() {
            parts.push(self.tokens_to_string(&run, clean));
        }
        // Qwen2Tokenizer.decode passes spaces_between_special_tokens=False, InternLM2 keeps True
        let separator = match self.model {
            Model::ByteLevel { .. } => "",
            Model::SentencePiece(_) => " ",
        };
        let text = parts.join(separator);
        if clean && self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        }
    }

    /// `convert_tokens_to_string` of the family, over ids.
    fn tokens_to_string(&self, ids: &[u32], clean: bool) -> String {
        match &self.model {
            Model::ByteLevel { byte_decoder, .. } => {
                let mut bytes = Vec::new();
                for token in ids.iter().filter_map(|&id| self.id_to_token(id)) {
                    for c in token.chars() {
                        match byte_decoder.get(&c) {
                            Some(&b) => bytes.push(b),
                            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Model::SentencePiece(sp) => {
                // special tokens are written as they are, with a space before a group of them
                let mut out = String::new();
                let mut pieces = Vec::new();
                let mut prev_special = false;
                for &id in ids {
                    if self.special_ids.contains(&id) {
                        if !prev_special {
                            out.push(' ');
                        }
                        out.push_str(&sp.decode(&pieces));
                        out.push_str(&self.added_by_id[&id]);
                        pieces.clear();
                        prev_special = true;
                    } else {
                        pieces.push(id);
                        prev_special = false;
                    }
                }
                out.push_str(&sp.decode(&pieces));
                if clean {
                    clean_up_tokenization(&out)
                } else {
                    out
                }
            }
        }
    }

    /// The id of a token (added tokens first, then the model vocabulary).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.added_by_content
            .get(token)
            .copied()
            .or_else(|| self.model_token_to_id(token))
    }

    /// The token of an id (added tokens first, then the model vocabulary).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        if let Some(token) = self.added_by_id.get(&id) {
            return Some(token.clone());
        }
        match &self.model {
            Model::ByteLevel { inner, .. } => inner.id_to_token(id),
            Model::SentencePiece(sp) => sp.id_to_piece(id).map(str::to_owned),
        }
    }

    /// The most bytes of normalized text one token covers: a vocabulary entry (byte-level
    /// entries are one character per byte) or an added token's text.
    fn longest_token(&self) -> Option<usize> {
        let added = self.added_by_content.keys().map(String::len).max();
        let model = match &self.model {
            Model::ByteLevel { inner, .. } => {
                // only NFC (or none) is measured by `min_tokens`; another normalizer may shrink text
                use tokenizers::NormalizerWrapper;
                if !matches!(
                    inner.get_normalizer(),
                    None | Some(NormalizerWrapper::NFC(_))
                ) {
                    return None;
                }
                let vocab = inner
                    .get_vocab(false)
                    .into_keys()
                    .map(|t| t.chars().count());
                let added = inner.get_added_tokens_decoder().into_values();
                vocab.chain(added.map(|t| t.content.len())).max()
            }
            Model::SentencePiece(sp) => Some(sp.max_token_bytes()?),
        };
        Some(model?.max(added.unwrap_or(0)).max(1))
    }

    /// A lower bound of the number of tokens `text` encodes to, found without encoding it: its
    /// length after normalization divided by the most bytes one token covers, rounded up. `None`
    /// when there is no such bound (a sentencepiece model without byte fallback makes one
    /// token of a run of unknown characters, however long).
    pub fn min_tokens(&self, text: &str) -> Option<MinTokens> {
        let max_token_bytes = self.max_token_bytes?;
        let bytes = match &self.model {
            // NFC (the only normalizer `longest_token` allows) leaves ASCII alone
            Model::ByteLevel { inner, .. }
                if text.is_ascii() || inner.get_normalizer().is_none() =>
            {
                text.len()
            }
            Model::ByteLevel { .. } => {
                use unicode_normalization_alignments::UnicodeNormalization;
                text.nfc().map(|(c, _)| c.len_utf8()).sum()
            }
            Model::SentencePiece(sp) => sp.normalized_len(text),
        };
        Some(MinTokens {
            bytes,
            max_token_bytes,
            tokens: bytes.div_ceil(max_token_bytes),
        })
    }

    /// Largest id + 1, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The BOS id (`None` for Qwen2, which has no BOS token).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS id of the tokenizer (model.chat stops on the template's separator instead).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::tests::ids;
    use crate::testutil::fixture;

    fn load(model: &str) -> Tokenizer {
        Tokenizer::from_dir(&fixture(&format!("models/{model}"))).unwrap()
    }

    #[test]
    fn min_tokens_never_exceeds_the_tokens_of_the_text() {
        let texts = [
            "Hello, world!".to_string(),
            " ".repeat(5000),
            "-".repeat(3000),
            "\n".repeat(2000),
            "0".repeat(4000),
            "描述这张图片。".repeat(300),
            // decomposed: NFC makes one character of each pair
            "e\u{301}a\u{308}".repeat(500),
            "\u{1100}\u{1161}\u{11a8}".repeat(500),
            "<|im_start|><|im_end|><IMG_CONTEXT>".repeat(200),
            "the quick brown fox ".repeat(400),
        ];
        for model in [
            "tiny-qwen2",
            "tiny-internlm2",
            "tiny-qwen2-hf",
            "tiny-qwen3",
        ] {
            let t = load(model);
            let longest = t.max_token_bytes;
            for text in &texts {
                let ids = t.encode(text).unwrap();
                let min = t
                    .min_tokens(text)
                    .unwrap_or_else(|| panic!("{model}: a bound ({longest:?})"));
                assert!(
                    min.tokens <= ids.len(),
                    "{model}: {} tokens at least but {} encoded ({:?})",
                    min.tokens,
                    ids.len(),
                    text.chars().take(10).collect::<String>()
                );
                assert!(min.tokens > 0);
            }
        }
        // a long ASCII text is measured without encoding it
        let t = load("tiny-qwen2");
        let min = t.min_tokens(&"x".repeat(30 << 20)).unwrap();
        assert_eq!(min.bytes, 30 << 20);
        assert_eq!(min.tokens, (30usize << 20).div_ceil(min.max_token_bytes));
    }

    fn check_golden(tokenizer: &Tokenizer, golden: &str) {
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(&format!("golden/tokenizer/{golden}.json"))).unwrap(),
        )
        .unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() >= 9);
        for case in cases {
            let text = case["text"].as_str().unwrap();
            let want = ids(&case["input_ids"]);
            assert_eq!(tokenizer.encode(text).unwrap(), want, "{golden}: {text:?}");
            assert_eq!(
                tokenizer.decode(&want, true),
                case["decoded"].as_str().unwrap(),
                "{golden}: {text:?}"
            );
        }
    }

    #[test]
    fn qwen2_from_vocab_and_merges_matches_the_slow_tokenizer() {
        let dir = fixture("models/tiny-qwen2");
        assert!(
            !dir.join("tokenizer.json").exists(),
            "this case must exercise vocab.json + merges.txt"
        );
        check_golden(&load("tiny-qwen2"), "qwen2");
    }

    #[test]
    fn qwen2_from_tokenizer_json_matches_the_slow_tokenizer() {
        assert!(fixture("models/tiny-vit6b-qwen2/tokenizer.json").is_file());
        check_golden(&load("tiny-vit6b-qwen2"), "qwen2");
    }

    #[test]
    fn internlm2_sentencepiece_matches_the_slow_tokenizer() {
        check_golden(&load("tiny-internlm2"), "internlm2");
    }

    #[test]
    fn special_ids_and_sizes() {
        let qwen = load("tiny-qwen2");
        assert_eq!(qwen.bos_id(), None);
        assert_eq!(qwen.eos_id(), Some(151645));
        assert_eq!(qwen.vocab_size(), 151674);
        assert_eq!(qwen.token_to_id("<IMG_CONTEXT>"), Some(151667));
        assert_eq!(qwen.id_to_token(151667).as_deref(), Some("<IMG_CONTEXT>"));
        assert_eq!(qwen.id_to_token(9707).as_deref(), Some("Hello"));
        let internlm = load("tiny-internlm2");
        assert_eq!(internlm.bos_id(), Some(1));
        assert_eq!(internlm.eos_id(), Some(2));
        assert_eq!(internlm.vocab_size(), 92553);
        assert_eq!(internlm.token_to_id("<|im_end|>"), Some(92542));
        // the added name wins over the sentencepiece piece of the same id
        assert_eq!(internlm.id_to_token(92543).as_deref(), Some("<|im_start|>"));
        assert_eq!(internlm.token_to_id("[UNUSED_TOKEN_146]"), Some(92543));
        assert_eq!(internlm.id_to_token(2028).as_deref(), Some("▁world"));
    }

    #[test]
    fn decoding_with_special_tokens_keeps_the_reference_quirks() {
        // InternLM2Tokenizer: a space before each group of special tokens, standalone added
        // tokens joined with spaces
        let internlm = load("tiny-internlm2");
        let ids = internlm
            .encode("<|im_start|>user\n<image>\nhi<|im_end|>\n")
            .unwrap();
        assert_eq!(
            internlm.decode(&ids, false),
            " <s><|im_start|> user\n<image>\nhi<|im_end|>\n"
        );
        let ids = internlm.encode("<img><IMG_CONTEXT></img>").unwrap();
        assert_eq!(
            internlm.decode(&ids, false),
            " <s> <img> <IMG_CONTEXT> </img>"
        );
        let qwen = load("tiny-qwen2");
        let text = "<|im_start|>user\n<img><IMG_CONTEXT></img>hi<|im_end|><|endoftext|>";
        assert_eq!(qwen.decode(&qwen.encode(text).unwrap(), false), text);
        // non-special added tokens survive skip_special_tokens
        let ids = qwen.encode("<tool_call>x</tool_call><|im_end|>").unwrap();
        assert_eq!(ids, [151657, 87, 151658, 151645]);
        assert_eq!(qwen.decode(&ids, true), "<tool_call>x</tool_call>");
    }

    #[test]
    fn ids_outside_every_vocabulary_decode_to_nothing() {
        let qwen = load("tiny-qwen2");
        assert_eq!(qwen.decode(&[9707, 151900, 0], true), "Hello!");
        let internlm = load("tiny-internlm2");
        assert_eq!(internlm.decode(&[9843, 100_000, 346], true), "Hello!");
    }

    #[test]
    fn encoding_thousands_of_image_tokens_is_fast() {
        let query = format!(
            "<|im_start|>user\n<img>{}</img>\nDescribe.<|im_end|>\n",
            "<IMG_CONTEXT>".repeat(3072)
        );
        for model in ["tiny-qwen2", "tiny-vit6b-qwen2", "tiny-internlm2"] {
            let tokenizer = load(model);
            let start = std::time::Instant::now();
            let ids = tokenizer.encode(&query).unwrap();
            let elapsed = start.elapsed();
            let context = tokenizer.token_to_id("<IMG_CONTEXT>").unwrap();
            assert_eq!(
                ids.iter().filter(|&&id| id == context).count(),
                3072,
                "{model}"
            );
            assert!(elapsed.as_millis() < 250, "{model}: {elapsed:?}");
        }
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("tokenizer-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_folder_without_tokenizer_files_is_a_clear_error() {
        let dir = scratch_dir("empty");
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "no tokenizer in {}: expected tokenizer.json, vocab.json+merges.txt, or tokenizer.model",
                dir.display()
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_configured_class_picks_the_layout() {
        let dir = scratch_dir("class");
        std::fs::write(dir.join("vocab.json"), "{\"a\": 0}").unwrap();
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        let config = |class: &str| {
            let json = format!(
                r#"{{"tokenizer_class": "{class}", "eos_token": null, "unk_token": null, "pad_token": null}}"#
            );
            std::fs::write(dir.join("tokenizer_config.json"), json).unwrap();
        };
        config("LlamaTokenizer");
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("tokenizer_class \"LlamaTokenizer\" is not supported"),
            "{err}"
        );
        // an InternLM2 checkpoint is never read through BPE files
        config("InternLM2Tokenizer");
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, TokenizerError::Missing { .. }), "{err}");
        config("Qwen2TokenizerFast");
        assert_eq!(
            Tokenizer::from_dir(&dir).unwrap().encode("aa").unwrap(),
            [0, 0]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_files_are_named_in_the_error() {
        let dir = scratch_dir("corrupt");
        std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
        std::fs::write(dir.join("merges.txt"), "a b\nnot a pair\n").unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(matches!(err, TokenizerError::Invalid { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains("merges.txt") && msg.contains("line 2"),
            "{msg}"
        );
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        std::fs::write(dir.join("vocab.json"), r#"{"a": "zero"}"#).unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("vocab.json"), "{err}");
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"added_tokens_decoder": 3"#,
        )
        .unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
        std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn special_tokens_found_only_in_the_vocabulary_become_added_tokens() {
        let dir = scratch_dir("special");
        std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        // Qwen2Tokenizer's default special tokens are not in this vocabulary
        std::fs::write(dir.join("tokenizer_config.json"), "{}").unwrap();
        let err = Tokenizer::from_dir(&dir).unwrap_err();
        assert!(
            err.to_string()
                .contains("\"<|endoftext|>\" is in no vocabulary"),
            "{err}"
        );
        // no merge makes "ab": only splitting it out as a special token gives id 2
        let config = r#"{"eos_token": "ab", "unk_token": null, "pad_token": null}"#;
        std::fs::write(dir.join("tokenizer_config.json"), config).unwrap();
        let tokenizer = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tokenizer.eos_id(), Some(2));
        assert_eq!(tokenizer.encode("bab").unwrap(), [1, 2]);
        assert_eq!(tokenizer.decode(&[0, 2, 1], true), "ab");
        assert_eq!(tokenizer.decode(&[0, 2, 1], false), "aabb");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
