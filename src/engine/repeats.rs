//! The repeat rule (`decode.defer_repeats`): a denoising step does not write a word or piece
//! twice in a row.
//!
//! Positions unmasked in one step are sampled independently of each other: two neighbours that
//! both expect the same piece each take it, and the reply says it twice ("$14.955", "arrives
//! arrives"). The same happens across steps: a word decided early makes its neighbour propose it
//! too. With other positions of the block still open, a later step usually proposes something
//! else there, so a candidate that would complete a repeat waits; where nothing else can go first,
//! the canvas writes the position's likeliest token that repeats nothing
//! ([`Canvas`](super::canvas::Canvas)).

use std::ops::Range;

use super::policy::Candidate;

/// The longest span compared token by token: a word of up to a few pieces.
pub const REPEAT_SPAN: usize = 4;

/// What the rule needs to know of the vocabulary.
#[derive(Clone, Copy)]
pub struct Repeats<'a> {
    pub mask: i32,
    /// Tokens that end the reply: the text stops there.
    pub end_tokens: &'a [i32],
    /// Each token's bytes, to compare words however they were split; empty: tokens only.
    pub pieces: &'a [Vec<u8>],
}

impl Repeats<'_> {
    /// Of `chosen` (in the order the policy chose them), the ones to unmask now: a candidate that,
    /// written into `tokens` beside the decided tokens and the candidates kept before it,
    /// [`Self::completes`] a repeat stays masked for now.
    ///
    /// A step must make progress, so when every chosen candidate repeats, the most probable of the
    /// other `candidates` (every masked position's proposal) that does not is unmasked instead;
    /// only when none is left is the first chosen one kept.
    pub fn defer(&self, chosen: Vec<Candidate>, candidates: &[Candidate], tokens: &[i32]) -> Vec<Candidate> {
        let mut canvas = tokens.to_vec();
        let mut kept = Vec::with_capacity(chosen.len());
        for c in &chosen {
            if !self.completes_in(&mut canvas, c) {
                canvas[c.position] = c.token;
                kept.push(*c);
            }
        }
        if kept.is_empty() {
            let others = candidates
                .iter()
                .filter(|o| chosen.iter().all(|c| c.position != o.position));
            let fallback = others
                .filter(|o| !self.completes_in(&mut canvas, o))
                .max_by(|a, b| a.prob.total_cmp(&b.prob).then(b.position.cmp(&a.position)));
            kept.extend(fallback.or(chosen.first()).copied());
        }
        kept
    }

    /// Whether `c`, written into `tokens`, completes a span of up to [`REPEAT_SPAN`] tokens said
    /// twice in a row ("5 5", "Head lamp Head lamp") or a word said twice ([`Self::says_word_twice`]).
    pub fn completes(&self, tokens: &[i32], c: &Candidate) -> bool {
        self.completes_in(&mut tokens.to_vec(), c)
    }

    /// Whether `c`, written into `tokens`, makes the text say a word twice in a row, the word at
    /// or just before `c` one of the two. The decided tokens around it (up to the nearest masked
    /// position or end token) are read as text, split at whitespace and compared without case
    /// and surrounding punctuation, so " Poles" and " Pol" "es" are one word. A word cut off by a
    /// masked position is not compared yet ("Pol" may still become "Polish"). Pieces repeated
    /// inside a word ("1002", "$100") are no repeat here. `false` without pieces.
    /// A span of whole-word tokens said twice (" Poles" " Poles") counts too, even where a masked
    /// position follows.
    pub fn says_word_twice(&self, tokens: &[i32], c: &Candidate) -> bool {
        let mut canvas = tokens.to_vec();
        canvas[c.position] = c.token;
        let starts_word = |t: i32| {
            let piece = self.pieces.get(t as usize).map_or(&[][..], Vec::as_slice);
            piece.first().is_some_and(u8::is_ascii_whitespace) && piece.iter().any(u8::is_ascii_alphabetic)
        };
        self.repeated_span(&canvas, c.position)
            .is_some_and(|s| starts_word(canvas[s]))
            || self.words_repeat_at(&canvas, c.position)
    }

    /// [`Self::completes`] on `canvas`, which is left as it was.
    fn completes_in(&self, canvas: &mut [i32], c: &Candidate) -> bool {
        let before = std::mem::replace(&mut canvas[c.position], c.token);
        let repeats = self.repeated_span(canvas, c.position).is_some() || self.words_repeat_at(canvas, c.position);
        canvas[c.position] = before;
        repeats
    }

    /// Where the first copy of a span said twice in a row (no masked position in it) over
    /// `position` starts, if there is one.
    fn repeated_span(&self, canvas: &[i32], position: usize) -> Option<usize> {
        (1..=REPEAT_SPAN).find_map(|k| {
            let first = (position + 1).saturating_sub(2 * k);
            (first..=position).filter(|s| s + 2 * k <= canvas.len()).find(|s| {
                let (a, b) = (&canvas[*s..s + k], &canvas[s + k..s + 2 * k]);
                a == b && !a.contains(&self.mask)
            })
        })
    }

    fn words_repeat_at(&self, canvas: &[i32], position: usize) -> bool {
        if self.pieces.is_empty() || canvas[position] == self.mask {
            return false;
        }
        let start = canvas[..position]
            .iter()
            .rposition(|t| *t == self.mask)
            .map_or(0, |m| m + 1);
        let stop = canvas[position..]
            .iter()
            .position(|t| *t == self.mask || self.end_tokens.contains(t))
            .map(|m| position + m);
        // The text ends complete at the canvas's end or at an end token.
        let end = stop.unwrap_or(canvas.len());
        let open_end = stop.is_some_and(|s| canvas[s] == self.mask);
        let mut text = Vec::new();
        let mut own = 0..0;
        for (i, t) in canvas.iter().enumerate().take(end.max(position + 1)).skip(start) {
            let from = text.len();
            if !self.end_tokens.contains(t) {
                text.extend_from_slice(self.pieces.get(*t as usize).map_or(&[][..], Vec::as_slice));
            }
            if i == position {
                own = from..text.len();
            }
        }
        let words = words(&text, start > 0, open_end);
        // The word the candidate is part of, or the one it completes by following it.
        let touches = |r: &Range<usize>| r.start <= own.end && own.start <= r.end;
        words.windows(2).any(|w| {
            let ((a, wa, ca), (b, wb, cb)) = (&w[0], &w[1]);
            *ca && *cb && !wa.is_empty() && wa == wb && (touches(a) || touches(b))
        })
    }
}

