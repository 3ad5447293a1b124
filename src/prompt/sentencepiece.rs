//! SentencePiece BPE models (`tokenizer.model`), run the way the `sentencepiece` library runs them.
//!
//! Reference: google/sentencepiece `bpe_model.cc` (`Model::SampleEncode` with no dropout),
//! `normalizer.cc` (`Normalizer::Normalize`), `model_interface.cc` (`InitializePieces`,
//! `PieceToId`) and `sentencepiece_processor.cc` (`PopulateSentencePieceText`, `Decode`).
//! The `ModelProto` is read with a small protobuf reader; only the fields that change encoding
//! or decoding are kept. Normalisation rules compiled into a `precompiled_charsmap` are not
//! supported (InternLM2's model uses the `identity` rule) and are refused when loading.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

/// U+2581, what sentencepiece writes for a space.
const SPACE_SYMBOL: &str = "\u{2581}";

#[derive(Debug, thiserror::Error)]
pub enum SentencePieceError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid sentencepiece model: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("{} uses {what}, which is not supported", path.display())]
    Unsupported { path: PathBuf, what: String },
}

/// `ModelProto.SentencePiece.Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte(u8),
}

#[derive(Debug, Clone)]
struct Piece {
    text: String,
    score: f32,
    kind: Kind,
}

/// `NormalizerSpec` flags (the rule itself must be the identity).
#[derive(Debug, Clone, Copy)]
struct NormalizerFlags {
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    /// `TrainerSpec.treat_whitespace_as_suffix`: the dummy space goes at the end.
    whitespace_as_suffix: bool,
}

/// A loaded sentencepiece BPE model.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    pieces: Vec<Piece>,
    /// NORMAL, USER_DEFINED and UNUSED pieces: the ones BPE merges may produce.
    mergeable: HashMap<String, u32>,
    /// CONTROL, UNKNOWN and BYTE pieces.
    reserved: HashMap<String, u32>,
    /// USER_DEFINED pieces by first character, longest first: never split, never merged.
    user_defined: HashMap<char, Vec<String>>,
    unk_id: u32,
    /// Ids of `<0x00>`..`<0xFF>` when byte fallback is on.
    byte_ids: Option<Vec<u32>>,
    flags: NormalizerFlags,
    unk_surface: String,
    bos_piece: String,
    eos_piece: String,
}

/// Field values of one protobuf message, in file order.
enum Value<'a> {
    Varint(u64),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// Splits one protobuf message into `(field number, value)` pairs.
fn fields(mut buf: &[u8]) -> Result<Vec<(u64, Value<'_>)>, String> {
    fn varint(buf: &mut &[u8]) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = buf.split_first().ok_or("truncated varint")?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }
    fn take<'a>(buf: &mut &'a [u8], len: usize) -> Result<&'a [u8], String> {
        if buf.len() < len {
            return Err(format!("field of {len} bytes runs past the end"));
        }
        let (head, rest) = buf.split_at(len);
        *buf = rest;
        Ok(head)
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let field = key >> 3;
        let value = match key & 7 {
            0 => Value::Varint(varint(&mut buf)?),
            1 => {
                take(&mut buf, 8)?;
                continue;
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| "huge length")?;
                Value::Bytes(take(&mut buf, len)?)
            }
            5 => {
                let raw = take(&mut buf, 4)?;
                Value::Fixed32([raw[0], raw[1], raw[2], raw[3]])
            }
            wire => return Err(format!("unsupported wire type {wire} for field {field}")),
        };
        out.push((field, value));
    }
    Ok(out)
}

fn as_bool(v: &Value<'_>) -> Result<bool, String> {
    match v {
        Value::Varint(x) => Ok(*x != 0),
        _ => Err("expected a varint".into()),
    }
}

fn as_str<'a>(v: &Value<'a>) -> Result<&'a str, String> {
    match v {
        Value::Bytes(b) => std::str::from_utf8(b).map_err(|_| "string is not UTF-8".into()),
        _ => Err("expected a length-delimited string".into()),
    }
}

