package llmratelimit

import (
	"cmp"
	"context"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// states holds the limiter state that outlives a configuration. During a
// graceful reload the new configuration is provisioned, and so takes its
// reference, before the old one is cleaned up, so the buckets carry over.
var states = caddy.NewUsagePool()

// memoryStateKey names the in-memory state in the pool. There is one per
// process: zones and rule ids keep handlers apart inside it. A Redis store
// has one state per Redis configuration (see RedisConfig.poolKey).
const memoryStateKey = "llm_rate_limit/memory"

// sweepInterval is how often drained buckets are dropped. Dropping a full
// bucket changes no decision, so the interval only trades memory for work.
const sweepInterval = time.Minute

// sharedState is the limiter state shared by every llm_rate_limit handler of
// every loaded configuration.
type sharedState struct {
	store bucket.Store
	// shared is set when other Caddy instances use the same store: a rule
	// this process drops may be theirs still, so its buckets are left to
	// expire instead of being deleted.
	shared bool
	// closer, if set, closes the store's connections once the state is
	// destructed and no request uses it any more (see enter and leave).
	closer func() error
	// active counts the requests being served on this state; destructed
	// is set by Destruct; closeOnce closes the store's connections once.
	active     atomic.Int64
	destructed atomic.Bool
	closeOnce  sync.Once
	// logger is the latest configuration's, for the store's outage
	// messages (the state outlives the configuration that made it).
	logger atomic.Pointer[zap.Logger]
	// queue holds the requests waiting for their turn. Requests that wait
	// across a reload stay in it and are served by the same queue.
	queue *bucket.Queue
	// learners are adaptive mode's, per zone and model.
	learners learners

	mu sync.Mutex
	// refs holds, per rule key prefix, the rules of the provisioned
	// handlers that use it, the latest provisioned last. A prefix whose
	// list empties belongs to a removed rule. The admin API reads the
	// latest rule of each prefix to list and reset its buckets.
	refs map[string][]registeredRule

	stop chan struct{}
	done chan struct{}
}

// acquireState returns the state for the store configuration (nil: the
// in-memory store) and the key to release it with.
func acquireState(cfg *StoreConfig, logger *zap.Logger) (*sharedState, string, error) {
	key, build := memoryStateKey, func() (*sharedState, error) {
		store := bucket.NewMemoryStore()
		return newSharedState(store), nil
	}
	if cfg != nil && cfg.Redis != nil {
		rc, err := cfg.Redis.resolved(caddy.NewReplacer())
		if err != nil {
			return nil, "", err
		}
		key, build = rc.poolKey(), func() (*sharedState, error) { return newRedisState(rc, logger) }
	}
	v, _, err := states.LoadOrNew(key, func() (caddy.Destructor, error) {
		s, err := build()
		if err != nil {
			return nil, err
		}
		go s.sweep()
		return s, nil
	})
	if err != nil {
		return nil, "", err
	}
	s := v.(*sharedState)
	s.logger.Store(logger)
	return s, key, nil
}

// newSharedState returns a state over store.
func newSharedState(store bucket.Store) *sharedState {
	return &sharedState{
		store:    store,
		queue:    bucket.NewQueue(store, bucket.SystemClock{}),
		learners: learners{m: make(map[learnerKey]*learned)},
		refs:     make(map[string][]registeredRule),
		stop:     make(chan struct{}),
		done:     make(chan struct{}),
	}
}

// enter records that a request is being served on the state.
func (s *sharedState) enter() { s.active.Add(1) }

// leave records that a request is done with the state, and closes the
// store's connections if it was the last one of a destructed state.
func (s *sharedState) leave() {
	if s.active.Add(-1) == 0 && s.destructed.Load() {
		s.close()
	}
}

// close closes the store's connections, once.
func (s *sharedState) close() {
	if s.closer != nil {
		s.closeOnce.Do(func() { s.closer() })
	}
}

func releaseState(key string) error {
	_, err := states.Delete(key)
	return err
}

// Destruct stops the sweeper once no configuration uses the state.
func (s *sharedState) Destruct() error {
	close(s.stop)
	<-s.done
	// Requests of the configuration that let go of the state may still be
	// running (a long stream): they close the connections when the last
	// one leaves.
	s.destructed.Store(true)
	if s.active.Load() == 0 {
		s.close()
	}
	return nil
}

func (s *sharedState) sweep() {
	defer close(s.done)
	t := time.NewTicker(sweepInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case now := <-t.C:
			// The in-memory store, or the Redis store's local fallback,
			// drops its drained buckets.
			if sw, ok := s.store.(interface{ Sweep(time.Time) int }); ok {
				sw.Sweep(now)
			}
		}
	}
}

// registeredRule is a provisioned handler's rule, with its zone.
type registeredRule struct {
	zone string
	rule *compiledRule
}

// retain records that a handler of zone uses these rules.
func (s *sharedState) retain(zone string, rules []*compiledRule) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range rules {
		s.refs[r.prefix] = append(s.refs[r.prefix], registeredRule{zone: zone, rule: r})
	}
}

// release records that a handler no longer uses these rules, and frees the
// buckets of the prefixes no handler uses any more.
func (s *sharedState) release(rules []*compiledRule) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range rules {
		p := r.prefix
		s.refs[p] = slices.DeleteFunc(s.refs[p], func(rr registeredRule) bool { return rr.rule == r })
		if len(s.refs[p]) > 0 {
			continue
		}
		delete(s.refs, p)
		if !s.shared {
			s.store.DeletePrefix(context.Background(), []byte(p))
		}
	}
}

// registered returns the latest rule of each prefix in use, by zone, rule id
// and prefix.
func (s *sharedState) registered() []registeredRule {
	s.mu.Lock()
	out := make([]registeredRule, 0, len(s.refs))
	for _, rs := range s.refs {
		out = append(out, rs[len(rs)-1])
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b registeredRule) int {
		return cmp.Or(cmp.Compare(a.zone, b.zone), cmp.Compare(a.rule.id, b.rule.id), cmp.Compare(a.rule.prefix, b.rule.prefix))
	})
	return out
}
