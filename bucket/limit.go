// Package bucket holds the limiter primitives of llm_rate_limit: an exact
// "N per window" limit in the GCRA form, and the stores that keep one
// limiter state per bucket key.
//
// A bucket's whole state is one number, its theoretical arrival time (TAT):
// the instant at which the bucket would be full again if nothing more were
// charged. Charging n units moves the TAT forward by n emission intervals
// (window/count each); the charge conforms when the TAT, after the move, is
// no further ahead of now than the bucket's capacity (burst × interval).
// This is the generic cell rate algorithm that go-redis/redis_rate uses, and
// it gives what the module needs with O(1) memory per key:
//
//   - charge n > 1 at once (tokens);
//   - settle later with a signed correction, debt allowed (the TAT may run
//     past the capacity, and the bucket then refuses until it drains);
//   - reserve a place in the future (the TAT moves now, the caller waits for
//     its turn) and cancel it (the TAT moves back);
//   - report remaining and reset for the response headers.
//
// Time is always passed in by the caller, never read from a global, so that
// tests run on a fake clock. A stale time (earlier than one already seen)
// can only make a decision stricter: see [Reserve] for the argument.
package bucket

import (
	"fmt"
	"math"
	"math/big"
	"math/bits"
	"time"
)

// Limit is "Count units per Window", with a capacity of Burst units, or,
// with a zero Window, "at most Count units in flight".
type Limit struct {
	// Count is how many units (requests or tokens) the window allows: the
	// rule's limit_to. For a concurrency limit it is how many units may be
	// held at once.
	Count int64
	// Window is the period Count refers to: a second, minute, hour or day.
	// Zero makes a concurrency limit: a charge holds its units until an
	// Adjust gives them back, whenever that is.
	Window time.Duration
	// Burst is the bucket's capacity: how many units can be spent at once
	// after a quiet period. Zero means Count, the whole window's amount.
	Burst int64
}

// Capacity returns the bucket's capacity in units.
func (l Limit) Capacity() int64 {
	if l.Burst > 0 {
		return l.Burst
	}
	return l.Count
}

// Concurrent reports whether l caps units in flight rather than units per
// window.
func (l Limit) Concurrent() bool { return l.Window == 0 }

// Validate reports whether the limit can be enforced.
func (l Limit) Validate() error {
	switch {
	case l.Count <= 0:
		return fmt.Errorf("limit must be positive, got %d", l.Count)
	case l.Concurrent():
		if l.Burst != 0 {
			return fmt.Errorf("a concurrency limit has no burst")
		}
		if l.Count > maxUnits {
			return fmt.Errorf("limit %d is larger than %d", l.Count, int64(maxUnits))
		}
		return nil
	case l.Window < 0:
		return fmt.Errorf("window must be positive, got %s", l.Window)
	case l.Burst < 0:
		return fmt.Errorf("burst must not be negative, got %d", l.Burst)
	case l.Count > maxUnits || l.Burst > maxUnits:
		return fmt.Errorf("limit %d is larger than %d", max(l.Count, l.Burst), int64(maxUnits))
	case l.Count > int64(l.Window):
		// Keep the emission interval at a nanosecond or more (see span).
		return fmt.Errorf("limit %d per %s is finer than one per nanosecond", l.Count, l.Window)
	}
	return nil
}

// maxUnits bounds limits and charges so that the arithmetic below never
// overflows: a trillion units is far beyond any provider's daily quota.
const maxUnits = 1e12

// maxSpan bounds a TAT offset: about 73 years in nanoseconds, so that
// now + span never overflows an int64 of Unix nanoseconds.
const maxSpan = int64(math.MaxInt64 / 4)

// span returns the time n units take to drain, floor(n × window / count)
// nanoseconds, computed in 128 bits so that a day's window times a trillion
// tokens stays exact.
//
// Why round down: a TAT is a whole number of nanoseconds, so every charge
// rounds. Rounding down means the spans of any split of the capacity add up
// to at most the tolerance (Σ⌊xᵢ⌋ ≤ ⌊Σxᵢ⌋), so a full bucket always admits its
// whole capacity however it is charged. The price is leniency of under a
// nanosecond per charge: Validate keeps an interval of at least a
// nanosecond, so at 60 requests per minute that is one part in 10⁹.
func (l Limit) span(n int64) int64 {
	return mulDiv(n, int64(l.Window), l.Count)
}

