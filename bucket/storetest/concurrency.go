package storetest

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// The concurrency cases use only the Store interface. Concurrency buckets do
// not depend on time, so they run at the suite's epoch; where a case lets
// time pass (to show that time alone releases nothing, or to refill a rate
// bucket), its times never go backwards, as in the rest of the suite but the
// stale-timestamp case.

// concurrency returns a concurrency limit of n units held at once.
func concurrency(n int64) bucket.Limit { return bucket.Limit{Count: n} }

// runConcurrency runs the concurrency-limit cases.
func runConcurrency(t *testing.T, newStore func(t *testing.T) bucket.Store) {
	t.Run("AdmitUpToCount", func(t *testing.T) { testConcAdmit(t, newStore(t)) })
	t.Run("AtomicWithRate", func(t *testing.T) { testConcAtomic(t, newStore(t)) })
	t.Run("Release", func(t *testing.T) { testConcRelease(t, newStore(t)) })
	t.Run("OverRelease", func(t *testing.T) { testConcOverRelease(t, newStore(t)) })
	t.Run("Oversize", func(t *testing.T) { testConcOversize(t, newStore(t)) })
	t.Run("States", func(t *testing.T) { testConcStates(t, newStore(t)) })
	t.Run("LimitChangeKeepsHeld", func(t *testing.T) { testConcRescale(t, newStore(t)) })
	t.Run("DeletePrefix", func(t *testing.T) { testConcDeletePrefix(t, newStore(t)) })
	t.Run("Race", func(t *testing.T) { testConcRace(t, newStore(t)) })
	t.Run("AfterRateLimit", func(t *testing.T) { testConcAfterRate(t, newStore(t)) })
}

// fillConc charges n single units into key under l, all of which must be
// admitted immediately.
func fillConc(t *testing.T, s bucket.Store, now time.Time, key string, l bucket.Limit, n int64) {
	t.Helper()
	for i := int64(0); i < n; i++ {
		d, _ := reserve(t, s, now, 0, charge(key, l, 1))
		if !d.Allowed || d.Delay != 0 {
			t.Fatalf("unit %d of %d: %+v, want admitted at once", i+1, n, d)
		}
	}
}

// testConcAdmit admits exactly Count units, one at a time and in a batch, and
// refuses the next whatever maxWait says, naming the concurrency bucket.
func testConcAdmit(t *testing.T, s bucket.Store) {
	now := epoch
	for _, count := range []int64{1, 3, 50} {
		l := concurrency(count)
		key := fmt.Sprintf("conc/admit/%d", count)
		fillConc(t, s, now, key, l, count)
		for _, maxWait := range []time.Duration{0, time.Second, time.Hour, 24 * 365 * time.Hour} {
			d, st := reserve(t, s, now, maxWait, charge(key, l, 1))
			if d.Allowed {
				t.Fatalf("count %d: admitted beyond the count with maxWait %s", count, maxWait)
			}
			if d.Limiting != 0 {
				t.Fatalf("count %d: limiting = %d, want 0", count, d.Limiting)
			}
			if st[0].Remaining != 0 || st[0].ResetAfter != 0 {
				t.Fatalf("count %d: state after refusal %+v, want remaining 0, reset 0", count, st[0])
			}
		}
		// A zero-cost charge only reports the state: a full bucket admits it.
		d, st := reserve(t, s, now, 0, charge(key, l, 0))
		if !d.Allowed || st[0].Remaining != 0 {
			t.Fatalf("count %d: zero-cost charge on a full bucket: %+v %+v, want allowed, remaining 0", count, d, st[0])
		}
	}

	// A batch: 7 of 10, then 3 more fit, then 1 more does not.
	l := concurrency(10)
	if d, _ := reserve(t, s, now, 0, charge("conc/batch", l, 7)); !d.Allowed {
		t.Fatalf("7 of 10 refused: %+v", d)
	}
	if d, _ := reserve(t, s, now, time.Hour, charge("conc/batch", l, 4)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("4 more with 3 free: %+v, want refused by bucket 0", d)
	}
	if d, _ := reserve(t, s, now, 0, charge("conc/batch", l, 3)); !d.Allowed {
		t.Fatalf("the last 3 of 10 refused: %+v", d)
	}
	if d, _ := reserve(t, s, now, time.Hour, charge("conc/batch", l, 1)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("beyond 10: %+v, want refused by bucket 0", d)
	}

	// Limiting names the full concurrency bucket among several.
	roomy := concurrency(100)
	rate := bucket.Limit{Count: 100, Window: time.Minute}
	d, _ := reserve(t, s, now, time.Hour,
		charge("conc/multi/rate", rate, 1), charge("conc/multi/roomy", roomy, 1), charge("conc/batch", l, 1))
	if d.Allowed || d.Limiting != 2 {
		t.Fatalf("with a full bucket third: %+v, want refused by bucket 2", d)
	}

	// Time alone releases nothing.
	later := now.Add(24 * time.Hour)
	for _, count := range []int64{1, 3, 50} {
		key := fmt.Sprintf("conc/admit/%d", count)
		if d, _ := reserve(t, s, later, time.Hour, charge(key, concurrency(count), 1)); d.Allowed {
			t.Fatalf("count %d: admitted a day later without a release", count)
		}
	}
}

