package bucket

import (
	"container/heap"
	"slices"
	"time"
)

// lane is the queue in front of one bucket. Every field is guarded by the
// Queue's mutex.
type lane struct {
	key string
	// limit is the bucket's limit: the first waiter's, or the latest
	// UpdateLimit's.
	limit Limit
	// classes are the priority classes with waiting requests, highest
	// first. There are few: a class per priority value in use.
	classes []*class
	depth   int

	// state is the bucket's state as last observed, at stateAt: what
	// predictions start from.
	state   State
	stateAt time.Time
	// interval estimates, for a concurrency limit, the time between two
	// dispatches (an exponentially weighted mean), from which a refused
	// request's Retry-After is predicted. lastServed is the latest dispatch.
	interval   time.Duration
	lastServed time.Time

	timer       Timer
	dispatching bool
	// again is set when the lane is woken while it dispatches.
	again bool
	// dead is set once the lane left the Queue's map; a timer that fires
	// late finds it and does nothing.
	dead bool
}

// class is one priority class of a lane.
type class struct {
	priority int
	flows    map[string]*flow
	// backlog orders the class's flows by the service they received.
	backlog flowHeap
	// vtime is the class's virtual time: the counter of the flow served
	// last, before its charge. It never exceeds the smallest counter of a
	// waiting flow, and a flow that starts waiting starts from it.
	vtime float64
	// units is the sum of the costs waiting in the class.
	units int64
	// idle keeps the counters of flows that stopped waiting ahead of the
	// virtual time, so that a flow that comes straight back (a client
	// that sends its next request as soon as one is admitted) resumes its
	// counter rather than the virtual time: otherwise it would never be
	// charged for its service. Entries at or behind the virtual time say
	// nothing and are pruned.
	idle map[string]float64
	// seq numbers flows as they start waiting, to break ties between
	// equal counters in order of arrival.
	seq uint64
}

// flow is one subject's waiting requests in a class.
type flow struct {
	key string
	// counter is the service received, in units over weight.
	counter float64
	weight  float64
	waiters []*waiter
	units   int64
	index   int    // in the class's heap
	seq     uint64 // when it started waiting, for ties
}

type flowHeap []*flow

func (h flowHeap) Len() int { return len(h) }
func (h flowHeap) Less(i, j int) bool {
	return h[i].counter < h[j].counter || h[i].counter == h[j].counter && h[i].seq < h[j].seq
}
func (h flowHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].index, h[j].index = i, j
}
func (h *flowHeap) Push(x any) {
	f := x.(*flow)
	f.index = len(*h)
	*h = append(*h, f)
}
func (h *flowHeap) Pop() any {
	old := *h
	f := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	f.index = -1
	return f
}

// observe records the bucket's state.
func (ln *lane) observe(st State, now time.Time) {
	ln.state, ln.stateAt = st, now
}

// class returns the lane's class for a priority, creating it.
func (ln *lane) class(p int) *class {
	i, found := slices.BinarySearchFunc(ln.classes, p, func(c *class, p int) int { return p - c.priority })
	if found {
		return ln.classes[i]
	}
	c := &class{priority: p, flows: make(map[string]*flow), idle: make(map[string]float64)}
	ln.classes = slices.Insert(ln.classes, i, c)
	return c
}

