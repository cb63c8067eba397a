use super::*;
use bson::doc;

const T0_MS: i64 = 1_700_000_000_000;

fn event(collection: Collection, identifier: &str, modified_ms: i64) -> BridgeEvent {
    BridgeEvent {
        collection,
        kind: EventKind::Create,
        body: EventBody::Doc(doc! { "identifier": identifier, "srvModified": modified_ms }),
        wall_time_ms: Some(modified_ms),
        modified_ms: Some(modified_ms),
    }
}

fn packet(identifier: &str) -> Str {
    Str::from(format!(
        "2/storage,[\"create\",{{\"identifier\":\"{identifier}\"}}]"
    ))
}

/// Events e0.. written at T0+1s, T0+2s, .., alternately to entries and treatments.
fn filled(limits: HistoryLimits, count: i64) -> History {
    let mut history = History::new(limits, T0_MS);
    for i in 0..count {
        let id = format!("e{i}");
        let collection = if i % 2 == 0 {
            Collection::Entries
        } else {
            Collection::Treatments
        };
        let at = T0_MS + 1000 * (i + 1);
        history.push(&event(collection, &id, at), packet(&id), Some(token(i + 1)), at);
    }
    history
}

fn token(seq: i64) -> Bson {
    Bson::Document(doc! { "_data": format!("token-{seq:08}") })
}

fn identifiers(sent: &[Sent]) -> Vec<&str> {
    sent.iter().map(|s| s.identifier.as_str()).collect()
}

#[test]
fn events_get_consecutive_positions_and_keep_what_a_replay_needs() {
    let history = filled(HistoryLimits::default(), 3);
    assert_eq!(history.last_seq(), 3);
    let all = history.after(0, &Collection::ALL, 10);
    assert_eq!(all.iter().map(|s| s.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(identifiers(&all), ["e0", "e1", "e2"]);
    assert_eq!(all[1].modified_ms, T0_MS + 2000);
    assert_eq!(all[1].collection, Collection::Treatments);
    assert_eq!(
        all[2].packet.as_str(),
        r#"2/storage,["create",{"identifier":"e2"}]"#
    );
}

#[test]
fn the_oldest_events_go_beyond_the_count_or_the_age() {
    let limits = HistoryLimits {
        max_age: Duration::from_secs(60),
        max_events: 4,
    };
    let mut history = filled(limits, 6);
    assert_eq!(history.len(), 4);
    assert_eq!(
        identifiers(&history.after(0, &Collection::ALL, 10)),
        ["e2", "e3", "e4", "e5"]
    );
    assert!(history.holds_after(2));
    assert!(!history.holds_after(1));
    // A minute after the last was written, the rest is too old.
    history.forget_old(T0_MS + 6000 + 61_000);
    assert!(history.is_empty());
    assert_eq!(history.last_seq(), 6, "positions go on");
    // What it held is now only in the collections.
    assert_eq!(
        history.coverage(T0_MS + 5000),
        Coverage::Collections { after_seq: 6 }
    );
    assert_eq!(history.coverage(T0_MS + 6000), Coverage::History { after_seq: 6 });
}

#[test]
fn since_within_the_history_replays_from_the_first_event_after_it() {
    let history = filled(HistoryLimits::default(), 5);
    // Events modified at T0+1s .. T0+5s; the client saw up to T0+2s.
    assert_eq!(history.coverage(T0_MS + 2000), Coverage::History { after_seq: 2 });
    assert_eq!(history.coverage(T0_MS + 2500), Coverage::History { after_seq: 2 });
    assert_eq!(history.coverage(T0_MS + 9000), Coverage::History { after_seq: 5 });
    // The history started at T0: anything since then is in it.
    assert_eq!(history.coverage(T0_MS), Coverage::History { after_seq: 0 });
    // Before it started: the collections.
    assert_eq!(
        history.coverage(T0_MS - 1),
        Coverage::Collections { after_seq: 0 }
    );
}

#[test]
fn replays_page_through_the_events_of_the_granted_collections() {
    let history = filled(HistoryLimits::default(), 7);
    let treatments = [Collection::Treatments];
    assert_eq!(identifiers(&history.after(0, &treatments, 2)), ["e1", "e3"]);
    let next = history.position_after(0, &treatments, 2);
    assert_eq!(next, 4);
    assert_eq!(identifiers(&history.after(next, &treatments, 2)), ["e5"]);
    assert_eq!(history.position_after(next, &treatments, 1), 6);
    assert!(history.after(6, &treatments, 2).is_empty());
    assert!(history.after(7, &Collection::ALL, 2).is_empty());
    // Treatments e1, e3, e5 were modified at T0+2s, T0+4s, T0+6s.
    assert_eq!(history.count_after(0, &treatments, T0_MS + 2000), 2);
    assert_eq!(history.count_after(4, &treatments, 0), 1);
}

#[test]
fn the_checkpoint_is_the_newest_token_at_or_before_the_oldest_event() {
    let limits = HistoryLimits {
        max_age: Duration::from_secs(3600),
        max_events: 150,
    };
    let mut history = History::new(limits, T0_MS);
    assert_eq!(history.checkpoint(), None, "nothing recorded");
    let mut history_of = |count: i64| {
        for i in history.last_seq() as i64..count {
            let id = format!("e{i}");
            let at = T0_MS + 1000 * (i + 1);
            history.push(
                &event(Collection::Entries, &id, at),
                packet(&id),
                Some(token(i + 1)),
                at,
            );
        }
        history.checkpoint().unwrap()
    };
    // Tokens kept after events 1, 101, 201, ..
    let first = history_of(50);
    assert_eq!(
        (first.token.clone(), first.seq, first.sent_token.clone()),
        (token(1), 1, token(50))
    );
    // Event 1 is not read again: the refilled history is complete after it.
    assert_eq!(first.complete_after_ms, T0_MS + 1000);
    let later = history_of(250);
    // Events 101..250 are held: the checkpoint after event 101 misses event 101 only.
    assert_eq!(
        (later.token.clone(), later.seq, later.sent_token.clone()),
        (token(101), 101, token(250))
    );
    assert_eq!(later.complete_after_ms, T0_MS + 101_000);
    let after_a_gap = {
        history.gap(T0_MS + 500_000);
        history.checkpoint().unwrap()
    };
    assert_eq!(after_a_gap.complete_after_ms, T0_MS + 500_000);
}

#[test]
fn a_resumed_history_carries_on_the_positions() {
    let mut history = History::resumed(HistoryLimits::default(), 41, T0_MS);
    assert_eq!(history.last_seq(), 41);
    assert_eq!(
        history.coverage(T0_MS - 1),
        Coverage::Collections { after_seq: 41 }
    );
    let seq = history.push(
        &event(Collection::Entries, "a", T0_MS + 1),
        packet("a"),
        None,
        T0_MS + 1,
    );
    assert_eq!(seq, 42);
    assert_eq!(history.coverage(T0_MS), Coverage::History { after_seq: 41 });
    assert_eq!(history.checkpoint(), None, "no token yet");
}

#[test]
fn positions_are_the_tokens_data() {
    assert_eq!(position(&token(7)), Some("token-00000007"));
    assert!(position(&token(7)) < position(&token(10)));
    assert_eq!(position(&Bson::String("x".into())), None);
    assert_eq!(position(&Bson::Document(doc! { "_data": 1 })), None);
}