// WaitFor returns how long after a state was observed, elapsed ago, a charge
// of n units would conform if nothing else were charged meanwhile. It is the
// prediction a queue makes for a request that has n units ahead of it
// (its own included). A concurrency limit's wait cannot be predicted from
// its state, and WaitFor returns 0 for it.
func (l Limit) WaitFor(st State, elapsed time.Duration, n int64) time.Duration {
	if l.Concurrent() || n <= 0 {
		return 0
	}
	backlog := max(int64(st.ResetAfter-elapsed), 0)
	return time.Duration(max(backlog+l.span(n)-l.tolerance(), 0))
}

// BlockUnits returns how many units to charge a bucket in state st so that
// it admits nothing for the next d: what an upstream's Retry-After asks of
// the bucket that stands for it. It is 0 when the bucket already waits that
// long, and for a concurrency limit.
func (l Limit) BlockUnits(st State, d time.Duration) int64 {
	if l.Concurrent() || d <= 0 {
		return 0
	}
	// A unit conforms once the TAT is within tolerance − span(1) of now;
	// the TAT must reach d past that.
	target := min(int64(d)+l.tolerance()-l.span(1), maxSpan)
	short := target - max(int64(st.ResetAfter), 0)
	if short <= 0 {
		return 0
	}
	// Units whose spans cover short, rounded up.
	n := l.unitsWithin(short)
	if l.span(n) < short {
		n++
	}
	return min(n, int64(maxUnits))
}

// Interval returns the time one unit takes to drain: the service interval of
// a queue in front of the bucket. It is 0 for a concurrency limit.
func (l Limit) Interval() time.Duration {
	if l.Concurrent() {
		return 0
	}
	return time.Duration(max(l.span(1), 1))
}

// tolerance returns how far ahead of now the TAT may be after a charge: the
// capacity's span.
func (l Limit) tolerance() int64 {
	return mulDiv(l.Capacity(), int64(l.Window), l.Count)
}

// mulDiv returns floor(a × b / c) for non-negative a, b and positive c,
// saturating at maxSpan.
func mulDiv(a, b, c int64) int64 {
	if a <= 0 || b <= 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(a), uint64(b))
	if hi == 0 {
		// The common case, and a 64-bit division is several times cheaper
		// than a 128-bit one.
		return int64(min(lo/uint64(c), uint64(maxSpan)))
	}
	if hi >= uint64(c) {
		return maxSpan
	}
	q, _ := bits.Div64(hi, lo, uint64(c))
	return int64(min(q, uint64(maxSpan)))
}

// unitsWithin returns how many single units could be charged one after
// another into room nanoseconds: the largest k with span(k) ≤ room, that is
// ⌊((room+1) × count − 1) / window⌋.
func (l Limit) unitsWithin(room int64) int64 {
	if room < 0 {
		return 0
	}
	hi, lo := bits.Mul64(uint64(room)+1, uint64(l.Count))
	lo, borrow := bits.Sub64(lo, 1, 0)
	hi -= borrow
	if hi == 0 {
		return int64(min(lo/uint64(l.Window), math.MaxInt64))
	}
	if hi >= uint64(l.Window) {
		return math.MaxInt64
	}
	q, _ := bits.Div64(hi, lo, uint64(l.Window))
	return int64(min(q, math.MaxInt64))
}

// rescale converts a bucket's backlog (tat-now, in nanoseconds at the old
// limit's rate) to the same number of units at the new limit's rate. This is
// how a reload that changes a rule's limit applies the new limit to the level
// the bucket already has. It runs once per bucket per change, so it uses
// math/big rather than clever overflow handling.
func rescale(backlog int64, from, to Limit) int64 {
	if backlog <= 0 {
		return backlog
	}
	num := new(big.Int).SetInt64(backlog)
	num.Mul(num, big.NewInt(from.Count))
	num.Mul(num, big.NewInt(int64(to.Window)))
	den := new(big.Int).SetInt64(int64(from.Window))
	den.Mul(den, big.NewInt(to.Count))
	q, r := new(big.Int).QuoRem(num, den, new(big.Int))
	if r.Sign() != 0 {
		q.Add(q, big.NewInt(1))
	}
	if !q.IsInt64() || q.Int64() > maxSpan {
		return maxSpan
	}
	return q.Int64()
}
