//! The statements a server connection has prepared under Breakwater's global names, bounded
//! by `max_prepared_statements` with the least recently used evicted first.

use std::collections::HashMap;

use bytes::Bytes;

/// Per-server-connection cache of global statement names, least recently used first out.
#[derive(Debug, Default)]
pub struct PreparedCache {
    names: HashMap<Bytes, u64>,
    tick: u64,
}

impl PreparedCache {
    pub fn contains(&mut self, global: &Bytes) -> bool {
        self.tick += 1;
        match self.names.get_mut(global) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    /// Adds `global`; returns the name evicted to stay within `cap`, if any.
    pub fn insert(&mut self, global: Bytes, cap: usize) -> Option<Bytes> {
        self.tick += 1;
        let evicted = if self.names.len() >= cap.max(1) && !self.names.contains_key(&global) {
            let oldest = self
                .names
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(k, _)| k.clone());
            if let Some(k) = &oldest {
                self.names.remove(k);
            }
            oldest
        } else {
            None
        };
        self.names.insert(global, self.tick);
        evicted
    }

    pub fn remove(&mut self, global: &[u8]) {
        self.names.remove(global);
    }

    pub fn clear(&mut self) {
        self.names.clear();
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_cache_evicts_the_least_recently_used() {
        let mut c = PreparedCache::default();
        let (a, b, d) = (
            Bytes::from_static(b"a"),
            Bytes::from_static(b"b"),
            Bytes::from_static(b"d"),
        );
        assert_eq!(c.insert(a.clone(), 2), None);
        assert_eq!(c.insert(b.clone(), 2), None);
        assert!(c.contains(&a)); // a is now more recent than b
        assert_eq!(c.insert(d.clone(), 2), Some(b));
        assert!(c.contains(&a) && c.contains(&d));
        assert_eq!(c.len(), 2);
    }
}
