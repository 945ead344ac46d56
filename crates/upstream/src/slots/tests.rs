use std::time::Instant;

use proptest::prelude::*;

use super::*;

/// Takes a turn that must be free now, and what it finds.
fn checkout(slots: &Slots<u32>) -> Taken<u32> {
    let mut turn = slots.try_turn().expect("a free turn");
    let taken = turn.take();
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
    let mut first = Box::pin(slots.turn());
    let mut second = Box::pin(slots.turn());
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
    match turn.take() {
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
    assert!(matches!(turn.take(), Taken::Room));
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
    assert!(matches!(slots.try_turn(), Err(TryAcquireError::Closed)));
    assert_eq!(slots.give_back(2, Instant::now()), Some(2));
    assert_eq!(slots.status().size, 0);
}

#[tokio::test]
async fn a_waiter_learns_that_the_pool_closed() {
    let slots = Slots::<u32>::new(1);
    assert!(matches!(checkout(&slots), Taken::Room));
    let mut waiter = Box::pin(slots.turn());
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

#[derive(Debug, Clone)]
enum Op {
    Checkout,
    GiveBack,
    Remove,
    Resize(usize),
    Retain,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Checkout),
        3 => Just(Op::GiveBack),
        1 => Just(Op::Remove),
        1 => (0usize..6).prop_map(Op::Resize),
        1 => Just(Op::Retain),
    ]
}

proptest! {
    /// Whatever the order of checkouts, returns, closes and resizes: connections never exceed
    /// the size once the surplus is back, every connection is counted exactly once, and a
    /// free turn always finds a connection or room.
    #[test]
    fn the_books_always_balance(ops in proptest::collection::vec(op(), 1..200)) {
        let slots = Slots::new(3);
        let mut out: Vec<u32> = Vec::new();
        let mut next = 0u32;
        let now = Instant::now();
        for op in ops {
            match op {
                Op::Checkout => if let Ok(mut turn) = slots.try_turn() {
                    match turn.take() {
                        Taken::Idle(i) => { out.push(i.item); turn.keep(); }
                        Taken::Room => { next += 1; out.push(next); turn.keep(); }
                        Taken::Shrunk => {}
                    }
                },
                Op::GiveBack => if let Some(c) = out.pop() { let _ = slots.give_back(c, now); },
                Op::Remove => if out.pop().is_some() { slots.remove(); },
                Op::Resize(n) => { let _ = slots.resize(n); },
                Op::Retain => { let _ = slots.retain(|i| (i.item % 2 == 0).then_some(())); },
            }
            let s = slots.status();
            prop_assert_eq!(s.size, s.idle + out.len(), "every connection counted once");
            let st = slots.state();
            prop_assert_eq!(
                slots.turns.available_permits() + out.len(),
                st.max_size + st.owed,
                "turns in circulation"
            );
            prop_assert!(st.owed == 0 || !out.is_empty() || st.max_size == 0, "debts only while connections are out");
            drop(st);
        }
        // Everything comes back: the pool is within its size again.
        while let Some(c) = out.pop() { let _ = slots.give_back(c, now); }
        let s = slots.status();
        prop_assert!(s.size <= s.max_size);
        prop_assert_eq!(slots.turns.available_permits(), s.max_size);
    }
}
