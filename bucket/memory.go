package bucket

import (
	"bytes"
	"context"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// memoryShards is the number of independently locked parts of a MemoryStore.
// A request locks only the shards its buckets live in, so unrelated requests
// rarely contend; 64 is plenty for the cores a Caddy usually has.
const memoryShards = 64

// MemoryStore keeps bucket states in process memory. It is the default store.
//
// Each bucket costs one map entry with three integers, whatever its limit, and
// a bucket that has drained completely is indistinguishable from one that was
// never used, so Sweep drops it.
type MemoryStore struct {
	seed maphash.Seed
	// latest is the latest time, in Unix nanoseconds, any call has passed.
	// Calls use max(now, latest), so that the store's clock never runs
	// backwards: a caller with a stale timestamp sees the bucket as it is at
	// the latest known instant, never as it was earlier.
	latest atomic.Int64
	shards [memoryShards]memoryShard
}

type memoryShard struct {
	mu      sync.Mutex
	buckets map[string]*memoryBucket
}

// memoryBucket is a bucket's whole state.
type memoryBucket struct {
	// tat is the theoretical arrival time in Unix nanoseconds: when the
	// bucket will be full again.
	tat int64
	// count and window are the limit tat was computed under, so that a
	// changed limit can be applied to the existing level (see rescale).
	count  int64
	window time.Duration
}

// NewMemoryStore returns an empty in-memory store.
func NewMemoryStore() *MemoryStore {
	s := &MemoryStore{seed: maphash.MakeSeed()}
	for i := range s.shards {
		s.shards[i].buckets = make(map[string]*memoryBucket)
	}
	return s
}

var _ Store = (*MemoryStore)(nil)

// clock returns now as Unix nanoseconds, never earlier than a time an earlier
// call passed.
func (s *MemoryStore) clock(now time.Time) int64 {
	t := now.UnixNano()
	for {
		latest := s.latest.Load()
		if t <= latest {
			return latest
		}
		if s.latest.CompareAndSwap(latest, t) {
			return t
		}
	}
}

// lockSet is the set of shards one call holds, locked in ascending order so
// that two calls can never deadlock. It lives on the stack for up to eight
// buckets, which keeps the admission path free of allocations.
type lockSet struct {
	idx [8]uint8
	n   int
	ext []uint8
}

func (ls *lockSet) add(i uint8) {
	list := ls.list()
	for _, j := range list {
		if j == i {
			return
		}
	}
	if ls.ext == nil && ls.n < len(ls.idx) {
		// Insertion sort: the set is tiny.
		k := ls.n
		for k > 0 && ls.idx[k-1] > i {
			ls.idx[k] = ls.idx[k-1]
			k--
		}
		ls.idx[k] = i
		ls.n++
		return
	}
	if ls.ext == nil {
		ls.ext = append(make([]uint8, 0, 2*len(ls.idx)), ls.idx[:ls.n]...)
	}
	k := len(ls.ext)
	ls.ext = append(ls.ext, i)
	for k > 0 && ls.ext[k-1] > i {
		ls.ext[k] = ls.ext[k-1]
		k--
	}
	ls.ext[k] = i
}

func (ls *lockSet) list() []uint8 {
	if ls.ext != nil {
		return ls.ext
	}
	return ls.idx[:ls.n]
}

func (s *MemoryStore) shardOf(key []byte) uint8 {
	return uint8(maphash.Bytes(s.seed, key) % memoryShards)
}

func (s *MemoryStore) lock(charges []Charge) lockSet {
	var ls lockSet
	for i := range charges {
		ls.add(s.shardOf(charges[i].Key))
	}
	for _, i := range ls.list() {
		s.shards[i].mu.Lock()
	}
	return ls
}

func (s *MemoryStore) unlock(ls *lockSet) {
	for _, i := range ls.list() {
		s.shards[i].mu.Unlock()
	}
}

// load returns the bucket's TAT under c.Limit, rescaled if the bucket was last
// charged under another limit, and the stored bucket (nil if absent). The
// caller holds the shard's lock.
func (s *MemoryStore) load(now int64, c *Charge) (int64, *memoryBucket) {
	b := s.shards[s.shardOf(c.Key)].buckets[string(c.Key)]
	if b == nil {
		return now, nil
	}
	if b.count != c.Limit.Count || b.window != c.Limit.Window {
		b.tat = now + rescale(b.tat-now, Limit{Count: b.count, Window: b.window}, c.Limit)
		b.count, b.window = c.Limit.Count, c.Limit.Window
	}
	return b.tat, b
}

// store writes a bucket's new TAT, creating the bucket if needed. A TAT at or
// before now means the bucket is full, which is the same as no bucket at all,
// so nothing is created for it.
func (s *MemoryStore) store(now int64, c *Charge, b *memoryBucket, tat int64) {
	if b != nil {
		b.tat = tat
		return
	}
	if tat <= now {
		return
	}
	s.shards[s.shardOf(c.Key)].buckets[string(c.Key)] = &memoryBucket{tat: tat, count: c.Limit.Count, window: c.Limit.Window}
}

// Reserve implements Store.
//
// For each bucket, the charge moves the TAT to max(tat, now) + span(cost),
// and it conforms once the new TAT is within the bucket's tolerance of the
// clock: the wait is newTAT − tolerance − now. The request waits for its
// slowest bucket. If that wait is within maxWait every bucket is charged,
// otherwise none is.
//
// A charge larger than the whole capacity could never conform this way; it
// conforms instead once the bucket is full, and leaves the bucket in debt.
//
// Stale timestamps cannot over-admit, for two reasons. The store's clock
// never runs backwards (see clock), so a stale time is read as the latest one.
// And even on its own, the algorithm is safe: every admission moves some TAT forward
// by its span from max(tat, now) ≥ now, and is only granted while the new TAT
// is at most now + tolerance (+ maxWait for a reservation, which the caller
// then waits out). So over any set of calls, whatever order their times come
// in, the units admitted into a bucket are bounded by
// (latest now − earliest now + tolerance + maxWait) / interval: a caller that
// passes an old time only sees the bucket as fuller than it is. This is the
// property golang/go#71360 shows x/time/rate lacks; the stale-time test
// checks it on random schedules.
func (s *MemoryStore) Reserve(_ context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error) {
	t := s.clock(now)
	ls := s.lock(charges)
	defer s.unlock(&ls)

	d := Decision{Limiting: -1}
	var wait int64
	for i := range charges {
		c := &charges[i]
		tat, _ := s.load(t, c)
		w := conformsAfter(t, tat, c)
		if w > wait {
			wait, d.Limiting = w, i
		}
	}
	d.Delay = time.Duration(wait)
	d.Allowed = wait <= int64(maxWait)
	for i := range charges {
		c := &charges[i]
		tat, b := s.load(t, c)
		if d.Allowed {
			tat = max(tat, t) + c.Limit.span(c.Cost)
			s.store(t, c, b, tat)
		}
		if states != nil {
			states[i] = stateOf(t, tat, c.Limit)
		}
	}
	return d, nil
}

// conformsAfter returns how long after now the charge c conforms on a bucket
// whose TAT is tat.
func conformsAfter(now, tat int64, c *Charge) int64 {
	base := max(tat, now)
	tol := c.Limit.tolerance()
	sp := c.Limit.span(c.Cost)
	if sp > tol {
		// Larger than the capacity: admit when the bucket is full.
		sp = tol
	}
	return max(base+sp-tol-now, 0)
}

// stateOf reports a bucket's remaining units and time to full.
func stateOf(now, tat int64, l Limit) State {
	tol := l.tolerance()
	st := State{ResetAfter: time.Duration(max(tat-now, 0))}
	st.Remaining = min(l.unitsWithin(now+tol-max(tat, now)), l.Capacity())
	return st
}

// Adjust implements Store.
func (s *MemoryStore) Adjust(_ context.Context, now time.Time, charges []Charge) error {
	t := s.clock(now)
	ls := s.lock(charges)
	defer s.unlock(&ls)
	for i := range charges {
		c := &charges[i]
		tat, b := s.load(t, c)
		switch {
		case c.Cost > 0:
			tat = max(tat, t) + c.Limit.span(c.Cost)
		case c.Cost < 0:
			// A refund cannot fill the bucket beyond full.
			tat = max(tat-c.Limit.span(-c.Cost), t)
		}
		s.store(t, c, b, tat)
	}
	return nil
}

// Peek implements Store.
func (s *MemoryStore) Peek(_ context.Context, now time.Time, charges []Charge, states []State) error {
	t := s.clock(now)
	ls := s.lock(charges)
	defer s.unlock(&ls)
	for i := range charges {
		tat, _ := s.load(t, &charges[i])
		states[i] = stateOf(t, tat, charges[i].Limit)
	}
	return nil
}

// DeletePrefix implements Store.
func (s *MemoryStore) DeletePrefix(_ context.Context, prefix []byte) (int, error) {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for k := range sh.buckets {
			if bytes.HasPrefix([]byte(k), prefix) {
				delete(sh.buckets, k)
				n++
			}
		}
		sh.mu.Unlock()
	}
	return n, nil
}

// Sweep drops every bucket that is full at now, and returns how many it
// dropped. Dropping a full bucket changes no decision, so it is safe at any
// time; the module runs it periodically so that idle keys do not accumulate.
func (s *MemoryStore) Sweep(now time.Time) int {
	t := s.clock(now)
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		for k, b := range sh.buckets {
			if b.tat <= t {
				delete(sh.buckets, k)
				n++
			}
		}
		sh.mu.Unlock()
	}
	return n
}

// Len returns how many buckets the store holds.
func (s *MemoryStore) Len() int {
	n := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		n += len(sh.buckets)
		sh.mu.Unlock()
	}
	return n
}
