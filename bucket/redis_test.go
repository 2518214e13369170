package bucket_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
	"github.com/llmratelimit/caddy-llm-ratelimit/bucket/storetest"
	"github.com/llmratelimit/caddy-llm-ratelimit/internal/redistest"
)

// prefixes hands out a fresh key prefix per store, so that stores on one
// server start empty.
var prefixes atomic.Int64

func newTestRedisStore(c redis.UniversalClient, callerTime bool) *bucket.RedisStore {
	return bucket.NewRedisStore(c, bucket.RedisOptions{
		Prefix:     fmt.Sprintf("test%d", prefixes.Add(1)),
		CallerTime: callerTime,
	})
}

func TestRedisStoreConformance(t *testing.T) {
	c := redistest.Start(t).Client(t)
	storetest.Run(t, func(*testing.T) bucket.Store { return newTestRedisStore(c, true) })
}

// startRedisCluster starts a Redis Cluster of three masters, each with a
// third of the slots, and returns a client of it.
func startRedisCluster(t *testing.T) *redis.ClusterClient {
	ctx := context.Background()
	var nodes []*redistest.Server
	for i := 0; i < 3; i++ {
		nodes = append(nodes, redistest.Start(t, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"))
	}
	const slots = 16384
	for i, n := range nodes {
		c := n.Client(t)
		if err := c.ClusterAddSlotsRange(ctx, i*slots/3, (i+1)*slots/3-1).Err(); err != nil {
			t.Fatal(err)
		}
		if i > 0 {
			if err := c.ClusterMeet(ctx, "127.0.0.1", strconv.Itoa(nodes[0].Port())).Err(); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, n := range nodes {
		c := n.Client(t)
		deadline := time.Now().Add(20 * time.Second)
		for {
			info, err := c.ClusterInfo(ctx).Result()
			if err == nil && strings.Contains(info, "cluster_state:ok") && strings.Contains(info, "cluster_known_nodes:3") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("cluster not ready within 20s: %v %s", err, info)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	cc := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{nodes[0].Addr()}, ContextTimeoutEnabled: true})
	t.Cleanup(func() { cc.Close() })
	return cc
}

// TestRedisStoreCluster runs the conformance suite on a Redis Cluster, where
// every store's keys must share a slot (the hash tag) for the script to run,
// and DeletePrefix must walk every master.
func TestRedisStoreCluster(t *testing.T) {
	cc := startRedisCluster(t)
	ctx := context.Background()
	storetest.Run(t, func(*testing.T) bucket.Store { return newTestRedisStore(cc, true) })

	// Stores spread over the masters, and DeletePrefix finds each one's
	// buckets wherever they live.
	l := bucket.Limit{Count: 5, Window: time.Minute}
	masters := map[string]bool{}
	for i := 0; i < 12; i++ {
		prefix := fmt.Sprintf("spread%d", i)
		s := bucket.NewRedisStore(cc, bucket.RedisOptions{Prefix: prefix})
		cs := []bucket.Charge{{Key: []byte("rule\x1fa"), Limit: l, Cost: 1}, {Key: []byte("rule\x1fb"), Limit: l, Cost: 1}, {Key: []byte("other"), Limit: l, Cost: 1}}
		if _, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil {
			t.Fatal(err)
		}
		node, err := cc.MasterForKey(ctx, "{"+prefix+"}x")
		if err != nil {
			t.Fatal(err)
		}
		masters[node.Options().Addr] = true
		if n, err := s.DeletePrefix(ctx, []byte("rule\x1f")); err != nil || n != 2 {
			t.Fatalf("store %d: DeletePrefix = %d, %v; want 2", i, n, err)
		}
	}
	if len(masters) < 2 {
		t.Fatalf("12 prefixes all landed on %d master(s)", len(masters))
	}
}

// TestRedisStoreMatchesMemory runs random calls on a RedisStore and a
// MemoryStore side by side, with times that never go backwards, and checks
// that every decision, state and error agree exactly: mixed kinds of limits,
// limit changes (rescales), reservations, debts and refunds.
func TestRedisStoreMatchesMemory(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(3, 4))
	limits := []bucket.Limit{
		{Count: 60, Window: time.Minute},
		{Count: 60, Window: time.Minute, Burst: 7},
		{Count: 7, Window: time.Second},
		{Count: 1000, Window: time.Hour, Burst: 13},
		{Count: 100000, Window: 24 * time.Hour},
		// Its capacity keeps levels, rescaled to the slowest limit here
		// (3.6s a unit), well within the store's 2⁵² ns saturation.
		{Count: 999_999_937, Window: 24 * time.Hour, Burst: 50_000},
		{Count: 3},
		{Count: 10},
	}
	for trial := 0; trial < 4; trial++ {
		rs, ms := newTestRedisStore(c, true), bucket.NewMemoryStore()
		now := time.Date(2026, 3, 1, 12, 0, 0, 123456789, time.UTC)
		for step := 0; step < 1500; step++ {
			now = now.Add(time.Duration(rng.Int64N(int64(3 * time.Second))))
			n := 1 + rng.IntN(3)
			perm := rng.Perm(5)
			cs := make([]bucket.Charge, n)
			for i := range cs {
				l := limits[rng.IntN(len(limits))]
				cost := rng.Int64N(l.Capacity()/2 + 2)
				if rng.IntN(10) == 0 {
					cost = rng.Int64N(3*l.Capacity() + 1) // oversize ones too
				}
				cs[i] = bucket.Charge{Key: fmt.Appendf(nil, "k%d", perm[i]), Limit: l, Cost: cost}
			}
			where := fmt.Sprintf("trial %d step %d %+v", trial, step, cs)
			switch op := rng.IntN(10); {
			case op < 6:
				maxWait := []time.Duration{0, 0, time.Second, time.Minute}[rng.IntN(4)]
				ss, sm := make([]bucket.State, n), make([]bucket.State, n)
				dr, err := rs.Reserve(ctx, now, cs, maxWait, ss)
				if err != nil {
					t.Fatal(err)
				}
				dm, _ := ms.Reserve(ctx, now, cs, maxWait, sm)
				if dr != dm || fmt.Sprint(ss) != fmt.Sprint(sm) {
					t.Fatalf("%s: Reserve(maxWait %s): redis %+v %+v, memory %+v %+v", where, maxWait, dr, ss, dm, sm)
				}
			case op < 8:
				for i := range cs {
					cs[i].Cost = rng.Int64N(2*cs[i].Limit.Capacity()+1) - cs[i].Limit.Capacity()
				}
				if err := rs.Adjust(ctx, now, cs); err != nil {
					t.Fatal(err)
				}
				ms.Adjust(ctx, now, cs)
			default:
				ss, sm := make([]bucket.State, n), make([]bucket.State, n)
				if err := rs.Peek(ctx, now, cs, ss); err != nil {
					t.Fatal(err)
				}
				ms.Peek(ctx, now, cs, sm)
				if fmt.Sprint(ss) != fmt.Sprint(sm) {
					t.Fatalf("%s: Peek: redis %+v, memory %+v", where, ss, sm)
				}
			}
		}
	}
}

// TestRedisStoreRescaleExact checks the script's big-integer rescale against
// Go's on large and awkward numbers: limits of up to a trillion units a day
// to a handful a second and back.
func TestRedisStoreRescaleExact(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(5, 6))
	windows := []time.Duration{time.Second, time.Minute, time.Hour, 24 * time.Hour, 7 * time.Nanosecond * 1_000_000_007}
	randLimit := func() bucket.Limit {
		w := windows[rng.IntN(len(windows))]
		count := 1 + rng.Int64N(min(int64(w), 1_000_000_000_000))
		if rng.IntN(2) == 0 {
			count = 1 + rng.Int64N(1000)
		}
		return bucket.Limit{Count: count, Window: w, Burst: rng.Int64N(3) * rng.Int64N(count+1)}
	}
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	checked := 0
	for i := 0; i < 3000; i++ {
		rs, ms := newTestRedisStore(c, true), bucket.NewMemoryStore()
		from, to := randLimit(), randLimit()
		cost := 1 + rng.Int64N(from.Capacity())
		key := []byte("r")
		for _, s := range []bucket.Store{rs, ms} {
			if _, err := s.Reserve(ctx, now, []bucket.Charge{{Key: key, Limit: from, Cost: cost}}, 0, nil); err != nil {
				t.Fatal(err)
			}
		}
		sr, sm := make([]bucket.State, 1), make([]bucket.State, 1)
		if err := rs.Peek(ctx, now, []bucket.Charge{{Key: key, Limit: to, Cost: 1}}, sr); err != nil {
			t.Fatal(err)
		}
		ms.Peek(ctx, now, []bucket.Charge{{Key: key, Limit: to, Cost: 1}}, sm)
		if sm[0].ResetAfter >= 1<<52 {
			// Beyond the store's documented saturation: Redis caps at 2⁵² ns.
			if sr[0].ResetAfter != 1<<52 || sr[0].Remaining != 0 {
				t.Fatalf("%+v → %+v: saturated backlog: redis %+v", from, to, sr[0])
			}
			continue
		}
		checked++
		if sr[0] != sm[0] {
			t.Fatalf("%+v cost %d → %+v: redis %+v, memory %+v", from, cost, to, sr[0], sm[0])
		}
	}
	if checked < 1000 {
		t.Fatalf("only %d cases within range", checked)
	}
}

// redisCounter is a go-redis hook that counts the commands sent to the
// server (a pipeline counts once: it is one round trip), and remembers the
// names of the last ones.
type redisCounter struct {
	n     atomic.Int64
	mu    sync.Mutex
	names []string
}

func (h *redisCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (h *redisCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		h.record(cmd.Name())
		return next(ctx, cmd)
	}
}

func (h *redisCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		h.record("pipeline")
		return next(ctx, cmds)
	}
}

func (h *redisCounter) record(name string) {
	h.n.Add(1)
	h.mu.Lock()
	if len(h.names) < 1000 {
		h.names = append(h.names, name)
	}
	h.mu.Unlock()
}

// reset forgets what was counted so far.
func (h *redisCounter) reset() {
	h.n.Store(0)
	h.mu.Lock()
	h.names = nil
	h.mu.Unlock()
}

func (h *redisCounter) roundTrips() int64 { return h.n.Load() }

// scripts returns the script commands recorded, leaving out what a new
// connection sends to set itself up (HELLO, CLIENT SETINFO).
func (h *redisCounter) scripts() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []string
	for _, n := range h.names {
		if strings.HasPrefix(n, "eval") {
			out = append(out, n)
		}
	}
	return out
}

