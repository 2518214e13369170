package llmratelimit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

func TestCompileRulesErrors(t *testing.T) {
	lim := []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}
	for _, tc := range []struct {
		name  string
		rules []Rule
		want  string
	}{
		{"empty id", []Rule{{Limits: lim}}, "id \"\" must be"},
		{"id with space", []Rule{{ID: "a b", Limits: lim}}, "must be 1 to 128 printable"},
		{"id with quote", []Rule{{ID: `a"b`, Limits: lim}}, "without spaces, quotes"},
		{"duplicate id", []Rule{{ID: "a", Limits: lim}, {ID: "a", Limits: lim}}, `rule "a": duplicate id`},
		{"reserved id", []Rule{{ID: "adaptive", Limits: lim, AppliesPer: []string{"model"}}}, `rule id "adaptive" is reserved for adaptive mode`},
		{"no limits", []Rule{{ID: "a"}}, "no limits"},
		{"unknown unit", []Rule{{ID: "a", Limits: []Limit{{LimitTo: 1, Unit: "requests_per_week"}}}}, `unknown unit "requests_per_week"`},
		{"zero limit", []Rule{{ID: "a", Limits: []Limit{{LimitTo: 0, Unit: "requests_per_minute"}}}}, "limit must be positive"},
		{"negative burst", []Rule{{ID: "a", Limits: []Limit{{LimitTo: 5, Unit: "requests_per_minute", Burst: -1}}}}, "burst must not be negative"},
		{"too fine", []Rule{{ID: "a", Limits: []Limit{{LimitTo: 2e9, Unit: "tokens_per_second"}}}}, "finer than one per nanosecond"},
		{"two limits one unit", []Rule{{ID: "a", Limits: []Limit{lim[0], lim[0]}}}, "at most one limit per unit"},
		{"bad mode", []Rule{{ID: "a", Limits: lim, Mode: "dry-run"}}, `mode "dry-run"`},
		{"bad subject", []Rule{{ID: "a", Limits: lim, When: &When{Subjects: []string{"group:x"}}}}, `unknown kind "group"`},
		{"subject without value", []Rule{{ID: "a", Limits: lim, When: &When{Subjects: []string{"user:"}}}}, "want user:NAME"},
		{"bad account hash", []Rule{{ID: "a", Limits: lim, When: &When{Subjects: []string{"virtualaccount:sha256:xyz"}}}}, "hex digits of the key's SHA-256"},
		{"empty model", []Rule{{ID: "a", Limits: lim, When: &When{Models: []string{""}}}}, "empty model"},
		{"empty metadata key", []Rule{{ID: "a", Limits: lim, When: &When{Metadata: map[string]string{"": "x"}}}}, "empty key"},
		{"bad dimension", []Rule{{ID: "a", Limits: lim, AppliesPer: []string{"org"}}}, `unknown dimension "org"`},
		{"empty metadata dimension", []Rule{{ID: "a", Limits: lim, AppliesPer: []string{"metadata."}}}, `unknown dimension "metadata."`},
		{"dimension twice", []Rule{{ID: "a", Limits: lim, AppliesPer: []string{"user", "user"}}}, "listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := compileRules("", tc.rules)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestRuleMatching(t *testing.T) {
	lim := []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}
	rules, err := compileRules("", []Rule{
		{ID: "all", Limits: lim},
		{ID: "subjects", Limits: lim, When: &When{Subjects: []string{"team:backend", "user:dev@example.com", "virtualaccount:sk-test"}}},
		{ID: "models", Limits: lim, When: &When{Models: []string{"gpt-4o", "claude-*"}}},
		{ID: "metadata", Limits: lim, When: &When{Metadata: map[string]string{"env": "prod", "tier": "gold"}}},
		{ID: "and", Limits: lim, When: &When{Subjects: []string{"team:backend"}, Models: []string{"gpt-4o"}, Metadata: map[string]string{"env": "prod"}}},
		{ID: "hashed", Limits: lim, When: &When{Subjects: []string{"virtualaccount:sha256:" + hashAccount("sk-other")}}},
		{ID: "full-digest", Limits: lim, When: &When{Subjects: []string{"virtualaccount:sha256:" + fullDigest("sk-other")}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	meta := func(kv ...string) []metaPair {
		var out []metaPair
		for i := 0; i < len(kv); i += 2 {
			out = append(out, metaPair{kv[i], kv[i+1]})
		}
		return out
	}
	for _, tc := range []struct {
		name string
		id   identity
		want string
	}{
		{"nothing", identity{}, "all"},
		{"team", identity{team: "backend"}, "all subjects"},
		{"user", identity{user: "dev@example.com"}, "all subjects"},
		{"other user", identity{user: "dev@example.org"}, "all"},
		{"user name is not a team", identity{user: "backend"}, "all"},
		{"account", identity{account: hashAccount("Bearer sk-test")}, "all subjects"},
		{"hashed account", identity{account: hashAccount("sk-other")}, "all hashed full-digest"},
		{"model exact", identity{model: "gpt-4o"}, "all models"},
		{"model exact is not prefix", identity{model: "gpt-4o-mini"}, "all"},
		{"model prefix", identity{model: "claude-sonnet-4"}, "all models"},
		{"metadata all pairs", identity{metadata: meta("tier", "gold", "env", "prod")}, "all metadata"},
		{"metadata one pair", identity{metadata: meta("env", "prod")}, "all"},
		{"metadata wrong value", identity{metadata: meta("env", "dev", "tier", "gold")}, "all"},
		{"and", identity{team: "backend", model: "gpt-4o", metadata: meta("env", "prod")}, "all subjects models and"},
		{"and missing one", identity{team: "backend", model: "gpt-4o"}, "all subjects models"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var got []string
			for i := range rules {
				if rules[i].matches(&tc.id) {
					got = append(got, rules[i].id)
				}
			}
			if strings.Join(got, " ") != tc.want {
				t.Fatalf("matched %q, want %q", got, tc.want)
			}
		})
	}
}

func TestBucketKeys(t *testing.T) {
	rules, err := compileRules("z", []Rule{
		{ID: "r", Limits: []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}, AppliesPer: []string{"user", "model"}},
		{ID: "m", Limits: []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}, AppliesPer: []string{"metadata.project"}},
		{ID: "shared", Limits: []Limit{{LimitTo: 10, Unit: "requests_per_minute"}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	key := func(r int, id identity) string {
		return string(rules[r].appendKey(nil, &rules[r].limits[0], &id))
	}
	// A value cannot forge another split: values are length-prefixed.
	a := key(0, identity{user: "a\x1fb", model: "c"})
	b := key(0, identity{user: "a", model: "b\x1fc"})
	if a == b {
		t.Fatalf("keys collide: %q", a)
	}
	if key(0, identity{user: "alice", model: "x"}) == key(0, identity{user: "bob", model: "x"}) {
		t.Fatal("users share a bucket")
	}
	if key(2, identity{user: "alice"}) != key(2, identity{user: "bob"}) {
		t.Fatal("a rule without applies_per split by user")
	}
	p1 := key(1, identity{metadata: []metaPair{{"project", "p1"}}})
	p2 := key(1, identity{metadata: []metaPair{{"project", "p2"}, {"other", "p1"}}})
	if p1 == p2 {
		t.Fatal("projects share a bucket")
	}
	// Every key of a rule starts with the rule's prefix, which DeletePrefix
	// uses to free it, and no other rule's prefix.
	for i, r := range rules {
		k := []byte(key(i, identity{user: "u"}))
		for j, other := range rules {
			if bytes.HasPrefix(k, []byte(other.prefix)) != (i == j) {
				t.Fatalf("key of rule %s vs prefix of rule %s", r.id, other.id)
			}
		}
	}
}

func TestHashAccount(t *testing.T) {
	if hashAccount("Bearer sk-123") != hashAccount("sk-123") || hashAccount("bearer  sk-123 ") != hashAccount("sk-123") {
		t.Fatal("Bearer prefix not dropped")
	}
	h := hashAccount("sk-123")
	if len(h) != 32 || strings.Contains(h, "sk-") {
		t.Fatalf("hash %q", h)
	}
	if hashAccount("") != "" || hashAccount("Bearer ") != "" {
		t.Fatal("an empty key is an account")
	}
}

func TestBoundedValue(t *testing.T) {
	long := strings.Repeat("u", 10000)
	if v := boundedValue(long); len(v) > maxIdentityValue || v == boundedValue(long+"x") {
		t.Fatalf("bounded %q", v)
	}
	if boundedValue("alice") != "alice" {
		t.Fatal("short value changed")
	}
}

func fullDigest(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:])
}
