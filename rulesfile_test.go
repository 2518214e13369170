package llmratelimit

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The seed's example file, as shipped in examples/, converts to the seed's
// rules.
func TestRulesFileSeedExample(t *testing.T) {
	rf, err := readRulesFile(filepath.Join("examples", "seed003-rules.yaml"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if rf.name != "seed003-example-limits" {
		t.Errorf("name %q", rf.name)
	}
	lim := func(n int64, unit string) []Limit { return []Limit{{LimitTo: n, Unit: unit}} }
	gpt4 := func(subject string) *When { return &When{Subjects: []string{subject}, Models: []string{"gpt-4"}} }
	want := []Rule{
		{ID: "bob-gpt4-daily", When: gpt4("user:bob@email.com"), Limits: lim(1000, "requests_per_day")},
		{ID: "backend-gpt4-tokens", When: gpt4("team:backend"), Limits: lim(20000, "tokens_per_minute")},
		{ID: "va1-gpt4-tokens", When: gpt4("virtualaccount:virtualaccount1"), Limits: lim(20000, "tokens_per_minute")},
		{ID: "per-model-daily", When: &When{}, Limits: lim(1000000, "tokens_per_day"), AppliesPer: []string{"model"}},
		{ID: "per-user-daily", When: &When{}, Limits: lim(1000000, "tokens_per_day"), AppliesPer: []string{"user"}},
		{ID: "per-user-model-daily", When: &When{}, Limits: lim(1000000, "tokens_per_day"), AppliesPer: []string{"user", "model"}},
		{ID: "per-project-hourly", When: &When{}, Limits: lim(50000, "tokens_per_hour"), AppliesPer: []string{"metadata.project_id"}},
	}
	if !reflect.DeepEqual(rf.rules, want) {
		t.Errorf("rules:\n%s\nwant:\n%s", dumpRules(rf.rules), dumpRules(want))
	}
	if _, err := compileRules("", rf.rules); err != nil {
		t.Errorf("the example's rules do not compile: %v", err)
	}
}

// Every part of the format, written the ways YAML allows.
func TestRulesFileFull(t *testing.T) {
	const src = `# a comment
name: my-limits
type: gateway-rate-limiting-config
rules:
  - id: bob-gpt4-daily
    when:
      subjects: ["user:bob@email.com", team:backend, 'virtualaccount:sha256:0123456789abcdef0123456789abcdef']
      models:
        - openai-main/gpt4
        - "gpt-4o*"
      metadata: {environment: production, tier: 1}
    limit_to: 1000
    unit: requests_per_day
    rate_limit_applies_per: ['user', 'model', team, virtualaccount, metadata.project_id]
  - {id: 42, limit_to: 0x10, unit: concurrent_requests}
  - id: fine
    limit_to: 1_000
    unit: tokens_per_second
  - id: anchored
    when: &prod
      metadata: {environment: production}
    limit_to: 5
    unit: requests_per_second
  - id: aliased
    when: *prod
    limit_to: 7
    unit: requests_per_minute
`
	rf, err := parseRulesFile("full.yaml", []byte(src), nil)
	if err != nil {
		t.Fatal(err)
	}
	prod := &When{Metadata: map[string]string{"environment": "production"}}
	want := []Rule{
		{
			ID: "bob-gpt4-daily",
			When: &When{
				Subjects: []string{"user:bob@email.com", "team:backend", "virtualaccount:sha256:0123456789abcdef0123456789abcdef"},
				Models:   []string{"openai-main/gpt4", "gpt-4o*"},
				Metadata: map[string]string{"environment": "production", "tier": "1"},
			},
			Limits:     []Limit{{LimitTo: 1000, Unit: "requests_per_day"}},
			AppliesPer: []string{"user", "model", "team", "virtualaccount", "metadata.project_id"},
		},
		{ID: "42", Limits: []Limit{{LimitTo: 16, Unit: "concurrent_requests"}}},
		{ID: "fine", Limits: []Limit{{LimitTo: 1000, Unit: "tokens_per_second"}}},
		{ID: "anchored", When: prod, Limits: []Limit{{LimitTo: 5, Unit: "requests_per_second"}}},
		{ID: "aliased", When: prod, Limits: []Limit{{LimitTo: 7, Unit: "requests_per_minute"}}},
	}
	if rf.name != "my-limits" {
		t.Errorf("name %q", rf.name)
	}
	if !reflect.DeepEqual(rf.rules, want) {
		t.Errorf("rules:\n%s\nwant:\n%s", dumpRules(rf.rules), dumpRules(want))
	}
}

func dumpRules(rules []Rule) string {
	var b strings.Builder
	for _, r := range rules {
		fmt.Fprintf(&b, "  %+v when=%+v\n", r, r.When)
	}
	return b.String()
}

// Every mistake names the file and the line where it is.
func TestRulesFileErrors(t *testing.T) {
	const head = "name: x\ntype: gateway-rate-limiting-config\nrules:\n"
	// rule is one rule's lines, starting on line 4.
	rule := func(lines ...string) string {
		return head + "  - " + strings.Join(lines, "\n    ") + "\n"
	}
	ok := func(id string) string { return "  - id: " + id + "\n    limit_to: 10\n    unit: requests_per_minute\n" }
	cases := []struct {
		name string
		src  string
		line int
		want string
	}{
		{"type missing", "name: x\nrules: []\n", 1, "type is missing: a rules file declares type: gateway-rate-limiting-config"},
		{"other type", "name: x\ntype: gateway-routing-config\nrules: []\n", 2, `type "gateway-routing-config": want gateway-rate-limiting-config`},
		{"type not a string", "type: [a]\n", 1, "type: want a string, got a list"},
		{"not a mapping", "- id: a\n  limit_to: 1\n", 1, "not a YAML mapping: want name, type and rules at the top level, got a list"},
		{"scalar file", "just words\n", 1, "not a YAML mapping"},
		{"syntax error", head + "  - id: a\n    limit_to: [1\n    unit: x\n", 4, "invalid YAML: did not find expected ',' or ']'"},
		{"tab indentation", head + "  - id: a\n\tlimit_to: 1\n", 4, "invalid YAML: found a tab character that violates indentation"},
		{"unclosed quote", head + "  - id: 'a\n    limit_to: 1\n", 4, "invalid YAML: found unexpected end of stream"},
		{"unknown top-level key", head + ok("a") + "limits: []\n", 7, `unknown key "limits": want name, type or rules`},
		{"top-level key twice", head + ok("a") + "name: y\n", 7, "name given twice: line 1 has it already"},
		{"unknown rule key", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "limit_too: 5"), 7, `rule "a": unknown key "limit_too": want id, when, limit_to, unit or rate_limit_applies_per`},
		{"misspelled id", rule("idd: a", "limit_to: 10", "unit: requests_per_minute"), 4, `rule #1: unknown key "idd"`},
		{"rule key twice", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "unit: requests_per_hour"), 7, `rule "a": unit given twice: line 6 has it already`},
		{"unknown when key", rule("id: a", "when:", "  subject: [user:x]", "limit_to: 10", "unit: requests_per_minute"), 6, `rule "a": unknown key "subject": want subjects, models or metadata`},
		{"merge key", rule("id: a", "<<: {limit_to: 1}", "unit: requests_per_minute"), 5, `rule "a": merge keys (<<) are not supported`},
		{"id missing", head + ok("a") + "  - limit_to: 10\n    unit: requests_per_minute\n", 7, "rule #2: id is missing"},
		{"id empty", rule("id: ''", "limit_to: 10", "unit: requests_per_minute"), 4, `id must be 1 to 128 printable ASCII characters`},
		{"id with space", rule("id: a b", "limit_to: 10", "unit: requests_per_minute"), 4, `rule "a b": id must be 1 to 128`},
		{"id null", rule("id:", "limit_to: 10", "unit: requests_per_minute"), 4, "rule #1: id: want a string, got nothing"},
		{"duplicate id", head + ok("a") + ok("b") + ok("a"), 10, `rule "a": duplicate id: line 4 has it already`},
		{"limit_to missing", rule("id: a", "unit: requests_per_minute"), 4, `rule "a": limit_to is missing: want a positive whole number`},
		{"limit_to zero", rule("id: a", "limit_to: 0", "unit: requests_per_minute"), 5, `rule "a": limit_to must be positive, got 0`},
		{"limit_to negative", rule("id: a", "limit_to: -5", "unit: requests_per_minute"), 5, `rule "a": limit_to must be positive, got -5`},
		{"limit_to fraction", rule("id: a", "limit_to: 2.5", "unit: requests_per_minute"), 5, `rule "a": limit_to: want a positive whole number, got "2.5"`},
		{"limit_to quoted", rule("id: a", `limit_to: "1000"`, "unit: requests_per_minute"), 5, `limit_to: want a positive whole number, got "1000"`},
		{"limit_to words", rule("id: a", "limit_to: lots", "unit: requests_per_minute"), 5, `limit_to: want a positive whole number, got "lots"`},
		{"limit_to null", rule("id: a", "limit_to:", "unit: requests_per_minute"), 5, `limit_to: want a positive whole number, got nothing`},
		{"limit_to list", rule("id: a", "limit_to: [1]", "unit: requests_per_minute"), 5, `limit_to: want a positive whole number, got a list`},
		{"limit_to overflow", rule("id: a", "limit_to: 99999999999999999999", "unit: requests_per_minute"), 5, `limit_to 99999999999999999999 is too large`},
		{"limit_to too large", rule("id: a", "limit_to: 2000000000000", "unit: tokens_per_day"), 5, `limit_to: limit 2000000000000 is larger than 1000000000000`},
		{"limit_to too fine", rule("id: a", "limit_to: 2000000000", "unit: tokens_per_second"), 5, `finer than one per nanosecond`},
		{"unit missing", rule("id: a", "limit_to: 10"), 4, `rule "a": unit is missing: want one of concurrent_requests`},
		{"unknown unit", rule("id: a", "limit_to: 10", "unit: tokens_per_week"), 6, `rule "a": unit "tokens_per_week" is not one of concurrent_requests, requests_per_day, requests_per_hour, requests_per_minute, requests_per_second, tokens_per_day`},
		{"bad subject prefix", rule("id: a", "when:", "  subjects: [user:ok, group:eng]", "limit_to: 10", "unit: requests_per_minute"), 6, `rule "a": subject: unknown kind "group", want user, team or virtualaccount`},
		{"subject without value", rule("id: a", "when:", "  subjects:", "    - user:ok", "    - 'team:'", "limit_to: 10", "unit: requests_per_minute"), 8, `rule "a": subject of kind "team" has no value`},
		{"subjects not a list", rule("id: a", "when:", "  subjects: user:bob", "limit_to: 10", "unit: requests_per_minute"), 6, `subjects: want a list such as ["a", "b"], got a single value`},
		{"subjects null", rule("id: a", "when:", "  subjects:", "limit_to: 10", "unit: requests_per_minute"), 6, `subjects: want a list such as ["a", "b"], got nothing`},
		{"subjects empty", rule("id: a", "when:", "  subjects: []", "limit_to: 10", "unit: requests_per_minute"), 6, `rule "a": subjects: an empty list would match every caller`},
		{"models empty", rule("id: a", "when: {models: []}", "limit_to: 10", "unit: requests_per_minute"), 5, `rule "a": models: an empty list would match every model`},
		{"subject not a string", rule("id: a", "when:", "  subjects: [{user: bob}]", "limit_to: 10", "unit: requests_per_minute"), 6, `subjects entry: want a string, got a mapping`},
		{"empty model", rule("id: a", "when: {models: ['']}", "limit_to: 10", "unit: requests_per_minute"), 5, `rule "a": models: empty model name`},
		{"metadata not a mapping", rule("id: a", "when: {metadata: [environment=production]}", "limit_to: 10", "unit: requests_per_minute"), 5, `metadata: want a mapping of keys to values, got a list`},
		{"metadata value null", rule("id: a", "when:", "  metadata:", "    environment:", "limit_to: 10", "unit: requests_per_minute"), 7, `metadata.environment: want a string, got nothing`},
		{"metadata key twice", rule("id: a", "when:", "  metadata:", "    env: a", "    env: b", "limit_to: 10", "unit: requests_per_minute"), 8, `env given twice: line 7 has it already`},
		{"when a list", rule("id: a", "when: [x]", "limit_to: 10", "unit: requests_per_minute"), 5, `when: want a mapping with subjects, models and metadata, got a list`},
		{"when null", rule("id: a", "when:", "limit_to: 10", "unit: requests_per_minute"), 5, `when: want a mapping with subjects, models and metadata, got nothing`},
		{"bad applies_per entry", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "rate_limit_applies_per:", "  - user", "  - org"), 9, `rule "a": rate_limit_applies_per: unknown dimension "org", want user, team, virtualaccount, model or metadata.KEY`},
		{"applies_per metadata without key", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "rate_limit_applies_per: ['metadata.']"), 7, `unknown dimension "metadata."`},
		{"applies_per twice", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "rate_limit_applies_per: [model, model]"), 7, `rate_limit_applies_per: "model" listed twice`},
		{"applies_per a string", rule("id: a", "limit_to: 10", "unit: requests_per_minute", "rate_limit_applies_per: user"), 7, `rate_limit_applies_per: want a list`},
		{"empty rules list", head[:len(head)-1] + " []\n", 3, "rules is empty: want at least one rule"},
		{"rules null", head, 3, "rules: want a list of rules, got nothing"},
		{"rules missing", "name: x\ntype: gateway-rate-limiting-config\n", 1, "rules is missing"},
		{"rules a mapping", head + "  a: {}\n", 4, "rules: want a list of rules, got a mapping"},
		{"rule not a mapping", head + ok("a") + "  - bob-gpt4-daily\n", 7, "rule #2: want a mapping with id, when, limit_to, unit and rate_limit_applies_per, got a single value"},
		{"second document", head + ok("a") + "---\nname: y\n", 8, "a second YAML document: a rules file holds one"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRulesFile("/etc/limits.yaml", []byte(tc.src), nil)
			if err == nil {
				t.Fatalf("no error for\n%s", tc.src)
			}
			msg := err.Error()
			if at := fmt.Sprintf("rules_file /etc/limits.yaml:%d:", tc.line); !strings.HasPrefix(msg, at) {
				t.Errorf("error %q does not start with %q", msg, at)
			}
			if !strings.Contains(msg, tc.want) {
				t.Errorf("error %q does not contain %q", msg, tc.want)
			}
		})
	}
}

