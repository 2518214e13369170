// Package storetest is the conformance suite every bucket.Store must pass.
//
// The suite drives time itself: every call gets an explicit now from a fake
// clock that starts at an arbitrary instant, so a store under test must use
// the time it is given (a store that normally reads a server's clock needs a
// mode that takes the caller's time for this suite).
package storetest

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// epoch is the fake clock's start: a fixed, unremarkable instant.
var epoch = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

// Run runs the whole suite. newStore must return an empty store each time.
func Run(t *testing.T, newStore func(t *testing.T) bucket.Store) {
	t.Run("UnitsAndWindows", func(t *testing.T) { testUnitsAndWindows(t, newStore) })
	t.Run("RemainingAndReset", func(t *testing.T) { testRemainingAndReset(t, newStore(t)) })
	t.Run("MultiBucketAtomicity", func(t *testing.T) { testAtomicity(t, newStore(t)) })
	t.Run("SettleDebtAndRefund", func(t *testing.T) { testSettle(t, newStore(t)) })
	t.Run("ReserveAndCancel", func(t *testing.T) { testReserveCancel(t, newStore(t)) })
	t.Run("OversizeCharge", func(t *testing.T) { testOversize(t, newStore(t)) })
	t.Run("LimitChangeKeepsLevel", func(t *testing.T) { testRescale(t, newStore(t)) })
	t.Run("DeletePrefix", func(t *testing.T) { testDeletePrefix(t, newStore(t)) })
	t.Run("StaleTimestamps", func(t *testing.T) { testStale(t, newStore) })
	t.Run("Concurrent", func(t *testing.T) { testConcurrent(t, newStore(t)) })
	t.Run("HugeDebtSaturates", func(t *testing.T) { testHugeDebt(t, newStore(t)) })
	t.Run("RepeatedKey", func(t *testing.T) { testRepeatedKey(t, newStore(t)) })
	t.Run("Concurrency", func(t *testing.T) { runConcurrency(t, newStore) })
	t.Run("Scan", func(t *testing.T) { runScan(t, newStore) })
}

func charge(key string, l bucket.Limit, cost int64) bucket.Charge {
	return bucket.Charge{Key: []byte(key), Limit: l, Cost: cost}
}

func reserve(t *testing.T, s bucket.Store, now time.Time, maxWait time.Duration, cs ...bucket.Charge) (bucket.Decision, []bucket.State) {
	t.Helper()
	st := make([]bucket.State, len(cs))
	d, err := s.Reserve(context.Background(), now, cs, maxWait, st)
	if err != nil {
		t.Fatalf("Reserve: %v", err)
	}
	return d, st
}

func peek(t *testing.T, s bucket.Store, now time.Time, cs ...bucket.Charge) []bucket.State {
	t.Helper()
	st := make([]bucket.State, len(cs))
	if err := s.Peek(context.Background(), now, cs, st); err != nil {
		t.Fatalf("Peek: %v", err)
	}
	return st
}

func adjust(t *testing.T, s bucket.Store, now time.Time, cs ...bucket.Charge) {
	t.Helper()
	if err := s.Adjust(context.Background(), now, cs); err != nil {
		t.Fatalf("Adjust: %v", err)
	}
}

// raceReserve has 8 goroutines make n Reserve calls each at the epoch, with
// maxWait and the charges cs returns for goroutine g, and returns how many
// were admitted. refused, when not nil, is given every refusal.
func raceReserve(t *testing.T, s bucket.Store, n int, maxWait time.Duration, cs func(g int) []bucket.Charge, refused func(bucket.Decision)) int64 {
	var admitted atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			st := make([]bucket.State, len(cs(g)))
			for i := 0; i < n; i++ {
				d, err := s.Reserve(context.Background(), epoch, cs(g), maxWait, st)
				if err != nil {
					t.Error(err)
					return
				}
				if d.Allowed {
					admitted.Add(1)
				} else if refused != nil {
					refused(d)
				}
			}
		}()
	}
	wg.Wait()
	return admitted.Load()
}

