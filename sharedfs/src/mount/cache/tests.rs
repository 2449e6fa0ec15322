//! Unit tests of [`super`].

use super::*;

const TTL: Duration = Duration::from_secs(2);
const ROOT: u64 = 1;

fn attr(ino: u64, size: u64) -> Attr {
    Attr {
        ino,
        size,
        ..Default::default()
    }
}

fn n(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

/// The reply to a create (or mkdir) of `name` in `parent`, sent now.
fn create(c: &mut Cache, t0: Instant, parent: u64, name: &str, ino: u64, dir: bool) {
    let t = c.ticket(t0);
    create_sent(c, t, parent, name, ino, dir)
}

/// The same, sent with ticket `t`.
fn create_sent(c: &mut Cache, t: Ticket, parent: u64, name: &str, ino: u64, dir: bool) {
    let a = attr(ino, 0);
    let p = attr(parent, 4096);
    c.settle(
        t,
        &Fresh {
            ok: true,
            attr: Some((&a, TTL)),
            parents: vec![&p],
            names_ttl: TTL,
            changed: &[parent],
            ..Default::default()
        },
        &Effect::Added {
            parent,
            name: n(name),
            ino,
            dir,
        },
    );
}

/// The reply to a lookup: found (`ino`) or not.
fn looked(c: &mut Cache, t0: Instant, parent: u64, name: &str, ino: Option<u64>) {
    let t = c.ticket(t0);
    looked_sent(c, t, parent, name, ino)
}

fn looked_sent(c: &mut Cache, t: Ticket, parent: u64, name: &str, ino: Option<u64>) {
    let a = ino.map(|i| attr(i, 7));
    c.settle(
        t,
        &Fresh {
            ok: ino.is_some(),
            attr: a.as_ref().map(|a| (a, TTL)),
            parents: vec![],
            names_ttl: TTL,
            changed: &[],
            ..Default::default()
        },
        &Effect::Looked {
            parent,
            name: n(name),
            ino,
        },
    );
}

#[test]
fn a_directory_made_here_answers_every_name_without_asking() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    create(&mut c, t0, ROOT, "d", 10, true);
    assert_eq!(c.name(ROOT, b"d", t0), Name::Found(10));
    assert_eq!(
        c.name(10, b"f1", t0),
        Name::Absent,
        "complete: unknown is absent"
    );
    create(&mut c, t0, 10, "f1", 11, false);
    assert_eq!(c.name(10, b"f1", t0), Name::Found(11));
    assert_eq!(c.attr(11, t0).unwrap().0.ino, 11);
    // The parent's attributes came back fresh with the reply.
    assert_eq!(c.attr(10, t0).unwrap().0.size, 4096);
    // A directory not made here only knows what it was told.
    assert_eq!(c.name(ROOT, b"other", t0), Name::Unknown);
    looked(&mut c, t0, ROOT, "other", None);
    assert_eq!(
        c.name(ROOT, b"other", t0),
        Name::Absent,
        "negative answers are kept"
    );
}

#[test]
fn leases_run_out_from_when_the_request_was_sent() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    looked(&mut c, t0, ROOT, "f", Some(5));
    let later = t0 + TTL - Duration::from_millis(1);
    assert_eq!(c.name(ROOT, b"f", later), Name::Found(5));
    assert_eq!(c.attr(5, later).unwrap().1, Duration::from_millis(1));
    assert_eq!(c.name(ROOT, b"f", t0 + TTL), Name::Unknown);
    assert!(c.attr(5, t0 + TTL).is_none());
}

