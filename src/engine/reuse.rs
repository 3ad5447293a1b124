//! The prefix-reuse rule: how much of the conversation's KV cache a new prompt keeps. Pure
//! (ids, picture fingerprints and lengths in, positions out), so that its edge cases are tested
//! without a model; [`Engine`](super::chat::Engine) applies it.

/// What a conversation's KV cache holds.
pub struct Cached<'a, K> {
    /// The ids whose keys and values are cached.
    pub ids: &'a [i64],
    /// The fingerprint of the picture behind each of their `<IMG_CONTEXT>` runs.
    pub images: &'a [K],
}

/// What a new prompt keeps of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reuse {
    /// Leading positions kept ([`reusable_prefix`]).
    pub positions: usize,
    /// Tiles whose features lie inside the kept positions (their vision features need not be
    /// computed again).
    pub cached_tiles: usize,
}

/// [`reusable_prefix`] of a prompt `ids` whose `<IMG_CONTEXT>` id is `img_context_id`, one
/// fingerprint per picture run, and the tiles of `tokens_per_tile` positions inside the kept
/// prefix.
pub fn plan<K: PartialEq>(
    cached: &Cached<'_, K>,
    ids: &[i64],
    img_context_id: i64,
    fingerprints: &[K],
    tokens_per_tile: usize,
    dynamic_max_positions: Option<i64>,
) -> Reuse {
    let runs = image_runs(ids, img_context_id);
    debug_assert_eq!(runs.len(), fingerprints.len(), "one run per placeholder");
    let positions = reusable_prefix(cached, ids, &runs, fingerprints, dynamic_max_positions);
    let cached_tiles = runs
        .iter()
        .filter(|r| r.1 <= positions)
        .map(|r| (r.1 - r.0) / tokens_per_tile.max(1))
        .sum();
    Reuse {
        positions,
        cached_tiles,
    }
}

/// Whether a scheduled request takes the conversation's cache (cut to `reuse` positions) rather
/// than a fresh one: only when it continues the conversation, keeping at least half of its
/// `cached` positions. A request that shares no more than the system message computes that
/// again in its own cache and leaves the conversation to its next turn.
pub fn lends_conversation(reuse: usize, cached: usize) -> bool {
    reuse > 0 && 2 * reuse >= cached
}

/// How many leading positions of a cached conversation a new prompt `ids` can keep: the
/// longest common prefix, short of the whole prompt (its last position must run to give
/// logits), cut back to the start of the first picture whose run is not the cached picture's
/// (equal ids do not mean equal pictures) and never through a picture's run. With a dynamic rope
/// (`dynamic_max_positions`: its `max_position_embeddings`) nothing is kept once the prompt or
/// the cached sequence (which only grows between cuts, so its length is the most it held) went
/// past that length: the reference rotates a longer prompt's keys with a base grown for its
/// length, and keys decoded past it with one grown per step.
pub fn reusable_prefix<K: PartialEq>(
    cached: &Cached<'_, K>,
    ids: &[i64],
    runs: &[(usize, usize)],
    fingerprints: &[K],
    dynamic_max_positions: Option<i64>,
) -> usize {
    if let Some(max) = dynamic_max_positions {
        if ids.len() as i64 > max || cached.ids.len() as i64 > max {
            return 0;
        }
    }
    let mut reuse = cached
        .ids
        .iter()
        .zip(ids)
        .take_while(|(a, b)| a == b)
        .count()
        .min(ids.len().saturating_sub(1));
    if let Some(r) = runs
        .iter()
        .zip(fingerprints)
        .enumerate()
        .find(|(k, (r, f))| r.0 < reuse && cached.images.get(*k) != Some(f))
        .map(|(_, (r, _))| r)
    {
        reuse = r.0;
    }
    if let Some(r) = runs.iter().find(|r| r.0 < reuse && r.1 > reuse) {
        reuse = r.0;
    }
    reuse
}

