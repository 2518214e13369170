package bucket_test

import (
	"context"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

func TestLimitValidateConcurrency(t *testing.T) {
	for _, tc := range []struct {
		l  bucket.Limit
		ok bool
	}{
		{bucket.Limit{Count: 1}, true},
		{bucket.Limit{Count: 5}, true},
		{bucket.Limit{Count: 1e12}, true},
		{bucket.Limit{Count: 0}, false},
		{bucket.Limit{Count: -1}, false},
		{bucket.Limit{Count: 2e12}, false},
		{bucket.Limit{Count: 5, Burst: 1}, false},
		{bucket.Limit{Count: 5, Burst: 5}, false},
		{bucket.Limit{Count: 5, Burst: -1}, false},
		// A negative window is an error, not a concurrency limit.
		{bucket.Limit{Count: 5, Window: -time.Second}, false},
	} {
		if err := tc.l.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v, want ok %v", tc.l, err, tc.ok)
		}
	}
	if !(bucket.Limit{Count: 5}).Concurrent() || (bucket.Limit{Count: 5, Window: time.Second}).Concurrent() {
		t.Error("Concurrent() does not follow a zero window")
	}
}

func TestLimitInterval(t *testing.T) {
	for _, tc := range []struct {
		l    bucket.Limit
		want time.Duration
	}{
		{bucket.Limit{Count: 60, Window: time.Minute}, time.Second},
		{bucket.Limit{Count: 60, Window: time.Minute, Burst: 10}, time.Second},
		{bucket.Limit{Count: 10, Window: time.Second}, 100 * time.Millisecond},
		{bucket.Limit{Count: 7, Window: time.Second}, 142857142}, // rounded down
		{bucket.Limit{Count: 1e9, Window: time.Second}, time.Nanosecond},
		{bucket.Limit{Count: 10000, Window: 24 * time.Hour}, 8640 * time.Millisecond},
		{bucket.Limit{Count: 5}, 0},
	} {
		if got := tc.l.Interval(); got != tc.want {
			t.Errorf("%+v: Interval() = %s, want %s", tc.l, got, tc.want)
		}
	}
}

func TestLimitWaitFor(t *testing.T) {
	l := bucket.Limit{Count: 60, Window: time.Minute} // capacity 60, 1s a unit
	fresh := bucket.State{Remaining: 60}
	for n := int64(-1); n <= 60; n++ {
		if got := l.WaitFor(fresh, 0, n); got != 0 {
			t.Fatalf("fresh bucket, n = %d: WaitFor = %s, want 0", n, got)
		}
	}
	for k := int64(1); k <= 120; k++ {
		if got := l.WaitFor(fresh, 0, 60+k); got != time.Duration(k)*time.Second {
			t.Fatalf("fresh bucket, n = capacity+%d: WaitFor = %s, want %ds", k, got, k)
		}
		// The time since a full bucket was seen does not matter.
		if got := l.WaitFor(fresh, time.Hour, 60+k); got != time.Duration(k)*time.Second {
			t.Fatalf("fresh bucket an hour on, n = capacity+%d: WaitFor = %s, want %ds", k, got, k)
		}
	}

	// 10 units used: 10s of backlog. Elapsed time drains it.
	used := bucket.State{Remaining: 50, ResetAfter: 10 * time.Second}
	for _, tc := range []struct {
		elapsed time.Duration
		n       int64
		want    time.Duration
	}{
		{0, 1, 0},
		{0, 50, 0},
		{0, 51, time.Second},
		{0, 60, 10 * time.Second},
		{0, 65, 15 * time.Second},
		{4 * time.Second, 54, 0},
		{4 * time.Second, 55, time.Second},
		{4 * time.Second, 60, 6 * time.Second},
		{4*time.Second + 500*time.Millisecond, 60, 5500 * time.Millisecond},
		{10 * time.Second, 60, 0},
		{10 * time.Second, 61, time.Second},
		{time.Hour, 60, 0},
		{time.Hour, 61, time.Second},
	} {
		if got := l.WaitFor(used, tc.elapsed, tc.n); got != tc.want {
			t.Errorf("10 used, %s on, n = %d: WaitFor = %s, want %s", tc.elapsed, tc.n, got, tc.want)
		}
	}

	// A burst is the capacity the backlog is measured against.
	b := bucket.Limit{Count: 60, Window: time.Minute, Burst: 10}
	if got := b.WaitFor(bucket.State{Remaining: 10}, 0, 10); got != 0 {
		t.Errorf("burst 10, n = 10: WaitFor = %s, want 0", got)
	}
	if got := b.WaitFor(bucket.State{Remaining: 10}, 0, 15); got != 5*time.Second {
		t.Errorf("burst 10, n = 15: WaitFor = %s, want 5s", got)
	}
	if got := b.WaitFor(bucket.State{ResetAfter: 30 * time.Second}, 5*time.Second, 1); got != 16*time.Second {
		t.Errorf("burst 10 in debt (30s), 5s on, n = 1: WaitFor = %s, want 16s", got)
	}

	// A concurrency limit cannot predict.
	c := bucket.Limit{Count: 5}
	for _, st := range []bucket.State{{}, {Remaining: 5}, {ResetAfter: time.Hour}} {
		for _, n := range []int64{1, 5, 6, 100} {
			if got := c.WaitFor(st, 0, n); got != 0 {
				t.Errorf("concurrency %+v, n = %d: WaitFor = %s, want 0", st, n, got)
			}
		}
	}
}

// TestLimitWaitForMatchesStore checks WaitFor against the store's own
// answer: the wait it predicts from a state is the Delay a Reserve of n units
// gets, elapsed later, for any n up to the capacity.
func TestLimitWaitForMatchesStore(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	for _, l := range []bucket.Limit{
		{Count: 60, Window: time.Minute},
		{Count: 60, Window: time.Minute, Burst: 10},
		{Count: 7, Window: time.Second, Burst: 3},
		{Count: 1000, Window: time.Hour},
	} {
		for _, used := range []int64{1, l.Capacity() / 2, l.Capacity()} {
			for _, elapsed := range []time.Duration{0, l.Interval() / 2, 3 * l.Interval()} {
				for _, n := range []int64{1, 2, l.Capacity()} {
					s := bucket.NewMemoryStore()
					key := []byte("k")
					st := make([]bucket.State, 1)
					if d, _ := s.Reserve(ctx, now, []bucket.Charge{{Key: key, Limit: l, Cost: used}}, 0, st); !d.Allowed {
						t.Fatalf("%+v: %d used refused", l, used)
					}
					want := l.WaitFor(st[0], elapsed, n)
					d, _ := s.Reserve(ctx, now.Add(elapsed), []bucket.Charge{{Key: key, Limit: l, Cost: n}}, time.Hour, nil)
					// One charge made before: a nanosecond of rounding.
					if diff := want - d.Delay; diff < -time.Nanosecond || diff > time.Nanosecond {
						t.Errorf("%+v, %d used, %s on, n = %d: WaitFor = %s, store Delay = %s", l, used, elapsed, n, want, d.Delay)
					}
				}
			}
		}
	}
}