// TestRedisStoreOneRoundTrip checks that, once the script is loaded, each
// Reserve, Adjust and Peek is exactly one command, whatever the number of
// buckets.
func TestRedisStoreOneRoundTrip(t *testing.T) {
	c := redistest.Start(t).Client(t)
	var h redisCounter
	c.AddHook(&h)
	s := newTestRedisStore(c, false)
	ctx := context.Background()
	l := bucket.Limit{Count: 1000, Window: time.Minute}
	cs := []bucket.Charge{
		{Key: []byte("a"), Limit: l, Cost: 1},
		{Key: []byte("b"), Limit: l, Cost: 1},
		{Key: []byte("c"), Limit: bucket.Limit{Count: 100}, Cost: 1},
	}
	st := make([]bucket.State, len(cs))
	// The first call on a fresh server loads the script: EVALSHA answers
	// NOSCRIPT, and EVAL follows (besides the connection's setup).
	if _, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(h.scripts()); got != "[evalsha eval]" {
		t.Errorf("first Reserve sent %v, want [evalsha eval]", got)
	}
	const calls = 50
	h.reset()
	for i := 0; i < calls; i++ {
		if d, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil || !d.Allowed {
			t.Fatalf("Reserve %d: %+v, %v", i, d, err)
		}
	}
	if n := h.roundTrips(); n != calls || len(h.scripts()) != calls {
		t.Fatalf("%d Reserves took %d round trips (%d scripts), want one each", calls, n, len(h.scripts()))
	}
	h.reset()
	if err := s.Adjust(ctx, time.Now(), cs); err != nil {
		t.Fatal(err)
	}
	if err := s.Peek(ctx, time.Now(), cs, st); err != nil {
		t.Fatal(err)
	}
	if n := h.roundTrips(); n != 2 {
		t.Fatalf("an Adjust and a Peek took %d round trips, want 2", n)
	}
	if st[2].Remaining != 100-calls-2 {
		t.Fatalf("concurrency bucket after %d holds: %+v", calls+2, st[2])
	}
}