// testConcAtomic checks that a request charging a rate bucket and a
// concurrency bucket charges both or neither.
func testConcAtomic(t *testing.T, s bucket.Store) {
	now := epoch
	conc := concurrency(2)
	rate := bucket.Limit{Count: 60, Window: time.Minute, Burst: 3}

	// The concurrency bucket full: the rate bucket is not charged, neither
	// at once nor as a reservation within maxWait.
	fillConc(t, s, now, "atomc/c1", conc, 2)
	for _, maxWait := range []time.Duration{0, time.Minute} {
		d, st := reserve(t, s, now, maxWait, charge("atomc/r1", rate, 1), charge("atomc/c1", conc, 1))
		if d.Allowed || d.Limiting != 1 {
			t.Fatalf("full concurrency, maxWait %s: %+v, want refused by bucket 1", maxWait, d)
		}
		if st[0].Remaining != 3 || st[0].ResetAfter != 0 {
			t.Fatalf("full concurrency, maxWait %s: the rate bucket was charged: %+v", maxWait, st[0])
		}
	}
	if st := peek(t, s, now, charge("atomc/r1", rate, 1)); st[0].Remaining != 3 || st[0].ResetAfter != 0 {
		t.Fatalf("peek after refusals: rate bucket %+v, want untouched", st[0])
	}

	// The rate bucket empty: the concurrency bucket is not charged.
	for i := 0; i < 3; i++ {
		if d, _ := reserve(t, s, now, 0, charge("atomc/r2", rate, 1)); !d.Allowed {
			t.Fatalf("rate unit %d refused", i)
		}
	}
	for i := 0; i < 3; i++ {
		d, st := reserve(t, s, now, 0, charge("atomc/c2", conc, 1), charge("atomc/r2", rate, 1))
		if d.Allowed || d.Limiting != 1 || d.Delay != time.Second {
			t.Fatalf("empty rate bucket, try %d: %+v, want refused by bucket 1 for 1s", i, d)
		}
		if st[0].Remaining != 2 {
			t.Fatalf("empty rate bucket, try %d: concurrency charged: %+v", i, st[0])
		}
	}
	if st := peek(t, s, now, charge("atomc/c2", conc, 1)); st[0].Remaining != 2 {
		t.Fatalf("peek after refusals: concurrency bucket %+v, want 2 free", st[0])
	}
	// Both charges still fit 2 of 2 once the rate bucket allows them: the
	// refusals above really charged nothing.
	now = now.Add(5 * time.Second) // the rate bucket is full again
	for i := 0; i < 2; i++ {
		d, _ := reserve(t, s, now, 0, charge("atomc/c2", conc, 1), charge("atomc/r2", rate, 1))
		if !d.Allowed {
			t.Fatalf("after the rate bucket refilled, request %d refused: %+v", i, d)
		}
	}

	// Both with room, the rate one by a reservation within maxWait (2 units
	// where 1 is left: 1s): both are charged, and the concurrency unit is
	// held at once.
	d, st := reserve(t, s, now, 10*time.Second, charge("atomc/c3", conc, 1), charge("atomc/r2", rate, 2))
	if !d.Allowed || d.Delay != time.Second || d.Limiting != 1 {
		t.Fatalf("reservation: %+v, want allowed after 1s set by bucket 1", d)
	}
	if st[0].Remaining != 1 {
		t.Fatalf("reservation: concurrency state %+v, want 1 free", st[0])
	}
}

