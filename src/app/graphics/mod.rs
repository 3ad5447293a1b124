//! Pictures through terminal graphics protocols: kitty, sixel and iTerm2, with half blocks
//! (preview.rs) as the fallback. The encoders: each turns pixels into the escape sequences
//! of its protocol.
pub mod iterm2;
pub mod kitty;
pub mod sixel;