// TestRedisStoreClockNeverRunsBack checks that, in caller-time mode, a stale
// time is read as the latest one a bucket has seen, and that in server-time
// mode a caller's time changes nothing.
func TestRedisStoreClockNeverRunsBack(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 0, 0, 0, 0, time.UTC)
	l := bucket.Limit{Count: 1, Window: time.Minute}
	cs := []bucket.Charge{{Key: []byte("k"), Limit: l, Cost: 1}}
	for _, callerTime := range []bool{true, false} {
		s := newTestRedisStore(c, callerTime)
		if d, err := s.Reserve(ctx, now, cs, 0, nil); err != nil || !d.Allowed {
			t.Fatalf("callerTime %v: first: %+v, %v", callerTime, d, err)
		}
		// An hour-old timestamp must not see the bucket as it was an hour ago.
		st := make([]bucket.State, 1)
		d, err := s.Reserve(ctx, now.Add(-time.Hour), cs, 0, st)
		if err != nil || d.Allowed || st[0].ResetAfter <= 59*time.Second {
			t.Fatalf("callerTime %v: stale timestamp: %+v %+v, %v; want refused, reset about 60s", callerTime, d, st[0], err)
		}
	}
}

// TestRedisStoreTTL checks that every key written expires: a rate bucket
// when it is full again plus the slack, a concurrency bucket after
// RedisConcurrencyTTL; and that a full or empty bucket is deleted.
func TestRedisStoreTTL(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	s := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: "ttl"})
	rate := bucket.Limit{Count: 60, Window: time.Minute}
	conc := bucket.Limit{Count: 5}
	cs := []bucket.Charge{{Key: []byte("rate"), Limit: rate, Cost: 30}, {Key: []byte("conc"), Limit: conc, Cost: 2}}
	if d, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("Reserve: %+v, %v", d, err)
	}
	ttl := func(key string) time.Duration {
		t.Helper()
		d, err := c.PTTL(ctx, "{ttl}"+key).Result()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	// 30 of 60 per minute: full again in 30s.
	if d := ttl("rate"); d <= 29*time.Second || d > 30*time.Second+bucket.RedisExpirySlack {
		t.Errorf("rate bucket expires in %s, want 30s + %s", d, bucket.RedisExpirySlack)
	}
	if d := ttl("conc"); d <= bucket.RedisConcurrencyTTL-time.Minute || d > bucket.RedisConcurrencyTTL {
		t.Errorf("concurrency bucket expires in %s, want %s", d, bucket.RedisConcurrencyTTL)
	}
	// More debt moves the expiry on.
	if err := s.Adjust(ctx, time.Now(), cs[:1]); err != nil {
		t.Fatal(err)
	}
	if d := ttl("rate"); d <= 59*time.Second || d > time.Minute+bucket.RedisExpirySlack {
		t.Errorf("rate bucket in debt expires in %s, want 60s + %s", d, bucket.RedisExpirySlack)
	}
	// Given back in full, both keys go.
	cs[0].Cost, cs[1].Cost = -1000, -2
	if err := s.Adjust(ctx, time.Now(), cs); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Exists(ctx, "{ttl}rate", "{ttl}conc").Result(); err != nil || n != 0 {
		t.Fatalf("after giving everything back, %d keys remain (%v)", n, err)
	}
	// No key is ever left without an expiry.
	cs[0].Cost, cs[1].Cost = 1, 1
	for i := 0; i < 20; i++ {
		cs[0].Key, cs[1].Key = fmt.Appendf(nil, "r%d", i), fmt.Appendf(nil, "c%d", i)
		s.Reserve(ctx, time.Now(), cs, 0, nil)
	}
	keys, err := c.Keys(ctx, "{ttl}*").Result()
	if err != nil || len(keys) != 40 {
		t.Fatalf("%d keys (%v), want 40", len(keys), err)
	}
	for _, k := range keys {
		if d := ttl(strings.TrimPrefix(k, "{ttl}")); d <= 0 {
			t.Errorf("key %q has no expiry (PTTL %s)", k, d)
		}
	}
}

