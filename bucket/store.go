package bucket

import (
	"context"
	"time"
)

// Charge asks one bucket for Cost units under Limit.
type Charge struct {
	// Key names the bucket. Stores copy it when they keep it, so callers may
	// build it in a reused buffer. The keys of one call should be distinct
	// (the module's are: each names its zone, rule, unit and values). A key
	// given twice under one Limit is one bucket: each charge is checked
	// against the bucket as it was before the call, and an admission
	// applies them in order. A key given twice under different limits is
	// not defined.
	Key []byte
	// Limit is the bucket's limit as configured now. A bucket whose state was
	// built under another limit is rescaled to this one on first use: its
	// level in units is kept.
	Limit Limit
	// Cost is how many units to charge. In Reserve it must be ≥ 0; in Adjust
	// it is signed: positive charges more (debt allowed), negative refunds.
	Cost int64
	// Replay marks, in Adjust, a refund or release (negative Cost) of a
	// charge that a Failover's primary made (its Decision had Fallback
	// false). When the primary cannot take it now, the Failover keeps it and
	// applies it once the primary answers again, so that an outage leaks
	// no concurrency slot and no token refund there. Other stores ignore it.
	Replay bool
}

// State is what a bucket looks like after a decision, for the headers.
type State struct {
	// Remaining is how many units could be charged now without waiting.
	Remaining int64
	// ResetAfter is how long until the bucket is full again (0 when full).
	ResetAfter time.Duration
}

// Decision is the outcome of a Reserve.
type Decision struct {
	// Allowed is true when every bucket was charged; false when none was.
	Allowed bool
	// Delay is how long the caller must wait before its charge conforms.
	// It is 0 for an immediate admission and at most the maxWait given to
	// Reserve otherwise. When Allowed is false it is the predicted wait: how
	// long until the whole request could be admitted if nothing else were
	// charged meanwhile, which is what Retry-After should say.
	Delay time.Duration
	// Limiting is the index of the charge that decided Delay (the bucket
	// furthest from admitting the request), or -1 when no bucket had to wait.
	Limiting int
	// Fallback is set by a Failover whose fail mode decided, with its
	// primary down: the charges were made in its local store (FailLocal) or
	// nowhere (FailOpen). Their corrections must not be marked Replay.
	Fallback bool
}

// Store keeps bucket states. Every method is safe for concurrent use.
//
// Admission across several buckets is atomic: Reserve charges every bucket
// of the request or none of them, so a refused request costs nothing.
type Store interface {
	// Reserve charges every bucket in charges if the request conforms within
	// maxWait of now, and fills states (when it is not nil; it must have
	// len(charges) entries) with each bucket's state after the decision.
	// With maxWait 0 it admits only what conforms now.
	Reserve(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error)

	// Adjust applies signed corrections without any check: settlement of a
	// token estimate against the real usage, or the cancellation of a
	// reservation. A positive cost may leave the bucket in debt.
	Adjust(ctx context.Context, now time.Time, charges []Charge) error

	// Peek fills states without charging anything.
	Peek(ctx context.Context, now time.Time, charges []Charge, states []State) error

	// DeletePrefix forgets every bucket whose key starts with prefix, and
	// returns how many it forgot. It is how a removed rule's buckets are
	// freed.
	DeletePrefix(ctx context.Context, prefix []byte) (int, error)

	// Scan calls fn with every stored bucket whose key starts with prefix,
	// and its level at now (see Level), until fn returns false. It is for
	// inspection (the admin API), not for requests: it walks every bucket
	// the store holds, so it costs in proportion to the whole store. The
	// key passed to fn is valid only during the call. fn is called from one
	// goroutine at a time and must not call the store. A bucket that is
	// full (a rate bucket) or holds nothing (a concurrency bucket) is the
	// same as no bucket and is not reported. Stores that walk a keyspace
	// with a cursor (Redis's SCAN) may report a key more than once.
	Scan(ctx context.Context, now time.Time, prefix []byte, fn func(key []byte, lv Level) bool) error

	// Delete forgets the buckets with these keys, and returns how many of
	// them there were. A request that holds units of a deleted concurrency
	// bucket gives them back later into nothing: a release never takes a
	// bucket below zero.
	Delete(ctx context.Context, keys [][]byte) (int, error)
}