// testUnitsAndWindows checks, for every window and a spread of limits and
// bursts, that exactly the capacity is admitted at once, that the next charge
// is refused with the exact wait for one unit, and that one unit is admitted
// once that wait has passed.
func testUnitsAndWindows(t *testing.T, newStore func(t *testing.T) bucket.Store) {
	windows := map[string]time.Duration{"second": time.Second, "minute": time.Minute, "hour": time.Hour, "day": 24 * time.Hour}
	cases := []struct {
		count, burst int64
	}{{1, 0}, {7, 0}, {50, 0}, {60, 10}, {1000, 4}, {10000, 0}, {120, 1}}
	for wname, w := range windows {
		for _, c := range cases {
			name := fmt.Sprintf("%d_per_%s_burst_%d", c.count, wname, c.burst)
			t.Run(name, func(t *testing.T) {
				s := newStore(t)
				l := bucket.Limit{Count: c.count, Window: w, Burst: c.burst}
				key := "units/" + name
				now := epoch
				capacity := l.Capacity()
				// Admit the capacity in batches to keep large cases fast.
				batch := max(capacity/10, 1)
				admitted := int64(0)
				for admitted+batch <= capacity {
					d, _ := reserve(t, s, now, 0, charge(key, l, batch))
					if !d.Allowed {
						t.Fatalf("refused after %d of capacity %d", admitted, capacity)
					}
					admitted += batch
				}
				if rest := capacity - admitted; rest > 0 {
					if d, _ := reserve(t, s, now, 0, charge(key, l, rest)); !d.Allowed {
						t.Fatalf("refused the last %d of capacity %d", rest, capacity)
					}
				}
				d, st := reserve(t, s, now, 0, charge(key, l, 1))
				if d.Allowed {
					t.Fatalf("admitted beyond capacity %d", capacity)
				}
				if st[0].Remaining != 0 {
					t.Fatalf("remaining = %d after a refusal at capacity, want 0", st[0].Remaining)
				}
				// One unit frees after window/count. Each charge rounds down
				// to the nanosecond, so the wait may be short by a nanosecond
				// per charge made, never long.
				interval := time.Duration(int64(w) / c.count)
				if diff := interval - d.Delay; diff < 0 || diff > 12*time.Nanosecond {
					t.Fatalf("delay = %s, want %s", d.Delay, interval)
				}
				if d.Limiting != 0 {
					t.Fatalf("limiting = %d, want 0", d.Limiting)
				}
				if d, _ := reserve(t, s, now.Add(d.Delay-time.Nanosecond), 0, charge(key, l, 1)); d.Allowed {
					t.Fatalf("admitted a nanosecond before the delay")
				}
				if d, _ := reserve(t, s, now.Add(d.Delay), 0, charge(key, l, 1)); !d.Allowed {
					t.Fatalf("refused after waiting the delay")
				}
			})
		}
	}
}

func testRemainingAndReset(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 60, Window: time.Minute, Burst: 10}
	now := epoch
	st := peek(t, s, now, charge("rr", l, 1))
	if st[0].Remaining != 10 || st[0].ResetAfter != 0 {
		t.Fatalf("fresh bucket: %+v, want remaining 10, reset 0", st[0])
	}
	_, st = reserve(t, s, now, 0, charge("rr", l, 4))
	if st[0].Remaining != 6 || st[0].ResetAfter != 4*time.Second {
		t.Fatalf("after 4: %+v, want remaining 6, reset 4s", st[0])
	}
	st = peek(t, s, now.Add(1500*time.Millisecond), charge("rr", l, 1))
	if st[0].Remaining != 7 || st[0].ResetAfter != 2500*time.Millisecond {
		t.Fatalf("after 1.5s: %+v, want remaining 7, reset 2.5s", st[0])
	}
	st = peek(t, s, now.Add(time.Hour), charge("rr", l, 1))
	if st[0].Remaining != 10 || st[0].ResetAfter != 0 {
		t.Fatalf("after an hour: %+v, want full", st[0])
	}
}

