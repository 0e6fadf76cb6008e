//! Which hosts answer: one view for every user of the hub, so that a host
//! that does not answer costs a rush of spawns one connect timeout, not one
//! per user in turn.
//!
//! Plain data over plain time: the pool feeds it connection outcomes and
//! probe results ([`Health::failed`], [`Health::answered`]), host choice
//! asks [`Health::status`]. The rules (docs/reliability.md, "A host that
//! does not answer"):
//!
//! - A connection that cannot be made (refused, no route, no answer within
//!   `connect_timeout`) marks the host **down** for everyone, with the error
//!   and the time. Authentication and host-key failures are about a user or
//!   a key, not the host, and change nothing here.
//! - While it is down, spawns do not consider it, and one background probe
//!   at a time asks it again ([`PROBE_EVERY`] apart).
//! - The first answer (a probe, or any connection made) brings it back.
//! - A host that **flaps** (down [`FLAP_DOWNS`] times within [`FLAP_WINDOW`])
//!   must answer probes for a hold-down before new servers go there again:
//!   [`HOLD_DOWN`] for the third fall, doubled for each further one in the
//!   window, at most [`HOLD_DOWN_MAX`]. A failure during the hold-down makes
//!   it down again.
//! - Servers already on a host are polled and stopped as always: the mark
//!   only steers new servers.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use crate::error::{Error, Phase};

/// How often a down host is asked again (from the start of one attempt to
/// the start of the next; an attempt that takes longer is followed at once).
pub const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Falls within [`FLAP_WINDOW`] from which a returning host is held down.
pub const FLAP_DOWNS: usize = 3;
/// The window in which falls are counted.
pub const FLAP_WINDOW: Duration = Duration::from_secs(600);
/// The hold-down of a host that fell [`FLAP_DOWNS`] times in the window.
pub const HOLD_DOWN: Duration = Duration::from_secs(30);
/// The longest hold-down.
pub const HOLD_DOWN_MAX: Duration = Duration::from_secs(300);

/// Whether new servers may go to a host.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    /// Answering (or never tried).
    Up,
    /// Not answering since `since`.
    Down(Down),
    /// Answering again after flapping, but held down until `until`.
    HeldDown {
        /// When it answered again.
        back_at: SystemTime,
        /// When new servers may go there again.
        until: SystemTime,
        /// Falls in the last [`FLAP_WINDOW`].
        falls: usize,
    },
}

/// A host that does not answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Down {
    /// Wall-clock time of the first failure of this outage.
    pub since: SystemTime,
    /// The last error, as a connection reported it.
    pub error: String,
    /// Failed attempts (connections and probes) in this outage.
    pub attempts: u64,
}

impl Status {
    /// May new servers go there?
    pub fn takes_servers(&self) -> bool {
        matches!(self, Status::Up)
    }

    /// One line for progress messages, the options form and the CLI:
    /// `down since 09:01:02 UTC (12 s): timed out ...`.
    pub fn describe(&self, now: SystemTime) -> String {
        match self {
            Status::Up => "up".into(),
            Status::Down(d) => format!(
                "down since {} ({} ago): {}",
                clock(d.since),
                ago(now, d.since),
                d.error
            ),
            Status::HeldDown {
                back_at,
                until,
                falls,
            } => format!(
                "answering again since {} after {falls} outages in {} min; no new servers until {}",
                clock(*back_at),
                FLAP_WINDOW.as_secs() / 60,
                clock(*until)
            ),
        }
    }
}

/// `HH:MM:SS UTC` of a wall-clock time.
pub fn clock(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        day / 3600,
        (day / 60) % 60,
        day % 60
    )
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let s = now.duration_since(then).map(|d| d.as_secs()).unwrap_or(0);
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

/// What the pool should do after reporting a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// The host just went down: start its background probe.
    StartProbe,
    /// It was down already (its probe runs).
    AlreadyDown,
}

/// What a probe of a down host should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeNext {
    /// Ask again after this long.
    Again(Duration),
    /// The host takes servers again (or was never down): the probe ends.
    Done,
}

#[derive(Debug, Clone)]
struct Entry {
    status: Status,
    /// When the hold-down ends, on the monotonic clock.
    hold_until: Option<Instant>,
    /// Monotonic times of the falls in the window.
    falls: VecDeque<Instant>,
}

/// Every host's status, keyed by `address:port`.
#[derive(Debug, Default, Clone)]
pub struct Health {
    hosts: HashMap<String, Entry>,
}

impl Health {
    /// The host's status now.
    pub fn status(&self, label: &str) -> Status {
        self.hosts
            .get(label)
            .map(|e| e.status.clone())
            .unwrap_or(Status::Up)
    }

