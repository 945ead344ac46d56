use std::time::Instant;

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;

use super::*;

/// Takes a turn that must be free now, and what it finds.
fn checkout(slots: &Slots<u32>) -> Taken<u32> {
    let mut turn = slots.try_turn().expect("a free turn");
    let taken = turn.take(|_| false);
    turn.keep();
    taken
}

/// A pool of 3 whose connections 1, 2, 3 were opened and given back in that order.
fn three_idle() -> Slots<u32> {
    let slots = Slots::new(3);
    for _ in 0..3 {
        assert!(matches!(checkout(&slots), Taken::Room));
    }
    let now = Instant::now();
    for i in 1..=3 {
        assert!(slots.give_back(i, now).is_none());
    }
    slots
}

#[test]
fn the_most_recently_returned_connection_goes_out_first() {
    let slots = Slots::new(4);
    for _ in 0..2 {
        assert!(matches!(checkout(&slots), Taken::Room));
    }
    let now = Instant::now();
    assert!(slots.give_back(1, now).is_none());
    assert!(slots.give_back(2, now).is_none());
    match checkout(&slots) {
        Taken::Idle(i) => assert_eq!(i.item, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        slots.status(),
        Status {
            max_size: 4,
            size: 2,
            idle: 1,
            waiting: 0
        }
    );
}

#[tokio::test]
async fn when_every_connection_is_out_checkouts_wait_and_are_served_in_order() {
    let slots = Slots::<u32>::new(1);
    assert!(matches!(checkout(&slots), Taken::Room));
    let mut first = Box::pin(slots.turn(Source::default()));
    let mut second = Box::pin(slots.turn(Source::default()));
    assert!(futures_util::poll!(first.as_mut()).is_pending());
    assert!(futures_util::poll!(second.as_mut()).is_pending());
    assert_eq!(slots.status().waiting, 2);
    assert!(slots.give_back(7, Instant::now()).is_none());
    // The first in line gets the connection, the second keeps waiting.
    assert!(futures_util::poll!(second.as_mut()).is_pending());
    let mut turn = match futures_util::poll!(first.as_mut()) {
        std::task::Poll::Ready(t) => t.expect("open"),
        std::task::Poll::Pending => panic!("the first waiter was not served"),
    };
    match turn.take(|_| false) {
        Taken::Idle(i) => assert_eq!(i.item, 7),
        other => panic!("{other:?}"),
    }
    turn.keep();
    assert_eq!(slots.status().waiting, 1);
    // A waiter that gives up leaves the count.
    drop(second);
    assert_eq!(slots.status().waiting, 0);
}

#[test]
fn a_turn_dropped_without_a_connection_goes_back() {
    let slots = Slots::<u32>::new(1);
    let turn = slots.try_turn().expect("free");
    assert!(slots.try_turn().is_err());
    drop(turn);
    let mut turn = slots.try_turn().expect("free again");
    assert!(matches!(turn.take(|_| false), Taken::Room));
    // Opening failed: the room and the turn both come back.
    slots.gone();
    drop(turn);
    assert_eq!(slots.status().size, 0);
    assert!(slots.try_turn().is_ok());
}

#[test]
fn shrinking_while_connections_are_out_closes_them_as_they_come_back() {
    let slots = Slots::new(3);
    for _ in 0..3 {
        assert!(matches!(checkout(&slots), Taken::Room));
    }
    assert!(slots.resize(1).is_empty(), "nothing idle to close yet");
    let now = Instant::now();
    assert_eq!(slots.give_back(1, now), Some(1), "surplus");
    assert_eq!(slots.give_back(2, now), Some(2), "surplus");
    assert_eq!(slots.give_back(3, now), None, "within the new size");
    assert_eq!(
        slots.status(),
        Status {
            max_size: 1,
            size: 1,
            idle: 1,
            waiting: 0
        }
    );
    // Exactly one turn is left.
    let t = slots.try_turn().expect("one turn");
    assert!(slots.try_turn().is_err());
    drop(t);
}

#[test]
fn shrinking_closes_the_oldest_idle_connections_at_once() {
    let slots = three_idle();
    assert_eq!(slots.resize(1), vec![1, 2]);
    assert_eq!(
        slots.status(),
        Status {
            max_size: 1,
            size: 1,
            idle: 1,
            waiting: 0
        }
    );
    match checkout(&slots) {
        Taken::Idle(i) => assert_eq!(i.item, 3),
        other => panic!("{other:?}"),
    }
}

#[test]
fn closing_fails_new_turns_and_returns_connections_for_closing() {
    let slots = Slots::new(2);
    assert!(matches!(checkout(&slots), Taken::Room));
    assert!(matches!(checkout(&slots), Taken::Room));
    assert!(slots.give_back(1, Instant::now()).is_none());
    assert_eq!(slots.close(), vec![1]);
    assert!(slots.is_closed());
    assert!(matches!(slots.try_turn(), Err(NoTurn::Closed)));
    assert_eq!(slots.give_back(2, Instant::now()), Some(2));
    assert_eq!(slots.status().size, 0);
}

#[tokio::test]
async fn a_waiter_learns_that_the_pool_closed() {
    let slots = Slots::<u32>::new(1);
    assert!(matches!(checkout(&slots), Taken::Room));
    let mut waiter = Box::pin(slots.turn(Source::default()));
    assert!(futures_util::poll!(waiter.as_mut()).is_pending());
    slots.close();
    let woke = futures_util::poll!(waiter.as_mut());
    match woke {
        std::task::Poll::Ready(r) => assert_eq!(r.err(), Some(Closed)),
        std::task::Poll::Pending => panic!("still waiting on a closed pool"),
    };
}

#[test]
fn retain_drops_what_it_refuses_and_counts_it() {
    let slots = three_idle();
    assert_eq!(
        slots.retain(|i| (i.item == 2).then_some("why")),
        vec![(2, "why")]
    );
    assert_eq!(
        slots.status(),
        Status {
            max_size: 3,
            size: 2,
            idle: 2,
            waiting: 0
        }
    );
}

fn from(last: u8) -> Source {
    Source(Some(IpAddr::from([127, 0, 0, last])))
}

/// Polls each waiter once; the served ones leave `waits` for `order`, their turns for `out`.
fn served<'a>(
    waits: &mut Vec<(u32, Pin<Box<TurnWait<'a, u32>>>)>,
    order: &mut Vec<u32>,
    out: &mut Vec<Turn<'a, u32>>,
) {
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    waits.retain_mut(|(name, w)| match w.as_mut().poll(&mut cx) {
        Poll::Ready(r) => {
            order.push(*name);
            out.push(r.expect("open"));
            false
        }
        Poll::Pending => true,
    });
}

#[test]
fn a_source_with_few_waiters_takes_turns_with_one_that_has_many() {
    let slots = Slots::<u32>::new(1);
    let busy = slots.try_turn().expect("free");
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    // The noisy source queues six first; the quiet one's two arrive after them.
    let mut waits: Vec<(u32, Pin<Box<TurnWait<'_, u32>>>)> = Vec::new();
    for n in 1..=6 {
        waits.push((n, Box::pin(slots.turn(from(2)))));
    }
    for n in [101, 102] {
        waits.push((n, Box::pin(slots.turn(from(3)))));
    }
    for (_, w) in &mut waits {
        assert!(w.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(slots.status().waiting, 8);
    let mut order = Vec::new();
    let mut turns = vec![busy];
    // Each turn given back goes to the next in the rotation, once at a time.
    while order.len() < 8 {
        drop(turns.pop().expect("a turn to give back"));
        let before = order.len();
        served(&mut waits, &mut order, &mut turns);
        assert_eq!(order.len(), before + 1, "one turn, one checkout served");
    }
    assert_eq!(order, vec![1, 101, 2, 102, 3, 4, 5, 6]);
    assert_eq!(slots.status().waiting, 0);
}

#[test]
fn a_source_that_starts_waiting_later_is_served_next_after_the_current_one() {
    let slots = Slots::<u32>::new(1);
    let mut turns = vec![slots.try_turn().expect("free")];
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut waits: Vec<(u32, Pin<Box<TurnWait<'_, u32>>>)> = Vec::new();
    for n in 1..=4 {
        waits.push((n, Box::pin(slots.turn(from(2)))));
    }
    for (_, w) in &mut waits {
        assert!(w.as_mut().poll(&mut cx).is_pending());
    }
    let mut order = Vec::new();
    drop(turns.pop());
    served(&mut waits, &mut order, &mut turns);
    // Joins while the noisy source's 2, 3, 4 wait: it goes ahead of 3 and 4.
    let mut late = Box::pin(slots.turn(from(9)));
    assert!(late.as_mut().poll(&mut cx).is_pending());
    waits.push((900, late));
    while order.len() < 5 {
        drop(turns.pop());
        served(&mut waits, &mut order, &mut turns);
    }
    assert_eq!(order, vec![1, 2, 900, 3, 4]);
}

#[test]
fn a_waiter_that_gives_up_leaves_its_line_and_a_turn_granted_to_it_goes_on() {
    let slots = Slots::<u32>::new(1);
    let mut turns = vec![slots.try_turn().expect("free")];
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut gives_up = Box::pin(slots.turn(from(2)));
    let mut granted_then_gone = Box::pin(slots.turn(from(3)));
    let mut patient = Box::pin(slots.turn(from(2)));
    for w in [&mut gives_up, &mut granted_then_gone, &mut patient] {
        assert!(w.as_mut().poll(&mut cx).is_pending());
    }
    drop(gives_up);
    assert_eq!(slots.status().waiting, 2);
    // Source 3 is next (source 2's first waiter left); it is granted the turn but goes
    // before taking it: the turn passes to the patient one instead of being lost.
    drop(turns.pop());
    drop(granted_then_gone);
    match patient.as_mut().poll(&mut cx) {
        Poll::Ready(Ok(mut t)) => {
            assert!(matches!(t.take(|_| false), Taken::Room));
            t.keep();
        }
        other => panic!("the patient waiter was not served: {:?}", other.is_ready()),
    }
    assert_eq!(slots.status().waiting, 0);
    assert!(
        slots.try_turn().is_err(),
        "exactly one turn, with the patient one"
    );
}

#[test]
fn growing_the_pool_serves_waiters_before_anyone_new() {
    let slots = Slots::<u32>::new(1);
    assert!(matches!(checkout(&slots), Taken::Room));
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut a = Box::pin(slots.turn(from(2)));
    let mut b = Box::pin(slots.turn(from(3)));
    assert!(a.as_mut().poll(&mut cx).is_pending());
    assert!(b.as_mut().poll(&mut cx).is_pending());
    // reserve_pool_size's growth: both extra turns go to the two waiters, none is free.
    assert!(slots.resize(3).is_empty());
    assert!(matches!(slots.try_turn(), Err(NoTurn::Busy)));
    assert!(matches!(a.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
    assert!(matches!(b.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
}

/// Waiters of two runtimes in one line: a turn given back on runtime 1 goes to runtime 1's
/// oldest waiter, passing runtime 0's older one at most `MAX_PASSES` times.
#[test]
fn a_turn_goes_to_a_waiter_on_its_own_runtime_a_bounded_number_of_times() {
    let slots = Slots::<u32>::new(1);
    let mut turns = vec![slots.try_turn().expect("free")];
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut waits: Vec<(u32, Pin<Box<TurnWait<'_, u32>>>)> = Vec::new();
    // One source: 1 waits on runtime 0, then MAX_PASSES + 2 on runtime 1.
    let passes = u32::from(MAX_PASSES);
    let last = 11 + passes + 1;
    crate::home::set_this_thread(0);
    waits.push((1, Box::pin(slots.turn(from(2)))));
    crate::home::set_this_thread(1);
    for n in 11..=last {
        waits.push((n, Box::pin(slots.turn(from(2)))));
    }
    for (_, w) in &mut waits {
        assert!(w.as_mut().poll(&mut cx).is_pending());
    }
    // Every turn comes back on runtime 1.
    let mut order = Vec::new();
    while order.len() < passes as usize + 3 {
        drop(turns.pop().expect("a turn to give back"));
        served(&mut waits, &mut order, &mut turns);
    }
    crate::home::set_this_thread(crate::home::NONE);
    let mut expected: Vec<u32> = (11..11 + passes).collect();
    expected.push(1);
    expected.extend(11 + passes..=last);
    assert_eq!(order, expected);
}

/// A turn given back on runtime 0 goes to the oldest waiter even if it waits on runtime 1 when
/// nobody waits on runtime 0, and a waiter served takes an idle server of its own runtime first.
#[test]
fn with_nobody_waiting_at_home_the_oldest_is_served_and_takes_a_server_of_its_own_runtime() {
    let slots = Slots::<u32>::new(2);
    for _ in 0..2 {
        assert!(matches!(checkout(&slots), Taken::Room));
    }
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    crate::home::set_this_thread(1);
    let mut w = Box::pin(slots.turn(from(2)));
    assert!(w.as_mut().poll(&mut cx).is_pending());
    crate::home::set_this_thread(0);
    // Server 7 (say, at home on runtime 1) came back first, server 8 last.
    assert!(slots.give_back(7, Instant::now()).is_none());
    crate::home::set_this_thread(crate::home::NONE);
    let Poll::Ready(Ok(mut turn)) = w.as_mut().poll(&mut cx) else {
        panic!("the only waiter is served whatever its runtime");
    };
    assert!(slots.give_back(8, Instant::now()).is_none());
    match turn.take(|c| *c == 7) {
        Taken::Idle(i) => assert_eq!(
            i.item, 7,
            "its own runtime's server, though not the warmest"
        ),
        other => panic!("expected an idle server, got {other:?}"),
    }
    turn.keep();
}

#[derive(Debug, Clone)]
enum Op {
    Checkout,
    /// A checkout from source 0..3 that waits if it must.
    Wait(u8),
    /// Waiters poll; the served ones take what their turn found.
    Poll,
    /// The oldest waiter gives up.
    GiveUp,
    GiveBack,
    Remove,
    Resize(usize),
    Retain,
    /// What follows runs on runtime 0 or 1 (`crate::home`): waiters join there, turns come
    /// back there.
    Home(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Checkout),
        3 => (0u8..3).prop_map(Op::Wait),
        3 => Just(Op::Poll),
        1 => Just(Op::GiveUp),
        3 => Just(Op::GiveBack),
        1 => Just(Op::Remove),
        1 => (0usize..6).prop_map(Op::Resize),
        1 => Just(Op::Retain),
        2 => (0u16..2).prop_map(Op::Home),
    ]
}

proptest! {
    /// Whatever the order of checkouts, waits, give-ups, returns, closes and resizes:
    /// connections never exceed the size once the surplus is back, every connection and every
    /// turn is counted exactly once, no turn is free while anyone is in line, and a free turn
    /// always finds a connection or room.
    #[test]
    fn the_books_always_balance(ops in proptest::collection::vec(op(), 1..200)) {
        let slots = Slots::new(3);
        let mut out: Vec<u32> = Vec::new();
        let mut waits: Vec<Pin<Box<TurnWait<'_, u32>>>> = Vec::new();
        let mut next = 0u32;
        let now = Instant::now();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // What a served turn does with what it finds.
        let mut use_turn = |mut turn: Turn<'_, u32>, out: &mut Vec<u32>| match turn.take(|_| false) {
            Taken::Idle(i) => { out.push(i.item); turn.keep(); }
            Taken::Room => { next += 1; out.push(next); turn.keep(); }
            Taken::Shrunk => {}
        };
        for op in ops {
            match op {
                Op::Checkout => if let Ok(turn) = slots.try_turn() { use_turn(turn, &mut out) },
                Op::Wait(n) => {
                    let mut w = Box::pin(slots.turn(from(n)));
                    match w.as_mut().poll(&mut cx) {
                        Poll::Ready(r) => use_turn(r.expect("open"), &mut out),
                        Poll::Pending => waits.push(w),
                    }
                }
                Op::Poll => {
                    let mut still = Vec::new();
                    for mut w in waits.drain(..) {
                        match w.as_mut().poll(&mut cx) {
                            Poll::Ready(r) => use_turn(r.expect("open"), &mut out),
                            Poll::Pending => still.push(w),
                        }
                    }
                    waits = still;
                }
                Op::GiveUp => if !waits.is_empty() { drop(waits.remove(0)); },
                Op::GiveBack => if let Some(c) = out.pop() { let _ = slots.give_back(c, now); },
                Op::Remove => if out.pop().is_some() { slots.remove(); },
                Op::Resize(n) => { let _ = slots.resize(n); },
                Op::Retain => { let _ = slots.retain(|i| (i.item % 2 == 0).then_some(())); },
                Op::Home(h) => crate::home::set_this_thread(h),
            }
            let s = slots.status();
            prop_assert_eq!(s.size, s.idle + out.len(), "every connection counted once");
            prop_assert_eq!(s.waiting, waits.len(), "cl_waiting");
            let st = slots.state();
            let granted = st.queue.waiters.iter().flatten().filter(|w| w.granted).count();
            let free = slots.free.load(Ordering::Relaxed);
            prop_assert_eq!(
                free + out.len() + granted,
                st.max_size + st.owed,
                "turns in circulation"
            );
            prop_assert!(free == 0 || waits.len() == granted, "a turn free while someone is in line");
            prop_assert!(
                st.owed == 0 || !out.is_empty() || granted > 0 || st.max_size == 0,
                "debts only while turns are out"
            );
            let in_lines: usize = st.queue.lines.iter().map(|l| l.tickets.len()).sum();
            prop_assert_eq!(in_lines, waits.len() - granted, "every waiter in exactly one line");
            let mut ring: Vec<usize> = st.queue.ring.iter().copied().collect();
            ring.sort();
            let mut used: Vec<usize> = st.queue.by_source.values().copied().collect();
            used.sort();
            prop_assert_eq!(&ring, &used, "every line with waiters in the rotation once");
            for l in &used {
                let line = &st.queue.lines[*l];
                prop_assert!(!line.tickets.is_empty(), "a line in use has waiters");
                prop_assert!(
                    line.tickets.iter().zip(line.tickets.iter().skip(1)).all(|(a, b)| a.0 < b.0),
                    "a line stays in arrival order"
                );
                prop_assert_eq!(st.queue.by_source.get(&line.source), Some(l));
            }
            drop(st);
        }
        prop_assert!(
            slots.state().queue.waiters.iter().flatten().all(|w| w.passed <= MAX_PASSES),
            "nobody passed over more than MAX_PASSES times"
        );
        // Everyone gives up, everything comes back: the pool is within its size again.
        drop(waits);
        crate::home::set_this_thread(crate::home::NONE);
        while let Some(c) = out.pop() { let _ = slots.give_back(c, now); }
        let s = slots.status();
        prop_assert!(s.size <= s.max_size);
        prop_assert_eq!(slots.free.load(Ordering::Relaxed), s.max_size);
        prop_assert_eq!(s.waiting, 0);
    }
}

#[tokio::test]
async fn the_fast_path_takes_only_an_idle_connection_and_never_jumps_the_queue() {
    let slots = three_idle();
    // Warmest first, as a waiting checkout would get it.
    let (turn, idle) = slots
        .try_idle(|_| false)
        .expect("a turn and an idle connection");
    assert_eq!(idle.item, 3);
    // Put back as if never taken: the same connection comes out next, the books unchanged.
    slots.untake(turn, idle);
    assert_eq!(
        slots.status(),
        Status {
            max_size: 3,
            size: 3,
            idle: 3,
            waiting: 0
        }
    );
    let (turn, idle) = slots.try_idle(|_| false).expect("still there");
    assert_eq!(idle.item, 3);
    turn.keep();
    // Everything out: no idle connection, so the fast path declines and leaves no turn taken.
    let (a, _) = slots.try_idle(|_| false).expect("second");
    a.keep();
    let (b, _) = slots.try_idle(|_| false).expect("third");
    b.keep();
    assert!(slots.try_idle(|_| false).is_none());
    // A checkout queued before it is served before the fast path sees anything.
    let mut queued = Box::pin(slots.turn(Source::default()));
    assert!(futures_util::poll!(queued.as_mut()).is_pending());
    assert!(slots.give_back(3, Instant::now()).is_none());
    assert!(
        slots.try_idle(|_| false).is_none(),
        "the returned turn belongs to the waiting checkout"
    );
    let mut turn = match futures_util::poll!(queued.as_mut()) {
        std::task::Poll::Ready(Ok(t)) => t,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        turn.take(|_| false),
        Taken::Idle(Idle { item: 3, .. })
    ));
    turn.keep();
}

#[test]
fn the_fast_path_declines_while_the_pool_has_room_but_nothing_idle() {
    let slots = Slots::<u32>::new(2);
    // Room to open a connection is the slow path's work (it connects); the fast path hands
    // the turn straight back.
    assert!(slots.try_idle(|_| false).is_none());
    assert_eq!(
        slots.status(),
        Status {
            max_size: 2,
            size: 0,
            idle: 0,
            waiting: 0
        }
    );
    assert!(matches!(checkout(&slots), Taken::Room));
    assert!(matches!(checkout(&slots), Taken::Room));
}

#[test]
fn the_fast_path_prefers_the_warmest_connection_the_caller_likes() {
    // 1, 2, 3 idle, 3 the warmest: a caller that likes odd items gets 3, then 1, then
    // (nothing it likes left) the warmest of the rest.
    let slots = three_idle();
    let odd = |i: &u32| i % 2 == 1;
    let mut got = Vec::new();
    for _ in 0..3 {
        let (turn, idle) = slots.try_idle(odd).expect("a turn and an idle connection");
        turn.keep();
        got.push(idle.item);
    }
    assert_eq!(got, [3, 1, 2]);
    assert_eq!(
        slots.status(),
        Status {
            max_size: 3,
            size: 3,
            idle: 0,
            waiting: 0
        }
    );
}
