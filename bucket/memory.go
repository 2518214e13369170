package bucket

import (
	"bytes"
	"context"
	"hash/maphash"
	"strings"
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
	// epoch is a reference instant (the store's creation) from which times
	// are measured; see clock.
	epoch time.Time
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
	// bucket will be full again. For a concurrency limit it is instead the
	// number of units held.
	tat int64
	// count and window are the limit tat was computed under, so that a
	// changed limit can be applied to the existing level (see rescale).
	count  int64
	window time.Duration
}

// NewMemoryStore returns an empty in-memory store.
func NewMemoryStore() *MemoryStore {
	s := &MemoryStore{seed: maphash.MakeSeed(), epoch: time.Now()}
	for i := range s.shards {
		s.shards[i].buckets = make(map[string]*memoryBucket)
	}
	return s
}

var _ Store = (*MemoryStore)(nil)

// clock returns now as Unix nanoseconds, never earlier than a time an earlier
// call passed.
func (s *MemoryStore) clock(now time.Time) int64 {
	// Through the store's epoch, so that times carrying Go's monotonic
	// clock reading (time.Now) measure elapsed time with it: a step of the
	// wall clock then neither freezes nor floods a bucket.
	t := s.epoch.UnixNano() + int64(now.Sub(s.epoch))
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

// call is one call's view of its buckets: the shard of each charge, the
// shards it holds locked (in ascending order, so that two calls can never
// deadlock), and each charge's bucket as loaded. Up to eight charges it lives
// on the stack, which keeps the admission path free of allocations.
//
// A key given twice in one call is one bucket: slot names, for each charge,
// the first charge with its key, and every charge works on that charge's
// bucket reference, so that a bucket the first charge creates is the one the
// second charges (RedisStore's script does the same).
type call struct {
	s       *MemoryStore
	now     int64
	n       int
	shard   [8]uint8
	slot    [8]uint8
	bucket  [8]*memoryBucket
	locked  [8]uint8
	nlocked int
	// For calls with more than eight charges.
	shardExt  []uint8
	slotExt   []int
	bucketExt []*memoryBucket
	lockedExt []uint8
}

// begin locks the shards of charges and loads their buckets.
func (s *MemoryStore) begin(c *call, now time.Time, charges []Charge) {
	c.s, c.now, c.n = s, s.clock(now), len(charges)
	if len(charges) > len(c.shard) {
		c.shardExt = make([]uint8, len(charges))
		c.slotExt = make([]int, len(charges))
		c.bucketExt = make([]*memoryBucket, len(charges))
		c.lockedExt = make([]uint8, 0, len(charges))
	}
	for i := range charges {
		sh := uint8(maphash.Bytes(s.seed, charges[i].Key) % memoryShards)
		// The keys of a call are distinct in practice (the module's keys
		// name their rule and unit), and there are a few of them: a scan
		// of the earlier ones, which compares keys only in the same shard
		// (an equal key hashes alike), costs a byte compare a charge.
		slot := i
		for j := range i {
			if c.shardOf(j) == &s.shards[sh] && bytes.Equal(charges[j].Key, charges[i].Key) {
				slot = j
				break
			}
		}
		if c.shardExt != nil {
			c.shardExt[i], c.slotExt[i] = sh, slot
			c.lockedExt = insertSorted(c.lockedExt, sh)
		} else {
			c.shard[i], c.slot[i] = sh, uint8(slot)
			c.nlocked = len(insertSorted(c.locked[:c.nlocked], sh))
		}
	}
	for _, sh := range c.lockedShards() {
		s.shards[sh].mu.Lock()
	}
	for i := range charges {
		c.load(i, &charges[i])
	}
}

// insertSorted adds v to the ascending set list, if it is not there yet. The
// set is tiny, so a linear scan is the fastest way.
func insertSorted(list []uint8, v uint8) []uint8 {
	k := 0
	for k < len(list) && list[k] < v {
		k++
	}
	if k < len(list) && list[k] == v {
		return list
	}
	list = append(list, 0)
	copy(list[k+1:], list[k:])
	list[k] = v
	return list
}

func (c *call) end() {
	for _, sh := range c.lockedShards() {
		c.s.shards[sh].mu.Unlock()
	}
}

func (c *call) lockedShards() []uint8 {
	if c.lockedExt != nil {
		return c.lockedExt
	}
	return c.locked[:c.nlocked]
}

func (c *call) shardOf(i int) *memoryShard {
	if c.shardExt != nil {
		return &c.s.shards[c.shardExt[i]]
	}
	return &c.s.shards[c.shard[i]]
}

func (c *call) bucketRef(i int) **memoryBucket {
	if c.bucketExt != nil {
		return &c.bucketExt[c.slotExt[i]]
	}
	return &c.bucket[c.slot[i]]
}

// load finds charge i's bucket, rescaled to the charge's limit if it was
// last charged under another one.
func (c *call) load(i int, ch *Charge) {
	b := c.shardOf(i).buckets[string(ch.Key)]
	if b != nil && (b.window == 0) != ch.Limit.Concurrent() {
		// The key was last used under the other kind of limit, whose state
		// means nothing to this one: it starts empty (a rate bucket full, a
		// concurrency bucket holding nothing).
		b.tat, b.count, b.window = 0, ch.Limit.Count, ch.Limit.Window
		if !ch.Limit.Concurrent() {
			b.tat = c.now
		}
	}
	if b != nil && ch.Limit.Concurrent() {
		// What is held stays held, whatever the new limit says.
		b.count = ch.Limit.Count
	} else if b != nil && (b.count != ch.Limit.Count || b.window != ch.Limit.Window) {
		b.tat = c.now + rescale(b.tat-c.now, Limit{Count: b.count, Window: b.window}, ch.Limit)
		b.count, b.window = ch.Limit.Count, ch.Limit.Window
	}
	*c.bucketRef(i) = b
}

// tat returns charge i's theoretical arrival time; an absent bucket is full.
func (c *call) tat(i int) int64 {
	if b := *c.bucketRef(i); b != nil {
		return b.tat
	}
	return c.now
}

// held returns the units held in charge i's concurrency bucket.
func (c *call) held(i int) int64 {
	if b := *c.bucketRef(i); b != nil {
		return b.tat
	}
	return 0
}

// setHeld writes the units held in charge i's concurrency bucket. A bucket
// that holds nothing is dropped, like a full rate bucket.
func (c *call) setHeld(i int, ch *Charge, n int64) {
	ref := c.bucketRef(i)
	switch {
	case n <= 0 && *ref != nil:
		delete(c.shardOf(i).buckets, string(ch.Key))
		*ref = nil
	case n <= 0:
	case *ref != nil:
		(*ref).tat = n
	default:
		*ref = &memoryBucket{tat: n, count: ch.Limit.Count}
		c.shardOf(i).buckets[string(ch.Key)] = *ref
	}
}

// concurrentState reports a concurrency bucket's free units.
func concurrentState(held int64, l Limit) State {
	return State{Remaining: max(l.Count-held, 0)}
}

// setTAT writes charge i's new TAT, creating the bucket if needed. A TAT at
// or before now means the bucket is full, which is the same as no bucket at
// all, so nothing is created for it.
func (c *call) setTAT(i int, ch *Charge, tat int64) {
	ref := c.bucketRef(i)
	if *ref != nil {
		(*ref).tat = tat
		return
	}
	if tat <= c.now {
		return
	}
	*ref = &memoryBucket{tat: tat, count: ch.Limit.Count, window: ch.Limit.Window}
	c.shardOf(i).buckets[string(ch.Key)] = *ref
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
// A concurrency limit admits a charge while what it holds plus the charge is
// within its count (or, for a charge larger than the count, while it holds
// nothing). When one is full the request is refused whatever maxWait says,
// since no time can be predicted for a release, and Limiting names it.
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
	var c call
	s.begin(&c, now, charges)
	defer c.end()

	// Each charge's span and tolerance cost a division each; work them out
	// once. Up to eight charges this stays on the stack.
	var spanBuf, tolBuf [8]int64
	spans, tols := spanBuf[:0], tolBuf[:0]
	if len(charges) > len(spanBuf) {
		spans, tols = make([]int64, 0, len(charges)), make([]int64, 0, len(charges))
	}
	d := Decision{Limiting: -1}
	var wait int64
	full := -1
	for i := range charges {
		l := &charges[i].Limit
		if l.Concurrent() {
			spans, tols = append(spans, 0), append(tols, 0)
			if h := c.held(i); full < 0 && charges[i].Cost > 0 && h > 0 && h+charges[i].Cost > l.Count {
				full = i
			}
			continue
		}
		sp, tol := l.span(charges[i].Cost), l.tolerance()
		spans, tols = append(spans, sp), append(tols, tol)
		if w := conformsAfter(c.now, c.tat(i), sp, tol); w > wait {
			wait, d.Limiting = w, i
		}
	}
	d.Delay = time.Duration(wait)
	d.Allowed = full < 0 && wait <= int64(maxWait)
	if full >= 0 {
		d.Limiting = full
	}
	for i := range charges {
		ch := &charges[i]
		if ch.Limit.Concurrent() {
			h := c.held(i)
			if d.Allowed {
				h += ch.Cost
				c.setHeld(i, ch, h)
			}
			if states != nil {
				states[i] = concurrentState(h, ch.Limit)
			}
			continue
		}
		tat := c.tat(i)
		if d.Allowed {
			tat = advance(tat, c.now, spans[i])
			c.setTAT(i, ch, tat)
		}
		if states != nil {
			states[i] = stateOf(c.now, tat, tols[i], ch.Limit)
		}
	}
	return d, nil
}

// conformsAfter returns how long after now a charge of span sp conforms on a
// bucket whose TAT is tat and whose tolerance is tol.
func conformsAfter(now, tat, sp, tol int64) int64 {
	if sp == 0 {
		// Nothing to charge: a zero-cost charge only reports the state, and
		// a bucket in debt does not refuse it.
		return 0
	}
	base := max(tat, now)
	if sp > tol {
		// Larger than the capacity: admit when the bucket is full.
		sp = tol
	}
	return max(base+sp-tol-now, 0)
}

// advance moves a TAT forward by sp from max(tat, now), saturating at
// maxSpan ahead of now, so that debts piled on debts can never overflow and
// wrap around to a bucket that looks full. Both terms are at most maxSpan
// (a quarter of the int64 range) past now, so the sum itself cannot
// overflow.
func advance(tat, now, sp int64) int64 {
	return min(max(tat, now)+sp, now+maxSpan)
}

// stateOf reports a bucket's remaining units and time to full.
func stateOf(now, tat, tol int64, l Limit) State {
	st := State{ResetAfter: time.Duration(max(tat-now, 0))}
	st.Remaining = min(l.unitsWithin(now+tol-max(tat, now)), l.Capacity())
	return st
}

// Adjust implements Store.
func (s *MemoryStore) Adjust(_ context.Context, now time.Time, charges []Charge) error {
	var c call
	s.begin(&c, now, charges)
	defer c.end()
	for i := range charges {
		ch := &charges[i]
		if ch.Limit.Concurrent() {
			// Giving back more than is held (a release after a reload
			// rescaled nothing, or a double release) cannot go below zero.
			c.setHeld(i, ch, c.held(i)+ch.Cost)
			continue
		}
		tat := c.tat(i)
		switch {
		case ch.Cost > 0:
			tat = advance(tat, c.now, ch.Limit.span(ch.Cost))
		case ch.Cost < 0:
			// A refund cannot fill the bucket beyond full.
			tat = max(tat-ch.Limit.span(-ch.Cost), c.now)
		}
		c.setTAT(i, ch, tat)
	}
	return nil
}

// Peek implements Store.
func (s *MemoryStore) Peek(_ context.Context, now time.Time, charges []Charge, states []State) error {
	var c call
	s.begin(&c, now, charges)
	defer c.end()
	for i := range charges {
		if l := charges[i].Limit; l.Concurrent() {
			states[i] = concurrentState(c.held(i), l)
			continue
		}
		states[i] = stateOf(c.now, c.tat(i), charges[i].Limit.tolerance(), charges[i].Limit)
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

// Scan implements Store. It locks one shard at a time, and calls fn with
// that shard locked: the requests whose buckets live in the shard wait for
// it, as they do for DeletePrefix and Sweep.
func (s *MemoryStore) Scan(_ context.Context, now time.Time, prefix []byte, fn func(key []byte, lv Level) bool) error {
	t := s.clock(now)
	p := string(prefix)
	type found struct {
		key string
		lv  Level
	}
	var batch []found
	for i := range s.shards {
		// Copy the shard's matches under its lock and call fn after: fn
		// (the admin API's formatting) must not hold up the requests that
		// use the shard.
		sh := &s.shards[i]
		batch = batch[:0]
		sh.mu.Lock()
		for k, b := range sh.buckets {
			if !strings.HasPrefix(k, p) {
				continue
			}
			lv := Level{Count: b.count, Window: b.window, Backlog: b.tat}
			if b.window != 0 {
				if b.tat <= t {
					continue // full: the same as no bucket
				}
				lv.Backlog = b.tat - t
			}
			batch = append(batch, found{k, lv})
		}
		sh.mu.Unlock()
		for _, f := range batch {
			if !fn([]byte(f.key), f.lv) {
				return nil
			}
		}
	}
	return nil
}

// Delete implements Store.
func (s *MemoryStore) Delete(_ context.Context, keys [][]byte) (int, error) {
	n := 0
	for _, k := range keys {
		sh := &s.shards[maphash.Bytes(s.seed, k)%memoryShards]
		sh.mu.Lock()
		if _, ok := sh.buckets[string(k)]; ok {
			delete(sh.buckets, string(k))
			n++
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
			// A concurrency bucket (no window) is dropped as soon as it
			// holds nothing, so the ones here are all in use.
			if b.window != 0 && b.tat <= t {
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
