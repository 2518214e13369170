package bucket

import (
	"context"
	_ "embed"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// DefaultRedisPrefix is the key prefix of a RedisStore whose options leave
// Prefix empty.
const DefaultRedisPrefix = "llmrl"

// RedisExpirySlack is added to a rate bucket's time to full to make its
// key's expiry. It covers the rounding of the expiry to milliseconds and, in
// caller-time mode, clocks that disagree between instances; an idle key
// lingers that much longer, which costs nothing.
const RedisExpirySlack = 10 * time.Second

// RedisConcurrencyTTL is the expiry of a concurrency bucket's key, refreshed
// by every write to it. A concurrency bucket does not drain with time, so
// without an expiry the units held by an instance that crashed before giving
// them back would stay held forever; with it they come back once the key has
// gone this long without a charge or a release. The price: a bucket whose
// every holder runs longer than this with no other traffic on the key loses
// its count, and later releases find nothing to give back (a release never
// goes below zero, so this can only over-admit, once).
const RedisConcurrencyTTL = time.Hour

// redisMaxSpan bounds every nanosecond quantity the script handles (spans,
// tolerances, backlogs, waits, units held): 2⁵², about 52 days. Redis runs
// Lua with doubles, exact for integers below 2⁵³, so the sum or difference
// of two such quantities is still exact. MemoryStore saturates debts at
// maxSpan (73 years) instead; both refuse for far longer than any caller
// waits, and no limit the module builds (a day's window at most) comes near
// either bound through its capacity.
const redisMaxSpan = 1 << 52

// redisScript is the script every call runs; see redis.lua. redis.Script
// runs it with EVALSHA and falls back to EVAL (which also caches it) when the
// server does not know it yet, so after the first call on a server each
// call is one command and one round trip.
//
//go:embed redis.lua
var redisLua string

var redisScript = redis.NewScript(redisLua)

// The script's operations.
const (
	redisOpReserve = "r"
	redisOpAdjust  = "a"
	redisOpPeek    = "p"
)

// Arguments that are the same for every call, boxed once.
var (
	redisArgSlack   any = RedisExpirySlack.Milliseconds()
	redisArgConcTTL any = RedisConcurrencyTTL.Milliseconds()
)

// RedisOptions configures a RedisStore.
type RedisOptions struct {
	// Prefix starts every key. Keys are "{"+Prefix+"}"+bucketKey: the hash
	// tag puts every bucket of one prefix in one Redis Cluster slot, so a
	// request's buckets are checked and charged by one script atomically.
	// Empty means DefaultRedisPrefix. It must not contain braces, which
	// would change the hash tag (see Validate).
	Prefix string
	// CallerTime makes the script use the `now` the caller passes instead of
	// the Redis server's clock (TIME). Production uses the server clock so
	// instances with skewed clocks agree; the conformance suite needs caller
	// time.
	CallerTime bool
}

// Validate reports whether the options can be used. Configuration code
// should call it before NewRedisStore.
func (o RedisOptions) Validate() error {
	if strings.ContainsAny(o.Prefix, "{}") {
		return fmt.Errorf("redis key prefix %q must not contain braces: it is used as the keys' cluster hash tag", o.Prefix)
	}
	return nil
}

// RedisStore keeps bucket states in Redis, so that several instances of the
// module share their limits. It works with a single server, Sentinel or
// Cluster, through any redis.UniversalClient.
//
// Every call is one Lua script run (one round trip, after the script's first
// load on a server), which checks and charges all the call's buckets
// atomically with the same decisions as MemoryStore. The script, redis.lua,
// explains the storage format.
//
// Time. By default the script reads the Redis server's clock, so that
// instances whose clocks disagree still see the same buckets, and the now
// passed to each method is ignored. Either way a bucket's time never runs
// backwards: a call uses the latest of its time and the last write to any of
// its buckets. That is MemoryStore's rule kept per bucket instead of per
// store (which would need one hot key for every call), and it also covers a
// server clock that steps back, as after a failover to a replica.
//
// Precision. Redis's Lua has only doubles, exact for integers below 2⁵³, and
// Unix nanoseconds (about 1.8×10¹⁸) do not fit. So absolute times travel and
// are stored as two integers, Unix seconds and nanoseconds; every other
// quantity is a nanosecond offset from the call's time, bounded by 2⁵² (about
// 52 days), so that adding or subtracting two of them stays exact. All
// multiplication and division (a charge's span, a tolerance, the units
// remaining) is done in Go with the exact helpers MemoryStore uses; the
// script only adds, subtracts and compares, except to rescale a bucket whose
// limit changed, which it does with exact big-integer arithmetic. Decisions
// and states therefore match MemoryStore's to the nanosecond. The one
// difference is the bound: debts saturate at 2⁵² ns instead of 73 years, and
// a tolerance beyond 2⁵² ns (a burst of over 52 days' worth of a limit) is
// cut to it.
//
// Expiry. Every key the script writes gets an expiry: a rate bucket's when it
// would be full again plus RedisExpirySlack, a concurrency bucket's
// RedisConcurrencyTTL, refreshed on every write. A full rate bucket or an
// empty concurrency bucket is deleted rather than stored, so no sweeping is
// needed.
//
// Timeouts. The store passes its context to go-redis; create the client with
// ContextTimeoutEnabled so that a context deadline (such as Failover's) also
// bounds the network wait, not only the client's own ReadTimeout.
type RedisStore struct {
	client redis.UniversalClient
	// prefix is "{"+Prefix+"}", the start of every key.
	prefix     string
	callerTime bool
	// batch sends concurrent calls together (see redisBatcher).
	batch *redisBatcher
}

var _ Store = (*RedisStore)(nil)

// NewRedisStore returns a store that keeps its buckets in Redis through
// client. It does no I/O. It panics if client is nil or opts are invalid
// (see RedisOptions.Validate).
func NewRedisStore(client redis.UniversalClient, opts RedisOptions) *RedisStore {
	if client == nil {
		panic("bucket: NewRedisStore with a nil client")
	}
	if err := opts.Validate(); err != nil {
		panic("bucket: " + err.Error())
	}
	if opts.Prefix == "" {
		opts.Prefix = DefaultRedisPrefix
	}
	return &RedisStore{client: client, prefix: "{" + opts.Prefix + "}", callerTime: opts.CallerTime, batch: newRedisBatcher(client)}
}

// Warm opens a connection and loads the script, so that the first
// requests do not pay for a dial, a TLS handshake and a script load within
// their timeout. A lone call and a batch go through different pools of
// go-redis (a batch is a pipeline, which has a pool of its own), so it
// opens one connection of each, to the node that holds the store's keys:
// the pipelined command names a key in their hash slot (a keyless one
// would go to any master of a cluster).
func (s *RedisStore) Warm(ctx context.Context) error {
	if err := s.client.Ping(ctx).Err(); err != nil {
		return err
	}
	if _, err := s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		return p.PTTL(ctx, s.prefix).Err()
	}); err != nil {
		return err
	}
	s.batch.lastPipeline.Store(time.Now().UnixNano())
	return redisScript.Load(ctx, s.client).Err()
}

