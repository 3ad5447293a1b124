//! The image loader: any bytes decode to an RGB image and then to tiles and normalised pixels,
//! as the engine makes them, or give an error naming the data; never a panic, a hang or an
//! allocation past the decompression-bomb cap.
#![no_main]
use internvl_chat::preprocess::image::{decode_rgb, dynamic_preprocess, normalize_tiles};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // the first byte picks the tile limit (1..=12, as the model card's max_num) and the tile
    // size: the model's 448 for one input in eight, else 28, the same code 250 times cheaper
    let Some((&first, bytes)) = data.split_first() else {
        return;
    };
    let max_tiles = u32::from(first % 12) + 1;
    let size = if first >> 5 == 7 { 448 } else { 28 };
    match decode_rgb(bytes, "fuzz.img") {
        Ok(img) => {
            let t = dynamic_preprocess(&img, 1, max_tiles, size, true);
            let (cols, rows) = t.grid;
            assert!(cols * rows <= max_tiles);
            let expected = if cols * rows > 1 { cols * rows + 1 } else { 1 };
            assert_eq!(t.tiles.len() as u32, expected);
            assert!(t.tiles.iter().all(|t| t.dimensions() == (size, size)));
            let tiles: Vec<&image::RgbImage> = t.tiles.iter().collect();
            let px = normalize_tiles(&tiles);
            assert_eq!(px.len(), tiles.len() * 3 * (size * size) as usize);
            assert!(px.iter().all(|v| v.is_finite()));
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("fuzz.img") && !msg.contains('\n'), "{msg}");
        }
    }
});
