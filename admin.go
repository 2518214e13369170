package llmratelimit

import (
	"bytes"
	"cmp"
	"container/heap"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/adaptive"
	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

func init() {
	caddy.RegisterModule(AdminAPI{})
}

// AdminAPI serves the limiter's routes on Caddy's admin endpoint, under
// /llm_rate_limit/: the buckets of the running configuration, their reset,
// and what adaptive mode learned. Caddy loads every admin.api module by
// itself, so there is nothing to configure; who may call the routes is up to
// the admin endpoint (the `admin` global option, and remote admin's
// mTLS and access lists).
//
//   - GET  /llm_rate_limit/buckets?rule=ID&zone=Z&key=K&limit=N
//   - POST /llm_rate_limit/reset?rule=ID&zone=Z&key=K (or &all=1)
//   - GET  /llm_rate_limit/learned?zone=Z&model=M
type AdminAPI struct {
	// states returns the limiter states to serve; tests replace it. The
	// default is every state of the running configurations.
	states func() []adminState
	// now is the clock; it defaults to time.Now.
	now func() time.Time
}

// CaddyModule returns the Caddy module information.
func (AdminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.llm_rate_limit",
		New: func() caddy.Module { return new(AdminAPI) },
	}
}

// adminBase starts the module's routes.
const adminBase = "/llm_rate_limit/"

// Bounds of the bucket list's limit parameter.
const (
	defaultAdminListLimit = 100
	maxAdminListLimit     = 10000
)

// Routes returns the module's admin routes.
func (a *AdminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{{Pattern: adminBase, Handler: caddy.AdminHandlerFunc(a.serve)}}
}

// adminState is one limiter state and the name of its store, as the admin
// API reports it.
type adminState struct {
	name  string
	state *sharedState
}

// runningStates returns the states of the running configurations, by name.
// The pool's lock is held only to copy them: a scan must not keep a
// configuration from loading.
func runningStates() []adminState {
	var out []adminState
	states.Range(func(key, v any) bool {
		s := v.(*sharedState)
		name := "memory"
		if s.shared {
			name = "redis"
		}
		k, _ := key.(string)
		if r, ok := strings.CutPrefix(k, "llm_rate_limit/redis/"); ok {
			// Configurations with other Redis settings have states of
			// their own; the digest tells them apart.
			name += ":" + r[:min(len(r), 8)]
		}
		out = append(out, adminState{name: name, state: s})
		return true
	})
	slices.SortFunc(out, func(a, b adminState) int { return cmp.Compare(a.name, b.name) })
	return out
}

// serve routes a request to its handler.
func (a *AdminAPI) serve(w http.ResponseWriter, r *http.Request) error {
	var method string
	var handle func(http.ResponseWriter, *http.Request, url.Values) error
	switch r.URL.Path {
	case adminBase + "buckets":
		method, handle = http.MethodGet, a.handleBuckets
	case adminBase + "reset":
		method, handle = http.MethodPost, a.handleReset
	case adminBase + "learned":
		method, handle = http.MethodGet, a.handleLearned
	default:
		return caddy.APIError{HTTPStatus: http.StatusNotFound,
			Err: fmt.Errorf("no such llm_rate_limit admin route %q: want %sbuckets, %sreset or %slearned", r.URL.Path, adminBase, adminBase, adminBase)}
	}
	if r.Method != method {
		w.Header().Set("Allow", method)
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed,
			Err: fmt.Errorf("method %s not allowed on %s: use %s", r.Method, r.URL.Path, method)}
	}
	q, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return badRequest("malformed query: %v", err)
	}
	return handle(w, r, q)
}

func (a *AdminAPI) running() []adminState {
	if a.states != nil {
		return a.states()
	}
	return runningStates()
}

func (a *AdminAPI) clock() time.Time {
	if a.now != nil {
		return a.now()
	}
	return time.Now()
}

func badRequest(format string, args ...any) error {
	return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: fmt.Errorf(format, args...)}
}