// redisCall is one script run's keys and arguments, and what Go keeps of
// each charge to read the reply.
type redisCall struct {
	keys []string
	args []any
	// tols are the rate buckets' tolerances, as the script used them.
	tols []int64
}

// build prepares a script run. Everything that multiplies or divides is
// worked out here, exactly, and clamped to redisMaxSpan.
func (s *RedisStore) build(op string, now time.Time, charges []Charge, maxWait time.Duration) redisCall {
	c := redisCall{
		keys: make([]string, len(charges)),
		args: make([]any, 0, 7),
		tols: make([]int64, len(charges)),
	}
	// The per-key numbers travel as doubles, exact below 2⁵³: counts are at
	// most 10¹², windows a day in ns, spans and tolerances redisMaxSpan.
	packed := make([]byte, 0, 32*len(charges))
	put := func(v int64) { packed = binary.LittleEndian.AppendUint64(packed, math.Float64bits(float64(v))) }
	c.args = append(c.args, op)
	if s.callerTime {
		c.args = append(c.args, now.Unix(), now.Nanosecond())
	} else {
		c.args = append(c.args, "", 0)
	}
	c.args = append(c.args, clampSpan(int64(maxWait)), redisArgSlack, redisArgConcTTL)
	// Every key is cut from one string: one allocation for all of them.
	size := 0
	for i := range charges {
		size += len(s.prefix) + len(charges[i].Key)
	}
	var sb strings.Builder
	sb.Grow(size)
	for i := range charges {
		sb.WriteString(s.prefix)
		sb.Write(charges[i].Key)
	}
	all := sb.String()
	for i, at := range charges {
		n := len(s.prefix) + len(at.Key)
		c.keys[i], all = all[:n], all[n:]
	}
	for i := range charges {
		ch := &charges[i]
		l := ch.Limit
		var x, tol int64
		switch {
		case l.Concurrent():
			x = clampSpan(ch.Cost)
		case ch.Cost > 0:
			x = min(l.span(ch.Cost), redisMaxSpan)
		case ch.Cost < 0 && op == redisOpAdjust:
			// A refund. (In Reserve a negative cost charges nothing, as
			// span makes it in MemoryStore.)
			x = -min(l.span(-ch.Cost), redisMaxSpan)
		}
		if !l.Concurrent() {
			tol = min(l.tolerance(), redisMaxSpan)
		}
		c.tols[i] = tol
		put(l.Count)
		put(int64(l.Window))
		put(x)
		put(tol)
	}
	c.args = append(c.args, packed)
	return c
}