/// The words of `text`: byte range, the word lowercased without surrounding punctuation, and
/// whether it is complete (not running into a masked position at either end).
fn words(text: &[u8], open_start: bool, open_end: bool) -> Vec<(Range<usize>, Vec<u8>, bool)> {
    let mut words = Vec::new();
    let mut i = 0;
    while i < text.len() {
        if text[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let from = i;
        while i < text.len() && !text[i].is_ascii_whitespace() {
            i += 1;
        }
        let cut = (from == 0 && open_start) || (i == text.len() && open_end);
        let word: Vec<u8> = text[from..i]
            .iter()
            .map(u8::to_ascii_lowercase)
            .skip_while(|b| b.is_ascii_punctuation())
            .collect();
        let kept = word.len() - word.iter().rev().take_while(|b| b.is_ascii_punctuation()).count();
        words.push((from..i, word[..kept].to_vec(), !cut));
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i32 = -1;
    const END: i32 = 99;

    fn proposing(position: usize, token: i32, prob: f32) -> Candidate {
        Candidate {
            position,
            token,
            prob,
            runner_up: 0.0,
            entropy: 1.0 - prob,
        }
    }

    const TOKENS_ONLY: Repeats<'static> = Repeats {
        mask: M,
        end_tokens: &[END],
        pieces: &[],
    };

    fn kept(chosen: Vec<Candidate>, tokens: &[i32]) -> Vec<usize> {
        let candidates = chosen.clone();
        kept_among(chosen, &candidates, tokens)
    }

    fn kept_among(chosen: Vec<Candidate>, candidates: &[Candidate], tokens: &[i32]) -> Vec<usize> {
        TOKENS_ONLY
            .defer(chosen, candidates, tokens)
            .iter()
            .map(|c| c.position)
            .collect()
    }

    #[test]
    fn a_piece_said_twice_waits() {
        // "$14.95" decided, "5" proposed after it and a "for" after that.
        let tokens = [10, 11, 12, 5, M, M];
        assert_eq!(
            kept(vec![proposing(5, 20, 0.99), proposing(4, 5, 0.95)], &tokens),
            vec![5]
        );
        // Two neighbours proposing the same piece: the better one goes first, the other waits.
        let tokens = [10, M, M, 12];
        assert_eq!(
            kept(vec![proposing(2, 7, 0.99), proposing(1, 7, 0.95)], &tokens),
            vec![2]
        );
        // A different piece is no repeat.
        assert_eq!(
            kept(vec![proposing(2, 7, 0.99), proposing(1, 8, 0.95)], &tokens),
            vec![2, 1]
        );
    }

    #[test]
    fn when_the_best_repeats_another_position_goes_first() {
        // "Daypack" decided at 1; the step chose "Daypack" again at 2. Position 4 proposes a
        // token with less confidence and is unmasked instead, so the step still makes progress.
        let tokens = [10, 30, M, M, M];
        let chosen = vec![proposing(2, 30, 0.95)];
        let candidates = [proposing(2, 30, 0.95), proposing(3, 41, 0.4), proposing(4, 42, 0.6)];
        assert_eq!(kept_among(chosen.clone(), &candidates, &tokens), vec![4]);
        // Of the others, one that repeats too is passed over.
        let candidates = [proposing(2, 30, 0.95), proposing(3, 42, 0.4), proposing(4, 41, 0.6)];
        let tokens = [10, 30, M, M, M, 41];
        assert_eq!(kept_among(chosen.clone(), &candidates, &tokens), vec![3]);
        // With nothing else left the repeat is kept: every step makes progress.
        assert_eq!(kept_among(chosen, &[proposing(2, 30, 0.95)], &[10, 30, M]), vec![2]);
    }

    #[test]
    fn a_word_of_several_pieces_said_twice_waits() {
        // "The Head lamp [ ] [ ] has": "Head lamp" again would say the word twice.
        let tokens = [1, 30, 31, M, M, 40];
        assert_eq!(
            kept(vec![proposing(3, 30, 0.99), proposing(4, 31, 0.97)], &tokens),
            vec![3]
        );
        // Spans past REPEAT_SPAN are not looked for: a long phrase may come back.
        let long: Vec<i32> = (0..5).chain(0..4).chain([M]).collect();
        assert_eq!(
            kept(vec![proposing(0, 0, 0.99), proposing(9, 4, 0.9)], &long),
            vec![0, 9]
        );
        // A masked position between the copies is no repeat (yet).
        assert!(TOKENS_ONLY.repeated_span(&[30, 31, M, 30, 31], 4).is_none());
        assert!(TOKENS_ONLY.repeated_span(&[30, 31, 30, 31, 7], 3).is_some());
        assert!(TOKENS_ONLY.repeated_span(&[30, 31, 30, 31, 7], 4).is_none());
    }

    /// Token `i` of this vocabulary is `PIECES[i]`.
    const PIECES: [&str; 8] = [" The", " Poles", " Pol", "es", " have", ".", " the", " Pole"];

    /// Whether writing `canvas[position]` says a word twice.
    fn says_twice(canvas: &[i32], position: usize) -> bool {
        let pieces: Vec<Vec<u8>> = PIECES.iter().map(|p| p.as_bytes().to_vec()).collect();
        let rule = Repeats {
            pieces: &pieces,
            ..TOKENS_ONLY
        };
        rule.says_word_twice(canvas, &proposing(position, canvas[position], 0.9))
    }

    #[test]
    fn a_word_said_twice_is_found_however_it_was_split() {
        // " The Poles Pol|es have": the second "Poles" is two pieces.
        assert!(says_twice(&[0, 1, 2, 3, 4], 3));
        assert!(says_twice(&[0, 1, 2, 3, 4], 1));
        // Case and punctuation do not hide a repeat: " The the."
        assert!(says_twice(&[0, 6, 5], 1));
        // A word cut off by a masked position is not compared: "Pol" may become "Polish".
        assert!(!says_twice(&[0, 1, 2, M, 4], 2));
        // The end of the reply completes the word before it: " The Poles Poles" then the end
        // token, whose writing completes the repeat.
        assert!(says_twice(&[0, 1, 1, END, M], 2));
        assert!(says_twice(&[0, 1, 2, 3, END, M], 4));
        // A word that follows the last one completes it: " Poles Poles" then " have".
        assert!(says_twice(&[1, 1, 4, M], 2));
        // Whole-word tokens said twice count before the word is known to be complete, pieces
        // inside a word do not: " Poles Poles" then a masked position, against "1 0 0".
        assert!(says_twice(&[0, 1, 1, M], 2));
        assert!(!says_twice(&[0, 3, 3, M], 2));
        // Different words, and repeats away from the position, are not this position's.
        assert!(!says_twice(&[0, 1, 7, 4], 2));
        assert!(!says_twice(&[0, 1, 2, 3, M, 4, 5], 5));
        // Without a vocabulary only tokens are compared.
        assert!(!TOKENS_ONLY.says_word_twice(&[0, 1, 2, 3], &proposing(3, 3, 0.9)));
    }
}
