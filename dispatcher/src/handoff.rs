//! Sessions this dispatcher claimed in the statement that created them (a
//! start that skipped the queue: it had room and nothing was waiting), on
//! their way to its claim loop, which drives them like any it claimed.
//!
//! Each holds a [`Reservation`] of a free slot from the create until its
//! driver has placed it, so a burst of creates claims no more sessions here
//! than this dispatcher's nodes have room for; the rest wait in the queue.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::mpsc;

use crate::log::EventLog;
use crate::session::StatusEvent;
use crate::store::Claimed;

/// The creating side: whether a new session may start here, and where it
/// goes once claimed.
pub(crate) struct Handoff<T = Claimed> {
    /// This dispatcher's id, the owner a claim records.
    owner: String,
    tx: mpsc::UnboundedSender<(T, Reservation)>,
    reserved: Arc<AtomicU32>,
}

impl<T> Clone for Handoff<T> {
    fn clone(&self) -> Self {
        Self {
            owner: self.owner.clone(),
            tx: self.tx.clone(),
            reserved: self.reserved.clone(),
        }
    }
}

/// The claim loop's side.
pub(crate) struct HandedOff<T = Claimed>(mpsc::UnboundedReceiver<(T, Reservation)>);

/// A free slot held for a session claimed at its creation, until its driver
/// has placed it (the placement then holds the slot); released on drop.
#[derive(Debug)]
pub(crate) struct Reservation(Arc<AtomicU32>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A hand-off from the API to the claim loop of dispatcher `owner`.
pub(crate) fn channel<T>(owner: &str) -> (Handoff<T>, HandedOff<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let handoff = Handoff {
        owner: owner.to_string(),
        tx,
        reserved: Arc::default(),
    };
    (handoff, HandedOff(rx))
}

impl<T> Handoff<T> {
    /// The owner to claim a new session for, with a slot reserved for it,
    /// when this dispatcher can start it now: its claim loop is running
    /// and its nodes have more free slots (`free_slots`) than are already
    /// reserved. (The create statement still leaves the session queued
    /// when a claimable one is waiting.)
    pub(crate) fn reserve(&self, free_slots: u32) -> Option<(&str, Reservation)> {
        if self.tx.is_closed() {
            return None;
        }
        self.reserved
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                (r < free_slots).then_some(r + 1)
            })
            .ok()?;
        Some((self.owner.as_str(), Reservation(self.reserved.clone())))
    }

    /// Passes a session claimed at its creation to the claim loop; gives
    /// it back when the loop has stopped (this dispatcher is shutting down).
    pub(crate) fn send(&self, claimed: T, reservation: Reservation) -> Result<(), T> {
        self.tx.send((claimed, reservation)).map_err(|e| e.0.0)
    }
}

/// Puts a session claimed at its creation, that no driver will take (this
/// dispatcher is shutting down), back in the queue: another dispatcher
/// starts it. One the log cannot move now is re-queued by the janitor once
/// this dispatcher's lease lapses.
pub(crate) async fn give_back(log: &EventLog, claimed: &Claimed) {
    let s = &claimed.session;
    let reason = "the dispatcher that claimed it shut down before it started";
    let back = log.transition_at(
        s.id,
        s.epoch,
        StatusEvent::NodeLost,
        reason,
        Default::default(),
    );
    match back.await {
        Ok(_) => {
            tracing::info!(session_id = %s.id, "claimed at creation, given back to the queue at shutdown")
        }
        Err(e) => {
            tracing::warn!(session_id = %s.id, error = %e, "could not give back a session claimed at creation; the janitor re-queues it after this dispatcher's lease")
        }
    }
}

impl<T> HandedOff<T> {
    /// The next session claimed at creation, with its slot.
    pub(crate) async fn recv(&mut self) -> Option<(T, Reservation)> {
        self.0.recv().await
    }

    /// Takes no more, and returns what was sent and not received.
    pub(crate) fn close(mut self) -> Vec<T> {
        self.0.close();
        let mut left = Vec::new();
        while let Ok((c, _)) = self.0.try_recv() {
            left.push(c);
        }
        left
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_claim_no_more_than_the_free_slots_until_their_drivers_place() {
        let (handoff, loop_side) = channel::<u32>("d1");
        assert!(handoff.reserve(0).is_none(), "no free slot");
        let (owner, first) = handoff.reserve(2).expect("room");
        assert_eq!(owner, "d1");
        let second = handoff.reserve(2).expect("room for one more");
        assert!(handoff.reserve(2).is_none(), "both slots are reserved");
        drop(first);
        let third = handoff
            .reserve(2)
            .expect("a placed session freed its reservation");
        drop((second, third));
        drop(loop_side);
        assert!(handoff.reserve(2).is_none(), "the claim loop has stopped");
    }

    #[test]
    fn a_closed_loop_gives_back_what_it_never_took() {
        let (handoff, loop_side) = channel::<u32>("d1");
        let (_, r1) = handoff.reserve(4).expect("room");
        let (_, r2) = handoff.reserve(4).expect("room");
        assert!(handoff.send(1, r1).is_ok());
        assert_eq!(loop_side.close(), vec![1], "sent, never received");
        assert_eq!(handoff.send(2, r2), Err(2), "closed: given back");
        assert_eq!(
            handoff.reserved.load(Ordering::SeqCst),
            0,
            "nothing stays reserved"
        );
    }
}