// clampSpan bounds v to ±redisMaxSpan.
func clampSpan(v int64) int64 {
	return max(min(v, redisMaxSpan), -redisMaxSpan)
}

// run runs the script and checks its reply: three header integers and one
// value per key.
func (s *RedisStore) run(ctx context.Context, c *redisCall) ([]int64, error) {
	res, err := s.batch.run(ctx, c.keys, c.args)
	if err != nil {
		if errors.Is(err, redis.Nil) {
			return nil, errors.New("bucket: redis script returned nil")
		}
		return nil, fmt.Errorf("bucket: redis script: %w", err)
	}
	arr, ok := res.([]any)
	if !ok || len(arr) != 3+len(c.keys) {
		return nil, fmt.Errorf("bucket: unexpected reply from the redis script: %T of length %d", res, len(arr))
	}
	vals := make([]int64, len(arr))
	for i, v := range arr {
		n, ok := v.(int64)
		if !ok {
			return nil, fmt.Errorf("bucket: unexpected reply from the redis script: element %d is %T", i, v)
		}
		vals[i] = n
	}
	if lim := vals[2]; lim < -1 || lim >= int64(len(c.keys)) {
		return nil, fmt.Errorf("bucket: unexpected reply from the redis script: limiting index %d", lim)
	}
	return vals, nil
}

// fill writes each bucket's state from the script's values: a rate bucket's
// backlog, or the units a concurrency bucket holds, as MemoryStore does,
// with the call's time as zero.
func (c *redisCall) fill(charges []Charge, vals []int64, states []State) {
	for i := range charges {
		l := charges[i].Limit
		v := vals[3+i]
		if l.Concurrent() {
			states[i] = concurrentState(v, l)
			continue
		}
		// v is the TAT relative to the call's time.
		states[i] = stateOf(0, v, c.tols[i], l)
	}
}

// Reserve implements Store, with MemoryStore's decisions (see
// MemoryStore.Reserve), in one round trip.
func (s *RedisStore) Reserve(ctx context.Context, now time.Time, charges []Charge, maxWait time.Duration, states []State) (Decision, error) {
	if len(charges) == 0 {
		// Nothing to check; and a script with no keys could not be routed
		// in a cluster.
		return Decision{Allowed: true, Limiting: -1}, nil
	}
	if states != nil && len(states) < len(charges) {
		return Decision{Limiting: -1}, fmt.Errorf("bucket: %d states for %d charges", len(states), len(charges))
	}
	c := s.build(redisOpReserve, now, charges, maxWait)
	vals, err := s.run(ctx, &c)
	if err != nil {
		return Decision{Limiting: -1}, err
	}
	if states != nil {
		c.fill(charges, vals, states)
	}
	return Decision{Allowed: vals[0] == 1, Delay: time.Duration(vals[1]), Limiting: int(vals[2])}, nil
}

