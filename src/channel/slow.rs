//! Which clients hold back delivery: the rule for disconnecting a slow client; pure.
//!
//! A burst is not a slow client: while the bridge writes a burst, every subscriber's
//! buffer fills and drains. A client is slow when it stays behind while others keep up:
//! it has had at least `threshold` packets waiting for `timeout` without a break, while
//! at least one other subscriber had nothing waiting. Such a client holds events in the
//! delivery window, so the change stream waits for it; it is disconnected (it then
//! reconnects and catches up) so that the others are served.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlowClientRule {
    /// Packets waiting that count as behind: half the delivery window.
    pub threshold: usize,
    /// How long a client may stay behind while others keep up.
    pub timeout: Duration,
}

/// Since when each client has been behind.
#[derive(Debug)]
pub struct Observations<K> {
    behind_since: HashMap<K, Instant>,
}

impl<K> Default for Observations<K> {
    fn default() -> Self {
        Observations {
            behind_since: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Observations<K> {
    /// Takes the number of packets waiting for each subscribed client at `now`, and
    /// returns the clients to disconnect.
    pub fn observe(&mut self, rule: SlowClientRule, now: Instant, buffered: &[(K, usize)]) -> Vec<K> {
        let someone_current = buffered.iter().any(|&(_, waiting)| waiting == 0);
        let mut behind_since = HashMap::new();
        let mut slow = Vec::new();
        for &(client, waiting) in buffered {
            if waiting < rule.threshold {
                continue;
            }
            let since = self.behind_since.get(&client).copied().unwrap_or(now);
            behind_since.insert(client, since);
            if someone_current && now.saturating_duration_since(since) >= rule.timeout {
                slow.push(client);
            }
        }
        // Only clients behind now are remembered: one that caught up starts afresh.
        self.behind_since = behind_since;
        for client in &slow {
            self.behind_since.remove(client);
        }
        slow
    }

    /// Clients behind now.
    pub fn behind(&self) -> usize {
        self.behind_since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: SlowClientRule = SlowClientRule {
        threshold: 32,
        timeout: Duration::from_secs(5),
    };

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    #[test]
    fn a_client_behind_while_others_keep_up_is_slow_after_the_timeout() {
        let t0 = Instant::now();
        let mut seen = Observations::default();
        assert!(seen.observe(RULE, t0, &[(1, 40), (2, 0)]).is_empty());
        assert!(seen.observe(RULE, at(t0, 4), &[(1, 64), (2, 3)]).is_empty());
        assert_eq!(seen.observe(RULE, at(t0, 5), &[(1, 64), (2, 0)]), vec![1]);
        // Forgotten once reported.
        assert_eq!(seen.behind(), 0);
    }

    #[test]
    fn catching_up_for_a_moment_starts_the_clock_again() {
        let t0 = Instant::now();
        let mut seen = Observations::default();
        seen.observe(RULE, t0, &[(1, 40), (2, 0)]);
        seen.observe(RULE, at(t0, 3), &[(1, 10), (2, 0)]);
        assert!(seen.observe(RULE, at(t0, 4), &[(1, 40), (2, 0)]).is_empty());
        assert!(seen.observe(RULE, at(t0, 8), &[(1, 40), (2, 0)]).is_empty());
        assert_eq!(seen.observe(RULE, at(t0, 9), &[(1, 40), (2, 0)]), vec![1]);
    }

    #[test]
    fn a_burst_that_every_client_meets_is_no_slow_client() {
        let t0 = Instant::now();
        let mut seen = Observations::default();
        for secs in 0..20 {
            let everyone_busy = [(1, 50), (2, 60), (3, 33)];
            assert!(seen.observe(RULE, at(t0, secs), &everyone_busy).is_empty());
        }
        assert_eq!(seen.behind(), 3);
        // As soon as one catches up, those behind for long enough are slow.
        assert_eq!(
            seen.observe(RULE, at(t0, 20), &[(1, 50), (2, 0), (3, 33)]),
            vec![1, 3]
        );
    }

    #[test]
    fn a_client_that_left_is_forgotten() {
        let t0 = Instant::now();
        let mut seen = Observations::default();
        seen.observe(RULE, t0, &[(1, 40), (2, 0)]);
        seen.observe(RULE, at(t0, 1), &[(2, 0)]);
        assert_eq!(seen.behind(), 0);
        assert!(seen.observe(RULE, at(t0, 6), &[(1, 40), (2, 0)]).is_empty());
    }

    #[test]
    fn below_the_threshold_is_keeping_up() {
        let t0 = Instant::now();
        let mut seen = Observations::default();
        for secs in 0..30 {
            assert!(seen.observe(RULE, at(t0, secs), &[(1, 31), (2, 0)]).is_empty());
        }
    }
}