// checkParams rejects parameters other than allowed and repeated ones, so
// that a misspelt filter does not silently widen a list or a reset.
func checkParams(q url.Values, allowed ...string) error {
	for k, vs := range q {
		if !slices.Contains(allowed, k) {
			return badRequest("unknown query parameter %q: want %s", k, strings.Join(allowed, ", "))
		}
		if len(vs) > 1 {
			return badRequest("query parameter %q given %d times", k, len(vs))
		}
	}
	return nil
}

// ruleFilter selects rules by zone and id; an absent parameter selects
// every zone (or rule). The empty zone is a zone: zone= selects it.
type ruleFilter struct {
	zone, id       string
	anyZone, anyID bool
}

func newRuleFilter(q url.Values) ruleFilter {
	return ruleFilter{zone: q.Get("zone"), id: q.Get("rule"), anyZone: !q.Has("zone"), anyID: !q.Has("rule")}
}

func (f ruleFilter) matches(rr registeredRule) bool {
	return (f.anyZone || rr.zone == f.zone) && (f.anyID || rr.rule.id == f.id)
}

func (f ruleFilter) String() string {
	s := "rule " + strconv.Quote(f.id)
	if !f.anyZone {
		s += " in zone " + strconv.Quote(f.zone)
	}
	return s
}

// dimName is a dimension as rate_limit_applies_per names it.
func dimName(d dimension) string {
	switch d.kind {
	case dimUser:
		return "user"
	case dimTeam:
		return "team"
	case dimVirtualAccount:
		return "virtualaccount"
	case dimModel:
		return "model"
	}
	return "metadata." + d.metaKey
}

// keyPair is one dimension's value in a bucket's key.
type keyPair struct{ dim, value string }

// formatKey writes a bucket's applies_per values as the admin API shows
// them and reset takes them: "user=alice,model=gpt-4o", each name and value
// escaped (see escapeKeyPart).
func formatKey(pairs []keyPair) string {
	var b strings.Builder
	for i, p := range pairs {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(escapeKeyPart(p.dim))
		b.WriteByte('=')
		b.WriteString(escapeKeyPart(p.value))
	}
	return b.String()
}

