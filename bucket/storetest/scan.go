package storetest

import (
	"context"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// runScan runs the cases of Scan and Delete, the admin API's view of a
// store.
func runScan(t *testing.T, newStore func(t *testing.T) bucket.Store) {
	t.Run("ScanPrefix", func(t *testing.T) { testScanPrefix(t, newStore(t)) })
	t.Run("ScanStops", func(t *testing.T) { testScanStops(t, newStore(t)) })
	t.Run("Delete", func(t *testing.T) { testDelete(t, newStore(t)) })
	t.Run("DeleteInFlight", func(t *testing.T) { testDeleteInFlight(t, newStore(t)) })
}

// scanAll returns what Scan reports under prefix, by key.
func scanAll(t *testing.T, s bucket.Store, now time.Time, prefix string) map[string]bucket.Level {
	t.Helper()
	got := make(map[string]bucket.Level)
	err := s.Scan(context.Background(), now, []byte(prefix), func(key []byte, lv bucket.Level) bool {
		got[string(key)] = lv // SCAN may repeat a key; it is the same bucket
		return true
	})
	if err != nil {
		t.Fatalf("Scan(%q): %v", prefix, err)
	}
	return got
}

// testScanPrefix checks that Scan reports exactly the buckets under its
// prefix that are not full, and that their levels read under a limit give
// what Peek says, in debt and under a changed limit too.
func testScanPrefix(t *testing.T, s bucket.Store) {
	now := epoch
	rate := bucket.Limit{Count: 60, Window: time.Minute, Burst: 10}
	conc := concurrency(4)
	reserve(t, s, now, 0, charge("scan-a\x1fx", rate, 4))
	reserve(t, s, now, 0, charge("scan-a\x1fy", rate, 10))
	adjust(t, s, now, charge("scan-a\x1fy", rate, 5)) // 5 in debt
	reserve(t, s, now, 0, charge("scan-a\x1fc", conc, 3))
	reserve(t, s, now, 0, charge("scan-ab\x1fx", rate, 5))
	reserve(t, s, now, 0, charge("scan-b\x1fx", rate, 5))
	// Charged and refunded: full again, the same as no bucket.
	reserve(t, s, now, 0, charge("scan-a\x1ffull", rate, 2))
	adjust(t, s, now, charge("scan-a\x1ffull", rate, -2))

	now = now.Add(1500 * time.Millisecond) // 1.5 units drained
	got := scanAll(t, s, now, "scan-a\x1f")
	if len(got) != 3 {
		t.Fatalf("Scan(scan-a) reported %d buckets, want 3 (x, y, c): %v", len(got), got)
	}
	for key, want := range map[string]struct {
		l    bucket.Limit
		used int64
	}{
		"scan-a\x1fx": {rate, 3},  // 4 charged, 1.5 drained: 2.5, rounded up
		"scan-a\x1fy": {rate, 14}, // 15 charged, 1.5 drained
		"scan-a\x1fc": {conc, 3},
	} {
		lv, ok := got[key]
		if !ok {
			t.Fatalf("Scan did not report %q", key)
		}
		st, used := lv.Under(want.l)
		peeked := peek(t, s, now, charge(key, want.l, 0))[0]
		if st != peeked || used != want.used {
			t.Errorf("%q: Under = %+v, used %d; Peek says %+v, want used %d", key, st, used, peeked, want.used)
		}
	}
	// Read under a limit twice as generous, the units taken are the same
	// and the state is what Peek reports once the limit changed.
	double := bucket.Limit{Count: 120, Window: time.Minute, Burst: 20}
	st, used := got["scan-a\x1fx"].Under(double)
	if peeked := peek(t, s, now, charge("scan-a\x1fx", double, 0))[0]; st != peeked || used != 3 {
		t.Errorf("under a doubled limit: %+v, used %d; Peek says %+v, want used 3", st, used, peeked)
	}

	// An empty prefix is every bucket.
	if got := scanAll(t, s, now, ""); len(got) != 5 {
		t.Fatalf("Scan(\"\") reported %d buckets, want 5", len(got))
	}

	// Once drained, a rate bucket is gone; a concurrency bucket is not.
	got = scanAll(t, s, now.Add(time.Minute), "scan-a\x1f")
	if _, ok := got["scan-a\x1fc"]; len(got) != 1 || !ok {
		t.Fatalf("after a minute, Scan reported %v; want only the concurrency bucket", got)
	}
}

// testScanStops checks that Scan stops when fn says so.
func testScanStops(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 5, Window: time.Minute}
	for _, k := range []string{"stop\x1fa", "stop\x1fb", "stop\x1fc", "stop\x1fd"} {
		reserve(t, s, epoch, 0, charge(k, l, 1))
	}
	calls := 0
	err := s.Scan(context.Background(), epoch, []byte("stop\x1f"), func([]byte, bucket.Level) bool {
		calls++
		return calls < 2
	})
	if err != nil || calls != 2 {
		t.Fatalf("Scan stopped after %d calls (%v), want 2", calls, err)
	}
}

// testDelete checks that Delete forgets exactly its keys and counts those
// that were there.
func testDelete(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 5, Window: time.Minute}
	now := epoch
	for _, k := range []string{"del\x1fa", "del\x1fb", "del\x1fc"} {
		reserve(t, s, now, 0, charge(k, l, 5))
	}
	n, err := s.Delete(context.Background(), [][]byte{[]byte("del\x1fa"), []byte("del\x1fc"), []byte("del\x1fabsent")})
	if err != nil || n != 2 {
		t.Fatalf("Delete = %d, %v; want 2", n, err)
	}
	st := peek(t, s, now, charge("del\x1fa", l, 1), charge("del\x1fb", l, 1), charge("del\x1fc", l, 1))
	if st[0].Remaining != 5 || st[1].Remaining != 0 || st[2].Remaining != 5 {
		t.Fatalf("after Delete: %+v, want a and c full, b empty", st)
	}
	if n, err := s.Delete(context.Background(), nil); err != nil || n != 0 {
		t.Fatalf("Delete(nil) = %d, %v", n, err)
	}
}

// testDeleteInFlight checks what the admin API's reset relies on: deleting a
// concurrency bucket while requests hold units of it frees them, and the
// releases those requests make later find nothing to give back. They must
// not leave the bucket below zero, which would admit more than the count
// from then on.
func testDeleteInFlight(t *testing.T, s bucket.Store) {
	l := concurrency(2)
	key := "reset\x1fconc"
	now := epoch
	fillConc(t, s, now, key, l, 2) // two requests in flight
	if n, err := s.Delete(context.Background(), [][]byte{[]byte(key)}); err != nil || n != 1 {
		t.Fatalf("Delete = %d, %v; want 1", n, err)
	}
	fillConc(t, s, now, key, l, 2) // two new ones, after the reset
	// The old two end: their releases meet the new ones' units.
	adjust(t, s, now, charge(key, l, -1))
	adjust(t, s, now, charge(key, l, -1))
	// The new two end: nothing is left to release.
	adjust(t, s, now, charge(key, l, -1))
	adjust(t, s, now, charge(key, l, -1))
	if got := scanAll(t, s, now, key); len(got) != 0 {
		t.Fatalf("after every release, Scan reports %v; want nothing held", got)
	}
	// The count holds again: two, and not one more.
	fillConc(t, s, now, key, l, 2)
	if d, _ := reserve(t, s, now, 0, charge(key, l, 1)); d.Allowed {
		t.Fatal("a third request admitted under a count of 2: the releases after the reset left the bucket below zero")
	}
}