// Adjust implements Store, in one round trip.
func (s *RedisStore) Adjust(ctx context.Context, now time.Time, charges []Charge) error {
	if len(charges) == 0 {
		return nil
	}
	c := s.build(redisOpAdjust, now, charges, 0)
	_, err := s.run(ctx, &c)
	return err
}

// Peek implements Store, in one round trip. Like MemoryStore's, it writes a
// bucket only to record a rescale to a changed limit.
func (s *RedisStore) Peek(ctx context.Context, now time.Time, charges []Charge, states []State) error {
	if len(charges) == 0 {
		return nil
	}
	if len(states) < len(charges) {
		return fmt.Errorf("bucket: %d states for %d charges", len(states), len(charges))
	}
	c := s.build(redisOpPeek, now, charges, 0)
	vals, err := s.run(ctx, &c)
	if err != nil {
		return err
	}
	c.fill(charges, vals, states)
	return nil
}

// redisScanCount is the COUNT hint of DeletePrefix's SCAN: how many keys a
// server looks at per call, and so at most how many one UNLINK removes.
const redisScanCount = 1000

// DeletePrefix implements Store. It walks the keyspace with SCAN, matching
// the prefix, and removes what it finds with UNLINK (which frees memory in
// the background) a batch at a time; on a Cluster or a Ring it walks every
// master. It is for rare maintenance (a rule removed by a reload) and costs a
// full keyspace scan.
func (s *RedisStore) DeletePrefix(ctx context.Context, prefix []byte) (int, error) {
	pattern := globEscape(s.prefix) + globEscape(string(prefix)) + "*"
	var total atomic.Int64
	del := func(ctx context.Context, c redis.Cmdable) error {
		var cursor uint64
		for {
			keys, next, err := c.Scan(ctx, cursor, pattern, redisScanCount).Result()
			if err != nil {
				return fmt.Errorf("bucket: redis scan: %w", err)
			}
			if len(keys) > 0 {
				// All of one prefix's keys share a hash slot, so one UNLINK
				// is valid on a Cluster node too.
				n, err := c.Unlink(ctx, keys...).Result()
				if err != nil {
					return fmt.Errorf("bucket: redis unlink: %w", err)
				}
				total.Add(n)
			}
			if next == 0 {
				return nil
			}
			cursor = next
		}
	}
	var err error
	switch c := s.client.(type) {
	case *redis.ClusterClient:
		err = c.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error { return del(ctx, node) })
	case *redis.Ring:
		err = c.ForEachShard(ctx, func(ctx context.Context, shard *redis.Client) error { return del(ctx, shard) })
	default:
		err = del(ctx, s.client)
	}
	return int(total.Load()), err
}