// TestRedisStoreServerTime checks the production mode, where the script
// reads the server's clock and ignores the caller's.
func TestRedisStoreServerTime(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	s := newTestRedisStore(c, false)
	// Times the store must ignore: far in the past and the future.
	bogus := []time.Time{time.Unix(0, 0), time.Date(2090, 1, 1, 0, 0, 0, 0, time.UTC), {}}
	l := bucket.Limit{Count: 3, Window: time.Minute}
	cs := []bucket.Charge{{Key: []byte("k"), Limit: l, Cost: 1}}
	st := make([]bucket.State, 1)
	for i := 0; i < 3; i++ {
		d, err := s.Reserve(ctx, bogus[i], cs, 0, st)
		if err != nil || !d.Allowed || d.Delay != 0 {
			t.Fatalf("unit %d: %+v, %v", i, d, err)
		}
		if st[0].Remaining != int64(2-i) {
			t.Fatalf("unit %d: %+v, want remaining %d", i, st[0], 2-i)
		}
	}
	d, err := s.Reserve(ctx, bogus[0], cs, 0, st)
	if err != nil || d.Allowed || d.Limiting != 0 {
		t.Fatalf("fourth unit: %+v, %v; want refused", d, err)
	}
	// 20s per unit, less the little time that has passed on the server.
	if d.Delay > 20*time.Second || d.Delay < 15*time.Second {
		t.Fatalf("fourth unit: delay %s, want just under 20s", d.Delay)
	}
	if st[0].Remaining != 0 || st[0].ResetAfter > time.Minute || st[0].ResetAfter < 55*time.Second {
		t.Fatalf("after refusal: %+v, want remaining 0, reset just under 60s", st[0])
	}
	// A reservation within maxWait is admitted with the predicted delay.
	if d, err := s.Reserve(ctx, bogus[1], cs, time.Minute, st); err != nil || !d.Allowed || d.Delay < 15*time.Second || d.Delay > 20*time.Second {
		t.Fatalf("reservation: %+v, %v", d, err)
	}

	// Time passing on the server frees units: 20 per second with no burst
	// beyond one, so the next unit conforms within 50ms; wait what the
	// store says, and it is admitted.
	fast := []bucket.Charge{{Key: []byte("fast"), Limit: bucket.Limit{Count: 20, Window: time.Second, Burst: 1}, Cost: 1}}
	if d, err := s.Reserve(ctx, bogus[2], fast, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("fast: %+v, %v", d, err)
	}
	d, err = s.Reserve(ctx, bogus[2], fast, 0, nil)
	if err != nil || d.Allowed || d.Delay <= 0 || d.Delay > 50*time.Millisecond {
		t.Fatalf("fast, at once: %+v, %v; want refused for up to 50ms", d, err)
	}
	time.Sleep(d.Delay + time.Millisecond)
	if d, err := s.Reserve(ctx, bogus[0], fast, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("fast, after the delay: %+v, %v; want admitted", d, err)
	}
}

