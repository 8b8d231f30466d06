//! Poison-tolerant lock helpers (a panic in one client task must not take
//! every other task's access to shared state with it), and the hasher of
//! the maps every login or transaction looks into.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// foldhash, seeded at random per process: std's SipHash costs about 300
/// instructions for a login's parameter set and 160 for a name, this a
/// fraction of that. Keys a client chooses (names, settings) still cannot
/// be made to collide without knowing the seed.
pub(crate) type FastHash = foldhash::fast::RandomState;
/// A map hashed with [`FastHash`].
pub(crate) type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;

/// Read-locks, carrying on if another thread panicked while holding it.
pub(crate) fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Write-locks, carrying on if another thread panicked while holding it.
pub(crate) fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Locks a mutex, carrying on if another thread panicked while holding it.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
