package caddytest

import (
	"fmt"
	"strings"
	"testing"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// A `model X { rpm N }` shorthand admits a burst of N (or of its burst) and
// refuses the next request; other models are not limited at all.
func TestModelShorthandBurst(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		model gpt-4o {
			rpm 3
		}
		model gpt-4o-mini {
			rpm 6 burst 2
		}`, up)

	rs := wantStatuses(t, "gpt-4o", func() response { return h.chat("gpt-4o") }, 200, 200, 200, 429)
	const p = "model:gpt-4o/requests_per_minute"
	for i, want := range []int64{2, 1, 0, 0} {
		wantRemaining(t, "gpt-4o", rs[i], map[string]int64{p: want})
	}
	pol, _ := parsePolicy(t, rs[0].header)
	if pol[p] != (policyItem{q: 3, w: 60}) {
		t.Errorf("policy %s = %+v, want q=3 w=60", p, pol[p])
	}
	wantOpenAI429(t, "gpt-4o 4th", rs[3], "model:gpt-4o", "requests_per_minute")

	rs = wantStatuses(t, "gpt-4o-mini", func() response { return h.chat("gpt-4o-mini") }, 200, 200, 429)
	const pm = "model:gpt-4o-mini/requests_per_minute"
	wantRemaining(t, "gpt-4o-mini #1", rs[0], map[string]int64{pm: 1})
	if pol, _ := parsePolicy(t, rs[0].header); pol[pm] != (policyItem{q: 6, w: 60}) {
		t.Errorf("policy %s = %+v, want q=6 w=60", pm, pol[pm])
	}
	wantOpenAI429(t, "gpt-4o-mini 3rd", rs[2], "model:gpt-4o-mini", "requests_per_minute")

	// A model no rule names is never limited and gets no headers.
	for i := 0; i < 6; i++ {
		r := h.chat("claude-3-haiku")
		wantStatus(t, "unlimited model", r, 200)
		wantNoRateLimitHeaders(t, "unlimited model", r)
	}
	// Refused requests never reached the upstream.
	if total, _ := up.Counts(); total != 3+2+6 {
		t.Errorf("upstream saw %d requests, want %d", total, 3+2+6)
	}
}

// when.subjects: user, team and virtual account (hashed, "Bearer " dropped),
// any of the list matching.
func TestWhenSubjects(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		user {http.request.header.X-User}
		team {http.request.header.X-Team}
		virtualaccount {http.request.header.Authorization}
		rule u {
			when {
				subjects user:alice
			}
			limit 1 requests_per_day
		}
		rule t {
			when {
				subjects team:red
			}
			limit 1 requests_per_day
		}
		rule va {
			when {
				subjects virtualaccount:sk-test
			}
			limit 1 requests_per_day
		}
		rule either {
			when {
				subjects user:carol team:blue
			}
			limit 1 requests_per_day
		}`, up)

	const day = "/requests_per_day"
	r := h.chat("m", "X-User", "alice")
	wantStatus(t, "alice", r, 200)
	wantRemaining(t, "alice", r, map[string]int64{"u" + day: 0})
	wantOpenAI429(t, "alice again", h.chat("m", "X-User", "alice"), "u", "requests_per_day")

	r = h.chat("m", "X-User", "bob")
	wantStatus(t, "bob", r, 200)
	wantNoRateLimitHeaders(t, "bob", r)

	r = h.chat("m", "X-User", "bob", "X-Team", "red")
	wantStatus(t, "team red", r, 200)
	wantRemaining(t, "team red", r, map[string]int64{"t" + day: 0})
	wantOpenAI429(t, "team red again", h.chat("m", "X-Team", "red"), "t", "requests_per_day")

	r = h.chat("m", "Authorization", "Bearer sk-test")
	wantStatus(t, "virtual account", r, 200)
	wantRemaining(t, "virtual account", r, map[string]int64{"va" + day: 0})
	// The same key without "Bearer " is the same account.
	e := wantOpenAI429(t, "virtual account again", h.chat("m", "Authorization", "sk-test"), "va", "requests_per_day")
	if strings.Contains(e.Error.Message, "sk-test") {
		t.Errorf("refusal message leaks the key: %q", e.Error.Message)
	}
	r = h.chat("m", "Authorization", "Bearer sk-other")
	wantStatus(t, "other account", r, 200)
	wantNoRateLimitHeaders(t, "other account", r)

	// Subjects are ORed, and the rule has a single bucket.
	r = h.chat("m", "X-User", "carol")
	wantStatus(t, "carol", r, 200)
	wantRemaining(t, "carol", r, map[string]int64{"either" + day: 0})
	wantOpenAI429(t, "team blue", h.chat("m", "X-User", "dave", "X-Team", "blue"), "either", "requests_per_day")
}