#[test]
fn a_renewal_extends_live_entries_only_and_not_across_a_recall() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    looked(&mut c, t0, ROOT, "a", Some(5));
    looked(&mut c, t0 + Duration::from_secs(1), ROOT, "b", Some(6));
    // A heartbeat sent at 1.5 s, answered at 2.5 s: "a" (good until 2 s) ran out
    // before the answer and stays out; "b" (until 3 s) now lasts until 3.5 s.
    let hb = c.ticket(t0 + Duration::from_millis(1500));
    c.renew(hb, TTL, t0 + Duration::from_millis(2500));
    assert!(c.attr(5, t0 + Duration::from_millis(2500)).is_none());
    assert!(c.attr(6, t0 + Duration::from_millis(3400)).is_some());
    assert_eq!(
        c.name(ROOT, b"b", t0 + Duration::from_millis(3400)),
        Name::Found(6)
    );
    assert!(c.attr(6, t0 + Duration::from_millis(3500)).is_none());
    // A recall between the heartbeat and its answer: nothing is renewed.
    let hb = c.ticket(t0 + Duration::from_secs(3));
    c.recall(&[99]);
    c.renew(hb, TTL, t0 + Duration::from_millis(3100));
    assert!(c.attr(6, t0 + Duration::from_millis(3600)).is_none());
    // Our own changes do not stop a renewal.
    let hb = c.ticket(t0 + Duration::from_millis(3200));
    create(
        &mut c,
        t0 + Duration::from_millis(3200),
        ROOT,
        "d",
        10,
        true,
    );
    c.renew(hb, TTL, t0 + Duration::from_millis(3300));
    assert!(c.attr(6, t0 + Duration::from_millis(5000)).is_some());
}

#[test]
fn a_listing_to_the_end_knows_every_name_unless_something_changed_meanwhile() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    let list = |c: &mut Cache, t: Ticket, names: &[(&str, u64)]| {
        let listed: Vec<DirEntryPlus> = names
            .iter()
            .map(|(n, i)| DirEntryPlus {
                cookie: 0,
                name: n.as_bytes().to_vec(),
                attr: Some(attr(*i, 1)),
            })
            .collect();
        c.settle(
            t,
            &Fresh {
                ok: true,
                names_ttl: TTL,
                listed: &listed,
                listed_ttl: TTL,
                ..Default::default()
            },
            &Effect::Listed { parent: ROOT },
        );
    };
    assert!(!c.note_miss(ROOT, 3) && !c.note_miss(ROOT, 3) && !c.note_miss(ROOT, 3));
    assert!(c.note_miss(ROOT, 3), "the fourth miss asks for a listing");
    // A big directory is listed only after a miss per 64 entries.
    let asked = (1..=200).find(|_| c.note_miss(7, 10_000));
    assert_eq!(asked, Some(156));
    let first = c.ticket(t0);
    list(&mut c, first, &[("a", 5), ("b", 6)]);
    let t = c.ticket(t0);
    list(&mut c, t, &[("c", 7)]);
    c.listed_all(ROOT, first, t0);
    assert_eq!(c.name(ROOT, b"c", t0), Name::Found(7));
    assert_eq!(c.attr(6, t0).unwrap().0.size, 1);
    assert_eq!(c.name(ROOT, b"zzz", t0), Name::Absent, "complete");
    // A recall during a listing: the names seen are kept, but not "complete".
    c.recall(&[ROOT]);
    let first = c.ticket(t0);
    list(&mut c, first, &[("a", 5)]);
    c.recall(&[42]);
    let t = c.ticket(t0);
    list(&mut c, t, &[("b", 6)]);
    c.listed_all(ROOT, first, t0);
    assert_eq!(c.name(ROOT, b"b", t0), Name::Found(6));
    assert_eq!(c.name(ROOT, b"zzz", t0), Name::Unknown);
}

#[test]
fn a_recall_drops_names_and_attributes_and_beats_replies_in_flight() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    looked(&mut c, t0, ROOT, "f", Some(5));
    let in_flight = c.ticket(t0);
    c.recall(&[ROOT, 5]);
    assert_eq!(c.name(ROOT, b"f", t0), Name::Unknown);
    assert!(c.attr(5, t0).is_none());
    // The reply to a lookup sent before the recall may predate the change.
    looked_sent(&mut c, in_flight, ROOT, "g", Some(6));
    assert_eq!(c.name(ROOT, b"g", t0), Name::Unknown);
    assert!(c.attr(6, t0).is_none());
}

