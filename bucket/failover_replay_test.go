package bucket_test

import (
	"context"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// TestFailoverReplaysReleases: a release of a slot the primary granted,
// made while the primary is down, reaches the primary once it answers
// again, in every mode; a release of a slot the fail mode granted does not.
func TestFailoverReplaysReleases(t *testing.T) {
	for _, mode := range []bucket.FailMode{bucket.FailOpen, bucket.FailClosed, bucket.FailLocal} {
		t.Run(mode.String(), func(t *testing.T) {
			p := newFakePrimary()
			f := bucket.NewFailover(p, bucket.FailoverOptions{Mode: mode, Backoff: time.Millisecond})
			ctx, now := context.Background(), time.Now()
			conc := bucket.Limit{Count: 2}
			slot := []bucket.Charge{{Key: []byte("slots"), Limit: conc, Cost: 1}}
			held := func() int64 {
				st := make([]bucket.State, 1)
				if err := p.inner.Peek(ctx, now, slot, st); err != nil {
					t.Fatal(err)
				}
				return conc.Count - st[0].Remaining
			}
			// Two slots granted by the primary.
			for i := range 2 {
				d, err := f.Reserve(ctx, now, slot, 0, nil)
				if err != nil || !d.Allowed || d.Fallback {
					t.Fatalf("slot %d: %+v, %v; want granted by the primary", i, d, err)
				}
			}
			// The primary goes down; a fail-mode decision says so.
			p.set(fakeFail)
			if d, _ := f.Reserve(ctx, now, slot, 0, nil); !d.Fallback {
				t.Fatalf("decision while down: %+v, want Fallback", d)
			}
			// Both releases are made during the outage: one of a primary
			// slot (Replay), one of a slot the fail mode granted (not).
			release := []bucket.Charge{{Key: []byte("slots"), Limit: conc, Cost: -1, Replay: true}}
			if err := f.Adjust(ctx, now, release); err != nil {
				t.Fatal(err)
			}
			release[0].Key[0] = 'X' // the caller reuses its buffer
			if err := f.Adjust(ctx, now, []bucket.Charge{{Key: []byte("slots"), Limit: conc, Cost: -1}}); err != nil {
				t.Fatal(err)
			}
			if n := held(); n != 2 {
				t.Fatalf("primary holds %d slots during the outage, want 2", n)
			}
			// Back up: the next call probes, and the kept release follows.
			p.set(fakeOK)
			ctx2, cancel := context.WithTimeout(ctx, 10*time.Second)
			defer cancel()
			for held() != 1 {
				if ctx2.Err() != nil {
					t.Fatalf("primary holds %d slots 10 s after recovery, want 1 (the kept release applied once)", held())
				}
				f.Peek(ctx, now, slot, make([]bucket.State, 1))
				time.Sleep(time.Millisecond)
			}
			// And only once.
			// (The flush took the kept release off before applying it.)
			for range 20 {
				f.Peek(ctx, now, slot, make([]bucket.State, 1))
			}
			if n := held(); n != 1 {
				t.Fatalf("primary holds %d slots, want 1", n)
			}
		})
	}
}
