//! Mutex and condition-variable waits that ignore poisoning, in one place for every tern crate.
//!
//! A mutex is poisoned when a thread panics while holding it. Release builds abort on panic
//! (`panic = "abort"` in the workspace), so there poisoning cannot happen; tests and debug builds
//! unwind, and there a panicking thread must not turn every later lock into a second panic. Every
//! lock taken through these traits guards data that stays consistent at any point a panic could
//! leave it (whole-value assignments, table inserts and removals), so going on with it is safe.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError, WaitTimeoutResult};
use std::time::Duration;

/// [`Mutex::lock`] that goes on past a poisoned lock.
pub trait LockExt<T: ?Sized> {
    /// Locks the mutex, taking the guard even if a holder panicked.
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T>;
}

impl<T: ?Sized> LockExt<T> for Mutex<T> {
    fn lock_unpoisoned(&self) -> MutexGuard<'_, T> {
        self.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// [`Condvar`] waits that go on past a poisoned lock.
pub trait CondvarExt {
    /// [`Condvar::wait`], taking the guard back even if a holder panicked.
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T>;

    /// [`Condvar::wait_timeout`], taking the guard back even if a holder panicked.
    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult);
}

impl CondvarExt for Condvar {
    fn wait_unpoisoned<'a, T>(&self, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
        self.wait(guard).unwrap_or_else(PoisonError::into_inner)
    }

    fn wait_timeout_unpoisoned<'a, T>(
        &self,
        guard: MutexGuard<'a, T>,
        timeout: Duration,
    ) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
        self.wait_timeout(guard, timeout).unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_poisoned_mutex_still_locks_and_keeps_its_value() {
        let mutex = Arc::new(Mutex::new(7));
        let holder = Arc::clone(&mutex);
        let panicked = std::thread::spawn(move || {
            let _guard = holder.lock_unpoisoned();
            panic!("poison the lock");
        })
        .join();
        assert!(panicked.is_err());
        assert!(mutex.is_poisoned());
        assert_eq!(*mutex.lock_unpoisoned(), 7);
    }

    #[test]
    fn wait_timeout_returns_the_guard_and_reports_the_timeout() {
        let mutex = Mutex::new(());
        let condvar = Condvar::new();
        let (_guard, result) = condvar.wait_timeout_unpoisoned(mutex.lock_unpoisoned(), Duration::from_millis(1));
        assert!(result.timed_out());
    }
}
