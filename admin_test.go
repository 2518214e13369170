package llmratelimit

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/adaptive"
	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

// adminFixture is an admin API over a state of its own, on a fake clock,
// with compiled rules registered as a handler would register them.
type adminFixture struct {
	api   *AdminAPI
	state *sharedState
	rules []compiledRule
	clock *fakeClock
}

func newAdminFixture(t *testing.T, zone string, rules []Rule) *adminFixture {
	t.Helper()
	crs, err := compileRules(zone, rules)
	if err != nil {
		t.Fatal(err)
	}
	f := &adminFixture{state: newSharedState(bucket.NewMemoryStore()), rules: crs,
		clock: &fakeClock{t: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}}
	ptrs := make([]*compiledRule, len(crs))
	for i := range crs {
		ptrs[i] = &crs[i]
	}
	f.state.retain(zone, ptrs)
	f.api = &AdminAPI{
		states: func() []adminState { return []adminState{{name: "memory", state: f.state}} },
		now:    f.clock.now,
	}
	return f
}

// charge charges every limit of rule i for a request of id, at the fixture's
// time, and returns the charges (to release concurrency slots with).
func (f *adminFixture) charge(t *testing.T, i int, id identity) []bucket.Charge {
	t.Helper()
	cr := &f.rules[i]
	var cs []bucket.Charge
	for j := range cr.limits {
		cs = append(cs, bucket.Charge{Key: cr.appendKey(nil, &cr.limits[j], &id), Limit: cr.limits[j].limit, Cost: 1})
	}
	d, err := f.state.store.Reserve(context.Background(), f.clock.now(), cs, 0, nil)
	if err != nil || !d.Allowed {
		t.Fatalf("charging rule %q for %+v: %+v, %v", cr.id, id, d, err)
	}
	return cs
}

// adminCall calls the API as Caddy's admin endpoint would, and returns the
// status and the body; an error answers as the endpoint writes it.
func adminCall(t *testing.T, a *AdminAPI, method, target string) (int, []byte) {
	t.Helper()
	w := httptest.NewRecorder()
	err := a.Routes()[0].Handler.ServeHTTP(w, httptest.NewRequest(method, target, nil))
	if err == nil {
		return w.Code, w.Body.Bytes()
	}
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("%s %s: an error that is not a caddy.APIError: %v", method, target, err)
	}
	apiErr.Message = apiErr.Err.Error()
	b, _ := json.Marshal(apiErr)
	return apiErr.HTTPStatus, b
}

func listBuckets(t *testing.T, a *AdminAPI, query string) bucketList {
	t.Helper()
	code, body := adminCall(t, a, http.MethodGet, "/llm_rate_limit/buckets"+query)
	if code != http.StatusOK {
		t.Fatalf("GET buckets%s: %d %s", query, code, body)
	}
	var out bucketList
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatalf("GET buckets%s: %v in %s", query, err, body)
	}
	return out
}

var adminRules = []Rule{
	{ID: "per-user", AppliesPer: []string{"user", "model"}, Limits: []Limit{
		{LimitTo: 3, Unit: "requests_per_minute"},
		{LimitTo: 5, Unit: "concurrent_requests"},
	}},
	{ID: "global", Limits: []Limit{{LimitTo: 100, Unit: "requests_per_hour", Burst: 10}}},
}

