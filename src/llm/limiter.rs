//! Client-side rate limits: requests per minute and tokens per minute, as providers
//! enforce them. GCRA buckets from `governor`; the request bucket holds one second's
//! worth of burst so the rate is smooth (providers enforce per-minute limits over shorter
//! windows too), the token bucket ten seconds' worth.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Both limits; `None` is unlimited.
pub struct Limiter {
    requests: Option<DefaultDirectRateLimiter>,
    tokens: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
}

impl Limiter {
    /// Limits of `requests_per_minute` and `tokens_per_minute` (0: unlimited).
    pub fn new(requests_per_minute: u32, tokens_per_minute: u32) -> Self {
        let requests = NonZeroU32::new(requests_per_minute).map(|rpm| {
            let burst = NonZeroU32::new(rpm.get().div_ceil(60)).unwrap_or(NonZeroU32::MIN);
            RateLimiter::direct(Quota::per_minute(rpm).allow_burst(burst))
        });
        let tokens = NonZeroU32::new(tokens_per_minute).map(|tpm| {
            let burst = NonZeroU32::new(tpm.get().div_ceil(6)).unwrap_or(NonZeroU32::MIN);
            (
                RateLimiter::direct(Quota::per_minute(tpm).allow_burst(burst)),
                burst,
            )
        });
        Self { requests, tokens }
    }

    /// Waits until one request of about `tokens` tokens may be sent. A request larger than
    /// the token bucket waits for a full bucket.
    pub async fn acquire(&self, tokens: u32) {
        if let Some((bucket, burst)) = &self.tokens {
            let n = NonZeroU32::new(tokens.min(burst.get())).unwrap_or(NonZeroU32::MIN);
            // `n` never exceeds the burst, so the only error (insufficient capacity)
            // cannot happen.
            let _ = bucket.until_n_ready(n).await;
        }
        if let Some(bucket) = &self.requests {
            bucket.until_ready().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn request_limit_spaces_requests_after_the_burst() {
        // 600/min = 10/s with a burst of 10: 20 requests need about one second.
        let limiter = Limiter::new(600, 0);
        let t0 = Instant::now();
        for _ in 0..20 {
            limiter.acquire(1).await;
        }
        let took = t0.elapsed().as_secs_f64();
        assert!(took > 0.8, "20 requests at 10/s took only {took:.2}s");
    }

    #[tokio::test]
    async fn unlimited_never_waits_and_token_limit_waits() {
        let limiter = Limiter::new(0, 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            limiter.acquire(10_000).await;
        }
        assert!(t0.elapsed().as_secs_f64() < 0.5);
        // 6000 tokens/min = 100/s, bucket 1000: three 1000-token requests need ~20 s of
        // refill after the first; check the second one already waits.
        let limiter = Limiter::new(0, 6000);
        limiter.acquire(1000).await;
        let t0 = Instant::now();
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(300), limiter.acquire(1000))
                .await;
        assert!(
            waited.is_err(),
            "a second full bucket was granted at once ({:?})",
            t0.elapsed()
        );
    }
}
