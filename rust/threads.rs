//! Rayon thread pools of a requested size, each built once and kept for the life of the process.
//! A caller that passes a thread count on every call (the Python binding does, once per batch
//! when packing) then reuses one set of threads instead of spawning a new pool each time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::{Error, Result};

/// The pool of `threads` threads (0: rayon's default size), built on first use.
pub fn pool(threads: usize) -> Result<Arc<ThreadPool>> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<ThreadPool>>>> = OnceLock::new();
    // A pool enters the map only once built, so a panic elsewhere cannot leave it inconsistent.
    let mut pools = POOLS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(pool) = pools.get(&threads) {
        return Ok(Arc::clone(pool));
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Config(format!("num_threads={threads}: {e}")))?;
    let pool = Arc::new(pool);
    pools.insert(threads, Arc::clone(&pool));
    Ok(pool)
}

/// Runs `f` on the pool of `threads` threads, or on rayon's global pool when `None`.
pub fn install<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> Result<T> {
    match threads {
        None => Ok(f()),
        Some(n) => Ok(pool(n)?.install(f)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_count_reuses_one_pool_and_another_count_gets_its_own() {
        let three = pool(3).unwrap();
        assert!(Arc::ptr_eq(&three, &pool(3).unwrap()));
        let two = pool(2).unwrap();
        assert!(!Arc::ptr_eq(&three, &two));
        assert_eq!(three.current_num_threads(), 3);
        assert_eq!(two.current_num_threads(), 2);
    }

    #[test]
    fn install_runs_on_a_pool_of_the_requested_size() {
        assert_eq!(install(Some(5), rayon::current_num_threads).unwrap(), 5);
        assert_eq!(
            install(None, rayon::current_num_threads).unwrap(),
            rayon::current_num_threads()
        );
    }
}