// escapeKeyPart percent-escapes what would make a key ambiguous (',', '=',
// '%'), control characters, and, in a value that is not valid UTF-8, every
// byte past ASCII, so that the key survives JSON and a query string intact.
func escapeKeyPart(s string) string {
	valid := utf8.ValidString(s)
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == ',' || c == '=' || c == '%' || c < 0x20 || c == 0x7f || (c >= 0x80 && !valid) {
			fmt.Fprintf(&b, "%%%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// parseKey reads a key as formatKey writes it. The empty key has no pairs:
// the single bucket of a rule without applies_per.
func parseKey(s string) ([]keyPair, error) {
	if s == "" {
		return nil, nil
	}
	var pairs []keyPair
	for _, part := range strings.Split(s, ",") {
		dim, value, ok := strings.Cut(part, "=")
		if !ok {
			return nil, fmt.Errorf("key part %q is not DIMENSION=VALUE", part)
		}
		d, err := url.PathUnescape(dim)
		if err != nil {
			return nil, fmt.Errorf("key part %q: %v", part, err)
		}
		v, err := url.PathUnescape(value)
		if err != nil {
			return nil, fmt.Errorf("key part %q: %v", part, err)
		}
		if slices.ContainsFunc(pairs, func(p keyPair) bool { return p.dim == d }) {
			return nil, fmt.Errorf("key names %q twice", d)
		}
		pairs = append(pairs, keyPair{dim: d, value: v})
	}
	return pairs, nil
}

// keyValues orders a parsed key's values as the rule's dimensions: ok is
// false when the key names a dimension the rule does not split by, and
// complete tells whether it gives them all. values[i] is set where has[i].
func keyValues(cr *compiledRule, pairs []keyPair) (values []string, has []bool, ok, complete bool) {
	values, has = make([]string, len(cr.per)), make([]bool, len(cr.per))
	for _, p := range pairs {
		i := slices.IndexFunc(cr.per, func(d dimension) bool { return dimName(d) == p.dim })
		if i < 0 {
			return nil, nil, false, false
		}
		values[i], has[i] = p.value, true
	}
	return values, has, true, !slices.Contains(has, false)
}

// decodeKey reads the applies_per values that follow a limit's key prefix
// (see compiledRule.appendKey). ok is false for a key that is not one of the
// rule's.
func decodeKey(rest []byte, per []dimension) (values []string, ok bool) {
	values = make([]string, len(per))
	for i := range per {
		n, k := binary.Uvarint(rest)
		if k <= 0 || n > uint64(len(rest)-k) {
			return nil, false
		}
		values[i] = string(rest[k : k+int(n)])
		rest = rest[k+int(n):]
	}
	return values, len(rest) == 0
}

// bucketGroup is one limit of one rule: the buckets under its key prefix.
type bucketGroup struct {
	store string
	zone  string
	rule  *compiledRule
	unit  string
	// prefix starts its keys.
	prefix []byte
	// limit returns the limit of the bucket whose applies_per values are
	// given: a rule's is fixed, a learned one's is its model's.
	limit func(values []string) (l *compiledLimit, ok bool)
}

// groups returns the bucket groups of a state's registered rules that f
// selects.
func groups(as adminState, f ruleFilter) []bucketGroup {
	var out []bucketGroup
	for _, rr := range as.state.registered() {
		if !f.matches(rr) {
			continue
		}
		cr := rr.rule
		if cr.learned {
			out = append(out, learnedGroups(as, rr)...)
			continue
		}
		for i := range cr.limits {
			l := &cr.limits[i]
			out = append(out, bucketGroup{store: as.name, zone: rr.zone, rule: cr, unit: l.unit, prefix: l.keyPrefix,
				limit: func([]string) (*compiledLimit, bool) { return l, true }})
		}
	}
	return out
}

// learnedGroups returns the groups of adaptive mode's buckets: one per
// learned unit, each bucket under the limit its model's learner published.
func learnedGroups(as adminState, rr registeredRule) []bucketGroup {
	var out []bucketGroup
	for _, unit := range []string{"concurrent_requests", "requests_per_minute", "tokens_per_minute"} {
		out = append(out, bucketGroup{store: as.name, zone: rr.zone, rule: rr.rule, unit: unit,
			prefix: []byte(rr.rule.prefix + unit + string(keySep)),
			limit: func(values []string) (*compiledLimit, bool) {
				l := as.state.learners.find(rr.zone, values[0])
				if l == nil {
					return nil, false
				}
				p := l.limits.Load()
				for _, cl := range []*compiledLimit{p.requests, p.tokens, p.concurrent} {
					if cl != nil && cl.unit == unit {
						return cl, true
					}
				}
				return nil, false
			}})
	}
	return out
}

// find returns the learner of a model in a zone (or the one that model
// shares past maxLearners), without creating one.
func (ls *learners) find(zone, model string) *learned {
	ls.mu.RLock()
	defer ls.mu.RUnlock()
	if l := ls.m[learnerKey{zone, model}]; l != nil {
		return l
	}
	return ls.m[learnerKey{zone, overflowModel}]
}

// adminLimit is a limit as the admin API shows it.
type adminLimit struct {
	// LimitTo is the limit's count; absent for adaptive mode's counting
	// concurrency limit, before a cap is learned.
	LimitTo int64 `json:"limit_to,omitempty"`
	// Window and WindowSeconds are the rate's window; absent for a
	// concurrency limit.
	Window        string `json:"window,omitempty"`
	WindowSeconds int64  `json:"window_seconds,omitempty"`
	// Burst is the capacity: how much the bucket holds when full.
	Burst int64 `json:"burst,omitempty"`
	// Unbounded marks a concurrency limit that only counts.
	Unbounded bool `json:"unbounded,omitempty"`
}

func newAdminLimit(cl *compiledLimit, l bucket.Limit) adminLimit {
	if cl.hidden {
		return adminLimit{Unbounded: true}
	}
	al := adminLimit{LimitTo: l.Count}
	if !l.Concurrent() {
		al.Window, al.WindowSeconds, al.Burst = l.Window.String(), int64(l.Window/time.Second), l.Capacity()
	}
	return al
}

// adminBucket is one bucket as the list shows it.
type adminBucket struct {
	Store      string            `json:"store"`
	Zone       string            `json:"zone"`
	Rule       string            `json:"rule"`
	Unit       string            `json:"unit"`
	AppliesPer map[string]string `json:"applies_per"`
	// Key is the applies_per values as reset takes them.
	Key   string     `json:"key"`
	Limit adminLimit `json:"limit"`
	// Used is the units taken: a rate bucket's not yet drained (more than
	// the burst when in debt), a concurrency bucket's held.
	Used      int64 `json:"used"`
	Remaining int64 `json:"remaining"`
	// Reset is when a rate bucket is full again.
	Reset             string  `json:"reset,omitempty"`
	ResetAfterSeconds float64 `json:"reset_after_seconds,omitempty"`
	// Fallback marks a bucket of a Redis store's local stand-in, read
	// during an outage under fail_mode local.
	Fallback bool `json:"fallback,omitempty"`

	// perText orders buckets of rules that share an id but not a split.
	perText string
}

// adminBucketCmp is the list's order: zone, rule, split, unit, key, store.
func adminBucketCmp(a, b *adminBucket) int {
	return cmp.Or(cmp.Compare(a.Zone, b.Zone), cmp.Compare(a.Rule, b.Rule), cmp.Compare(a.perText, b.perText),
		cmp.Compare(a.Unit, b.Unit), cmp.Compare(a.Key, b.Key), cmp.Compare(a.Store, b.Store))
}

// firstBuckets keeps the n first buckets in the list's order, as a max-heap:
// a list of millions of buckets costs n entries, not millions.
type firstBuckets struct {
	n     int
	items []*adminBucket
	// kept holds the identities of items, to drop repeats.
	kept map[string]struct{}
}

func newFirstBuckets(n int) *firstBuckets {
	return &firstBuckets{n: n, kept: make(map[string]struct{})}
}

func (h *firstBuckets) Len() int           { return len(h.items) }
func (h *firstBuckets) Less(i, j int) bool { return adminBucketCmp(h.items[i], h.items[j]) > 0 }
func (h *firstBuckets) Swap(i, j int)      { h.items[i], h.items[j] = h.items[j], h.items[i] }
func (h *firstBuckets) Push(x any)         { h.items = append(h.items, x.(*adminBucket)) }
func (h *firstBuckets) Pop() any {
	x := h.items[len(h.items)-1]
	h.items = h.items[:len(h.items)-1]
	return x
}

// name names a bucket by every field of the list's order.
func (b *adminBucket) name() string {
	return strings.Join([]string{b.Zone, b.Rule, b.perText, b.Unit, b.Key, b.Store}, "\x00")
}

// offer keeps b if it is among the first n so far, and reports whether it
// is new: one equal to a bucket kept is a repeat (Redis's SCAN may report a
// key twice) and is dropped. A repeat of a bucket not kept is one that
// sorts after the n kept, so it is left out either way.
func (h *firstBuckets) offer(b *adminBucket) bool {
	if len(h.items) == h.n && adminBucketCmp(b, h.items[0]) >= 0 {
		return true
	}
	id := b.name()
	if _, ok := h.kept[id]; ok {
		return false
	}
	h.kept[id] = struct{}{}
	heap.Push(h, b)
	if len(h.items) > h.n {
		delete(h.kept, heap.Pop(h).(*adminBucket).name())
	}
	return true
}

// bucketList is the list's answer.
type bucketList struct {
	Buckets []*adminBucket `json:"buckets"`
	// Matched counts every bucket that matched (a key Redis's SCAN
	// reports twice may count twice); Truncated says that some were left
	// out by limit.
	Matched   int  `json:"matched"`
	Truncated bool `json:"truncated"`
}

// handleBuckets lists buckets.
func (a *AdminAPI) handleBuckets(w http.ResponseWriter, r *http.Request, q url.Values) error {
	if err := checkParams(q, "rule", "zone", "key", "limit"); err != nil {
		return err
	}
	limit := defaultAdminListLimit
	if s := q.Get("limit"); q.Has("limit") {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 || n > maxAdminListLimit {
			return badRequest("limit must be a whole number from 1 to %d, got %q", maxAdminListLimit, s)
		}
		limit = n
	}
	f := newRuleFilter(q)
	var filter []keyPair
	if q.Has("key") {
		var err error
		if filter, err = parseKey(q.Get("key")); err != nil {
			return badRequest("key: %v", err)
		}
	}
	now := a.clock()
	first := newFirstBuckets(limit)
	var matched, rulesSeen, rulesKeyed int
	for _, as := range a.running() {
		gs := groups(as, f)
		var selected []bucketGroup
		seen := map[*compiledRule]bool{}
		for _, g := range gs {
			if !seen[g.rule] {
				seen[g.rule] = true
				rulesSeen++
				if _, _, ok, _ := keyValues(g.rule, filter); ok {
					rulesKeyed++
				}
			}
			if _, _, ok, _ := keyValues(g.rule, filter); ok {
				selected = append(selected, g)
			}
		}
		n, err := scanGroups(r.Context(), as, selected, filter, now, first.offer)
		matched += n
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: fmt.Errorf("store %s: %w", as.name, err)}
		}
	}
	if !f.anyID && rulesSeen == 0 {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no running llm_rate_limit %s", f)}
	}
	if len(filter) > 0 && rulesSeen > 0 && rulesKeyed == 0 {
		return badRequest("key %q names a dimension no selected rule splits by", q.Get("key"))
	}
	out := bucketList{Buckets: first.items, Matched: matched, Truncated: matched > len(first.items)}
	slices.SortFunc(out.Buckets, adminBucketCmp)
	if out.Buckets == nil {
		out.Buckets = []*adminBucket{}
	}
	return writeJSON(w, out)
}

// scanGroups walks a state's store once for the groups, and offers every
// bucket of theirs that the key filter selects. It returns how many of them
// were not repeats.
func scanGroups(ctx context.Context, as adminState, gs []bucketGroup, filter []keyPair, now time.Time, offer func(*adminBucket) bool) (int, error) {
	if len(gs) == 0 {
		return 0, nil
	}
	byPrefix := make(map[string]*bucketGroup, len(gs))
	common := gs[0].prefix
	for i := range gs {
		byPrefix[string(gs[i].prefix)] = &gs[i]
		n := 0
		for n < len(common) && n < len(gs[i].prefix) && common[n] == gs[i].prefix[n] {
			n++
		}
		common = common[:n]
	}
	store := as.state.store
	fo, _ := store.(*bucket.Failover)
	fallback := false
	if fo != nil {
		// One decision for the whole scan: which store answers, and so
		// how its buckets are labelled.
		s, local, err := fo.ScanSource()
		if s == nil {
			return 0, err
		}
		store, fallback = s, local
	}
	matched := 0
	err := store.Scan(ctx, now, common, func(key []byte, lv bucket.Level) bool {
		// A limit's prefix ends with a separator: try each one in the key
		// (the common prefix may end with the one that ends a limit's).
		var g *bucketGroup
		for i := max(len(common)-1, 0); i < len(key); i++ {
			if key[i] == keySep {
				if g = byPrefix[string(key[:i+1])]; g != nil {
					key = key[i+1:]
					break
				}
			}
		}
		if g == nil {
			return true
		}
		values, ok := decodeKey(key, g.rule.per)
		if !ok {
			return true
		}
		pairs := make([]keyPair, len(values))
		for i, v := range values {
			pairs[i] = keyPair{dim: dimName(g.rule.per[i]), value: v}
		}
		for _, fp := range filter {
			if !slices.Contains(pairs, fp) {
				return true
			}
		}
		cl, ok := g.limit(values)
		if !ok {
			return true
		}
		l := cl.limit
		if fallback {
			l = fo.LocalLimit(l)
		}
		st, used := lv.Under(l)
		b := &adminBucket{Store: g.store, Zone: g.zone, Rule: g.rule.id, Unit: g.unit, AppliesPer: make(map[string]string, len(pairs)),
			Key: formatKey(pairs), Limit: newAdminLimit(cl, l), Used: used, Remaining: st.Remaining, Fallback: fallback, perText: g.rule.perText}
		for _, p := range pairs {
			b.AppliesPer[p.dim] = p.value
		}
		if !l.Concurrent() {
			b.Reset = now.Add(st.ResetAfter).UTC().Format(time.RFC3339Nano)
			b.ResetAfterSeconds = st.ResetAfter.Seconds()
		}
		if offer(b) {
			matched++
		}
		return true
	})
	return matched, err
}

// resetResult is reset's answer.
type resetResult struct {
	// Reset counts the buckets deleted.
	Reset int          `json:"reset"`
	Rules []resetRules `json:"rules"`
}

type resetRules struct {
	Store string `json:"store"`
	Zone  string `json:"zone"`
	Rule  string `json:"rule"`
	Reset int    `json:"reset"`
}

// handleReset deletes buckets: one per limit of the rule for the key given,
// or all of the rule's.
func (a *AdminAPI) handleReset(w http.ResponseWriter, r *http.Request, q url.Values) error {
	if err := checkParams(q, "rule", "zone", "key", "all"); err != nil {
		return err
	}
	if !q.Has("rule") || q.Get("rule") == "" {
		return badRequest("rule is required: the id of the rule whose buckets to reset")
	}
	all := q.Has("all")
	if all && q.Get("all") != "1" && q.Get("all") != "true" {
		return badRequest("all must be 1 or true, got %q", q.Get("all"))
	}
	if all == q.Has("key") {
		return badRequest("give either key (the bucket's applies_per values, as the bucket list shows them) or all=1")
	}
	pairs, err := parseKey(q.Get("key"))
	if err != nil {
		return badRequest("key: %v", err)
	}
	f := newRuleFilter(q)
	type target struct {
		as adminState
		rr registeredRule
	}
	var targets []target
	for _, as := range a.running() {
		for _, rr := range as.state.registered() {
			if !f.matches(rr) {
				continue
			}
			// Every rule must take the key before any bucket is reset.
			if _, _, ok, complete := keyValues(rr.rule, pairs); !all && (!ok || !complete) {
				want := make([]string, len(rr.rule.per))
				for i, d := range rr.rule.per {
					want[i] = dimName(d)
				}
				return badRequest("rule %q in zone %q splits by [%s]: key must give exactly those dimensions", rr.rule.id, rr.zone, strings.Join(want, ", "))
			}
			targets = append(targets, target{as, rr})
		}
	}
	if len(targets) == 0 {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no running llm_rate_limit %s", f)}
	}
	out := resetResult{Rules: []resetRules{}}
	for _, t := range targets {
		n, err := resetRule(r.Context(), t.as, t.rr, all, pairs)
		out.Reset += n
		out.Rules = append(out.Rules, resetRules{Store: t.as.name, Zone: t.rr.zone, Rule: t.rr.rule.id, Reset: n})
		if err != nil {
			return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable,
				Err: fmt.Errorf("store %s: %w (%d buckets reset before the error)", t.as.name, err, out.Reset)}
		}
	}
	return writeJSON(w, out)
}

