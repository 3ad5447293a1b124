//! Prompt fitting: how many of the oldest history turns to leave out so that a prompt leaves
//! room for the answer in the context window. Pure: the token count of each cut comes from the
//! caller ([`Engine::prepare_to_fit`](super::chat::Engine::prepare_to_fit) renders and
//! tokenizes the prompt), so the rule is tested without a model.

/// The room a prompt must fit in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// The context window: prompt plus answer.
    pub context: usize,
    /// Tokens the answer may take.
    pub max_new_tokens: usize,
}

impl Room {
    pub fn fits(self, prompt: usize) -> bool {
        prompt
            .checked_add(self.max_new_tokens)
            .is_some_and(|n| n <= self.context)
    }
}

/// How the cut came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Leave out this many oldest turns (0: the whole history fits).
    Drop(usize),
    /// Even with every droppable turn (`dropped`) left out, the prompt takes `prompt` tokens.
    TooLong { prompt: usize, dropped: usize },
}

/// The fewest oldest turns to leave out, at most `max_drop`, for the prompt to fit `room`.
/// `tokens(d)` is the prompt's length with the `d` oldest turns left out; it shrinks as `d`
/// grows, so the cut is found by bisection (about log2(`max_drop`) + 2 calls).
pub fn smallest_cut<E>(
    max_drop: usize,
    room: Room,
    mut tokens: impl FnMut(usize) -> Result<usize, E>,
) -> Result<Cut, E> {
    if room.fits(tokens(0)?) {
        return Ok(Cut::Drop(0));
    }
    let least = tokens(max_drop)?;
    if !room.fits(least) {
        return Ok(Cut::TooLong {
            prompt: least,
            dropped: max_drop,
        });
    }
    // !fits(lo), fits(hi)
    let (mut lo, mut hi) = (0, max_drop);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if room.fits(tokens(mid)?) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Cut::Drop(hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    /// A prompt of `base` tokens plus turns of the given lengths, oldest first.
    fn cut(turns: &[usize], base: usize, room: Room) -> (Cut, Vec<usize>) {
        let mut asked = Vec::new();
        let c = smallest_cut::<Infallible>(turns.len(), room, |d| {
            asked.push(d);
            Ok(base + turns[d..].iter().sum::<usize>())
        })
        .unwrap();
        (c, asked)
    }

    const ROOM: Room = Room {
        context: 100,
        max_new_tokens: 20,
    };

    #[test]
    fn an_empty_history_fits_or_is_too_long_alone() {
        assert_eq!(cut(&[], 80, ROOM).0, Cut::Drop(0));
        assert_eq!(
            cut(&[], 81, ROOM).0,
            Cut::TooLong {
                prompt: 81,
                dropped: 0
            }
        );
    }

    #[test]
    fn an_exact_fit_keeps_everything() {
        // 50 + 10 + 20 = 80 tokens, + 20 new = 100 = the window
        let (c, asked) = cut(&[10, 20], 50, ROOM);
        assert_eq!(c, Cut::Drop(0));
        assert_eq!(asked, [0], "a fitting prompt is measured once");
    }

    #[test]
    fn one_token_over_drops_the_oldest_turn() {
        let (c, _) = cut(&[1, 20], 60, ROOM);
        assert_eq!(c, Cut::Drop(1));
        // over by one even without droppable turns
        assert_eq!(
            cut(&[5, 5], 81, ROOM).0,
            Cut::TooLong {
                prompt: 81,
                dropped: 2
            }
        );
    }

    #[test]
    fn the_smallest_cut_that_fits() {
        // 10 turns of 10 on 10: the prompt is 110 - 10 d; it fits at 80, so d = 3
        let (c, asked) = cut(&[10; 10], 10, ROOM);
        assert_eq!(c, Cut::Drop(3));
        assert!(asked.len() <= 6, "bisection, not a scan: {asked:?}");
        for (turns, want) in [(&[100, 1, 1][..], 1), (&[1, 1, 100][..], 3)] {
            let (c, _) = cut(turns, 0, ROOM);
            assert_eq!(c, Cut::Drop(want), "{turns:?}");
        }
    }

    #[test]
    fn only_droppable_turns_are_dropped_and_errors_pass_through() {
        let c = smallest_cut::<Infallible>(1, ROOM, |d| Ok(if d == 0 { 200 } else { 90 }));
        assert_eq!(
            c.unwrap(),
            Cut::TooLong {
                prompt: 90,
                dropped: 1
            }
        );
        let e = smallest_cut(3, ROOM, |d| if d == 0 { Ok(500) } else { Err(d) });
        assert_eq!(e, Err(3));
        assert!(!Room {
            context: 10,
            max_new_tokens: usize::MAX
        }
        .fits(1));
    }
}