// when.models: exact names and trailing-* prefixes; the model comes from the
// body.
func TestWhenModels(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule p {
			when {
				models gpt-4o* claude-3
			}
			limit 3 requests_per_day
		}`, up)
	const p = "p/requests_per_day"
	for _, c := range []struct {
		model string
		match bool
	}{
		{"gpt-4o-mini", true},
		{"gpt-4", false},
		{"gpt-4o", true}, // a prefix includes the bare name
		{"claude-3-opus", false},
		{"GPT-4O", false}, // case matters
		{"claude-3", true},
	} {
		r := h.chat(c.model)
		wantStatus(t, c.model, r, 200)
		if c.match {
			if len(r.header.Values("RateLimit")) == 0 {
				t.Errorf("%s: rule p did not apply", c.model)
			}
		} else {
			wantNoRateLimitHeaders(t, c.model, r)
		}
	}
	// Three matching requests used the single bucket up.
	r := h.chat("gpt-4o-2024")
	wantOpenAI429(t, "gpt-4o-2024", r, "p", "requests_per_day")
	wantRemaining(t, "gpt-4o-2024", r, map[string]int64{p: 0})
	if r := h.chat("gpt-4"); r.status != 200 {
		t.Errorf("non-matching model refused: %v", r)
	}
}

// when.metadata: every pair must be present in the metadata header.
func TestWhenMetadata(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		metadata_header X-LLM-Metadata
		rule m {
			when {
				metadata env=prod project_id=p1
			}
			limit 1 requests_per_day
		}`, up)
	for _, md := range []string{
		`{"env":"prod"}`,
		`{"project_id":"p1"}`,
		`{"env":"prod","project_id":"p2"}`,
		`{"env":"dev","project_id":"p1"}`,
		`{"env":"PROD","project_id":"p1"}`,
		``,
	} {
		r := h.chat("m", "X-LLM-Metadata", md)
		wantStatus(t, md, r, 200)
		wantNoRateLimitHeaders(t, md, r)
	}
	r := h.chat("m", "X-LLM-Metadata", `{"team":"x","project_id":"p1","env":"prod"}`)
	wantStatus(t, "all pairs", r, 200)
	wantRemaining(t, "all pairs", r, map[string]int64{"m/requests_per_day": 0})
	wantOpenAI429(t, "all pairs again", h.chat("m", "X-LLM-Metadata", `{"env":"prod","project_id":"p1"}`), "m", "requests_per_day")
}

// A rule without when matches every request: any dialect, any path, any
// method, with or without a model.
func TestMissingWhenMatchesEverything(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule all {
			limit 3 requests_per_day
		}`, up)
	const p = "all/requests_per_day"
	r := h.chat("gpt-4o")
	wantStatus(t, "chat", r, 200)
	wantRemaining(t, "chat", r, map[string]int64{p: 2})
	r = h.get("/v1/models")
	wantStatus(t, "GET /v1/models (fakellm has no such endpoint)", r, 404)
	wantRemaining(t, "GET /v1/models", r, map[string]int64{p: 1})
	r = h.post("/somewhere/else", "not json at all")
	wantStatus(t, "unknown path", r, 404)
	wantRemaining(t, "unknown path", r, map[string]int64{p: 0})
	r = h.post("/v1/embeddings", `{"input":"x"}`)
	wantOpenAI429(t, "4th, no model", r, "all", "requests_per_day")
	wantRemaining(t, "4th", r, map[string]int64{p: 0})
	if total, _ := up.Counts(); total != 3 {
		t.Errorf("upstream saw %d requests, want 3", total)
	}
}

// Several limits in a rule: each must have room.
func TestSeveralLimitsPerRule(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule a {
			when {
				models m1
			}
			limit 2 requests_per_minute
			limit 10 requests_per_hour
		}
		rule b {
			when {
				models m2
			}
			limit 10 requests_per_minute
			limit 2 requests_per_hour
		}`, up)
	rs := wantStatuses(t, "m1", func() response { return h.chat("m1") }, 200, 200, 429)
	_, order := parsePolicy(t, rs[0].header)
	if strings.Join(order, ",") != "a/requests_per_minute,a/requests_per_hour" {
		t.Errorf("policy order %q", order)
	}
	wantRemaining(t, "m1 #2", rs[1], map[string]int64{"a/requests_per_minute": 0, "a/requests_per_hour": 8})
	wantOpenAI429(t, "m1 #3", rs[2], "a", "requests_per_minute")
	// The refusal charged neither limit.
	wantRemaining(t, "m1 #3", rs[2], map[string]int64{"a/requests_per_minute": 0, "a/requests_per_hour": 8})

	rs = wantStatuses(t, "m2", func() response { return h.chat("m2") }, 200, 200, 429)
	wantOpenAI429(t, "m2 #3", rs[2], "b", "requests_per_hour")
	wantRemaining(t, "m2 #3", rs[2], map[string]int64{"b/requests_per_minute": 8, "b/requests_per_hour": 0})
	pol, _ := parsePolicy(t, rs[2].header)
	if pol["b/requests_per_minute"] != (policyItem{10, 60}) || pol["b/requests_per_hour"] != (policyItem{2, 3600}) {
		t.Errorf("policies %+v", pol)
	}
}