// resetRule deletes one rule's buckets.
func resetRule(ctx context.Context, as adminState, rr registeredRule, all bool, pairs []keyPair) (int, error) {
	cr, store := rr.rule, as.state.store
	if all {
		return store.DeletePrefix(ctx, []byte(cr.prefix))
	}
	values, _, _, _ := keyValues(cr, pairs) // checked by handleReset
	var prefixes [][]byte
	if cr.learned {
		for _, unit := range []string{"concurrent_requests", "requests_per_minute", "tokens_per_minute"} {
			prefixes = append(prefixes, []byte(cr.prefix+unit+string(keySep)))
		}
	} else {
		for i := range cr.limits {
			prefixes = append(prefixes, cr.limits[i].keyPrefix)
		}
	}
	keys := make([][]byte, len(prefixes))
	wake := make([]bucket.Charge, len(prefixes))
	for i, p := range prefixes {
		k := bytes.Clone(p)
		for _, v := range values {
			k = appendKeyValue(k, v)
		}
		keys[i], wake[i] = k, bucket.Charge{Key: k}
	}
	n, err := store.Delete(ctx, keys)
	// The requests waiting for these buckets may go now.
	as.state.queue.Wake(wake)
	return n, err
}

// adminRate is a learned rate.
type adminRate struct {
	LimitTo int64  `json:"limit_to"`
	Window  string `json:"window,omitempty"`
	Burst   int64  `json:"burst,omitempty"`
	// Source says where it came from: headers, measured or retry-after
	// (see the adaptive package's Source constants); refusals for a
	// concurrency cap.
	Source string `json:"source"`
}