    /// Every host known not to take servers now, with its status.
    pub fn not_up(&self) -> Vec<(String, Status)> {
        let mut v: Vec<_> = self
            .hosts
            .iter()
            .filter(|(_, e)| !e.status.takes_servers())
            .map(|(l, e)| (l.clone(), e.status.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// A connection to the host could not be made (`error`), at `now`
    /// (`wall` on the wall clock).
    pub fn failed(
        &mut self,
        label: &str,
        error: &str,
        now: Instant,
        wall: SystemTime,
    ) -> AfterFailure {
        let e = self.hosts.entry(label.to_string()).or_insert(Entry {
            status: Status::Up,
            hold_until: None,
            falls: VecDeque::new(),
        });
        match &mut e.status {
            Status::Down(d) => {
                d.attempts += 1;
                d.error = error.to_string();
                AfterFailure::AlreadyDown
            }
            Status::HeldDown { .. } => {
                // Still flapping: down again, and the probe (still running
                // through the hold-down) carries on.
                e.falls.push_back(now);
                e.hold_until = None;
                e.status = Status::Down(Down {
                    since: wall,
                    error: error.to_string(),
                    attempts: 1,
                });
                AfterFailure::AlreadyDown
            }
            Status::Up => {
                e.falls.push_back(now);
                e.status = Status::Down(Down {
                    since: wall,
                    error: error.to_string(),
                    attempts: 1,
                });
                AfterFailure::StartProbe
            }
        }
    }

    /// The host answered (a probe, or a connection made) at `now`. Returns
    /// how long it had been down when this ends an outage.
    pub fn answered(&mut self, label: &str, now: Instant, wall: SystemTime) -> Option<Duration> {
        let e = self.hosts.get_mut(label)?;
        while e
            .falls
            .front()
            .is_some_and(|t| now.duration_since(*t) > FLAP_WINDOW)
        {
            e.falls.pop_front();
        }
        match &e.status {
            Status::Up => None,
            Status::HeldDown { .. } => {
                if e.hold_until.is_some_and(|until| now >= until) {
                    e.status = Status::Up;
                    e.hold_until = None;
                }
                None
            }
            Status::Down(d) => {
                let was = wall.duration_since(d.since).unwrap_or_default();
                let falls = e.falls.len();
                if falls >= FLAP_DOWNS {
                    let doublings = u32::try_from(falls - FLAP_DOWNS).unwrap_or(u32::MAX).min(8);
                    let hold = HOLD_DOWN.saturating_mul(1 << doublings).min(HOLD_DOWN_MAX);
                    e.hold_until = Some(now + hold);
                    e.status = Status::HeldDown {
                        back_at: wall,
                        until: wall + hold,
                        falls,
                    };
                } else {
                    e.status = Status::Up;
                }
                Some(was)
            }
        }
    }

    /// After a probe of a down or held-down host: ask again, or stop.
    /// `took` is how long the attempt took.
    pub fn probe_next(&self, label: &str, took: Duration) -> ProbeNext {
        match self.hosts.get(label).map(|e| &e.status) {
            None | Some(Status::Up) => ProbeNext::Done,
            Some(_) => ProbeNext::Again(PROBE_EVERY.saturating_sub(took)),
        }
    }
}

/// Once one host has answered a host choice (after `first`), how much
/// longer the others are waited for: as long again, at least
/// [`STRAGGLER_MIN`] and at most [`STRAGGLER_MAX`]. A host that answers
/// slower than that is left out of this one choice (its read goes on, and
/// the next spawn sees it); a host that does not answer at all costs the
/// spawn this instead of the connect timeout.
pub fn straggler_wait(first: Duration) -> Duration {
    first.clamp(STRAGGLER_MIN, STRAGGLER_MAX)
}

/// See [`straggler_wait`].
pub const STRAGGLER_MIN: Duration = Duration::from_secs(1);
/// See [`straggler_wait`].
pub const STRAGGLER_MAX: Duration = Duration::from_secs(5);

/// Which connection failures mean the host does not answer (rather than
/// refusing this user or this key): refused, unreachable, reset before the
/// SSH greeting, or no answer within the connect timeout.
pub fn means_host_down(e: &Error) -> bool {
    matches!(
        e,
        Error::Unreachable { .. }
            | Error::Timeout {
                phase: Phase::Connect,
                ..
            }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "198.18.0.12:22";

    fn t0() -> (Instant, SystemTime) {
        (
            Instant::now(),
            SystemTime::UNIX_EPOCH + Duration::from_secs(9 * 3600),
        )
    }

    #[test]
    fn a_failure_marks_the_host_down_for_everyone_once_and_the_first_answer_brings_it_back() {
        let (now, wall) = t0();
        let mut h = Health::default();
        assert!(h.status(H).takes_servers());
        assert_eq!(
            h.failed(H, "timed out", now, wall),
            AfterFailure::StartProbe
        );
        // A second user's failure in the same outage starts no second probe.
        assert_eq!(
            h.failed(H, "timed out again", now, wall),
            AfterFailure::AlreadyDown
        );
        let Status::Down(d) = h.status(H) else {
            panic!("not down: {:?}", h.status(H));
        };
        assert_eq!(
            (d.attempts, d.error.as_str(), d.since),
            (2, "timed out again", wall)
        );
        assert_eq!(
            h.status(H).describe(wall + Duration::from_secs(12)),
            "down since 09:00:00 UTC (12 s ago): timed out again"
        );
        assert_eq!(h.not_up().len(), 1);
        assert_eq!(
            h.probe_next(H, Duration::from_millis(500)),
            ProbeNext::Again(Duration::from_millis(1500))
        );
        assert_eq!(
            h.answered(
                H,
                now + Duration::from_secs(20),
                wall + Duration::from_secs(20)
            ),
            Some(Duration::from_secs(20))
        );
        assert_eq!(h.status(H), Status::Up);
        assert_eq!(h.probe_next(H, Duration::ZERO), ProbeNext::Done);
        // Other hosts were never touched.
        assert_eq!(h.status("198.18.0.11:22"), Status::Up);
        assert_eq!(h.answered("198.18.0.11:22", now, wall), None);
    }

    #[test]
    fn a_probe_that_took_longer_than_the_period_is_followed_at_once() {
        let (now, wall) = t0();
        let mut h = Health::default();
        h.failed(H, "x", now, wall);
        assert_eq!(
            h.probe_next(H, Duration::from_secs(10)),
            ProbeNext::Again(Duration::ZERO)
        );
    }

    #[test]
    fn a_flapping_host_is_held_down_longer_with_each_fall_and_a_fall_in_the_hold_resets_it() {
        let (now, wall) = t0();
        let mut h = Health::default();
        let s = Duration::from_secs;
        // Two falls: back at once each time.
        for i in 0..2u64 {
            h.failed(H, "x", now + s(10 * i), wall + s(10 * i));
            h.answered(H, now + s(10 * i + 1), wall + s(10 * i + 1));
            assert_eq!(h.status(H), Status::Up);
        }
        // The third within ten minutes: held down for 30 s.
        h.failed(H, "x", now + s(20), wall + s(20));
        h.answered(H, now + s(21), wall + s(21));
        assert_eq!(
            h.status(H),
            Status::HeldDown {
                back_at: wall + s(21),
                until: wall + s(51),
                falls: 3
            }
        );
        assert!(!h.status(H).takes_servers());
        assert!(h
            .status(H)
            .describe(wall + s(22))
            .contains("no new servers until 09:00:51 UTC"));
        // The probe carries on through the hold-down.
        assert!(matches!(h.probe_next(H, s(0)), ProbeNext::Again(_)));
        h.answered(H, now + s(40), wall + s(40));
        assert!(
            !h.status(H).takes_servers(),
            "released before the hold ended"
        );
        // Falls again during the hold: down, and the next return holds 60 s.
        h.failed(H, "y", now + s(45), wall + s(45));
        assert!(matches!(h.status(H), Status::Down(_)));
        h.answered(H, now + s(50), wall + s(50));
        assert!(matches!(
            h.status(H),
            Status::HeldDown { until, falls: 4, .. } if until == wall + s(110)
        ));
        h.answered(H, now + s(110), wall + s(110));
        assert_eq!(h.status(H), Status::Up);
        assert_eq!(h.probe_next(H, s(0)), ProbeNext::Done);
    }

    #[test]
    fn falls_older_than_the_window_are_forgotten_and_the_hold_down_is_capped() {
        let (now, wall) = t0();
        let mut h = Health::default();
        let s = Duration::from_secs;
        for i in 0..2u64 {
            h.failed(H, "x", now + s(i), wall + s(i));
            h.answered(H, now + s(i), wall + s(i));
        }
        // Eleven minutes later: the old falls have left the window.
        h.failed(H, "x", now + s(700), wall + s(700));
        h.answered(H, now + s(701), wall + s(701));
        assert_eq!(h.status(H), Status::Up);
        // Twelve falls at once: capped at five minutes.
        let mut h = Health::default();
        for i in 0..12u64 {
            h.failed(H, "x", now + s(i), wall + s(i));
            h.answered(H, now + s(i), wall + s(i));
            if let Status::HeldDown { until, back_at, .. } = h.status(H) {
                assert!(until.duration_since(back_at).unwrap() <= HOLD_DOWN_MAX);
            }
        }
        assert!(matches!(
            h.status(H),
            Status::HeldDown { until, back_at, .. } if until.duration_since(back_at).unwrap() == HOLD_DOWN_MAX
        ));
    }

    #[test]
    fn stragglers_are_waited_for_as_long_again_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(straggler_wait(ms(30)), STRAGGLER_MIN);
        assert_eq!(straggler_wait(ms(2500)), ms(2500));
        assert_eq!(straggler_wait(ms(60_000)), STRAGGLER_MAX);
    }

    #[test]
    fn only_failures_of_the_host_itself_mark_it_down() {
        let host = || "node2:22".to_string();
        let user = || "alice".to_string();
        let timeout = |phase| Error::Timeout {
            host: host(),
            user: user(),
            phase,
            after: Duration::from_secs(10),
        };
        assert!(means_host_down(&Error::Unreachable {
            host: host(),
            user: user(),
            reason: "No route to host".into(),
            source: None,
        }));
        assert!(means_host_down(&timeout(Phase::Connect)));
        for e in [
            timeout(Phase::Auth),
            timeout(Phase::Command),
            Error::AuthRefused {
                host: host(),
                user: user(),
                identity: "hub_ed25519".into(),
            },
        ] {
            assert!(!means_host_down(&e), "{e}");
        }
    }
}