// testConcRelease checks that Adjust with a negative cost frees the slots.
func testConcRelease(t *testing.T, s bucket.Store) {
	now := epoch
	l := concurrency(3)
	fillConc(t, s, now, "rel", l, 3)
	adjust(t, s, now, charge("rel", l, -1))
	if st := peek(t, s, now, charge("rel", l, 1)); st[0].Remaining != 1 {
		t.Fatalf("after releasing 1: %+v, want 1 free", st[0])
	}
	if d, _ := reserve(t, s, now, 0, charge("rel", l, 1)); !d.Allowed {
		t.Fatalf("freed slot refused: %+v", d)
	}
	if d, _ := reserve(t, s, now, 0, charge("rel", l, 1)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("beyond the freed slot: %+v, want refused", d)
	}
	// A release may come later than the charge, and with a larger cost.
	adjust(t, s, now.Add(time.Minute), charge("rel", l, -2))
	if d, _ := reserve(t, s, now.Add(time.Minute), 0, charge("rel", l, 2)); !d.Allowed {
		t.Fatalf("2 freed slots refused: %+v", d)
	}
	// A positive Adjust holds more, without any check.
	adjust(t, s, now.Add(time.Minute), charge("rel", l, 2))
	if st := peek(t, s, now.Add(time.Minute), charge("rel", l, 1)); st[0].Remaining != 0 {
		t.Fatalf("after holding 2 beyond the count: %+v, want remaining 0", st[0])
	}
	adjust(t, s, now.Add(time.Minute), charge("rel", l, -2))
	if d, _ := reserve(t, s, now.Add(time.Minute), 0, charge("rel", l, 1)); d.Allowed {
		t.Fatalf("full again after giving back the excess, but admitted: %+v", d)
	}
	// Everything given back: the bucket is as new.
	adjust(t, s, now.Add(time.Minute), charge("rel", l, -3))
	if st := peek(t, s, now.Add(time.Minute), charge("rel", l, 1)); st[0].Remaining != 3 {
		t.Fatalf("after releasing all: %+v, want 3 free", st[0])
	}
}

// testConcOverRelease checks that giving back more than is held leaves the
// bucket empty, not in credit.
func testConcOverRelease(t *testing.T, s bucket.Store) {
	now := epoch
	l := concurrency(3)
	fillConc(t, s, now, "over", l, 2)
	adjust(t, s, now, charge("over", l, -5))
	if st := peek(t, s, now, charge("over", l, 1)); st[0].Remaining != 3 {
		t.Fatalf("after over-release: %+v, want remaining 3", st[0])
	}
	fillConc(t, s, now, "over", l, 3)
	if d, _ := reserve(t, s, now, time.Hour, charge("over", l, 1)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("over-release gave credit: a fourth unit of 3 admitted: %+v", d)
	}
	// A double release of the same unit does not either.
	adjust(t, s, now, charge("over", l, -1))
	adjust(t, s, now, charge("over", l, -1))
	adjust(t, s, now, charge("over", l, -1))
	adjust(t, s, now, charge("over", l, -1))
	fillConc(t, s, now, "over", l, 3)
	if d, _ := reserve(t, s, now, 0, charge("over", l, 1)); d.Allowed {
		t.Fatalf("double release gave credit: %+v", d)
	}
	// A release of a bucket never charged changes nothing.
	adjust(t, s, now, charge("over/fresh", l, -10))
	fillConc(t, s, now, "over/fresh", l, 3)
	if d, _ := reserve(t, s, now, 0, charge("over/fresh", l, 1)); d.Allowed {
		t.Fatalf("release of a fresh bucket gave credit: %+v", d)
	}
	// An over-release within a call that also releases a rate bucket.
	rate := bucket.Limit{Count: 60, Window: time.Minute}
	adjust(t, s, now, charge("over/fresh", l, -100), charge("over/rate", rate, -100))
	fillConc(t, s, now, "over/fresh", l, 3)
	if d, _ := reserve(t, s, now, 0, charge("over/fresh", l, 1)); d.Allowed {
		t.Fatalf("mixed over-release gave credit: %+v", d)
	}
}