func TestAdminBucketsList(t *testing.T) {
	f := newAdminFixture(t, "z1", adminRules)
	alice := identity{user: "alice", model: "gpt-4o"}
	for range 3 {
		f.charge(t, 0, alice)
	}
	f.charge(t, 0, identity{user: "bob", model: "gpt-4o"})
	f.charge(t, 1, identity{})
	f.clock.advance(10 * time.Second)

	all := listBuckets(t, f.api, "")
	var got []string
	for _, b := range all.Buckets {
		got = append(got, b.Rule+" "+b.Unit+" "+b.Key)
	}
	want := []string{
		"global requests_per_hour ",
		"per-user concurrent_requests user=alice,model=gpt-4o",
		"per-user concurrent_requests user=bob,model=gpt-4o",
		"per-user requests_per_minute user=alice,model=gpt-4o",
		"per-user requests_per_minute user=bob,model=gpt-4o",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") || all.Matched != 5 || all.Truncated {
		t.Fatalf("buckets (matched %d, truncated %v):\n%s\nwant:\n%s", all.Matched, all.Truncated, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}

	// Alice's rate bucket: 3 of 3 used 10 s ago, one unit back in 10 s,
	// full in 50 s.
	out := listBuckets(t, f.api, "?rule=per-user&key=user=alice&zone=z1")
	if len(out.Buckets) != 2 {
		t.Fatalf("alice's buckets: %d, want 2", len(out.Buckets))
	}
	rate := out.Buckets[1]
	wantReset := f.clock.now().Add(50 * time.Second).Format(time.RFC3339Nano)
	if rate.Zone != "z1" || rate.Unit != "requests_per_minute" || rate.AppliesPer["user"] != "alice" || rate.AppliesPer["model"] != "gpt-4o" ||
		rate.Used != 3 || rate.Remaining != 0 || rate.ResetAfterSeconds != 50 || rate.Reset != wantReset ||
		rate.Limit != (adminLimit{LimitTo: 3, Window: "1m0s", WindowSeconds: 60, Burst: 3}) {
		t.Fatalf("alice's rate bucket: %+v; want 3 used, 0 remaining, reset in 50 s at %s", rate, wantReset)
	}
	conc := out.Buckets[0]
	if conc.Used != 3 || conc.Remaining != 2 || conc.Reset != "" || conc.Limit != (adminLimit{LimitTo: 5}) {
		t.Fatalf("alice's concurrency bucket: %+v; want 3 held of 5, no reset", conc)
	}

	// The limit keeps the first buckets in order and says some were left.
	out = listBuckets(t, f.api, "?limit=2")
	if len(out.Buckets) != 2 || out.Matched != 5 || !out.Truncated || out.Buckets[0].Rule != "global" || out.Buckets[1].Key != "user=alice,model=gpt-4o" {
		t.Fatalf("limit=2: %+v", out)
	}
	// A key filter on a later dimension, and a zone with nothing.
	if out := listBuckets(t, f.api, "?key=model=gpt-4o&rule=per-user"); out.Matched != 4 {
		t.Fatalf("model=gpt-4o matched %d, want 4", out.Matched)
	}
	if out := listBuckets(t, f.api, "?zone=other"); out.Matched != 0 || out.Buckets == nil {
		t.Fatalf("zone other: %+v, want an empty list", out)
	}
	// The global rule's single bucket: 1 used of a burst of 10.
	if out := listBuckets(t, f.api, "?rule=global&key="); len(out.Buckets) != 1 || out.Buckets[0].Remaining != 9 || out.Buckets[0].Limit.Burst != 10 {
		t.Fatalf("global: %+v", out)
	}
}

// TestAdminBucketsAtScale lists a few of many buckets: the answer holds the
// first ones in order, and nothing else.
func TestAdminBucketsAtScale(t *testing.T) {
	f := newAdminFixture(t, "", adminRules[:1])
	for i := range 3000 {
		f.charge(t, 0, identity{user: "u" + string(rune('a'+i%26)) + strings.Repeat("x", i/26), model: "m"})
	}
	out := listBuckets(t, f.api, "?limit=3")
	if out.Matched != 6000 || len(out.Buckets) != 3 {
		t.Fatalf("matched %d, listed %d; want 6000 and 3", out.Matched, len(out.Buckets))
	}
	for i, want := range []string{"user=ua,model=m", "user=uax,model=m", "user=uaxx,model=m"} {
		if b := out.Buckets[i]; b.Unit != "concurrent_requests" || b.Key != want {
			t.Fatalf("bucket %d: %s %s, want concurrent_requests %s", i, b.Unit, b.Key, want)
		}
	}
}

func TestAdminBadRequests(t *testing.T) {
	f := newAdminFixture(t, "", adminRules)
	for _, c := range []struct {
		method, target string
		code           int
		msg            string
	}{
		{"POST", "/llm_rate_limit/buckets", 405, "method POST not allowed"},
		{"GET", "/llm_rate_limit/reset?rule=global&all=1", 405, "use POST"},
		{"DELETE", "/llm_rate_limit/learned", 405, "use GET"},
		{"GET", "/llm_rate_limit/nothing", 404, "no such llm_rate_limit admin route"},
		{"GET", "/llm_rate_limit/buckets?limit=0", 400, "limit must be a whole number from 1 to 10000"},
		{"GET", "/llm_rate_limit/buckets?limit=10001", 400, "limit must be"},
		{"GET", "/llm_rate_limit/buckets?limit=ten", 400, "limit must be"},
		{"GET", "/llm_rate_limit/buckets?rules=global", 400, `unknown query parameter "rules"`},
		{"GET", "/llm_rate_limit/buckets?rule=a&rule=b", 400, `given 2 times`},
		{"GET", "/llm_rate_limit/buckets?key=user", 400, `not DIMENSION=VALUE`},
		{"GET", "/llm_rate_limit/buckets?key=user=a,user=b", 400, `names "user" twice`},
		{"GET", "/llm_rate_limit/buckets?key=user=%ZZ", 400, `malformed query`},
		{"GET", "/llm_rate_limit/buckets?key=team=x", 400, `no selected rule splits by`},
		{"GET", "/llm_rate_limit/buckets?rule=nope", 404, `no running llm_rate_limit rule "nope"`},
		{"GET", "/llm_rate_limit/buckets?rule=global&zone=z9", 404, `rule "global" in zone "z9"`},
		{"POST", "/llm_rate_limit/reset?key=user=a", 400, "rule is required"},
		{"POST", "/llm_rate_limit/reset?rule=per-user", 400, "either key"},
		{"POST", "/llm_rate_limit/reset?rule=per-user&key=user=a&all=1", 400, "either key"},
		{"POST", "/llm_rate_limit/reset?rule=per-user&all=yes", 400, "all must be 1 or true"},
		{"POST", "/llm_rate_limit/reset?rule=per-user&key=user=a", 400, "splits by [user, model]"},
		{"POST", "/llm_rate_limit/reset?rule=nope&all=1", 404, `no running llm_rate_limit rule "nope"`},
		{"GET", "/llm_rate_limit/learned?zone=a&mode=x", 400, `unknown query parameter "mode"`},
	} {
		code, body := adminCall(t, f.api, c.method, c.target)
		var e struct{ Error string }
		if err := json.Unmarshal(body, &e); code != c.code || err != nil || !strings.Contains(e.Error, c.msg) {
			t.Errorf("%s %s: %d %s; want %d with an error saying %q", c.method, c.target, code, body, c.code, c.msg)
		}
	}
}

func TestAdminReset(t *testing.T) {
	f := newAdminFixture(t, "", adminRules)
	alice, bob := identity{user: "alice", model: "gpt-4o"}, identity{user: "bob", model: "gpt-4o"}
	for range 3 {
		f.charge(t, 0, alice)
	}
	f.charge(t, 0, bob)
	f.charge(t, 1, identity{})

	code, body := adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=per-user&key=user=alice,model=gpt-4o")
	var res resetResult
	if err := json.Unmarshal(body, &res); code != 200 || err != nil || res.Reset != 2 || len(res.Rules) != 1 || res.Rules[0].Rule != "per-user" {
		t.Fatalf("reset alice: %d %s; want 2 buckets (rate and concurrency) reset", code, body)
	}
	out := listBuckets(t, f.api, "?rule=per-user")
	for _, b := range out.Buckets {
		if b.AppliesPer["user"] != "bob" || b.Used != 1 {
			t.Fatalf("after alice's reset: %+v; want only bob's buckets, as they were", b)
		}
	}
	if out.Matched != 2 {
		t.Fatalf("after alice's reset: %d buckets, want bob's 2", out.Matched)
	}
	// Resetting again finds nothing; the order of the key does not matter.
	code, body = adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=per-user&key=model=gpt-4o,user=alice")
	if json.Unmarshal(body, &res); code != 200 || res.Reset != 0 {
		t.Fatalf("second reset of alice: %d %s", code, body)
	}
	// all=1 resets the rule's every bucket and no other rule's.
	code, body = adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=per-user&all=1")
	if json.Unmarshal(body, &res); code != 200 || res.Reset != 2 {
		t.Fatalf("reset all: %d %s; want bob's 2", code, body)
	}
	if out := listBuckets(t, f.api, ""); out.Matched != 1 || out.Buckets[0].Rule != "global" {
		t.Fatalf("after reset all: %+v; want only the global bucket", out)
	}
	// The empty key is the single bucket of a rule without applies_per.
	code, body = adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=global&key=")
	if json.Unmarshal(body, &res); code != 200 || res.Reset != 1 {
		t.Fatalf("reset global: %d %s", code, body)
	}
}

// TestAdminResetInFlight resets a concurrency bucket while requests hold
// its slots: the slots are free at once, the releases of those requests
// later give back nothing, and the count holds as before.
func TestAdminResetInFlight(t *testing.T) {
	f := newAdminFixture(t, "", []Rule{{ID: "conc", AppliesPer: []string{"user"}, Limits: []Limit{{LimitTo: 2, Unit: "concurrent_requests"}}}})
	alice := identity{user: "alice"}
	old := [][]bucket.Charge{f.charge(t, 0, alice), f.charge(t, 0, alice)}
	if code, body := adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=conc&key=user=alice"); code != 200 {
		t.Fatalf("reset: %d %s", code, body)
	}
	fresh := [][]bucket.Charge{f.charge(t, 0, alice), f.charge(t, 0, alice)}
	for _, cs := range append(old, fresh...) {
		if err := f.state.queue.Release(cs); err != nil {
			t.Fatal(err)
		}
	}
	if out := listBuckets(t, f.api, ""); out.Matched != 0 {
		t.Fatalf("after every release: %+v; want nothing held", out.Buckets)
	}
	f.charge(t, 0, alice)
	f.charge(t, 0, alice)
	cr := &f.rules[0]
	d, err := f.state.store.Reserve(context.Background(), f.clock.now(),
		[]bucket.Charge{{Key: cr.appendKey(nil, &cr.limits[0], &alice), Limit: cr.limits[0].limit, Cost: 1}}, 0, nil)
	if err != nil || d.Allowed {
		t.Fatalf("a third request under a count of 2: %+v, %v; want refused", d, err)
	}
}