// enqueue adds a waiter to the lane, unless its predicted turn comes after
// its deadline or the lane is full; then it returns the refusal and false.
func (ln *lane) enqueue(q *Queue, w *waiter, now time.Time) (Result, bool) {
	ch := w.charges[w.at]
	if ln.depth == 0 && !ln.dispatching {
		// The first waiter sets the lane's limit. Later ones may carry an
		// older one (a waiter that moved here, or a limit learned since it
		// was matched); a change reaches the lane through UpdateLimit.
		ln.limit = ch.Limit
	}
	c := ln.class(w.priority)
	f := c.flows[w.flowKey]
	if !ln.limit.Concurrent() {
		wait := ln.predict(c, f, w.weight, flowUnits(f), ch.Cost, now)
		w.predicted = now.Sub(w.arrived) + wait
		if now.Add(wait).After(w.deadline) {
			res := Result{Decision: Decision{Delay: wait, Limiting: w.at}, Outcome: Predicted, Waited: now.Sub(w.arrived), Depth: ln.depth}
			ln.dropEmpty(c)
			return res, false
		}
	}
	if pol := w.policies[w.at]; pol.MaxDepth > 0 && ln.depth >= pol.MaxDepth {
		victim := ln.evictable(c, f)
		if victim == nil {
			res := Result{Decision: Decision{Delay: ln.predict(c, f, w.weight, flowUnits(f), ch.Cost, now), Limiting: w.at}, Outcome: QueueFull, Waited: now.Sub(w.arrived), Depth: ln.depth}
			ln.dropEmpty(c)
			return res, false
		}
		res := ln.refusal(victim, QueueFull, now)
		wasPick := ln.pick() == victim
		ln.remove(victim)
		victim.finish(res)
		if wasPick && !ln.dispatching && ln.timer != nil {
			q.arm(ln, now)
		}
		// The victim may have been the last of its class: look again.
		c = ln.class(w.priority)
		f = c.flows[w.flowKey]
	}
	if f == nil {
		c.seq++
		f = &flow{key: w.flowKey, counter: max(c.vtime, c.idle[w.flowKey]), index: -1, seq: c.seq}
		delete(c.idle, w.flowKey)
		c.flows[w.flowKey] = f
	}
	f.weight = w.weight
	f.waiters = append(f.waiters, w)
	f.units += ch.Cost
	c.units += ch.Cost
	if f.index < 0 {
		heap.Push(&c.backlog, f)
	}
	ln.depth++
	w.lane, w.flow, w.state = ln, f, waiterQueued
	return Result{}, true
}

func flowUnits(f *flow) int64 {
	if f == nil {
		return 0
	}
	return f.units
}

// dropEmpty forgets a class that has no waiting request.
func (ln *lane) dropEmpty(c *class) {
	if len(c.backlog) == 0 {
		ln.classes = slices.DeleteFunc(ln.classes, func(x *class) bool { return x == c })
	}
}

// evictable finds the waiter a newcomer of class c and flow f may push out
// of a full lane: the newest of the flow with the most waiting in the lowest
// class, provided that class is lower than the newcomer's, or it is the same
// class and that flow has more waiting than the newcomer's would. So a
// flooder filling the queue cannot lock out anyone else; it loses its own
// newest requests instead. nil means the newcomer is the one turned away.
func (ln *lane) evictable(c *class, f *flow) *waiter {
	low := ln.classes[len(ln.classes)-1]
	if low.priority > c.priority {
		return nil
	}
	var big *flow
	for _, g := range low.backlog {
		if big == nil || len(g.waiters) > len(big.waiters) {
			big = g
		}
	}
	if big == nil {
		return nil
	}
	if low == c && (big == f || len(big.waiters) <= len(flowWaiters(f))+1) {
		return nil
	}
	v := big.waiters[len(big.waiters)-1]
	if v.state != waiterQueued {
		// The dispatcher is trying it: it is the flow's only request.
		return nil
	}
	return v
}

func flowWaiters(f *flow) []*waiter {
	if f == nil {
		return nil
	}
	return f.waiters
}

// pick returns the request to try next: the head of the least-served flow
// of the highest class, or nil when the lane is empty.
func (ln *lane) pick() *waiter {
	for _, c := range ln.classes {
		if len(c.backlog) > 0 {
			return c.backlog[0].waiters[0]
		}
	}
	return nil
}

