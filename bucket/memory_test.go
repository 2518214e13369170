package bucket_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/bucket/storetest"
)

func TestMemoryStoreConformance(t *testing.T) {
	storetest.Run(t, func(*testing.T) bucket.Store { return bucket.NewMemoryStore() })
}

func TestMemoryStoreSweep(t *testing.T) {
	s := bucket.NewMemoryStore()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	l := bucket.Limit{Count: 10, Window: time.Second}
	for i := 0; i < 1000; i++ {
		cs := []bucket.Charge{{Key: fmt.Appendf(nil, "k%d", i), Limit: l, Cost: int64(1 + i%10)}}
		if d, _ := s.Reserve(context.Background(), now, cs, 0, nil); !d.Allowed {
			t.Fatalf("key %d refused", i)
		}
	}
	if s.Len() != 1000 {
		t.Fatalf("Len = %d, want 1000", s.Len())
	}
	// After 0.5s, buckets charged 5 or fewer units are full again.
	if n := s.Sweep(now.Add(500 * time.Millisecond)); n != 500 {
		t.Fatalf("swept %d, want 500", n)
	}
	if n := s.Sweep(now.Add(time.Second)); n != 500 || s.Len() != 0 {
		t.Fatalf("swept %d, left %d; want 500 and 0", n, s.Len())
	}
	// A full bucket is never even created.
	cs := []bucket.Charge{{Key: []byte("refund"), Limit: l, Cost: -3}}
	if err := s.Adjust(context.Background(), now, cs); err != nil || s.Len() != 0 {
		t.Fatalf("a refund on a full bucket created state: %d, %v", s.Len(), err)
	}
}

// TestMemoryStoreClockNeverRunsBack checks the store reads a stale time as the
// latest one it has seen.
func TestMemoryStoreClockNeverRunsBack(t *testing.T) {
	s := bucket.NewMemoryStore()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	l := bucket.Limit{Count: 1, Window: time.Minute}
	cs := []bucket.Charge{{Key: []byte("k"), Limit: l, Cost: 1}}
	if d, _ := s.Reserve(context.Background(), now, cs, 0, nil); !d.Allowed {
		t.Fatal("first refused")
	}
	// An hour-old timestamp must not see the bucket as it was an hour ago.
	if d, _ := s.Reserve(context.Background(), now.Add(-time.Hour), cs, 0, nil); d.Allowed {
		t.Fatal("stale timestamp admitted beyond the limit")
	}
}

func TestLimitValidate(t *testing.T) {
	for _, tc := range []struct {
		l  bucket.Limit
		ok bool
	}{
		{bucket.Limit{Count: 1, Window: time.Second}, true},
		{bucket.Limit{Count: 0, Window: time.Second}, false},
		{bucket.Limit{Count: 1, Window: 0}, true}, // a concurrency limit
		{bucket.Limit{Count: 1, Window: -1}, false},
		{bucket.Limit{Count: 1, Window: time.Second, Burst: -1}, false},
		{bucket.Limit{Count: 2e12, Window: time.Second}, false},
	} {
		if err := tc.l.Validate(); (err == nil) != tc.ok {
			t.Errorf("%+v: Validate() = %v", tc.l, err)
		}
	}
}

// benchCharges is one admission in the benchmarks: a rule per user and
// model, a rule per team and a model limit, all too roomy to refuse.
func benchCharges(user, team string) []bucket.Charge {
	l := bucket.Limit{Count: 1e9, Window: time.Second}
	return []bucket.Charge{
		{Key: []byte("rule-a\x1f" + user + "\x1fgpt-4o"), Limit: l, Cost: 1},
		{Key: []byte("rule-b\x1f" + team), Limit: l, Cost: 1},
		{Key: []byte("model:gpt-4o"), Limit: l, Cost: 1},
	}
}

// BenchmarkMemoryReserve3 measures one admission over three buckets.
func BenchmarkMemoryReserve3(b *testing.B) {
	s := bucket.NewMemoryStore()
	// time.Now, as in production: its monotonic reading is what the
	// store's clock uses.
	now := time.Now()
	cs := benchCharges("user@example.com", "team-backend")
	st := make([]bucket.State, len(cs))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.Reserve(context.Background(), now.Add(time.Duration(i)), cs, 0, st)
	}
}

// TestMemoryStoreManyBuckets covers calls with more buckets than the
// allocation-free path holds.
func TestMemoryStoreManyBuckets(t *testing.T) {
	s := bucket.NewMemoryStore()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	l := bucket.Limit{Count: 2, Window: time.Second}
	cs := make([]bucket.Charge, 20)
	for i := range cs {
		cs[i] = bucket.Charge{Key: fmt.Appendf(nil, "many/%d", i), Limit: l, Cost: 1}
	}
	for i := 0; i < 2; i++ {
		if d, _ := s.Reserve(context.Background(), now, cs, 0, nil); !d.Allowed {
			t.Fatalf("call %d refused", i)
		}
	}
	cs[19].Limit.Count = 3 // one roomier bucket cannot make the call pass
	st := make([]bucket.State, len(cs))
	if d, _ := s.Reserve(context.Background(), now, cs, 0, st); d.Allowed || d.Limiting != 0 {
		t.Fatalf("third call: %+v, want refused by bucket 0", d)
	}
	if s.Len() != 20 || st[5].Remaining != 0 {
		t.Fatalf("Len %d, state %+v", s.Len(), st[5])
	}
}