func testAtomicity(t *testing.T, s bucket.Store) {
	roomy := bucket.Limit{Count: 100, Window: time.Minute}
	tight := bucket.Limit{Count: 2, Window: time.Minute}
	now := epoch
	for i := 0; i < 2; i++ {
		if d, _ := reserve(t, s, now, 0, charge("atom/a", roomy, 1), charge("atom/b", tight, 1), charge("atom/c", roomy, 1)); !d.Allowed {
			t.Fatalf("request %d refused", i)
		}
	}
	d, st := reserve(t, s, now, 0, charge("atom/a", roomy, 1), charge("atom/b", tight, 1), charge("atom/c", roomy, 1))
	if d.Allowed || d.Limiting != 1 {
		t.Fatalf("third request: %+v, want refused by bucket 1", d)
	}
	if st[0].Remaining != 98 || st[2].Remaining != 98 {
		t.Fatalf("a refused request charged the other buckets: %+v", st)
	}
	got := peek(t, s, now, charge("atom/a", roomy, 1), charge("atom/c", roomy, 1))
	if got[0].Remaining != 98 || got[1].Remaining != 98 {
		t.Fatalf("peek after refusal: %+v, want 98 each", got)
	}
}

func testSettle(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 1000, Window: time.Minute}
	now := epoch
	if d, _ := reserve(t, s, now, 0, charge("settle", l, 300)); !d.Allowed {
		t.Fatal("estimate refused")
	}
	// The real usage was 1500: charge 1200 more, leaving a debt of 800.
	adjust(t, s, now, charge("settle", l, 1200))
	if st := peek(t, s, now, charge("settle", l, 1)); st[0].Remaining != 0 || st[0].ResetAfter != 90*time.Second {
		t.Fatalf("in debt: %+v, want remaining 0, reset 90s", st[0])
	}
	d, _ := reserve(t, s, now, 0, charge("settle", l, 1))
	if d.Allowed || d.Delay != 30*time.Second+60*time.Millisecond {
		t.Fatalf("in debt: %+v, want refused for 30.06s", d)
	}
	// Refund 1000: the level is back to 500.
	adjust(t, s, now, charge("settle", l, -1000))
	if st := peek(t, s, now, charge("settle", l, 1)); st[0].Remaining != 500 {
		t.Fatalf("after refund: remaining %d, want 500", st[0].Remaining)
	}
	// A refund never fills beyond full.
	adjust(t, s, now, charge("settle", l, -1_000_000))
	if st := peek(t, s, now, charge("settle", l, 1)); st[0].Remaining != 1000 {
		t.Fatalf("after big refund: remaining %d, want 1000", st[0].Remaining)
	}
	if d, _ := reserve(t, s, now, 0, charge("settle", l, 1001)); !d.Allowed {
		t.Fatal("full bucket refused an oversize charge")
	}
}

func testReserveCancel(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 60, Window: time.Minute, Burst: 1}
	now := epoch
	if d, _ := reserve(t, s, now, 10*time.Second, charge("q", l, 1)); !d.Allowed || d.Delay != 0 {
		t.Fatalf("first: %+v, want immediate", d)
	}
	for i := 1; i <= 3; i++ {
		d, _ := reserve(t, s, now, 10*time.Second, charge("q", l, 1))
		if !d.Allowed || d.Delay != time.Duration(i)*time.Second {
			t.Fatalf("reservation %d: %+v, want delay %ds", i, d, i)
		}
	}
	// The next would wait 4s: refused with maxWait 3s, and nothing charged.
	if d, _ := reserve(t, s, now, 3*time.Second, charge("q", l, 1)); d.Allowed || d.Delay != 4*time.Second {
		t.Fatalf("over maxWait: %+v, want refused with delay 4s", d)
	}
	// Cancel two reservations: the next one waits 2s.
	adjust(t, s, now, charge("q", l, -1), charge("q", l, -1))
	if d, _ := reserve(t, s, now, 10*time.Second, charge("q", l, 1)); !d.Allowed || d.Delay != 2*time.Second {
		t.Fatalf("after cancel: %+v, want delay 2s", d)
	}
}

