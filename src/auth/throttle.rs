//! Slowing down failed subscribes, per client address, without ever slowing a valid one.
//!
//! Each failure within the window lengthens the wait before that address's next failure
//! ack (like Nightscout's REST delay list). Many users share one address behind a proxy
//! or NAT, so only failure acks wait; and the number of acks waiting per address is
//! bounded so that the waiting itself cannot exhaust memory.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// Added to the wait for each failure within `window`.
    pub per_failure: Duration,
    pub window: Duration,
    pub max_delay: Duration,
    /// Failure acks waiting at once per address; beyond it the attempt is refused outright.
    pub max_pending: usize,
    /// Addresses tracked at once; idle ones are forgotten first.
    pub max_addresses: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        ThrottleConfig {
            per_failure: Duration::from_millis(100),
            window: Duration::from_secs(60),
            max_delay: Duration::from_secs(2),
            max_pending: 16,
            max_addresses: 100_000,
        }
    }
}

#[derive(Clone)]
pub struct FailureThrottle {
    inner: Arc<Inner>,
}

struct Inner {
    config: ThrottleConfig,
    addresses: Mutex<HashMap<IpAddr, AddressState>>,
}

#[derive(Default)]
struct AddressState {
    failures: VecDeque<Instant>,
    pending: usize,
}

/// A failure ack that must wait `delay`; holds its place among the address's pending acks.
#[must_use]
pub struct DelayedFailure {
    pub delay: Duration,
    key: IpAddr,
    inner: Arc<Inner>,
}

impl Drop for DelayedFailure {
    fn drop(&mut self) {
        let mut addresses = self.inner.addresses.lock().unwrap();
        if let Some(state) = addresses.get_mut(&self.key) {
            state.pending = state.pending.saturating_sub(1);
        }
    }
}

impl FailureThrottle {
    pub fn new(config: ThrottleConfig) -> Self {
        FailureThrottle {
            inner: Arc::new(Inner {
                config,
                addresses: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Records a failed attempt from `address` at `now`. `None` when the address already
    /// has `max_pending` acks waiting: the caller refuses the attempt without an ack.
    pub fn failure(&self, address: IpAddr, now: Instant) -> Option<DelayedFailure> {
        let config = &self.inner.config;
        let key = throttle_key(address);
        let mut addresses = self.inner.addresses.lock().unwrap();
        if addresses.len() >= config.max_addresses && !addresses.contains_key(&key) {
            forget_idle(&mut addresses, now, config);
        }
        let state = addresses.entry(key).or_default();
        while state
            .failures
            .front()
            .is_some_and(|t| now.saturating_duration_since(*t) >= config.window)
        {
            state.failures.pop_front();
        }
        if state.pending >= config.max_pending {
            return None;
        }
        // Beyond the cap more history changes nothing: keep the queue bounded.
        let cap = (config.max_delay.as_nanos() / config.per_failure.as_nanos().max(1)) as usize + 1;
        if state.failures.len() >= cap {
            state.failures.pop_front();
        }
        state.failures.push_back(now);
        state.pending += 1;
        let delay = config
            .per_failure
            .saturating_mul(state.failures.len() as u32)
            .min(config.max_delay);
        Some(DelayedFailure {
            delay,
            key,
            inner: self.inner.clone(),
        })
    }

    pub fn tracked_addresses(&self) -> usize {
        self.inner.addresses.lock().unwrap().len()
    }
}

fn forget_idle(addresses: &mut HashMap<IpAddr, AddressState>, now: Instant, config: &ThrottleConfig) {
    addresses.retain(|_, s| {
        s.pending > 0
            || s.failures
                .back()
                .is_some_and(|t| now.saturating_duration_since(*t) < config.window)
    });
    if addresses.len() >= config.max_addresses {
        // Still full of recent failures: forget those without waiting acks.
        addresses.retain(|_, s| s.pending > 0);
    }
}

/// One IPv6 host usually owns a whole /64, so failures are counted per /64.
fn throttle_key(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V4(_) => address,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// The client's address: the peer, or behind a trusted proxy the first
/// `X-Forwarded-For` hop (the original client), when it parses.
pub fn client_address(peer: SocketAddr, forwarded_for: Option<&str>, trusted_proxy: bool) -> IpAddr {
    let first_hop = forwarded_for.and_then(|h| h.split(',').next()).map(str::trim);
    if trusted_proxy && let Some(first) = first_hop {
        if let Ok(ip) = first.parse::<IpAddr>() {
            return ip;
        }
        if let Ok(addr) = first.parse::<SocketAddr>() {
            return addr.ip();
        }
    }
    peer.ip()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> FailureThrottle {
        FailureThrottle::new(ThrottleConfig {
            max_pending: 3,
            ..ThrottleConfig::default()
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn each_failure_in_the_window_adds_100ms_up_to_2s() {
        let t = throttle();
        let start = Instant::now();
        let delays: Vec<u128> = (0..25)
            .map(|i| {
                t.failure(A, start + Duration::from_millis(i))
                    .unwrap()
                    .delay
                    .as_millis()
            })
            .collect();
        assert_eq!(&delays[..3], &[100, 200, 300]);
        assert_eq!(delays[19], 2000);
        assert_eq!(delays[24], 2000);
        // Another address starts from nothing.
        assert_eq!(t.failure(B, start).unwrap().delay, Duration::from_millis(100));
        // Failures older than the window no longer count.
        let later = start + Duration::from_secs(61);
        assert_eq!(t.failure(A, later).unwrap().delay, Duration::from_millis(100));
    }

    #[test]
    fn pending_acks_per_address_are_bounded() {
        let t = throttle();
        let now = Instant::now();
        let held: Vec<_> = (0..3).map(|_| t.failure(A, now).unwrap()).collect();
        assert!(t.failure(A, now).is_none(), "a fourth waiting ack is refused");
        assert!(t.failure(B, now).is_some(), "other addresses are unaffected");
        drop(held);
        assert!(t.failure(A, now).is_some(), "places free up when acks are sent");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_v4_as_v4() {
        let t = throttle();
        let now = Instant::now();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let _x = t.failure(a, now).unwrap();
        assert_eq!(t.failure(b, now).unwrap().delay, Duration::from_millis(200));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        let _y = t.failure(A, now).unwrap();
        assert_eq!(t.failure(mapped, now).unwrap().delay, Duration::from_millis(200));
    }

    #[test]
    fn tracked_addresses_are_bounded() {
        let t = FailureThrottle::new(ThrottleConfig {
            max_addresses: 4,
            ..ThrottleConfig::default()
        });
        let start = Instant::now();
        for i in 0..4u8 {
            drop(t.failure(IpAddr::V4([10, 0, 0, i].into()), start));
        }
        let later = start + Duration::from_secs(61);
        drop(t.failure(IpAddr::V4([10, 0, 1, 0].into()), later));
        assert_eq!(t.tracked_addresses(), 1);
    }

    #[test]
    fn client_address_from_peer_or_trusted_forwarded_for() {
        let peer: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        assert_eq!(
            client_address(peer, Some("203.0.113.7, 10.0.0.1"), false),
            peer.ip()
        );
        assert_eq!(
            client_address(peer, Some("203.0.113.7, 10.0.0.1"), true),
            "203.0.113.7".parse::<IpAddr>().unwrap()
        );
        assert_eq!(client_address(peer, Some("garbage"), true), peer.ip());
        assert_eq!(client_address(peer, None, true), peer.ip());
        assert_eq!(
            client_address(peer, Some("[2001:db8::1]:443"), true),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
    }
}