// TestRedisStoreDeletePrefixGlob checks that DeletePrefix matches its prefix
// literally, glob characters included, in the bucket prefix and the store's.
func TestRedisStoreDeletePrefixGlob(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	l := bucket.Limit{Count: 5, Window: time.Minute}
	weird := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: `p*[?]\`, CallerTime: true})
	plain := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: `pX[?]\`, CallerTime: true})
	keys := []string{`r*?[a-z]\` + "\x1fk", `r*?[a-z]\` + "\x1fj", `rX?[a-z]\` + "\x1fk", `r*Q[a-z]\` + "\x1fk", `r*?a\` + "\x1fk", `r*?[a-z]X`}
	now := time.Now()
	for _, s := range []*bucket.RedisStore{weird, plain} {
		for _, k := range keys {
			if _, err := s.Reserve(ctx, now, []bucket.Charge{{Key: []byte(k), Limit: l, Cost: 5}}, 0, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Many more keys than one SCAN batch, to cover the cursor loop.
	for i := 0; i < 2500; i++ {
		k := fmt.Appendf(nil, "r*?[a-z]\\\x1fmany%d", i)
		weird.Reserve(ctx, now, []bucket.Charge{{Key: k, Limit: l, Cost: 1}}, 0, nil)
	}
	n, err := weird.DeletePrefix(ctx, []byte(`r*?[a-z]\`+"\x1f"))
	if err != nil || n != 2502 {
		t.Fatalf("DeletePrefix = %d, %v; want 2502", n, err)
	}
	left, err := c.Keys(ctx, "*").Result()
	if err != nil || len(left) != 2*len(keys)-2 {
		t.Fatalf("%d keys left (%v), want %d: %q", len(left), err, 2*len(keys)-2, left)
	}
	for _, k := range left {
		if strings.HasPrefix(k, `{p*[?]\}r*?[a-z]\`+"\x1f") {
			t.Errorf("key %q survived", k)
		}
	}
	if n, err := weird.DeletePrefix(ctx, []byte("nothing")); err != nil || n != 0 {
		t.Fatalf("DeletePrefix(nothing) = %d, %v", n, err)
	}
	// An empty prefix forgets the store's buckets, and only its own.
	if n, err := weird.DeletePrefix(ctx, nil); err != nil || n != len(keys)-2 {
		t.Fatalf("DeletePrefix(empty) = %d, %v; want %d", n, err, len(keys)-2)
	}
	if n, err := c.DBSize(ctx).Result(); err != nil || n != int64(len(keys)) {
		t.Fatalf("%d keys left (%v), want the other store's %d", n, err, len(keys))
	}
}

// TestRedisStoreKeysAndOptions checks the key layout and the options'
// validation.
func TestRedisStoreKeysAndOptions(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	s := bucket.NewRedisStore(c, bucket.RedisOptions{})
	cs := []bucket.Charge{{Key: []byte("rule\x1fuser"), Limit: bucket.Limit{Count: 1, Window: time.Minute}, Cost: 1}}
	if _, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil {
		t.Fatal(err)
	}
	if n, err := c.Exists(ctx, "{"+bucket.DefaultRedisPrefix+"}rule\x1fuser").Result(); err != nil || n != 1 {
		t.Fatalf("key under the default prefix: exists %d, %v", n, err)
	}
	for _, p := range []string{"a{b", "a}b", "{x}"} {
		if err := (bucket.RedisOptions{Prefix: p}).Validate(); err == nil {
			t.Errorf("prefix %q accepted", p)
		}
	}
	if err := (bucket.RedisOptions{Prefix: "llm:rl*"}).Validate(); err != nil {
		t.Errorf("prefix without braces refused: %v", err)
	}
	// No charges: nothing to ask the server.
	if d, err := s.Reserve(ctx, time.Now(), nil, 0, nil); err != nil || !d.Allowed || d.Limiting != -1 {
		t.Fatalf("Reserve with no charges: %+v, %v", d, err)
	}
}

// TestRedisStoreErrors checks that server errors come back as errors, never
// as panics or decisions.
func TestRedisStoreErrors(t *testing.T) {
	srv := redistest.Start(t)
	c := srv.Client(t)
	ctx := context.Background()
	s := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: "err"})
	// A key of another type where a bucket should be is not a bucket: the
	// script reads every key with one MGET, which sees it as absent, and
	// the charge replaces it.
	if err := c.HSet(ctx, "{err}hash", "f", "v").Err(); err != nil {
		t.Fatal(err)
	}
	cs := []bucket.Charge{{Key: []byte("hash"), Limit: bucket.Limit{Count: 1, Window: time.Second}, Cost: 1}}
	if d, err := s.Reserve(ctx, time.Now(), cs, 0, make([]bucket.State, 1)); err != nil || !d.Allowed {
		t.Fatalf("Reserve over a hash: %+v, %v; want it taken for an empty bucket", d, err)
	}
	if typ := c.Type(ctx, "{err}hash").Val(); typ != "string" {
		t.Fatalf("the hash is a %s after a charge, want a bucket (string)", typ)
	}
	// A server that cannot be asked: every method returns the error.
	closed := srv.Client(t)
	closed.Close()
	cs0 := bucket.NewRedisStore(closed, bucket.RedisOptions{Prefix: "err"})
	if d, err := cs0.Reserve(ctx, time.Now(), cs, 0, make([]bucket.State, 1)); err == nil || d.Allowed {
		t.Fatalf("Reserve on a closed client: %+v, %v; want an error", d, err)
	}
	if err := cs0.Adjust(ctx, time.Now(), cs); err == nil {
		t.Fatal("Adjust on a closed client: no error")
	}
	if err := cs0.Peek(ctx, time.Now(), cs, make([]bucket.State, 1)); err == nil {
		t.Fatal("Peek on a closed client: no error")
	}
	// A value that is not a bucket is taken for an empty bucket.
	c.Set(ctx, "{err}junk", "not a bucket", 0)
	cs[0].Key = []byte("junk")
	if d, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("Reserve over junk: %+v, %v", d, err)
	}
	// So is a value of a bucket's length whose numbers are not a bucket's
	// (all bits set: NaNs).
	c.Set(ctx, "{err}nan", strings.Repeat("\xff", 40), 0)
	cs[0].Key = []byte("nan")
	st := make([]bucket.State, 1)
	if d, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil || !d.Allowed || st[0].Remaining != 0 {
		t.Fatalf("Reserve over 40 bytes of junk: %+v, %+v, %v; want the 1-unit bucket taken for empty and charged", d, st, err)
	}
	// Too few states.
	if err := s.Peek(ctx, time.Now(), append(cs, cs[0]), make([]bucket.State, 1)); err == nil {
		t.Fatal("Peek with too few states: no error")
	}
	// A canceled context and a stopped server.
	canceled, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Reserve(canceled, time.Now(), cs, 0, nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Reserve with a canceled context: %v", err)
	}
	srv.Stop()
	if _, err := s.Reserve(ctx, time.Now(), cs, 0, nil); err == nil {
		t.Fatal("Reserve with the server stopped: no error")
	}
	if _, err := s.DeletePrefix(ctx, []byte("x")); err == nil {
		t.Fatal("DeletePrefix with the server stopped: no error")
	}
}

// BenchmarkRedisReserve measures one admission over three buckets against a
// local redis-server, and reports the round trips each takes.
func BenchmarkRedisReserve(b *testing.B) {
	srv := redistest.Start(b)
	c := srv.Client(b)
	var h redisCounter
	c.AddHook(&h)
	s := newTestRedisStore(c, false)
	cs := benchCharges("user@example.com", "team-backend")
	st := make([]bucket.State, len(cs))
	ctx := context.Background()
	if _, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil { // loads the script
		b.Fatal(err)
	}
	h.reset()
	if err := c.ConfigResetStat(ctx).Err(); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(h.roundTrips())/float64(b.N), "roundtrips/op")
	b.ReportMetric(scriptMicros(b, c), "server-µs/op")
}

// scriptMicros is the server's own time per script call, from INFO
// commandstats: what a decision costs Redis, apart from the network.
func scriptMicros(b *testing.B, c *redis.Client) float64 {
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		b.Fatal(err)
	}
	m := regexp.MustCompile(`cmdstat_evalsha:calls=\d+,usec=\d+,usec_per_call=([0-9.]+)`).FindStringSubmatch(info)
	if m == nil {
		b.Fatalf("no evalsha in INFO commandstats:\n%s", info)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// BenchmarkRedisReserveParallel is BenchmarkRedisReserve from many
// goroutines at once, as concurrent requests do: decisions/s is the store's
// throughput on this machine (client and server sharing its cores), each
// goroutine on buckets of its own user.
func BenchmarkRedisReserveParallel(b *testing.B) {
	srv := redistest.Start(b)
	c := redis.NewClient(&redis.Options{Addr: srv.Addr(), ContextTimeoutEnabled: true, PoolSize: 64})
	b.Cleanup(func() { c.Close() })
	var h redisCounter
	c.AddHook(&h)
	s := newTestRedisStore(c, false)
	l := bucket.Limit{Count: 1e9, Window: time.Second}
	ctx := context.Background()
	if _, err := s.Reserve(ctx, time.Now(), []bucket.Charge{{Key: []byte("warm"), Limit: l, Cost: 1}}, 0, nil); err != nil {
		b.Fatal(err)
	}
	var users atomic.Int64
	h.reset()
	if err := c.ConfigResetStat(ctx).Err(); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetParallelism(8)
	start := time.Now()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		u := fmt.Sprintf("user%d", users.Add(1))
		cs := benchCharges(u, u)
		st := make([]bucket.State, len(cs))
		for pb.Next() {
			if _, err := s.Reserve(ctx, time.Now(), cs, 0, st); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "decisions/s")
	b.ReportMetric(float64(h.roundTrips())/float64(b.N), "roundtrips/op")
	// Pipelined, the server's time per script is the script's own, without
	// a read and a write for each call.
	b.ReportMetric(scriptMicros(b, c), "server-µs/op")
}

// TestRedisStoreScanServerTime checks Scan in the production mode, on the
// server's clock: levels drain from the time the script wrote them, keys
// with glob characters match literally, a batch larger than one SCAN call
// is walked whole, and values that are not buckets are skipped.
func TestRedisStoreScanServerTime(t *testing.T) {
	c := redistest.Start(t).Client(t)
	ctx := context.Background()
	s := bucket.NewRedisStore(c, bucket.RedisOptions{Prefix: `scan*`})
	l := bucket.Limit{Count: 10, Window: time.Minute}
	if _, err := s.Reserve(ctx, time.Time{}, []bucket.Charge{{Key: []byte("r*\x1fa"), Limit: l, Cost: 3}}, 0, nil); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 1500; i++ {
		s.Reserve(ctx, time.Time{}, []bucket.Charge{{Key: fmt.Appendf(nil, "rX\x1f%d", i), Limit: l, Cost: 1}}, 0, nil)
	}
	// Not a bucket: skipped, never an error.
	c.Set(ctx, "{scan*}r*\x1fjunk", "not a bucket", time.Minute)
	var got []bucket.Level
	err := s.Scan(ctx, time.Time{}, []byte("r*\x1f"), func(k []byte, lv bucket.Level) bool {
		if string(k) != "r*\x1fa" {
			t.Errorf("Scan reported %q", k)
		}
		got = append(got, lv)
		return true
	})
	// Three units of 6 s, less the little time since the write.
	if err != nil || len(got) != 1 || got[0].Count != 10 || got[0].Window != time.Minute || got[0].Backlog > int64(18*time.Second) || got[0].Backlog < int64(17*time.Second) {
		t.Fatalf("Scan = %+v, %v; want one bucket with a backlog just under 18 s", got, err)
	}
	n := 0
	if err := s.Scan(ctx, time.Time{}, []byte("rX\x1f"), func([]byte, bucket.Level) bool { n++; return true }); err != nil || n < 1500 {
		t.Fatalf("Scan of 1500 keys reported %d, %v", n, err)
	}
	if d, err := s.Delete(ctx, [][]byte{[]byte("r*\x1fa"), []byte("r*\x1fnone")}); d != 1 || err != nil {
		t.Fatalf("Delete = %d, %v; want 1", d, err)
	}
}