func testOversize(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 100, Window: time.Second, Burst: 10}
	now := epoch
	d, _ := reserve(t, s, now, 0, charge("big", l, 50))
	if !d.Allowed {
		t.Fatalf("oversize charge on a full bucket refused: %+v", d)
	}
	// 50 units at 100/s: the debt takes 0.5s to clear, and the next unit
	// conforms once the bucket is back within its capacity of 10.
	d, _ = reserve(t, s, now, 0, charge("big", l, 1))
	if d.Allowed || d.Delay != 410*time.Millisecond {
		t.Fatalf("after oversize: %+v, want refused for 410ms", d)
	}
	d, _ = reserve(t, s, now.Add(100*time.Millisecond), 0, charge("big", l, 50))
	if d.Allowed || d.Delay != 400*time.Millisecond {
		t.Fatalf("second oversize: %+v, want refused until full (400ms)", d)
	}
}

func testRescale(t *testing.T, s bucket.Store) {
	old := bucket.Limit{Count: 100, Window: time.Minute}
	now := epoch
	if d, _ := reserve(t, s, now, 0, charge("rs", old, 40)); !d.Allowed {
		t.Fatal("refused")
	}
	// The rule now says 10 per second: 40 used of a 10-capacity bucket.
	tighter := bucket.Limit{Count: 10, Window: time.Second}
	st := peek(t, s, now, charge("rs", tighter, 1))
	if st[0].Remaining != 0 || st[0].ResetAfter != 4*time.Second {
		t.Fatalf("tighter: %+v, want remaining 0, reset 4s", st[0])
	}
	// And a looser one: 40 used of 1000.
	looser := bucket.Limit{Count: 1000, Window: time.Hour}
	st = peek(t, s, now, charge("rs", looser, 1))
	if st[0].Remaining != 960 || st[0].ResetAfter != 144*time.Second {
		t.Fatalf("looser: %+v, want remaining 960, reset 144s", st[0])
	}
}

func testDeletePrefix(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 5, Window: time.Minute}
	now := epoch
	for _, k := range []string{"rule-a\x1fx", "rule-a\x1fy", "rule-ab\x1fx", "rule-b\x1fx"} {
		reserve(t, s, now, 0, charge(k, l, 5))
	}
	n, err := s.DeletePrefix(context.Background(), []byte("rule-a\x1f"))
	if err != nil || n != 2 {
		t.Fatalf("DeletePrefix = %d, %v; want 2", n, err)
	}
	st := peek(t, s, now, charge("rule-a\x1fx", l, 1), charge("rule-ab\x1fx", l, 1), charge("rule-b\x1fx", l, 1))
	if st[0].Remaining != 5 || st[1].Remaining != 0 || st[2].Remaining != 0 {
		t.Fatalf("after DeletePrefix: %+v", st)
	}
}

// testStale feeds random, non-monotonic timestamps and checks the bound that
// x/time/rate breaks (golang/go#71360): over a span D of times, no more than
// capacity + D × rate units are admitted.
func testStale(t *testing.T, newStore func(t *testing.T) bucket.Store) {
	rng := rand.New(rand.NewPCG(1, 2))
	for trial := 0; trial < 20; trial++ {
		s := newStore(t)
		l := bucket.Limit{Count: int64(1 + rng.IntN(100)), Window: time.Second, Burst: int64(rng.IntN(5))}
		key := fmt.Sprintf("stale/%d", trial)
		span := time.Duration(1+rng.IntN(10)) * time.Second
		admitted := int64(0)
		for i := 0; i < 5000; i++ {
			at := epoch.Add(time.Duration(rng.Int64N(int64(span))))
			if d, _ := reserve(t, s, at, 0, charge(key, l, 1)); d.Allowed {
				admitted++
			}
		}
		bound := l.Capacity() + int64(span/time.Second)*l.Count
		if admitted > bound {
			t.Fatalf("trial %d: %+v over %s admitted %d, bound %d", trial, l, span, admitted, bound)
		}
	}
}

// testConcurrent races many goroutines for one bucket at a single instant:
// exactly the capacity is admitted.
func testConcurrent(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 500, Window: time.Minute}
	other := bucket.Limit{Count: 1_000_000, Window: time.Minute}
	admitted := raceReserve(t, s, 200, 0, func(g int) []bucket.Charge {
		return []bucket.Charge{charge("conc/shared", l, 1), charge(fmt.Sprintf("conc/own/%d", g), other, 1)}
	}, nil)
	if admitted != 500 {
		t.Fatalf("admitted %d, want exactly 500", admitted)
	}
}