#[test]
fn our_own_change_drops_what_it_touched_and_outdates_older_replies() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    looked(&mut c, t0, ROOT, "f", Some(5));
    // A getattr goes out, then a write that grows the file; the write's reply first.
    let getattr = c.ticket(t0);
    let write = c.ticket(t0);
    let grown = attr(5, 100);
    c.settle(
        write,
        &Fresh {
            ok: true,
            attr: Some((&grown, TTL)),
            changed: &[5],
            ..Default::default()
        },
        &Effect::None,
    );
    assert_eq!(c.attr(5, t0).unwrap().0.size, 100);
    let old = attr(5, 7);
    c.settle(
        getattr,
        &Fresh {
            ok: true,
            attr: Some((&old, TTL)),
            ..Default::default()
        },
        &Effect::None,
    );
    assert_eq!(
        c.attr(5, t0).unwrap().0.size,
        100,
        "the older reply is ignored"
    );
    // A change whose reply comes after another change drops its names.
    create(&mut c, t0, ROOT, "d", 10, true);
    let stale = c.ticket(t0);
    c.recall(&[99]);
    create_sent(&mut c, stale, 10, "x", 12, false);
    assert_eq!(c.name(10, b"x", t0), Name::Unknown);
    assert_eq!(c.name(10, b"y", t0), Name::Unknown, "no longer complete");
}

#[test]
fn unlink_and_rename_move_names_and_exchange_forgets_them() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    create(&mut c, t0, ROOT, "d", 10, true);
    create(&mut c, t0, 10, "a", 11, false);
    create(&mut c, t0, 10, "b", 12, false);
    let moved = |c: &mut Cache, from: &str, to: &str, exchange: bool| {
        let p = attr(10, 1);
        let t = c.ticket(t0);
        c.settle(
            t,
            &Fresh {
                ok: true,
                parents: vec![&p, &p],
                names_ttl: TTL,
                changed: &[10],
                ..Default::default()
            },
            &Effect::Renamed {
                parent: 10,
                name: n(from),
                new_parent: 10,
                new_name: n(to),
                exchange,
            },
        );
    };
    moved(&mut c, "a", "c", false);
    assert_eq!(c.name(10, b"a", t0), Name::Absent);
    assert_eq!(c.name(10, b"c", t0), Name::Found(11));
    moved(&mut c, "b", "c", true);
    assert_eq!(c.name(10, b"b", t0), Name::Unknown);
    assert_eq!(c.name(10, b"c", t0), Name::Unknown);
    let t = c.ticket(t0);
    c.settle(
        t,
        &Fresh {
            ok: true,
            names_ttl: TTL,
            changed: &[10, 12],
            ..Default::default()
        },
        &Effect::Removed {
            parent: 10,
            name: n("b"),
        },
    );
    assert_eq!(c.name(10, b"b", t0), Name::Absent);
}

#[test]
fn a_refused_change_or_a_reply_without_a_lease_forgets_the_directory() {
    let t0 = Instant::now();
    let mut c = Cache::default();
    create(&mut c, t0, ROOT, "d", 10, true);
    let t = c.ticket(t0);
    c.settle(
        t,
        &Fresh {
            ok: false,
            names_ttl: TTL,
            ..Default::default()
        },
        &Effect::Added {
            parent: 10,
            name: n("x"),
            ino: 0,
            dir: false,
        },
    );
    assert_eq!(c.name(10, b"y", t0), Name::Unknown);
    create(&mut c, t0, ROOT, "e", 20, true);
    // No lease on the names (the coordinator cannot recall it): nothing is kept.
    let t = c.ticket(t0);
    c.settle(
        t,
        &Fresh {
            ok: true,
            ..Default::default()
        },
        &Effect::Removed {
            parent: 20,
            name: n("z"),
        },
    );
    assert_eq!(c.name(20, b"z", t0), Name::Unknown);
}