// TestAdminLearned shows adaptive mode's learners, and lists and resets its
// buckets like a rule's.
func TestAdminLearned(t *testing.T) {
	f := newAdminFixture(t, "ad", nil)
	as, err := (&AdaptiveConfig{}).compile("ad", queueSettings{})
	if err != nil {
		t.Fatal(err)
	}
	f.state.retain("ad", []*compiledRule{&as.rule})
	now := f.clock.now()
	l := f.state.learners.get("ad", "gpt-4o")
	f.state.learners.get("ad", "quiet")
	obs := func(status int, retryAfter time.Duration) adaptive.Observation {
		none := adaptive.Quota{Limit: -1, Remaining: -1, Reset: -1}
		return adaptive.Observation{Status: status, Requests: none, Tokens: none, InputTokens: none, OutputTokens: none, RetryAfter: retryAfter}
	}
	l.learner.Observe(obs(200, -1), now)
	l.learner.Observe(obs(429, 2*time.Second), now)
	l.publish(l.learner.Limits())

	code, body := adminCall(t, f.api, "GET", "/llm_rate_limit/learned?zone=ad")
	var out struct{ Learned []adminLearned }
	if err := json.Unmarshal(body, &out); code != 200 || err != nil || len(out.Learned) != 2 {
		t.Fatalf("learned: %d %s", code, body)
	}
	g, q := out.Learned[0], out.Learned[1]
	wantBlocked := now.Add(2 * time.Second).Format(time.RFC3339Nano)
	if g.Model != "gpt-4o" || g.Requests == nil || g.Requests.Source != adaptive.SourceRetryAfter || g.Requests.Window != "1m0s" ||
		g.BlockedUntil != wantBlocked || g.Accepted != 1 || g.Tokens != nil || g.Concurrent != nil {
		t.Fatalf("gpt-4o: %s; want a request rate guessed from Retry-After, blocked until %s", body, wantBlocked)
	}
	if q.Model != "quiet" || q.Requests != nil || q.BlockedUntil != "" {
		t.Fatalf("quiet: %+v; want nothing learned", q)
	}
	if code, body := adminCall(t, f.api, "GET", "/llm_rate_limit/learned?model=none"); code != 200 || !strings.Contains(string(body), `"learned": []`) {
		t.Fatalf("learned?model=none: %d %s", code, body)
	}

	// A learned bucket lists under its model's limit.
	id := identity{model: "gpt-4o"}
	p := l.limits.Load()
	ch := []bucket.Charge{{Key: as.rule.appendKey(nil, p.requests, &id), Limit: p.requests.limit, Cost: 1}}
	if d, err := f.state.store.Reserve(context.Background(), now, ch, 0, nil); err != nil || !d.Allowed {
		t.Fatalf("charging the learned bucket: %+v, %v", d, err)
	}
	list := listBuckets(t, f.api, "?rule=adaptive")
	if len(list.Buckets) != 1 || list.Buckets[0].Key != "model=gpt-4o" || list.Buckets[0].Limit.LimitTo != p.requests.limit.Count || list.Buckets[0].Used != 1 {
		t.Fatalf("adaptive buckets: %+v", list.Buckets)
	}
	if code, body := adminCall(t, f.api, "POST", "/llm_rate_limit/reset?rule=adaptive&key=model=gpt-4o"); code != 200 || !strings.Contains(string(body), `"reset": 1`) {
		t.Fatalf("reset the learned bucket: %d %s", code, body)
	}
}