// adminLearned is one learner as /learned shows it.
type adminLearned struct {
	Store string `json:"store"`
	Zone  string `json:"zone"`
	Model string `json:"model"`
	// Overflow marks the learner that models past the bound share.
	Overflow bool `json:"overflow,omitempty"`
	// Requests and Tokens are the learned rates, Concurrent the learned
	// cap; each absent when nothing is known.
	Requests   *adminRate `json:"requests,omitempty"`
	Tokens     *adminRate `json:"tokens,omitempty"`
	Concurrent *adminRate `json:"concurrent,omitempty"`
	// BlockedUntil is when the upstream said it takes requests again, if
	// that is still ahead.
	BlockedUntil string `json:"blocked_until,omitempty"`
	// MeasuredPerSecond is the rate last measured from refusals.
	MeasuredPerSecond float64 `json:"measured_per_second,omitempty"`
	MeasuredAt        string  `json:"measured_at,omitempty"`
	InFlight          int64   `json:"in_flight"`
	Accepted          int64   `json:"accepted"`
	LastRefusal       string  `json:"last_refusal,omitempty"`
}

// handleLearned lists what adaptive mode learned, per zone and model.
func (a *AdminAPI) handleLearned(w http.ResponseWriter, r *http.Request, q url.Values) error {
	if err := checkParams(q, "zone", "model"); err != nil {
		return err
	}
	now := a.clock()
	stamp := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format(time.RFC3339Nano)
	}
	rate := func(r adaptive.Rate, source string) *adminRate {
		if r.Count <= 0 {
			return nil
		}
		return &adminRate{LimitTo: r.Count, Window: r.Window.String(), Burst: r.Burst, Source: source}
	}
	out := struct {
		Learned []adminLearned `json:"learned"`
	}{Learned: []adminLearned{}}
	for _, as := range a.running() {
		for _, e := range as.state.learners.entries() {
			overflow := e.key.model == overflowModel
			model := e.key.model
			if overflow {
				model = ""
			}
			if q.Has("zone") && e.key.zone != q.Get("zone") || q.Has("model") && (overflow || model != q.Get("model")) {
				continue
			}
			s := e.l.learner.Snapshot()
			al := adminLearned{Store: as.name, Zone: e.key.zone, Model: model, Overflow: overflow,
				Requests: rate(s.Requests, s.RequestsSource), Tokens: rate(s.Tokens, adaptive.SourceHeaders),
				MeasuredPerSecond: s.MeasuredPerSecond, MeasuredAt: stamp(s.MeasuredAt),
				InFlight: s.InFlight, Accepted: s.Accepted, LastRefusal: stamp(s.LastRefusal)}
			if s.Concurrent > 0 {
				al.Concurrent = &adminRate{LimitTo: s.Concurrent, Source: "refusals"}
			}
			if s.BlockedUntil.After(now) {
				al.BlockedUntil = stamp(s.BlockedUntil)
			}
			out.Learned = append(out.Learned, al)
		}
	}
	return writeJSON(w, out)
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// Interface guards.
var (
	_ caddy.Module      = (*AdminAPI)(nil)
	_ caddy.AdminRouter = (*AdminAPI)(nil)
)
