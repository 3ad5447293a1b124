//! Memory that must not grow with use, measured on this process alone (one test in the file).
use internvl_chat::engine::protocol::Attachment;
use internvl_chat::preprocess::{self, TileConfig};
use internvl_chat::testutil::fixture;
mod common;
use common::rss;

/// Every request of a chat re-reads the videos of its history: reading one must not leave its
/// packets behind. (ffmpeg-next's `Packet::read` does not release the packet it overwrites;
/// the soak test found each read of a video leaking the whole file.)
#[test]
fn reading_a_video_again_and_again_keeps_memory_flat() {
    let cfg = TileConfig::internvl_2_5();
    let video = fixture("media/videos/flipping_a_pancake.mkv");
    let size = std::fs::metadata(&video).unwrap().len();
    let att = Attachment::Video {
        path: video,
        segments: 8,
        bound: None,
        max_tiles: 1,
    };
    let read = || {
        assert_eq!(preprocess::placeholder_tiles(&att, &cfg).unwrap(), [1; 8]);
    };
    for _ in 0..20 {
        read();
    }
    let before = rss();
    let n = 300;
    for _ in 0..n {
        read();
    }
    let grown = rss().saturating_sub(before);
    assert!(
        grown < n * size / 10,
        "{n} reads of a {size}-byte video grew RSS by {grown} bytes"
    );
    // frames decoded too
    let before = rss();
    for _ in 0..20 {
        preprocess::load_visual(&att, &cfg).unwrap();
    }
    let grown = rss().saturating_sub(before);
    assert!(grown < 8 << 20, "20 decodes grew RSS by {grown} bytes");
}