// Every matching rule applies, and a refusal by one charges none of them.
func TestEveryMatchingRuleAppliesAtomically(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		user {http.request.header.X-User}
		rule A {
			when {
				models gpt-4o
			}
			limit 5 requests_per_day
		}
		rule B {
			when {
				subjects user:bob
			}
			limit 1 requests_per_day
		}`, up)
	const a, b = "A/requests_per_day", "B/requests_per_day"
	r := h.chat("gpt-4o", "X-User", "bob")
	wantStatus(t, "bob #1", r, 200)
	wantRemaining(t, "bob #1", r, map[string]int64{a: 4, b: 0})
	for i := 0; i < 3; i++ {
		r = h.chat("gpt-4o", "X-User", "bob")
		wantOpenAI429(t, "bob again", r, "B", "requests_per_day")
		// Refused by B, A was not charged.
		wantRemaining(t, "bob again", r, map[string]int64{a: 4, b: 0})
	}
	// So A still has exactly 4 for everyone else.
	for _, want := range []int64{3, 2, 1, 0} {
		r = h.chat("gpt-4o", "X-User", "alice")
		wantStatus(t, "alice", r, 200)
		wantRemaining(t, "alice", r, map[string]int64{a: want})
	}
	wantOpenAI429(t, "alice 5th", h.chat("gpt-4o", "X-User", "alice"), "A", "requests_per_day")
	if total, _ := up.Counts(); total != 5 {
		t.Errorf("upstream saw %d requests, want 5", total)
	}
}

// applies_per splits a rule into buckets.
func TestAppliesPer(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		user {http.request.header.X-User}
		metadata_header X-LLM-Metadata
		rule per-user {
			when {
				models u
			}
			limit 1 requests_per_day
			applies_per user
		}
		rule per-model {
			when {
				models pm-*
			}
			limit 1 requests_per_day
			applies_per model
		}
		rule per-user-model {
			when {
				models um-*
			}
			limit 1 requests_per_day
			applies_per user model
		}
		rule per-project {
			when {
				models pp
			}
			limit 1 requests_per_day
			applies_per metadata.project_id
		}`, up)

	type step struct {
		model, user, md string
		status          int
	}
	run := func(name, rule, per string, steps []step) {
		t.Run(name, func(t *testing.T) {
			for i, s := range steps {
				hdr := []string{}
				if s.user != "" {
					hdr = append(hdr, "X-User", s.user)
				}
				if s.md != "" {
					hdr = append(hdr, "X-LLM-Metadata", s.md)
				}
				r := h.chat(s.model, hdr...)
				what := name + " step " + string(rune('1'+i)) + " " + s.model + "/" + s.user + "/" + s.md
				wantStatus(t, what, r, s.status)
				if s.status == 429 {
					e := wantOpenAI429(t, what, r, rule, "requests_per_day")
					if !strings.Contains(e.Error.Message, "per "+per) {
						t.Errorf("%s: message %q does not say per %s", what, e.Error.Message, per)
					}
				}
			}
		})
	}
	run("user", "per-user", "user", []step{
		{"u", "alice", "", 200}, {"u", "alice", "", 429}, {"u", "bob", "", 200}, {"u", "bob", "", 429},
		{"u", "", "", 200}, {"u", "", "", 429}, // no user shares the empty bucket
	})
	run("model", "per-model", "model", []step{
		{"pm-a", "alice", "", 200}, {"pm-a", "bob", "", 429}, {"pm-b", "alice", "", 200}, {"pm-b", "", "", 429},
	})
	run("user model", "per-user-model", "user, model", []step{
		{"um-a", "alice", "", 200}, {"um-a", "alice", "", 429}, {"um-b", "alice", "", 200},
		{"um-a", "bob", "", 200}, {"um-b", "bob", "", 200}, {"um-b", "bob", "", 429},
	})
	run("metadata", "per-project", "metadata.project_id", []step{
		{"pp", "alice", `{"project_id":"p1"}`, 200}, {"pp", "bob", `{"project_id":"p1","x":"y"}`, 429},
		{"pp", "alice", `{"project_id":"p2"}`, 200}, {"pp", "", "", 200}, {"pp", "", `{"other":"1"}`, 429},
	})
}