// served charges the flow of an admitted waiter for its service. It must be
// called before remove.
func (ln *lane) served(w *waiter, now time.Time) {
	f := w.flow
	c := ln.class(w.priority)
	c.vtime = max(c.vtime, f.counter)
	f.counter += float64(w.cost()) / f.weight
	if ln.limit.Concurrent() {
		if !ln.lastServed.IsZero() {
			gap := now.Sub(ln.lastServed)
			if ln.interval == 0 {
				ln.interval = gap
			} else {
				ln.interval += (gap - ln.interval) / 8
			}
		}
		ln.lastServed = now
	}
}

// remove takes a waiter out of the lane.
func (ln *lane) remove(w *waiter) {
	f := w.flow
	c := ln.class(w.priority)
	i := slices.Index(f.waiters, w)
	f.waiters = slices.Delete(f.waiters, i, i+1)
	f.units -= w.cost()
	c.units -= w.cost()
	ln.depth--
	switch {
	case len(f.waiters) == 0:
		// A flow that waits no more leaves the backlog. When it comes back
		// it starts from the virtual time, so a pause earns no credit, or
		// from its own counter if that is still ahead.
		heap.Remove(&c.backlog, f.index)
		delete(c.flows, f.key)
		if f.counter > c.vtime {
			c.idle[f.key] = f.counter
			if bound := 2*len(c.backlog) + 64; len(c.idle) > bound {
				for k, v := range c.idle {
					if v <= c.vtime {
						delete(c.idle, k)
					}
				}
				if len(c.idle) > bound {
					// The virtual time has stalled (many flows served
					// once each): forget them all rather than scan on
					// every removal. The cost is a turn out of order for
					// a flow that comes back.
					clear(c.idle)
				}
			}
		}
		ln.dropEmpty(c)
	default:
		heap.Fix(&c.backlog, f.index)
	}
	w.lane, w.flow = nil, nil
}

// refusal is the result for a waiter leaving the queue without admission:
// its Retry-After is the predicted time until its turn.
func (ln *lane) refusal(w *waiter, why Outcome, now time.Time) Result {
	var wait time.Duration
	if f := w.flow; f != nil {
		before := int64(0)
		for _, v := range f.waiters {
			if v == w {
				break
			}
			before += v.cost()
		}
		wait = ln.predict(ln.class(w.priority), f, f.weight, before, w.cost(), now)
	}
	return Result{Decision: Decision{Delay: wait, Limiting: w.at}, Outcome: why, Waited: now.Sub(w.arrived), Depth: ln.depth}
}

// predict estimates how long a request of cost units waits when it has
// before units of its own flow ahead of it: the bucket must first take what
// the higher classes hold, what its own flow has ahead of it, and what the
// other flows of its class receive before its flow's counter reaches the
// request's start (each flow's backlog bounds that). Arrivals after it are
// not foreseen, so for a flow with more than its share waiting this is a
// lower bound.
func (ln *lane) predict(c *class, f *flow, weight float64, before, cost int64, now time.Time) time.Duration {
	if ln.limit.Concurrent() {
		return ln.predictConcurrent(c, before+cost)
	}
	// A request larger than the bucket conforms once the bucket is full,
	// so it needs no more than the capacity's span of its own.
	ahead := before + min(cost, ln.limit.Capacity())
	for _, hc := range ln.classes {
		if hc.priority > c.priority {
			ahead += hc.units
		}
	}
	start := c.vtime
	if f != nil {
		start = f.counter + float64(before)/weight
	}
	for _, g := range c.backlog {
		if g == f {
			continue
		}
		if lag := start - g.counter; lag > 0 {
			ahead += min(g.units, int64(lag*g.weight))
		}
	}
	return ln.limit.WaitFor(ln.state, now.Sub(ln.stateAt), ahead)
}

// predictConcurrent estimates a concurrency limit's wait from the mean time
// between dispatches. Without any dispatch yet it says one second, so that
// a Retry-After is never zero.
func (ln *lane) predictConcurrent(c *class, units int64) time.Duration {
	if ln.interval <= 0 {
		return time.Second
	}
	n := units
	for _, hc := range ln.classes {
		if hc.priority > c.priority {
			n += hc.units
		}
	}
	return time.Duration(n) * ln.interval
}