func TestAdminKeyRoundTrip(t *testing.T) {
	for _, pairs := range [][]keyPair{
		nil,
		{{"user", ""}},
		{{"user", "a,b=c%d"}, {"model", "gpt-4o"}},
		{{"metadata.x=y", "\x00\x1f\xff"}, {"team", "Zoë"}},
	} {
		s := formatKey(pairs)
		back, err := parseKey(s)
		if err != nil || len(back) != len(pairs) {
			t.Fatalf("%q: %v, %v", s, back, err)
		}
		for i := range pairs {
			if back[i] != pairs[i] {
				t.Fatalf("%q: pair %d came back %+v, want %+v", s, i, back[i], pairs[i])
			}
		}
		if js, _ := json.Marshal(s); !strings.Contains(string(js), s) && strings.ContainsAny(s, "\\\"") {
			t.Fatalf("%q does not survive JSON", s)
		}
	}
	// A key cut short or with bytes after its values is not the rule's.
	per := []dimension{{kind: dimUser}, {kind: dimModel}}
	full := appendKeyValue(appendKeyValue(nil, "alice"), "m")
	if v, ok := decodeKey(full, per); !ok || v[0] != "alice" || v[1] != "m" {
		t.Fatalf("decodeKey: %v, %v", v, ok)
	}
	for _, bad := range [][]byte{full[:len(full)-1], append(full, 'x'), {0xff}, nil} {
		if _, ok := decodeKey(bad, per); ok {
			t.Fatalf("decodeKey(%q) accepted", bad)
		}
	}
}

// TestAdminRunningHandlers goes through the pool: a provisioned handler's
// rules are listed, and once it is cleaned up they are gone.
func TestAdminRunningHandlers(t *testing.T) {
	h := &Handler{Zone: "admin-pool", User: "{http.request.header.X-User}", Rules: []Rule{
		{ID: "pool", AppliesPer: []string{"user"}, Limits: []Limit{{LimitTo: 5, Unit: "requests_per_minute"}}},
	}}
	clock := newTestHandler(t, h)
	for range 2 {
		serve(t, h, &upstream{}, "/v1/chat/completions", chatBody, "X-User", "carol")
	}
	a := &AdminAPI{now: clock.now} // the states of the running configurations
	out := listBuckets(t, a, "?zone=admin-pool")
	if len(out.Buckets) != 1 || out.Buckets[0].Store != "memory" || out.Buckets[0].Key != "user=carol" || out.Buckets[0].Remaining != 3 {
		t.Fatalf("buckets of the running handler: %+v", out.Buckets)
	}
	h.Cleanup()
	if code, body := adminCall(t, a, "GET", "/llm_rate_limit/buckets?zone=admin-pool&rule=pool"); code != 404 {
		t.Fatalf("after cleanup: %d %s; want 404", code, body)
	}
}
