//! `max_user_client_connections` and `max_db_client_connections`: clients counted per login
//! user and per database while they are logged in, so that a login over a cap is refused with
//! 53300 before it costs any server work. Counts exist only for names with a cap, and a name
//! leaves the table with its last client, so the table is as large as the capped names in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Logged-in clients per name (user or database), for the names that have a cap.
#[derive(Debug, Default)]
pub(crate) struct Headcount(Mutex<HashMap<Arc<str>, usize>>);

/// One client's place in a [`Headcount`], given back when dropped (the session ends).
#[derive(Debug)]
pub(crate) struct Place {
    count: Arc<Headcount>,
    name: Arc<str>,
}

impl Headcount {
    /// A place for one more client of `name`, unless `max` are there already.
    pub(crate) fn take(self: &Arc<Self>, name: &str, max: usize) -> Option<Place> {
        let mut counts = match self.0.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        let (key, n) = match counts.get_key_value(name) {
            Some((k, n)) => (k.clone(), *n),
            None => (Arc::from(name), 0),
        };
        if n >= max {
            return None;
        }
        counts.insert(key.clone(), n + 1);
        Some(Place {
            count: self.clone(),
            name: key,
        })
    }

    /// Clients of `name` counted now.
    #[cfg(test)]
    fn of(&self, name: &str) -> usize {
        let counts = match self.0.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        counts.get(name).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut counts = match self.count.0.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = counts.get_mut(&*self.name) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&*self.name);
            }
        }
    }
}

/// The places one client holds, for as long as its session lives.
#[derive(Debug, Default)]
pub(crate) struct Places {
    pub(crate) _user: Option<Place>,
    pub(crate) _db: Option<Place>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_admits_up_to_its_size_and_a_leaving_client_frees_its_place() {
        let count = Arc::new(Headcount::default());
        let a = count.take("app", 2).expect("first");
        let b = count.take("app", 2).expect("second");
        assert!(count.take("app", 2).is_none(), "third over the cap");
        let other = count
            .take("other", 2)
            .expect("another name has its own count");
        assert_eq!((count.of("app"), count.of("other")), (2, 1));
        drop(a);
        let c = count.take("app", 2).expect("a place came free");
        drop((b, c, other));
        assert_eq!(count.of("app"), 0);
        assert!(
            count.0.lock().unwrap().is_empty(),
            "names leave with their last client"
        );
    }
}