/// Raw `ModelProto` fields this module uses.
struct Proto {
    pieces: Vec<Piece>,
    model_type: u64,
    byte_fallback: bool,
    flags: NormalizerFlags,
    charsmap_rule: Option<String>,
    denormalizer: bool,
    unk_surface: String,
    bos_piece: String,
    eos_piece: String,
}

fn parse_proto(data: &[u8]) -> Result<Proto, String> {
    let mut proto = Proto {
        pieces: Vec::new(),
        model_type: 1,
        byte_fallback: false,
        flags: NormalizerFlags {
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            whitespace_as_suffix: false,
        },
        charsmap_rule: None,
        denormalizer: false,
        unk_surface: " \u{2047} ".into(),
        bos_piece: "<s>".into(),
        eos_piece: "</s>".into(),
    };
    for (field, value) in fields(data)? {
        let Value::Bytes(body) = value else { continue };
        match field {
            1 => proto.pieces.push(parse_piece(body, proto.pieces.len())?),
            2 => {
                for (f, v) in fields(body)? {
                    match f {
                        3 => {
                            let Value::Varint(t) = v else {
                                return Err("trainer_spec.model_type is not a varint".into());
                            };
                            proto.model_type = t;
                        }
                        24 => proto.flags.whitespace_as_suffix = as_bool(&v)?,
                        35 => proto.byte_fallback = as_bool(&v)?,
                        44 => proto.unk_surface = as_str(&v)?.to_owned(),
                        46 => proto.bos_piece = as_str(&v)?.to_owned(),
                        47 => proto.eos_piece = as_str(&v)?.to_owned(),
                        _ => {}
                    }
                }
            }
            3 => {
                let mut name = String::new();
                let mut charsmap = false;
                for (f, v) in fields(body)? {
                    match f {
                        1 => name = as_str(&v)?.to_owned(),
                        2 => charsmap = matches!(v, Value::Bytes(b) if !b.is_empty()),
                        3 => proto.flags.add_dummy_prefix = as_bool(&v)?,
                        4 => proto.flags.remove_extra_whitespaces = as_bool(&v)?,
                        5 => proto.flags.escape_whitespaces = as_bool(&v)?,
                        _ => {}
                    }
                }
                if charsmap {
                    proto.charsmap_rule = Some(name);
                }
            }
            5 => {
                proto.denormalizer = fields(body)?
                    .iter()
                    .any(|(f, v)| *f == 2 && matches!(v, Value::Bytes(b) if !b.is_empty()));
            }
            _ => {}
        }
    }
    Ok(proto)
}

fn parse_piece(body: &[u8], index: usize) -> Result<Piece, String> {
    let mut text = None;
    let mut score = 0.0f32;
    let mut kind = 1u64;
    for (f, v) in fields(body)? {
        match (f, v) {
            (1, v) => text = Some(as_str(&v)?.to_owned()),
            (2, Value::Fixed32(raw)) => score = f32::from_le_bytes(raw),
            (3, Value::Varint(t)) => kind = t,
            _ => {}
        }
    }
    let text = text.ok_or_else(|| format!("piece {index} has no text"))?;
    let kind = match kind {
        1 => Kind::Normal,
        2 => Kind::Unknown,
        3 => Kind::Control,
        4 => Kind::UserDefined,
        5 => Kind::Unused,
        6 => Kind::Byte(
            piece_to_byte(&text).ok_or_else(|| format!("byte piece {text:?} is invalid"))?,
        ),
        t => return Err(format!("piece {index} has unknown type {t}")),
    };
    Ok(Piece { text, score, kind })
}