// testConcOversize checks a charge larger than the count: admitted only on an
// empty bucket, which then refuses everything until it is given back.
func testConcOversize(t *testing.T, s bucket.Store) {
	now := epoch
	l := concurrency(3)
	d, st := reserve(t, s, now, 0, charge("ovs", l, 5))
	if !d.Allowed || d.Delay != 0 {
		t.Fatalf("oversize on an empty bucket: %+v, want admitted at once", d)
	}
	if st[0].Remaining != 0 || st[0].ResetAfter != 0 {
		t.Fatalf("after oversize: %+v, want remaining 0, reset 0", st[0])
	}
	for _, cost := range []int64{1, 3, 5} {
		if d, _ := reserve(t, s, now, time.Hour, charge("ovs", l, cost)); d.Allowed || d.Limiting != 0 {
			t.Fatalf("charge of %d over an oversize hold: %+v, want refused by bucket 0", cost, d)
		}
	}
	// A zero-cost charge only reports the state, as on a rate bucket in
	// debt: an oversize hold does not refuse it.
	if d, st := reserve(t, s, now, 0, charge("ovs", l, 0)); !d.Allowed || st[0] != (bucket.State{}) {
		t.Fatalf("zero-cost charge over an oversize hold: %+v %+v, want allowed, remaining 0", d, st[0])
	}
	adjust(t, s, now, charge("ovs", l, -5))
	if d, _ := reserve(t, s, now, 0, charge("ovs", l, 5)); !d.Allowed {
		t.Fatalf("oversize after release refused: %+v", d)
	}
	adjust(t, s, now, charge("ovs", l, -5))

	// Not empty: an oversize charge is refused, even with a single unit held.
	fillConc(t, s, now, "ovs", l, 1)
	if d, _ := reserve(t, s, now, time.Hour, charge("ovs", l, 4)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("oversize on a bucket holding 1: %+v, want refused by bucket 0", d)
	}
	if st := peek(t, s, now, charge("ovs", l, 1)); st[0].Remaining != 2 {
		t.Fatalf("a refused oversize charged the bucket: %+v, want 2 free", st[0])
	}
	adjust(t, s, now, charge("ovs", l, -1))
	if d, _ := reserve(t, s, now, 0, charge("ovs", l, 4)); !d.Allowed {
		t.Fatalf("oversize on an emptied bucket refused: %+v", d)
	}
}

