package bucket

import "time"

// Level is a stored bucket as Store.Scan reports it: how full it is at the
// scan's time, under the limit it was last charged with. Stores keep a
// bucket's count and window but not the limit's burst, so a level is read
// against the limit the caller knows applies, with Under.
type Level struct {
	// Count and Window are the limit the bucket was last charged under. A
	// zero Window is a concurrency bucket.
	Count  int64
	Window time.Duration
	// Backlog is, for a rate bucket, how many nanoseconds it needs to be
	// full again; for a concurrency bucket, how many units it holds.
	Backlog int64
}

// Under reports the bucket as Peek would under limit l: its state, and how
// many units it has taken (a rate bucket's units not yet drained, more than
// its capacity when it is in debt; a concurrency bucket's units held,
// which may exceed a count lowered since they were taken). A level of the
// other kind of limit means nothing under l, as for the stores: the bucket
// is full (or holds nothing).
func (lv Level) Under(l Limit) (st State, used int64) {
	if l.Concurrent() {
		if lv.Window != 0 {
			return concurrentState(0, l), 0
		}
		return concurrentState(lv.Backlog, l), lv.Backlog
	}
	if lv.Window == 0 {
		return stateOf(0, 0, l.tolerance(), l), 0
	}
	b := max(lv.Backlog, 0)
	if lv.Count > 0 && (lv.Count != l.Count || lv.Window != l.Window) {
		b = rescale(b, Limit{Count: lv.Count, Window: lv.Window}, l)
	}
	st = stateOf(0, b, l.tolerance(), l)
	if b > 0 {
		// The smallest number of units whose span covers the backlog.
		used = l.unitsWithin(b-1) + 1
	}
	return st, used
}