// testHugeDebt piles enormous debts on a bucket: it must stay in debt (never
// wrap around to full), and a zero-cost charge still conforms and reports.
func testHugeDebt(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 10000, Window: 24 * time.Hour}
	now := epoch
	for i := 0; i < 10; i++ {
		adjust(t, s, now, charge("debt", l, 1_000_000_000_000))
	}
	d, st := reserve(t, s, now, 0, charge("debt", l, 1))
	if d.Allowed || st[0].Remaining != 0 || d.Delay <= 0 {
		t.Fatalf("after huge debts: %+v %+v, want refused", d, st[0])
	}
	d, st = reserve(t, s, now, 0, charge("debt", l, 0))
	if !d.Allowed || st[0].Remaining != 0 {
		t.Fatalf("zero-cost charge in debt: %+v %+v, want allowed with remaining 0", d, st[0])
	}
}

// testRepeatedKey checks that a key given twice in one call, under one
// limit, is one bucket (see bucket.Charge): the decision checks each charge
// against the bucket as it was before the call, an admission applies both
// charges in order, each charge's state is the bucket after its own charge,
// a refusal charges neither, and Adjust applies both corrections. The same
// holds for a concurrency bucket. A key between the two stays a bucket of
// its own.
func testRepeatedKey(t *testing.T, s bucket.Store) {
	l := bucket.Limit{Count: 10, Window: time.Minute}
	d, st := reserve(t, s, epoch, 0, charge("rep", l, 2), charge("other", l, 1), charge("rep", l, 3))
	if !d.Allowed || st[0].Remaining != 8 || st[1].Remaining != 9 || st[2].Remaining != 5 {
		t.Fatalf("Reserve of 2 and 3 on one key = %+v, states %+v; want admitted, remaining 8, 9 (other key), 5", d, st)
	}
	if got := peek(t, s, epoch, charge("rep", l, 0))[0].Remaining; got != 5 {
		t.Fatalf("after 2+3 on one key of 10: remaining %d, want 5", got)
	}
	// 3 conforms on its own, 6 does not (it would wait one unit, 6 s):
	// neither is charged.
	d, st = reserve(t, s, epoch, 0, charge("rep", l, 3), charge("rep", l, 6))
	if d.Allowed || d.Limiting != 1 || d.Delay != 6*time.Second || st[0].Remaining != 5 || st[1].Remaining != 5 {
		t.Fatalf("Reserve of 3 and 6 with 5 left = %+v, states %+v; want refused by charge 1 for 6s, 5 left", d, st)
	}
	// Each of 3 and 3 conforms against the 5 left before the call, so both
	// are charged and the bucket ends one unit in debt.
	d, st = reserve(t, s, epoch, 0, charge("rep", l, 3), charge("rep", l, 3))
	if !d.Allowed || st[0].Remaining != 2 || st[1].Remaining != 0 || st[1].ResetAfter != 66*time.Second {
		t.Fatalf("Reserve of 3 and 3 with 5 left = %+v, states %+v; want admitted, 2 then 0 left, full in 66s", d, st)
	}
	adjust(t, s, epoch, charge("rep", l, -1), charge("rep", l, -2))
	if got := peek(t, s, epoch, charge("rep", l, 0))[0].Remaining; got != 2 {
		t.Fatalf("after refunds of 1 and 2: remaining %d, want 2", got)
	}

	c := bucket.Limit{Count: 3}
	d, st = reserve(t, s, epoch, 0, charge("slots", c, 1), charge("slots", c, 1))
	if !d.Allowed || st[0].Remaining != 2 || st[1].Remaining != 1 {
		t.Fatalf("two slots on one concurrency key = %+v, states %+v; want admitted, 2 then 1 left", d, st)
	}
	adjust(t, s, epoch, charge("slots", c, -1), charge("slots", c, -1))
	if got := peek(t, s, epoch, charge("slots", c, 0))[0].Remaining; got != 3 {
		t.Fatalf("after both slots released: %d free, want 3", got)
	}
}