// testConcStates checks Remaining = Count − held and ResetAfter = 0, from
// Reserve (admitted and refused) and Peek, at any time.
func testConcStates(t *testing.T, s bucket.Store) {
	now := epoch
	l := concurrency(5)
	if st := peek(t, s, now, charge("st", l, 1)); st[0] != (bucket.State{Remaining: 5}) {
		t.Fatalf("fresh: %+v, want remaining 5, reset 0", st[0])
	}
	for held := int64(1); held <= 5; held++ {
		_, st := reserve(t, s, now, 0, charge("st", l, 1))
		if want := (bucket.State{Remaining: 5 - held}); st[0] != want {
			t.Fatalf("holding %d: reserve state %+v, want %+v", held, st[0], want)
		}
		// Time does not change a concurrency bucket's state.
		now = now.Add(time.Hour)
		if st := peek(t, s, now, charge("st", l, 1)); st[0].Remaining != 5-held || st[0].ResetAfter != 0 {
			t.Fatalf("holding %d, an hour later: peek %+v, want remaining %d, reset 0", held, st[0], 5-held)
		}
	}
	_, st := reserve(t, s, now, 0, charge("st", l, 1))
	if st[0] != (bucket.State{}) {
		t.Fatalf("refused at the count: %+v, want remaining 0, reset 0", st[0])
	}
	// A call mixing kinds reports each with its own meaning, and a nil
	// states slice is accepted.
	rate := bucket.Limit{Count: 60, Window: time.Minute, Burst: 10}
	adjust(t, s, now, charge("st", l, -2))
	_, st = reserve(t, s, now, 0, charge("st/rate", rate, 4), charge("st", l, 1))
	if st[0].Remaining != 6 || st[0].ResetAfter != 4*time.Second || st[1] != (bucket.State{Remaining: 1}) {
		t.Fatalf("mixed call: %+v, want rate {6 4s} and concurrency {1 0}", st)
	}
	if _, err := s.Reserve(context.Background(), now, []bucket.Charge{charge("st", l, 1)}, 0, nil); err != nil {
		t.Fatalf("Reserve with nil states: %v", err)
	}
	if st := peek(t, s, now, charge("st/rate", rate, 1), charge("st", l, 1)); st[1] != (bucket.State{}) {
		t.Fatalf("mixed peek: %+v, want concurrency {0 0}", st)
	}
}

// testConcRescale checks that a changed count keeps what is held.
func testConcRescale(t *testing.T, s bucket.Store) {
	now := epoch
	fillConc(t, s, now, "crs", concurrency(5), 3)
	// Tighter: 3 held of 2.
	tight := concurrency(2)
	if st := peek(t, s, now, charge("crs", tight, 1)); st[0] != (bucket.State{}) {
		t.Fatalf("tighter: %+v, want remaining 0", st[0])
	}
	if d, _ := reserve(t, s, now, time.Hour, charge("crs", tight, 1)); d.Allowed || d.Limiting != 0 {
		t.Fatalf("tighter: %+v, want refused", d)
	}
	adjust(t, s, now, charge("crs", tight, -2))
	if st := peek(t, s, now, charge("crs", tight, 1)); st[0].Remaining != 1 {
		t.Fatalf("tighter after releasing 2: %+v, want 1 free", st[0])
	}
	// Looser: 1 held of 10.
	loose := concurrency(10)
	if st := peek(t, s, now, charge("crs", loose, 1)); st[0].Remaining != 9 {
		t.Fatalf("looser: %+v, want 9 free", st[0])
	}
	fillConc(t, s, now, "crs", loose, 9)
	if d, _ := reserve(t, s, now, 0, charge("crs", loose, 1)); d.Allowed {
		t.Fatalf("looser: admitted an eleventh unit: %+v", d)
	}
	// And back at the original count, with a release under it.
	adjust(t, s, now, charge("crs", concurrency(5), -10))
	if st := peek(t, s, now, charge("crs", concurrency(5), 1)); st[0].Remaining != 5 {
		t.Fatalf("after releasing all: %+v, want 5 free", st[0])
	}
}

