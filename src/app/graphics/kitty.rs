//! kitty's graphics protocol: `ESC _ G keys ; base64 ESC \`. An image is transmitted once
//! (PNG, `f=100`) under an id, then placed at the cursor in a box of cells and deleted by id.
//! Every command carries `q=2` so the terminal never answers (an answer would arrive as
//! keystrokes), continuation chunks included; placements carry `C=1` so the cursor stays.
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Base64 bytes per chunk (the protocol's limit; a multiple of 4).
pub const CHUNK: usize = 4096;

fn apc(out: &mut Vec<u8>, keys: &str, payload: &[u8]) {
    out.extend_from_slice(b"\x1b_G");
    out.extend_from_slice(keys.as_bytes());
    if !payload.is_empty() {
        out.push(b';');
        out.extend_from_slice(payload);
    }
    out.extend_from_slice(b"\x1b\\");
}

/// Transmits `png` as image `id` without showing it.
pub fn transmit(id: u32, png: &[u8]) -> Vec<u8> {
    let data = STANDARD.encode(png);
    let chunks: Vec<&[u8]> = data.as_bytes().chunks(CHUNK).collect();
    let mut out = Vec::with_capacity(data.len() + chunks.len() * 24 + 32);
    let last = chunks.len().saturating_sub(1);
    if chunks.is_empty() {
        apc(&mut out, &format!("a=t,t=d,f=100,i={id},q=2,m=0"), b"");
    }
    for (n, chunk) in chunks.into_iter().enumerate() {
        let more = u8::from(n < last);
        let keys = if n == 0 {
            format!("a=t,t=d,f=100,i={id},q=2,m={more}")
        } else {
            format!("m={more},q=2")
        };
        apc(&mut out, &keys, chunk);
    }
    out
}

/// Shows image `id` at the cursor, scaled into `cols` x `rows` cells, as placement `pid`.
pub fn place(id: u32, pid: u32, cols: u16, rows: u16) -> Vec<u8> {
    let mut out = Vec::new();
    apc(
        &mut out,
        &format!("a=p,i={id},p={pid},c={cols},r={rows},C=1,q=2"),
        b"",
    );
    out
}

/// Removes placement `pid` of image `id` (the image stays, ready to be placed again).
pub fn delete_placement(id: u32, pid: u32) -> Vec<u8> {
    let mut out = Vec::new();
    apc(&mut out, &format!("a=d,d=i,i={id},p={pid},q=2"), b"");
    out
}

/// Removes image `id` and frees its data.
pub fn delete_image(id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    apc(&mut out, &format!("a=d,d=I,i={id},q=2"), b"");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The APC commands in `bytes`, as (keys, payload).
    fn commands(bytes: &[u8]) -> Vec<(String, String)> {
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let mut out = Vec::new();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let body = rest.strip_prefix("\x1b_G").expect("an APC G command");
            let end = body.find("\x1b\\").expect("terminated");
            let (keys, payload) = match body[..end].split_once(';') {
                Some((k, p)) => (k, p),
                None => (&body[..end], ""),
            };
            out.push((keys.to_string(), payload.to_string()));
            rest = &body[end + 2..];
        }
        out
    }

    #[test]
    fn a_large_image_goes_in_4096_byte_chunks_with_m1_then_m0() {
        // 7000 bytes -> 9336 base64 bytes -> 4096 + 4096 + 1144
        let png: Vec<u8> = (0..7000u32).map(|i| (i * 7 % 251) as u8).collect();
        let cmds = commands(&transmit(42, &png));
        let keys: Vec<&str> = cmds.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            keys,
            ["a=t,t=d,f=100,i=42,q=2,m=1", "m=1,q=2", "m=0,q=2"],
            "only the first chunk names the image; q=2 on every chunk"
        );
        let sizes: Vec<usize> = cmds.iter().map(|c| c.1.len()).collect();
        assert_eq!(sizes, [4096, 4096, 1144]);
        let joined: String = cmds.iter().map(|c| c.1.as_str()).collect();
        assert_eq!(STANDARD.decode(joined).unwrap(), png);
    }

    #[test]
    fn a_small_image_is_one_chunk_with_m0() {
        let cmds = commands(&transmit(7, b"abc"));
        assert_eq!(
            cmds,
            [("a=t,t=d,f=100,i=7,q=2,m=0".to_string(), "YWJj".to_string())]
        );
        // exactly one chunk's worth: still one command
        let png = vec![0u8; 3072];
        assert_eq!(commands(&transmit(7, &png)).len(), 1);
        assert_eq!(commands(&transmit(7, &[0u8; 3073])).len(), 2);
    }

    #[test]
    fn place_and_delete_commands() {
        assert_eq!(
            place(9, 2, 30, 8),
            b"\x1b_Ga=p,i=9,p=2,c=30,r=8,C=1,q=2\x1b\\"
        );
        assert_eq!(delete_placement(9, 2), b"\x1b_Ga=d,d=i,i=9,p=2,q=2\x1b\\");
        assert_eq!(delete_image(9), b"\x1b_Ga=d,d=I,i=9,q=2\x1b\\");
    }
}