/// [start, end) of each run of `<IMG_CONTEXT>` tokens.
pub fn image_runs(ids: &[i64], ctx: i64) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        if ids[i] == ctx {
            let s = i;
            while i < ids.len() && ids[i] == ctx {
                i += 1;
            }
            runs.push((s, i));
        } else {
            i += 1;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: i64 = 9; // the <IMG_CONTEXT> id in these tests

    fn reuse(
        cached: &[i64],
        images: &[&str],
        ids: &[i64],
        fps: &[&str],
        dynamic: Option<i64>,
    ) -> usize {
        let runs = image_runs(ids, C);
        reusable_prefix(
            &Cached {
                ids: cached,
                images,
            },
            ids,
            &runs,
            fps,
            dynamic,
        )
    }

    #[test]
    fn the_common_prefix_short_of_the_last_position() {
        assert_eq!(reuse(&[1, 2, 3, 4], &[], &[1, 2, 3, 5, 6], &[], None), 3);
        // the whole prompt cached: its last position still runs
        assert_eq!(reuse(&[1, 2, 3, 4], &[], &[1, 2, 3], &[], None), 2);
        assert_eq!(reuse(&[], &[], &[1, 2], &[], None), 0);
    }

    #[test]
    fn pictures_are_kept_only_when_they_are_the_same_and_whole() {
        let cached = [1, C, C, 2, 3];
        // same picture: kept, up to the divergence
        assert_eq!(reuse(&cached, &["a"], &[1, C, C, 2, 4], &["a"], None), 4);
        // another picture with the same ids: cut back to its start
        assert_eq!(reuse(&cached, &["a"], &[1, C, C, 2, 4], &["b"], None), 1);
        // the common prefix ends inside a run: cut back to its start
        assert_eq!(
            reuse(&[1, C, C, 2], &["a"], &[1, C, C, C, 2], &["a"], None),
            1
        );
    }

    #[test]
    fn a_dynamic_rope_past_its_length_keeps_nothing() {
        let cached = [1, 2, 3, 4, 5];
        let ids = [1, 2, 3, 4, 5, 6];
        assert_eq!(reuse(&cached, &[], &ids, &[], Some(6)), 5);
        // the new prompt goes past max positions
        assert_eq!(reuse(&cached, &[], &ids, &[], Some(5)), 0);
        // the cache went past it while decoding, even if the new prompt fits
        assert_eq!(reuse(&[1, 2, 3, 4, 5, 6, 7, 8], &[], &ids, &[], Some(6)), 0);
        // no dynamic rope: lengths do not matter
        assert_eq!(reuse(&[1, 2, 3, 4, 5, 6, 7, 8], &[], &ids, &[], None), 5);
    }

    #[test]
    fn prompts_that_diverge_at_the_first_or_last_token_or_not_at_all() {
        // at the first token: nothing kept
        assert_eq!(reuse(&[7, 2, 3, 4], &[], &[1, 2, 3, 4], &[], None), 0);
        // at the last token: everything before it
        assert_eq!(reuse(&[1, 2, 3, 4], &[], &[1, 2, 3, 5], &[], None), 3);
        // identical: all but the last position, which must run again for its logits
        assert_eq!(reuse(&[1, 2, 3, 4], &[], &[1, 2, 3, 4], &[], None), 3);
        // identical with a picture ending the prompt: cut back to the picture's start
        assert_eq!(reuse(&[1, C, C], &["a"], &[1, C, C], &["a"], None), 1);
        // an empty cache or an empty prompt keeps nothing
        assert_eq!(reuse(&[], &[], &[1], &[], None), 0);
        assert_eq!(reuse(&[1, 2], &[], &[], &[], None), 0);
    }

    #[test]
    fn the_plan_counts_the_tiles_inside_the_kept_prefix() {
        // two pictures of 2 tiles of 2 positions each; the prompt diverges after the first
        let cached = [1, C, C, C, C, 2, C, C, C, C, 3];
        let ids = [1, C, C, C, C, 2, C, C, C, C, 4];
        let both = plan(
            &Cached {
                ids: &cached,
                images: &["a", "b"],
            },
            &ids,
            C,
            &["a", "b"],
            2,
            None,
        );
        assert_eq!(
            both,
            Reuse {
                positions: 10,
                cached_tiles: 4
            }
        );
        // the second picture changed: only the first one's tiles are kept
        let first = plan(
            &Cached {
                ids: &cached,
                images: &["a", "b"],
            },
            &ids,
            C,
            &["a", "x"],
            2,
            None,
        );
        assert_eq!(
            first,
            Reuse {
                positions: 6,
                cached_tiles: 2
            }
        );
        // nothing cached
        let none = plan(
            &Cached::<&str> {
                ids: &[],
                images: &[],
            },
            &ids,
            C,
            &["a", "b"],
            2,
            None,
        );
        assert_eq!(
            none,
            Reuse {
                positions: 0,
                cached_tiles: 0
            }
        );
    }

    #[test]
    fn the_conversation_is_lent_only_to_its_continuation() {
        assert!(!lends_conversation(0, 0));
        assert!(!lends_conversation(0, 10));
        assert!(lends_conversation(5, 10), "exactly half");
        assert!(!lends_conversation(4, 9), "short of half");
        assert!(lends_conversation(9, 10));
        assert!(lends_conversation(3, 0), "cached grew past nothing");
    }
}