// testConcDeletePrefix checks that a concurrency bucket survives the
// deletion of another rule's buckets and goes with its own.
func testConcDeletePrefix(t *testing.T, s bucket.Store) {
	now := epoch
	l := concurrency(2)
	rate := bucket.Limit{Count: 5, Window: time.Minute}
	fillConc(t, s, now, "rule-c\x1fx", l, 2)
	fillConc(t, s, now, "rule-cd\x1fx", l, 2)
	reserve(t, s, now, 0, charge("rule-d\x1fx", rate, 5))
	reserve(t, s, now, 0, charge("rule-c\x1fy", rate, 5))

	n, err := s.DeletePrefix(context.Background(), []byte("rule-d\x1f"))
	if err != nil || n != 1 {
		t.Fatalf("DeletePrefix(rule-d) = %d, %v; want 1", n, err)
	}
	if st := peek(t, s, now, charge("rule-c\x1fx", l, 1), charge("rule-cd\x1fx", l, 1)); st[0].Remaining != 0 || st[1].Remaining != 0 {
		t.Fatalf("another rule's deletion touched the concurrency buckets: %+v", st)
	}
	if d, _ := reserve(t, s, now, 0, charge("rule-c\x1fx", l, 1)); d.Allowed {
		t.Fatal("another rule's deletion freed a concurrency slot")
	}

	n, err = s.DeletePrefix(context.Background(), []byte("rule-c\x1f"))
	if err != nil || n != 2 {
		t.Fatalf("DeletePrefix(rule-c) = %d, %v; want 2 (one concurrency, one rate)", n, err)
	}
	st := peek(t, s, now, charge("rule-c\x1fx", l, 1), charge("rule-cd\x1fx", l, 1))
	if st[0].Remaining != 2 || st[1].Remaining != 0 {
		t.Fatalf("after DeletePrefix(rule-c): %+v, want rule-c freed and rule-cd kept", st)
	}
	fillConc(t, s, now, "rule-c\x1fx", l, 2)
	if d, _ := reserve(t, s, now, 0, charge("rule-c\x1fx", l, 1)); d.Allowed {
		t.Fatal("a recreated concurrency bucket admitted beyond its count")
	}
}

// testConcRace races goroutines for one concurrency bucket: exactly Count
// units are admitted, and after every admitted unit is released concurrently
// the bucket is empty.
func testConcRace(t *testing.T, s bucket.Store) {
	const count = 50
	l := concurrency(count)
	other := bucket.Limit{Count: 1_000_000, Window: time.Minute}
	admitted := raceReserve(t, s, 25, time.Minute, func(g int) []bucket.Charge {
		return []bucket.Charge{charge(fmt.Sprintf("cr/own/%d", g), other, 1), charge("cr/shared", l, 1)}
	}, func(d bucket.Decision) {
		if d.Limiting != 1 {
			t.Errorf("refused with limiting %d, want 1", d.Limiting)
		}
	})
	if admitted != count {
		t.Fatalf("admitted %d, want exactly %d", admitted, count)
	}
	var wg sync.WaitGroup
	for g := 0; g < count; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cs := []bucket.Charge{charge("cr/shared", l, -1)}
			if err := s.Adjust(context.Background(), epoch, cs); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if st := peek(t, s, epoch, charge("cr/shared", l, 1)); st[0].Remaining != count {
		t.Fatalf("after releasing all: %+v, want %d free", st[0], count)
	}
}

// testConcAfterRate checks a key whose limit changes from a rate limit to a
// concurrency limit, as a reload that turns a rule's "N per minute" into
// "N at once" does when the bucket key stays the same. Whether a store keeps
// the rate level or starts afresh, a rate bucket that has drained completely
// holds nothing, so the concurrency limit must admit its whole count.
func testConcAfterRate(t *testing.T, s bucket.Store) {
	now := epoch
	rate := bucket.Limit{Count: 10, Window: time.Minute}
	if d, _ := reserve(t, s, now, 0, charge("kind", rate, 1)); !d.Allowed {
		t.Fatalf("rate charge refused: %+v", d)
	}
	later := now.Add(time.Hour) // the rate bucket is full again
	l := concurrency(3)
	if st := peek(t, s, later, charge("kind", l, 1)); st[0] != (bucket.State{Remaining: 3}) {
		t.Errorf("drained rate bucket read as a concurrency bucket: %+v, want remaining 3, reset 0", st[0])
	}
	for i := 0; i < 3; i++ {
		if d, _ := reserve(t, s, later, 0, charge("kind", l, 1)); !d.Allowed {
			t.Fatalf("drained rate bucket read as a concurrency bucket: unit %d of 3 refused: %+v", i+1, d)
		}
	}
	if d, _ := reserve(t, s, later, 0, charge("kind", l, 1)); d.Allowed {
		t.Fatalf("fourth unit of 3 admitted: %+v", d)
	}
}
