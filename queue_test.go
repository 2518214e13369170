package llmratelimit

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/llmratelimit/caddy-llm-ratelimit/bucket"
)

func dur(d time.Duration) *caddy.Duration { c := caddy.Duration(d); return &c }

func TestQueuePolicies(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler *QueueConfig
		rule    *QueueConfig
		want    bucket.Policy
		err     string
	}{
		{name: "no queue anywhere", want: bucket.Policy{}},
		{name: "handler defaults", handler: &QueueConfig{}, want: bucket.Policy{MaxWait: 30 * time.Second, MaxDepth: 10000}},
		{name: "handler values", handler: &QueueConfig{MaxWait: dur(5 * time.Second), MaxDepth: 7}, want: bucket.Policy{MaxWait: 5 * time.Second, MaxDepth: 7}},
		{name: "max_wait 0 refuses at once", handler: &QueueConfig{MaxWait: dur(0)}, want: bucket.Policy{MaxDepth: 10000}},
		{name: "rule alone", rule: &QueueConfig{MaxWait: dur(time.Second)}, want: bucket.Policy{MaxWait: time.Second, MaxDepth: 10000}},
		{name: "rule over handler", handler: &QueueConfig{MaxWait: dur(5 * time.Second), MaxDepth: 7}, rule: &QueueConfig{MaxDepth: 3},
			want: bucket.Policy{MaxWait: 5 * time.Second, MaxDepth: 3}},
		{name: "rule turns it off", handler: &QueueConfig{}, rule: &QueueConfig{MaxWait: dur(0)}, want: bucket.Policy{MaxDepth: 10000}},
		{name: "negative wait", handler: &QueueConfig{MaxWait: dur(-time.Second)}, err: "max_wait must not be negative"},
		{name: "negative depth", rule: &QueueConfig{MaxDepth: -1}, err: "max_depth must not be negative"},
		{name: "priority in a rule", rule: &QueueConfig{Priority: "{x}"}, err: "belong to the handler"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			qs, err := tc.handler.compile()
			var p bucket.Policy
			if err == nil {
				p, err = rulePolicy(&Rule{Queue: tc.rule}, qs)
			}
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || p != tc.want {
				t.Fatalf("got %+v, %v; want %+v", p, err, tc.want)
			}
		})
	}
}

func TestQueueClassesAndWeights(t *testing.T) {
	qs, err := (&QueueConfig{
		Priority: "{http.request.header.X-Priority}",
		Weight:   "metadata.tier",
		Weights:  map[string]float64{"gold": 4, "tiny": 0.5},
	}).compile()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		priority string
		tier     string
		class    int
		weight   float64
	}{
		{"", "", 0, 1},
		{"7", "gold", 7, 4},
		{" -3 ", "tiny", -3, 0.5},
		{"high", "platinum", 0, 1},           // not a number; not in the map
		{"99999999999", "", 1000, 1},         // clamped
		{"-99999", "", -1000, 1},             // clamped
		{strings.Repeat("9", 400), "", 0, 1}, // bounded value, not a number
	} {
		r := httptest.NewRequest("POST", "/", nil)
		if tc.priority != "" {
			r.Header.Set("X-Priority", tc.priority)
		}
		var id identity
		id.reset()
		if tc.tier != "" {
			id.metadata, _ = parseMetadata(id.metadata, `{"tier":"`+tc.tier+`"}`)
		}
		if c := qs.classOf(r, nil, &id); c != tc.class {
			t.Errorf("priority %q: class %d, want %d", tc.priority, c, tc.class)
		}
		if w := qs.weightOf(r, nil, &id); w != tc.weight {
			t.Errorf("tier %q: weight %g, want %g", tc.tier, w, tc.weight)
		}
	}

	// Without a map, the weight is read as a number, within bounds.
	qs, _ = (&QueueConfig{Weight: "{http.request.header.X-Weight}", Priority: "metadata.p", PriorityClasses: map[string]int{"batch": -5}}).compile()
	for v, want := range map[string]float64{"2.5": 2.5, "0": 1, "-4": 1, "NaN": 1, "1e9": 1000, "1e-9": 0.001, "x": 1} {
		r := httptest.NewRequest("POST", "/", nil)
		r.Header.Set("X-Weight", v)
		var id identity
		id.reset()
		if w := qs.weightOf(r, nil, &id); w != want {
			t.Errorf("weight %q: %g, want %g", v, w, want)
		}
	}
	var id identity
	id.reset()
	id.metadata, _ = parseMetadata(id.metadata, `{"p":"batch"}`)
	if c := qs.classOf(httptest.NewRequest("GET", "/", nil), nil, &id); c != -5 {
		t.Errorf("class %d, want -5", c)
	}
}

func TestQueueFlowKey(t *testing.T) {
	id := identity{user: "alice", team: "blue", account: "abc"}
	var def queueSettings
	if got := string(def.appendFlow(nil, &id)); got != "alice" {
		t.Errorf("default flow %q, want the user", got)
	}
	id.user = ""
	if got := string(def.appendFlow(nil, &id)); got != "abc" {
		t.Errorf("default flow %q, want the virtual account", got)
	}
	id.account = ""
	if got := string(def.appendFlow(nil, &id)); got != "blue" {
		t.Errorf("default flow %q, want the team", got)
	}
	qs, err := (&QueueConfig{FairBy: []string{"team", "model"}}).compile()
	if err != nil {
		t.Fatal(err)
	}
	a := qs.appendFlow(nil, &identity{team: "ab", model: "c"})
	b := qs.appendFlow(nil, &identity{team: "a", model: "bc"})
	if string(a) == string(b) {
		t.Errorf("fair_by values run together: %q", a)
	}
}