// An error about a virtual account never shows the key.
func TestRulesFileKeepsKeysOutOfErrors(t *testing.T) {
	for _, subject := range []string{"virtualacount:sk-secret-1234", "virtualaccount:sha256:sk-secret-1234"} {
		src := "type: gateway-rate-limiting-config\nrules:\n  - id: a\n    when: {subjects: ['" + subject + "']}\n    limit_to: 1\n    unit: requests_per_day\n"
		_, err := parseRulesFile("f.yaml", []byte(src), nil)
		if err == nil || !strings.HasPrefix(err.Error(), "rules_file f.yaml:4:") || strings.Contains(err.Error(), "sk-secret") {
			t.Errorf("%s: err = %v, want an error at line 4 without the key", subject, err)
		}
	}
}

// Errors without a line: the file is empty, or cannot be read.
func TestRulesFileUnreadable(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty.yaml")
	if err := os.WriteFile(empty, []byte("# nothing yet\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ path, want string }{
		{empty, "rules_file " + empty + ": the file is empty"},
		{filepath.Join(dir, "missing.yaml"), "no such file or directory"},
		{dir, "rules_file " + dir + ": not a regular file"},
	} {
		_, err := readRulesFile(tc.path, nil)
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.path) {
			t.Errorf("%s: err = %v, want it to name the path and contain %q", tc.path, err, tc.want)
		}
	}
}

