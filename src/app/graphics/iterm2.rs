//! iTerm2's inline images (also WezTerm, mintty, Konsole): `ESC ] 1337 ; File=keys : base64
//! BEL`, a whole PNG drawn at the cursor into a box of cells. The image becomes part of the
//! cells it covers, so text written there later replaces it.
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

/// Draws `png` at the cursor, fitted into `cols` x `rows` cells.
pub fn inline(png: &[u8], cols: u16, rows: u16) -> Vec<u8> {
    let data = STANDARD.encode(png);
    let mut out = format!(
        "\x1b]1337;File=inline=1;size={};width={cols};height={rows};\
         preserveAspectRatio=1;doNotMoveCursor=1:",
        png.len()
    )
    .into_bytes();
    out.extend_from_slice(data.as_bytes());
    out.push(0x07);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgba, RgbaImage};

    #[test]
    fn header_fields_and_a_payload_that_decodes_to_the_png() {
        let img = RgbaImage::from_fn(5, 3, |x, y| Rgba([x as u8 * 40, y as u8 * 80, 7, 255]));
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let seq = inline(&png, 12, 4);
        let text = String::from_utf8(seq).unwrap();
        let body = text
            .strip_prefix("\x1b]1337;File=")
            .and_then(|t| t.strip_suffix('\x07'))
            .expect("OSC 1337 File= ... BEL");
        let (header, payload) = body.split_once(':').unwrap();
        let fields: Vec<&str> = header.split(';').collect();
        assert_eq!(
            fields,
            [
                "inline=1",
                &format!("size={}", png.len()),
                "width=12",
                "height=4",
                "preserveAspectRatio=1",
                "doNotMoveCursor=1"
            ]
        );
        let bytes = STANDARD.decode(payload).unwrap();
        assert_eq!(bytes, png);
        let back = image::load_from_memory(&bytes).unwrap().to_rgba8();
        assert_eq!(back, img);
    }
}
