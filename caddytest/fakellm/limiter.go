package fakellm

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// epsilon absorbs float rounding so that advancing the clock by exactly one
// token's worth of time always yields a whole token.
const epsilon = 1e-9

// bucket is a continuously refilled token bucket driven by an external
// clock. It is not safe for concurrent use; limiter serialises access.
type bucket struct {
	limit    int     // the advertised per-minute figure
	capacity float64 // the most tokens the bucket holds
	rate     float64 // tokens added per second
	tokens   float64
	last     time.Time // zero until first use, when the bucket starts full
}

func newBucket(perMinute, capacity int) *bucket {
	return &bucket{
		limit:    perMinute,
		capacity: float64(capacity),
		rate:     float64(perMinute) / 60,
	}
}

// refill brings the bucket up to date with now. A clock that goes
// backwards adds nothing rather than draining the bucket.
func (b *bucket) refill(now time.Time) {
	if b.last.IsZero() {
		b.tokens, b.last = b.capacity, now
		return
	}
	if el := now.Sub(b.last); el > 0 {
		b.tokens = math.Min(b.capacity, b.tokens+el.Seconds()*b.rate)
		b.last = now
	}
}

func (b *bucket) has(n float64) bool { return b.tokens+epsilon >= n }

// wait is how long until n tokens are available; an hour when n exceeds
// the capacity and never will be.
func (b *bucket) wait(n float64) time.Duration {
	if n > b.capacity+epsilon {
		return time.Hour
	}
	if b.has(n) {
		return 0
	}
	return secondsToDuration((n - b.tokens) / b.rate)
}

// state reports the bucket as rate-limit headers describe it.
func (b *bucket) state() *bucketState {
	return &bucketState{
		limit:     b.limit,
		remaining: int(math.Floor(b.tokens + epsilon)),
		reset:     secondsToDuration(math.Max(0, b.capacity-b.tokens) / b.rate),
	}
}

func secondsToDuration(sec float64) time.Duration {
	return time.Duration(math.Ceil(sec * float64(time.Second)))
}

// bucketState is one dimension of a limiter snapshot.
type bucketState struct {
	limit     int
	remaining int
	reset     time.Duration // until the bucket is full again
}

// snapshot is the limiter's state right after a decision, for headers.
// A nil dimension is unlimited.
type snapshot struct {
	now      time.Time
	requests *bucketState
	tokens   *bucketState
}

// dimension is one limited dimension of a snapshot.
type dimension struct {
	kind  string // "requests" or "tokens", as header names spell it
	state *bucketState
}

// dimensions lists the limited dimensions, requests first, skipping
// unlimited ones, which have no headers.
func (s snapshot) dimensions() []dimension {
	var out []dimension
	if s.requests != nil {
		out = append(out, dimension{"requests", s.requests})
	}
	if s.tokens != nil {
		out = append(out, dimension{"tokens", s.tokens})
	}
	return out
}

// decision is the limiter's verdict on one request.
type decision struct {
	ok         bool
	limitedBy  string // "requests" or "tokens" when !ok
	limit      int
	requested  int
	retryAfter time.Duration
	snap       snapshot
}

// message words a refusal the way OpenAI does, which is what humans
// reading test logs will recognise.
func (d decision) message() string {
	unit := "RPM"
	if d.limitedBy == "tokens" {
		unit = "TPM"
	}
	return fmt.Sprintf("Rate limit reached for %s per min (%s): Limit %d, Requested %d. Please try again in %s.",
		d.limitedBy, unit, d.limit, d.requested, formatReset(d.retryAfter))
}

// limiter holds the hidden request and token buckets.
type limiter struct {
	mu       sync.Mutex
	requests *bucket // nil when unlimited
	tokens   *bucket // nil when unlimited
}

func newLimiter(cfg Config) *limiter {
	l := &limiter{}
	if cfg.RPM > 0 {
		l.requests = newBucket(cfg.RPM, cfg.Burst)
	}
	if cfg.TPM > 0 {
		l.tokens = newBucket(cfg.TPM, cfg.TPM)
	}
	return l
}

// admit charges one request and cost tokens if both buckets can pay,
// and charges nothing otherwise, so a refusal never eats capacity.
func (l *limiter) admit(now time.Time, cost int) decision {
	l.mu.Lock()
	defer l.mu.Unlock()
	d := decision{ok: true, snap: snapshot{now: now}}
	for _, b := range []*bucket{l.requests, l.tokens} {
		if b != nil {
			b.refill(now)
		}
	}
	switch {
	case l.requests != nil && !l.requests.has(1):
		d = decision{limitedBy: "requests", limit: l.requests.limit, requested: 1,
			retryAfter: l.requests.wait(1), snap: d.snap}
	case l.tokens != nil && !l.tokens.has(float64(cost)):
		d = decision{limitedBy: "tokens", limit: l.tokens.limit, requested: cost,
			retryAfter: l.tokens.wait(float64(cost)), snap: d.snap}
	default:
		if l.requests != nil {
			l.requests.tokens--
		}
		if l.tokens != nil {
			l.tokens.tokens -= float64(cost)
		}
	}
	if l.requests != nil {
		d.snap.requests = l.requests.state()
	}
	if l.tokens != nil {
		d.snap.tokens = l.tokens.state()
	}
	return d
}

// setLimits changes the buckets' limits at now: see Server.SetLimits.
func (l *limiter) setLimits(now time.Time, rpm, burst, tpm int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.requests = l.requests.resize(now, rpm, burst)
	l.tokens = l.tokens.resize(now, tpm, tpm)
}

// resize returns b with a new limit and capacity, keeping the tokens it
// holds at now up to the new capacity; nil when perMinute is 0, and a full
// new bucket when b is nil. A bucket never used keeps starting full.
func (b *bucket) resize(now time.Time, perMinute, capacity int) *bucket {
	switch {
	case perMinute == 0:
		return nil
	case b == nil:
		return newBucket(perMinute, capacity)
	}
	if !b.last.IsZero() {
		b.refill(now) // at the old rate, up to now
	}
	b.limit = perMinute
	b.capacity = float64(capacity)
	b.rate = float64(perMinute) / 60
	b.tokens = math.Min(b.tokens, b.capacity)
	return b
}

// reset refills both buckets.
func (l *limiter) reset() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, b := range []*bucket{l.requests, l.tokens} {
		if b != nil {
			b.tokens, b.last = b.capacity, time.Time{}
		}
	}
}

// formatReset renders d as OpenAI's reset headers do ("6m0s", "20ms"):
// a Go duration rounded to the millisecond, never rounding a wait to 0.
func formatReset(d time.Duration) string {
	if d <= 0 {
		return "0s"
	}
	r := d.Round(time.Millisecond)
	if r < d {
		r += time.Millisecond
	}
	return r.String()
}

// setRetryAfter sets retry-after in whole seconds (rounded up, so a client
// that obeys it is never early) and retry-after-ms.
func setRetryAfter(h http.Header, d time.Duration) {
	secs := int64(math.Ceil(d.Seconds()))
	ms := int64(math.Ceil(float64(d) / float64(time.Millisecond)))
	h.Set("Retry-After", strconv.FormatInt(max(1, secs), 10))
	h.Set("Retry-After-Ms", strconv.FormatInt(max(1, ms), 10))
}

// retrySeconds is the whole-second wait used in bodies such as Gemini's
// RetryInfo, consistent with retry-after.
func retrySeconds(d time.Duration) int64 {
	return max(1, int64(math.Ceil(d.Seconds())))
}