/// `<0x41>` -> 0x41 (upper-case hex, as sentencepiece writes them).
fn piece_to_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || hex.bytes().any(|b| b.is_ascii_lowercase()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// One entry of the BPE agenda: merging symbols `left` and `right` gives a piece of `size` bytes.
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pair {
    /// Highest score first, then leftmost (sentencepiece's `SymbolPairComparator`); scores
    /// compare as IEEE floats, so -0.0 and 0.0 tie as they do there.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// A symbol of the BPE work list: `normalized[start..start + len]`, linked to its neighbours.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    frozen: bool,
}

impl SentencePiece {
    /// Loads and checks `tokenizer.model` (a BPE model with the identity normaliser).
    pub fn from_file(path: &Path) -> Result<SentencePiece, SentencePieceError> {
        let data = crate::files::read(path, crate::files::MAX_METADATA_BYTES, "a tokenizer file")
            .map_err(|source| SentencePieceError::Read {
            path: path.to_owned(),
            source,
        })?;
        let corrupt = |what: String| SentencePieceError::Corrupt {
            path: path.to_owned(),
            what,
        };
        let unsupported = |what: String| SentencePieceError::Unsupported {
            path: path.to_owned(),
            what,
        };
        let proto = parse_proto(&data).map_err(corrupt)?;
        match proto.model_type {
            2 => {}
            1 => return Err(unsupported("the unigram model type".into())),
            t => return Err(unsupported(format!("model type {t}"))),
        }
        if let Some(name) = proto.charsmap_rule {
            return Err(unsupported(format!(
                "the normalization rule {name:?} (a precompiled charsmap)"
            )));
        }
        if proto.denormalizer {
            return Err(unsupported("a denormalization rule".into()));
        }
        let mut mergeable = HashMap::new();
        let mut reserved = HashMap::new();
        let mut user_defined: HashMap<char, Vec<String>> = HashMap::new();
        let mut unk_id = None;
        let mut byte_ids = vec![None; 256];
        for (id, piece) in proto.pieces.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| corrupt("too many pieces".into()))?;
            if piece.text.is_empty() {
                return Err(corrupt(format!("piece {id} is empty")));
            }
            let map = match piece.kind {
                Kind::Normal | Kind::UserDefined | Kind::Unused => &mut mergeable,
                Kind::Unknown | Kind::Control | Kind::Byte(_) => &mut reserved,
            };
            if map.insert(piece.text.clone(), id).is_some() {
                return Err(corrupt(format!("piece {:?} is defined twice", piece.text)));
            }
            match piece.kind {
                Kind::UserDefined => {
                    let first = piece.text.chars().next().expect("pieces are not empty");
                    user_defined
                        .entry(first)
                        .or_default()
                        .push(piece.text.clone());
                }
                Kind::Unknown if unk_id.is_some() => {
                    return Err(corrupt("more than one unknown piece".into()))
                }
                Kind::Unknown => unk_id = Some(id),
                Kind::Byte(_) if !proto.byte_fallback => {
                    return Err(corrupt(format!(
                        "byte piece {:?} although byte_fallback is off",
                        piece.text
                    )))
                }
                Kind::Byte(b) => byte_ids[usize::from(b)] = Some(id),
                _ => {}
            }
        }
        for list in user_defined.values_mut() {
            list.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
        let unk_id = unk_id.ok_or_else(|| corrupt("no unknown piece".into()))?;
        let byte_ids = if proto.byte_fallback {
            let ids: Option<Vec<u32>> = byte_ids.into_iter().collect();
            Some(ids.ok_or_else(|| {
                corrupt("byte_fallback is on but not all 256 byte pieces exist".into())
            })?)
        } else {
            None
        };
        Ok(SentencePiece {
            pieces: proto.pieces,
            mergeable,
            reserved,
            user_defined,
            unk_id,
            byte_ids,
            flags: proto.flags,
            unk_surface: proto.unk_surface,
            bos_piece: proto.bos_piece,
            eos_piece: proto.eos_piece,
        })
    }

    /// Number of pieces (`get_piece_size()`).
    pub fn piece_count(&self) -> usize {
        self.pieces.len()
    }

    /// The id of a piece, `None` when it is not in the vocabulary.
    pub fn piece_to_id(&self, piece: &str) -> Option<u32> {
        self.reserved
            .get(piece)
            .or_else(|| self.mergeable.get(piece))
            .copied()
    }

    /// The piece of an id.
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|p| p.text.as_str())
    }

    /// `bos_id()`: the id of the BOS piece when it is a control piece.
    pub fn bos_id(&self) -> Option<u32> {
        self.control_id(&self.bos_piece)
    }

    /// `eos_id()`: the id of the EOS piece when it is a control piece.
    pub fn eos_id(&self) -> Option<u32> {
        self.control_id(&self.eos_piece)
    }

    fn control_id(&self, piece: &str) -> Option<u32> {
        self.piece_to_id(piece)
            .filter(|&id| self.pieces[id as usize].kind == Kind::Control)
    }

    /// `PieceToId`: unknown pieces map to the unknown id.
    fn id_or_unk(&self, piece: &str) -> u32 {
        self.piece_to_id(piece).unwrap_or(self.unk_id)
    }

    /// Byte length of the longest user-defined piece at the start of `text`.
    fn user_defined_prefix(&self, text: &str) -> Option<usize> {
        let first = text.chars().next()?;
        self.user_defined
            .get(&first)?
            .iter()
            .find(|p| text.starts_with(p.as_str()))
            .map(String::len)
    }

    /// The next normaliser/BPE unit: a user-defined piece or one character.
    fn next_unit(&self, text: &str) -> (usize, bool) {
        match self.user_defined_prefix(text) {
            Some(len) => (len, true),
            None => (text.chars().next().map_or(0, char::len_utf8), false),
        }
    }

    /// `Normalizer::Normalize` with the identity rule.
    fn normalize(&self, text: &str) -> String {
        let flags = self.flags;
        let space = if flags.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        let mut input = text;
        if flags.remove_extra_whitespaces {
            while !input.is_empty() && self.next_unit(input).0 == 1 && input.starts_with(' ') {
                input = &input[1..];
            }
        }
        let mut out = String::with_capacity(input.len() * 2);
        if input.is_empty() {
            return out;
        }
        if flags.add_dummy_prefix && !flags.whitespace_as_suffix {
            out.push_str(space);
        }
        let mut prev_space = flags.remove_extra_whitespaces;
        while !input.is_empty() {
            let (len, _) = self.next_unit(input);
            let mut unit = &input[..len];
            if prev_space {
                unit = unit.trim_start_matches(' ');
            }
            if !unit.is_empty() {
                for c in unit.chars() {
                    if flags.escape_whitespaces && c == ' ' {
                        out.push_str(SPACE_SYMBOL);
                    } else {
                        out.push(c);
                    }
                }
                prev_space = unit.ends_with(' ');
            }
            input = &input[len..];
            if !flags.remove_extra_whitespaces {
                prev_space = false;
            }
        }
        if flags.remove_extra_whitespaces {
            while out.ends_with(space) {
                out.truncate(out.len() - space.len());
            }
        }
        if flags.add_dummy_prefix && flags.whitespace_as_suffix {
            out.push_str(space);
        }
        out
    }

    /// The most bytes of normalized text one token of [`SentencePiece::encode`] covers; `None`
    /// without byte fallback, where a run of unknown characters of any length is one token.
    pub fn max_token_bytes(&self) -> Option<usize> {
        self.byte_ids.as_ref()?;
        Some(
            self.pieces
                .iter()
                .map(|p| p.text.len())
                .max()
                .unwrap_or(1)
                .max(1),
        )
    }

    /// The length in bytes of `text` as [`SentencePiece::encode`] normalises it.
    pub fn normalized_len(&self, text: &str) -> usize {
        self.normalize(text).len()
    }

    /// `SentencePieceProcessor::Encode` as ids: normalise, BPE, then byte fallback (or merged
    /// runs of unknown pieces).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let normalized = self.normalize(text);
        let mut ids = Vec::with_capacity(normalized.len() / 2);
        let mut prev_unk = false;
        for piece in self.bpe(&normalized) {
            let id = self.id_or_unk(piece);
            let is_unk = id == self.unk_id;
            match &self.byte_ids {
                Some(byte_ids) if is_unk => {
                    ids.extend(piece.bytes().map(|b| byte_ids[usize::from(b)]));
                }
                // a run of unknown pieces stays one unknown piece
                _ if is_unk && prev_unk => {}
                _ => ids.push(id),
            }
            prev_unk = is_unk;
        }
        ids
    }

    /// `bpe::Model::SampleEncode` without dropout: merge the best-scoring adjacent pair until
    /// none is in the vocabulary, then split UNUSED pieces back into what formed them.
    fn bpe<'a>(&self, normalized: &'a str) -> Vec<&'a str> {
        let mut symbols: Vec<Symbol> = Vec::with_capacity(normalized.len());
        let mut pos = 0;
        while pos < normalized.len() {
            let (len, frozen) = self.next_unit(&normalized[pos..]);
            let index = symbols.len();
            symbols.push(Symbol {
                start: pos,
                len,
                prev: index.checked_sub(1),
                next: (pos + len < normalized.len()).then_some(index + 1),
                frozen,
            });
            pos += len;
        }
        let mut agenda = BinaryHeap::new();
        let mut rev_merge: HashMap<&'a str, (&'a str, &'a str)> = HashMap::new();
        let text = |s: &Symbol| &normalized[s.start..s.start + s.len];
        let mut add_pair = |symbols: &[Symbol],
                            agenda: &mut BinaryHeap<Pair>,
                            left: Option<usize>,
                            right: Option<usize>| {
            let (Some(left), Some(right)) = (left, right) else {
                return;
            };
            let (l, r) = (&symbols[left], &symbols[right]);
            if l.frozen || r.frozen {
                return;
            }
            let merged = &normalized[l.start..l.start + l.len + r.len];
            let Some(&id) = self.mergeable.get(merged) else {
                return;
            };
            let piece = &self.pieces[id as usize];
            agenda.push(Pair {
                score: piece.score,
                left,
                right,
                size: merged.len(),
            });
            if piece.kind == Kind::Unused {
                rev_merge.insert(merged, (text(l), text(r)));
            }
        };
        for i in 1..symbols.len() {
            add_pair(&symbols, &mut agenda, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            // stale entry: one side was merged away or grew since it was queued
            if l.len == 0 || r.len == 0 || l.len + r.len != top.size {
                continue;
            }
            symbols[top.left].len += r.len;
            symbols[top.left].next = r.next;
            if let Some(next) = r.next {
                symbols[next].prev = Some(top.left);
            }
            symbols[top.right].len = 0;
            add_pair(&symbols, &mut agenda, l.prev, Some(top.left));
            add_pair(&symbols, &mut agenda, Some(top.left), r.next);
        }
        let mut out = Vec::with_capacity(symbols.len());
        let mut index = (!symbols.is_empty()).then_some(0);
        while let Some(i) = index {
            self.resegment(text(&symbols[i]), &rev_merge, &mut out);
            index = symbols[i].next;
        }
        out
    }

    fn resegment<'a>(
        &self,
        piece: &'a str,
        rev_merge: &HashMap<&'a str, (&'a str, &'a str)>,
        out: &mut Vec<&'a str>,
    ) {
        let id = self.id_or_unk(piece);
        match rev_merge.get(piece) {
            Some(&(left, right)) if self.pieces[id as usize].kind == Kind::Unused => {
                self.resegment(left, rev_merge, out);
                self.resegment(right, rev_merge, out);
            }
            _ => out.push(piece),
        }
    }

    /// `SentencePieceProcessor::Decode` of the pieces of `ids` (ids outside the model are
    /// ignored): control pieces vanish, byte pieces are reassembled into UTF-8 with one U+FFFD
    /// per invalid byte, `▁` becomes a space.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut text = String::new();
        let mut bytes = Vec::new();
        let mut is_bos_ws = true;
        let mut bos_ws_seen = false;
        for piece in ids.iter().filter_map(|&id| self.pieces.get(id as usize)) {
            if let Kind::Byte(b) = piece.kind {
                bytes.push(b);
                continue;
            }
            push_bytes(&mut text, &mut bytes);
            if bos_ws_seen || !text.is_empty() {
                is_bos_ws = false;
            }
            bos_ws_seen = self.decode_piece(piece, is_bos_ws, &mut text);
        }
        push_bytes(&mut text, &mut bytes);
        text
    }

    /// Appends the surface of one non-byte piece; returns whether it consumed the leading
    /// space that `add_dummy_prefix` put there.
    fn decode_piece(&self, piece: &Piece, is_bos_ws: bool, text: &mut String) -> bool {
        match piece.kind {
            Kind::Control => return false,
            Kind::Unknown => {
                text.push_str(&self.unk_surface);
                return false;
            }
            _ => {}
        }
        let flags = self.flags;
        let mut surface = piece.text.as_str();
        let mut consumed = false;
        if is_bos_ws && (flags.add_dummy_prefix || flags.remove_extra_whitespaces) {
            if let Some(rest) = surface.strip_prefix(SPACE_SYMBOL) {
                surface = rest;
                consumed = !flags.remove_extra_whitespaces;
            }
        }
        text.push_str(&surface.replace(SPACE_SYMBOL, " "));
        consumed
    }
}