// Shadow rules never refuse, but count and set headers; a refusal by an
// enforcing rule costs them nothing.
func TestShadowMode(t *testing.T) {
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	h.loadHandler(`
		rule s {
			when {
				models shadowed
			}
			limit 1 requests_per_day
			mode shadow
		}
		model shadow-model {
			rpd 1
			mode shadow
		}
		rule e {
			when {
				models both
			}
			limit 1 requests_per_day
		}
		rule s2 {
			when {
				models both
			}
			limit 5 requests_per_day
			mode shadow
		}`, up)
	for i, want := range []int64{0, 0, 0} {
		r := h.chat("shadowed")
		wantStatus(t, "shadowed", r, 200)
		wantRemaining(t, "shadowed", r, map[string]int64{"s/requests_per_day": want})
		if r.header.Get("Retry-After") != "" {
			t.Errorf("shadowed #%d: Retry-After %q on an admitted request", i+1, r.header.Get("Retry-After"))
		}
	}
	for i := 0; i < 2; i++ {
		r := h.chat("shadow-model")
		wantStatus(t, "shadow-model", r, 200)
		wantRemaining(t, "shadow-model", r, map[string]int64{"model:shadow-model/requests_per_day": 0})
	}
	if got := len(up.Requests()); got != 5 {
		t.Errorf("upstream saw %d requests, want all 5", got)
	}

	r := h.chat("both")
	wantStatus(t, "both #1", r, 200)
	wantRemaining(t, "both #1", r, map[string]int64{"e/requests_per_day": 0, "s2/requests_per_day": 4})
	_, order := parsePolicy(t, r.header)
	if strings.Join(order, ",") != "e/requests_per_day,s2/requests_per_day" {
		t.Errorf("policy order %q, want the enforcing rule first", order)
	}
	for i := 0; i < 2; i++ {
		r = h.chat("both")
		wantOpenAI429(t, "both again", r, "e", "requests_per_day")
		wantRemaining(t, "both again", r, map[string]int64{"e/requests_per_day": 0, "s2/requests_per_day": 4})
	}
	if got := len(up.Requests()); got != 6 {
		t.Errorf("upstream saw %d requests, want 6", got)
	}
}

// A virtual account can be named by its hash instead of the key. The
// module's own form is the first 16 bytes of the SHA-256 in hex; the whole
// SHA-256 (what sha256sum prints) must either match too or be refused when
// the config is loaded, never be accepted and silently match nothing.
func TestVirtualAccountSHA256Subject(t *testing.T) {
	sum := func(s string) string { return sha([]byte(s)) }
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	block := fmt.Sprintf(`
		virtualaccount {http.request.header.Authorization}
		rule short {
			when {
				subjects virtualaccount:sha256:%s
			}
			limit 1 requests_per_day
		}
		rule full {
			when {
				subjects virtualaccount:sha256:%s
			}
			limit 1 requests_per_day
		}`, sum("sk-short")[:32], sum("sk-full"))
	h.loadHandler(block, up)

	r := h.chat("m", "Authorization", "Bearer sk-short")
	wantStatus(t, "short", r, 200)
	wantRemaining(t, "short", r, map[string]int64{"short/requests_per_day": 0})

	r = h.chat("m", "Authorization", "Bearer sk-full")
	wantStatus(t, "full", r, 200)
	if len(r.header.Values("RateLimit")) == 0 {
		t.Errorf("rule full (subjects virtualaccount:sha256:<the key's whole SHA-256>) was accepted but does not match the key")
	}
}
