package bucket_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// TestMemoryStoreSweepKeepsHeld checks that Sweep, however late, never drops
// a concurrency bucket that holds units, while it drops drained rate buckets
// around it; and that a concurrency bucket goes as soon as it holds nothing.
func TestMemoryStoreSweepKeepsHeld(t *testing.T) {
	ctx := context.Background()
	s := bucket.NewMemoryStore()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	conc := bucket.Limit{Count: 3}
	rate := bucket.Limit{Count: 10, Window: time.Second}
	for i := 0; i < 100; i++ {
		cs := []bucket.Charge{
			{Key: fmt.Appendf(nil, "c%d", i), Limit: conc, Cost: int64(1 + i%3)},
			{Key: fmt.Appendf(nil, "r%d", i), Limit: rate, Cost: 1},
		}
		if d, _ := s.Reserve(ctx, now, cs, 0, nil); !d.Allowed {
			t.Fatalf("request %d refused", i)
		}
	}
	// An oversize hold too.
	if d, _ := s.Reserve(ctx, now, []bucket.Charge{{Key: []byte("big"), Limit: conc, Cost: 10}}, 0, nil); !d.Allowed {
		t.Fatal("oversize hold refused")
	}
	if s.Len() != 201 {
		t.Fatalf("Len = %d, want 201", s.Len())
	}
	for _, at := range []time.Duration{0, time.Second, time.Hour, 365 * 24 * time.Hour} {
		s.Sweep(now.Add(at))
		want := 101 // the concurrency buckets only
		if at == 0 {
			want = 201 // the rate buckets have not drained yet
		}
		if s.Len() != want {
			t.Fatalf("after Sweep %s on: Len = %d, want %d", at, s.Len(), want)
		}
	}
	later := now.Add(365 * 24 * time.Hour)
	st := make([]bucket.State, 1)
	for i := 0; i < 100; i++ {
		cs := []bucket.Charge{{Key: fmt.Appendf(nil, "c%d", i), Limit: conc, Cost: 1}}
		if err := s.Peek(ctx, later, cs, st); err != nil || st[0].Remaining != 2-int64(i%3) {
			t.Fatalf("c%d after sweeps: %+v, %v; want remaining %d", i, st[0], err, 2-i%3)
		}
	}
	if d, _ := s.Reserve(ctx, later, []bucket.Charge{{Key: []byte("big"), Limit: conc, Cost: 1}}, time.Hour, nil); d.Allowed {
		t.Fatal("the oversize hold was lost")
	}

	// Releases delete: nothing is left for Sweep.
	for i := 0; i < 100; i++ {
		cs := []bucket.Charge{{Key: fmt.Appendf(nil, "c%d", i), Limit: conc, Cost: -int64(1 + i%3)}}
		if err := s.Adjust(ctx, later, cs); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Adjust(ctx, later, []bucket.Charge{{Key: []byte("big"), Limit: conc, Cost: -20}}); err != nil {
		t.Fatal(err)
	}
	if s.Len() != 0 {
		t.Fatalf("Len = %d after releasing everything, want 0", s.Len())
	}
	if n := s.Sweep(later); n != 0 {
		t.Fatalf("swept %d, want 0", n)
	}
	// A release of a bucket never charged creates nothing.
	if err := s.Adjust(ctx, later, []bucket.Charge{{Key: []byte("none"), Limit: conc, Cost: -1}}); err != nil || s.Len() != 0 {
		t.Fatalf("a release on an empty bucket created state: %d, %v", s.Len(), err)
	}
}

// TestMemoryStoreSweepChangesNoDecisionAcrossKinds checks Sweep's contract,
// "dropping a full bucket changes no decision", on a key that has been used
// under both a rate limit and a concurrency limit (a reload that changes a
// rule's kind while its bucket key stays the same): the concurrency state
// seen before a Sweep is the one seen after it.
func TestMemoryStoreSweepChangesNoDecisionAcrossKinds(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	conc := bucket.Limit{Count: 3}
	rate := bucket.Limit{Count: 10, Window: time.Minute}
	peek := func(s *bucket.MemoryStore, at time.Time) bucket.State {
		t.Helper()
		st := make([]bucket.State, 1)
		if err := s.Peek(ctx, at, []bucket.Charge{{Key: []byte("k"), Limit: conc, Cost: 1}}, st); err != nil {
			t.Fatal(err)
		}
		return st[0]
	}

	t.Run("RateThenConcurrency", func(t *testing.T) {
		s := bucket.NewMemoryStore()
		if d, _ := s.Reserve(ctx, now, []bucket.Charge{{Key: []byte("k"), Limit: rate, Cost: 1}}, 0, nil); !d.Allowed {
			t.Fatal("rate charge refused")
		}
		later := now.Add(time.Hour) // the rate bucket has drained
		before := peek(s, later)
		s.Sweep(later)
		if after := peek(s, later); before != after {
			t.Errorf("Sweep changed the concurrency state: %+v before, %+v after", before, after)
		}
	})

	t.Run("ConcurrencyTouchedByRate", func(t *testing.T) {
		s := bucket.NewMemoryStore()
		if d, _ := s.Reserve(ctx, now, []bucket.Charge{{Key: []byte("k"), Limit: conc, Cost: 3}}, 0, nil); !d.Allowed {
			t.Fatal("concurrency charge refused")
		}
		// A look under the rate limit (the rule briefly reloaded as a rate
		// limit, or a header Peek by the new rule) before it goes back.
		st := make([]bucket.State, 1)
		if err := s.Peek(ctx, now, []bucket.Charge{{Key: []byte("k"), Limit: rate, Cost: 1}}, st); err != nil {
			t.Fatal(err)
		}
		before := peek(s, now)
		s.Sweep(now)
		if after := peek(s, now); before != after {
			t.Errorf("Sweep changed the concurrency state: %+v before, %+v after", before, after)
		}
	})
}