// The file's rules come after the handler's own, ids unique across both,
// and the path's placeholders are resolved.
func TestRulesFileWithHandlerRules(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("LLMRL_TEST_RULES_DIR", dir)
	path := filepath.Join(dir, "limits.yaml")
	write := func(src string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// Room for one more, to show that the file's rules are not appended
	// into the configured slice.
	own := make([]Rule, 1, 2)
	own[0] = Rule{ID: "own", Limits: []Limit{{LimitTo: 1, Unit: "requests_per_second"}}}
	h := &Handler{Rules: own, RulesFile: "{env.LLMRL_TEST_RULES_DIR}/limits.yaml"}

	write("type: gateway-rate-limiting-config\nrules:\n  - id: from-file\n    limit_to: 3\n    unit: requests_per_hour\n")
	all, err := h.withFileRules()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 2 || all[0].ID != "own" || all[1].ID != "from-file" {
		t.Fatalf("rules %+v, want own then from-file", all)
	}
	if len(h.Rules) != 1 || own[:2][1].ID != "" {
		t.Errorf("the handler's own rules were changed: %+v", own[:2])
	}

	write("type: gateway-rate-limiting-config\nrules:\n  - id: from-file\n    limit_to: 3\n    unit: requests_per_hour\n  - id: own\n    limit_to: 3\n    unit: requests_per_hour\n")
	_, err = h.withFileRules()
	if want := "rules_file " + path + ":6:"; err == nil || !strings.HasPrefix(err.Error(), want) ||
		!strings.Contains(err.Error(), `rule "own": id is also the id of one of the handler's own rules`) {
		t.Errorf("err = %v, want one at %s naming the clash", err, want)
	}
}

func TestRulesFileCaddyfile(t *testing.T) {
	var h Handler
	d := caddyfile.NewTestDispenser("llm_rate_limit {\n\trules_file {env.RULES_DIR}/limits.yaml\n}")
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if h.RulesFile != "{env.RULES_DIR}/limits.yaml" {
		t.Errorf("RulesFile %q", h.RulesFile)
	}
	for src, want := range map[string]string{
		"llm_rate_limit {\n\trules_file\n}":                   "wrong argument count",
		"llm_rate_limit {\n\trules_file a.yaml b.yaml\n}":     "wrong argument count",
		"llm_rate_limit {\n\trules_file a\n\trules_file b\n}": "rules_file specified more than once",
	} {
		var h Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: err = %v, want %q", src, err, want)
		}
	}
}

// No file makes the parser panic or hang, and whatever it accepts
// compiles.
func FuzzRulesFile(f *testing.F) {
	seed, err := os.ReadFile(filepath.Join("examples", "seed003-rules.yaml"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed)
	f.Add([]byte("type: gateway-rate-limiting-config\nrules: &r [*r]\n"))
	f.Add([]byte("type: gateway-rate-limiting-config\nrules:\n  - &x {id: a, when: {subjects: *x}, limit_to: 1, unit: requests_per_day}\n"))
	f.Add([]byte("type: gateway-rate-limiting-config\nrules:\n  - {id: a, limit_to: 0x7fffffffffffffff, unit: concurrent_requests, rate_limit_applies_per: [metadata.x, user]}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		rf, err := parseRulesFile("f.yaml", data, nil)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "rules_file f.yaml") {
				t.Fatalf("error %q does not name the file", err)
			}
			return
		}
		if _, err := compileRules("", rf.rules); err != nil {
			t.Fatalf("accepted rules that do not compile: %v", err)
		}
	})
}
