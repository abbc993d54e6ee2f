//! Retry delays for failed task attempts: exponential with a cap and jitter.
//! Attempt n (n ≥ 1 failed attempts so far) waits
//! `min(max_delay, initial_delay * multiplier^(n-1))`, then a random fraction of
//! up to `jitter` of that is taken off, so the cap is never exceeded and retries
//! of many tasks that failed together spread out.

use std::time::Duration;

use crate::config::RetryPolicy;

/// The delay before the attempt after failed attempt `failed` (1-based), given a
/// uniform random number `u` in [0, 1).
pub fn retry_delay(policy: &RetryPolicy, failed: u32, u: f64) -> Duration {
    let exp = i32::try_from(failed.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = policy.initial_delay.get().as_secs_f64() * policy.multiplier.powi(exp);
    let capped = base.min(policy.max_delay.get().as_secs_f64());
    let jittered = capped * (1.0 - policy.jitter * u.clamp(0.0, 1.0));
    Duration::from_secs_f64(jittered.max(0.001))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::duration::Dur;

    fn policy(jitter: f64) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            initial_delay: Dur::secs(1),
            multiplier: 2.0,
            max_delay: Dur::secs(10),
            jitter,
        }
    }

    #[test]
    fn grows_exponentially_up_to_the_cap() {
        let p = policy(0.0);
        let d: Vec<u64> = (1..=6)
            .map(|n| retry_delay(&p, n, 0.5).as_millis() as u64)
            .collect();
        assert_eq!(d, vec![1000, 2000, 4000, 8000, 10_000, 10_000]);
    }

    #[test]
    fn jitter_only_shortens_within_its_fraction() {
        let p = policy(0.2);
        assert_eq!(retry_delay(&p, 2, 0.0), Duration::from_secs(2));
        assert_eq!(retry_delay(&p, 2, 1.0).as_millis(), 1600);
        let mid = retry_delay(&p, 2, 0.5).as_millis();
        assert_eq!(mid, 1800);
    }
}