// Scan implements Store. It walks the keyspace with SCAN, matching the
// prefix, a batch of up to redisScanCount keys at a time, and reads each
// batch with one MGET; on a Cluster or a Ring it walks every master. Each
// server's buckets are read at that server's clock (or at now in
// caller-time mode), as the script would. Like every SCAN, it may report a
// key twice, and a key written during the walk may be missed.
func (s *RedisStore) Scan(ctx context.Context, now time.Time, prefix []byte, fn func(key []byte, lv Level) bool) error {
	pattern := globEscape(s.prefix) + globEscape(string(prefix)) + "*"
	// A Cluster's masters are walked concurrently: fn is called under mu,
	// and once it has said stop, every walk stops.
	var mu sync.Mutex
	var stopped atomic.Bool
	walk := func(ctx context.Context, c redis.Cmdable) error {
		nowS, nowNs := now.Unix(), int64(now.Nanosecond())
		if !s.callerTime {
			t, err := c.Time(ctx).Result()
			if err != nil {
				return fmt.Errorf("bucket: redis time: %w", err)
			}
			nowS, nowNs = t.Unix(), int64(t.Nanosecond())
		}
		var cursor uint64
		for !stopped.Load() {
			keys, next, err := c.Scan(ctx, cursor, pattern, redisScanCount).Result()
			if err != nil {
				return fmt.Errorf("bucket: redis scan: %w", err)
			}
			if len(keys) > 0 {
				// One slot (the hash tag) holds them all, so one MGET is
				// valid on a Cluster node too.
				vals, err := c.MGet(ctx, keys...).Result()
				if err != nil {
					return fmt.Errorf("bucket: redis mget: %w", err)
				}
				mu.Lock()
				for i, v := range vals {
					str, ok := v.(string) // nil: expired since the SCAN
					if !ok || stopped.Load() {
						continue
					}
					lv, ok := decodeRedisBucket(str, nowS, nowNs)
					if !ok {
						continue
					}
					if !fn([]byte(keys[i][len(s.prefix):]), lv) {
						stopped.Store(true)
					}
				}
				mu.Unlock()
			}
			if next == 0 {
				return nil
			}
			cursor = next
		}
		return nil
	}
	switch c := s.client.(type) {
	case *redis.ClusterClient:
		return c.ForEachMaster(ctx, func(ctx context.Context, node *redis.Client) error { return walk(ctx, node) })
	case *redis.Ring:
		return c.ForEachShard(ctx, func(ctx context.Context, shard *redis.Client) error { return walk(ctx, shard) })
	}
	return walk(ctx, s.client)
}

// decodeRedisBucket reads a stored bucket (see redis.lua: five
// little-endian doubles, seen_s seen_ns level count window) as its level at
// the time nowS, nowNs, with the checks the script makes: a value that is not
// a bucket of ours is skipped. A bucket written later than that time (a
// server clock that stepped back) is read at its write, as the script
// would read it.
func decodeRedisBucket(v string, nowS, nowNs int64) (Level, bool) {
	if len(v) != 40 {
		return Level{}, false
	}
	var f [5]float64
	for i := range f {
		f[i] = math.Float64frombits(binary.LittleEndian.Uint64([]byte(v[8*i : 8*i+8])))
	}
	seenS, seenNs, x, c, w := f[0], f[1], f[2], f[3], f[4]
	if !(seenNs >= 0 && seenNs < 1e9 && x >= 0 && x <= redisMaxSpan && c >= 1 && c <= maxUnits && w >= 0 && w <= float64(maxSpan) &&
		seenS == math.Floor(seenS) && math.Abs(seenS) < 1<<53) {
		return Level{}, false
	}
	lv := Level{Count: int64(c), Window: time.Duration(w), Backlog: int64(x)}
	if lv.Window == 0 {
		return lv, lv.Backlog > 0
	}
	// The backlog drains with time. Past redisMaxSpan any backlog has
	// drained, and below it the elapsed nanoseconds fit an int64.
	ds := nowS - int64(seenS)
	if ds >= 4600000 {
		return lv, false
	}
	if elapsed := ds*1e9 + nowNs - int64(seenNs); elapsed > 0 {
		lv.Backlog -= elapsed
	}
	return lv, lv.Backlog > 0
}

// Delete implements Store, with one UNLINK.
func (s *RedisStore) Delete(ctx context.Context, keys [][]byte) (int, error) {
	if len(keys) == 0 {
		return 0, nil
	}
	full := make([]string, len(keys))
	for i, k := range keys {
		full[i] = s.prefix + string(k)
	}
	// Every key shares the hash tag, and so the slot, as in DeletePrefix.
	n, err := s.client.Unlink(ctx, full...).Result()
	if err != nil {
		return 0, fmt.Errorf("bucket: redis unlink: %w", err)
	}
	return int(n), nil
}

// globEscape escapes the characters special to Redis's glob-style MATCH
// patterns, so that s matches only itself.
func globEscape(s string) string {
	if !strings.ContainsAny(s, `*?[]\`) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 8)
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