/// Appends `bytes` as UTF-8, one U+FFFD per byte that does not start a valid character
/// (sentencepiece's `ProcessBytePieces`), and clears it.
fn push_bytes(text: &mut String, bytes: &mut Vec<u8>) {
    for chunk in bytes.utf8_chunks() {
        text.push_str(chunk.valid());
        text.extend(std::iter::repeat_n('\u{FFFD}', chunk.invalid().len()));
    }
    bytes.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::fixture;

    fn model() -> SentencePiece {
        SentencePiece::from_file(&fixture("models/tiny-internlm2/tokenizer.model")).unwrap()
    }

    #[test]
    fn reads_the_internlm2_model() {
        let sp = model();
        assert_eq!(sp.piece_count(), 92544);
        assert_eq!(sp.bos_id(), Some(1));
        assert_eq!(sp.eos_id(), Some(2));
        assert_eq!(sp.id_to_piece(262), Some(SPACE_SYMBOL));
        assert_eq!(sp.piece_to_id("<0x0A>"), Some(13));
        assert_eq!(sp.piece_to_id("no such piece"), None);
    }

    #[test]
    fn user_defined_pieces_stay_whole() {
        let sp = model();
        let ids = sp.encode("a[UNUSED_TOKEN_141]b");
        assert!(ids.contains(&92538), "{ids:?}");
        assert_eq!(sp.decode(&ids), "a[UNUSED_TOKEN_141]b");
    }

    #[test]
    fn unknown_characters_fall_back_to_bytes() {
        let sp = model();
        // U+E000 (private use) is not in the vocabulary: three byte pieces EE 80 80
        assert_eq!(sp.encode("\u{E000}"), vec![3 + 0xEE, 3 + 0x80, 3 + 0x80]);
    }

    #[test]
    fn invalid_byte_runs_decode_to_one_replacement_per_byte() {
        let sp = model();
        // F0 9F (a truncated 4-byte sequence), then 'A' as a byte piece
        assert_eq!(
            sp.decode(&[3 + 0xF0, 3 + 0x9F, 3 + 0x41]),
            "\u{FFFD}\u{FFFD}A"
        );
        assert_eq!(sp.decode(&[1, 3 + 0xE4, 3 + 0xB8, 3 + 0xAD, 2]), "中");
    }

    #[test]
    fn missing_and_corrupt_files_are_errors_naming_the_file() {
        let err = SentencePiece::from_file(Path::new("/nonexistent/tokenizer.model")).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.model"),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("sp-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.model");
        std::fs::write(&path, [0x0a, 0x80]).unwrap();
        let err = SentencePiece::from_file(&path).unwrap_err();
        assert!(matches!(err, SentencePieceError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.model"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
