package caddytest

import (
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/llmratelimit/caddy-llm-ratelimit/caddytest/fakellm"
)

// writeRulesFile writes a rules file with the given rules (YAML list items)
// under the seed's header, and returns its path.
func writeRulesFile(t *testing.T, path, rules string) string {
	t.Helper()
	src := "name: e2e\ntype: gateway-rate-limiting-config\nrules:\n" + rules
	if err := os.WriteFile(path, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// aliceRule limits alice's gpt-4o requests to n an hour.
func aliceRule(n int) string {
	return fmt.Sprintf(`  - id: alice-gpt4o-hourly
    when:
      subjects: ["user:alice"]
      models: ["gpt-4o"]
    limit_to: %d
    unit: requests_per_hour
`, n)
}

// A rule from the YAML file refuses the request after its limit, with a
// 429 naming it, next to the handler's own rule; a reload reads the edited
// file.
func TestRulesFileLimitsRequests(t *testing.T) {
	dir := t.TempDir()
	// {env.*} in the path is resolved when the config is provisioned.
	t.Setenv("LLMRL_RULES_DIR", dir)
	path := writeRulesFile(t, filepath.Join(dir, "limits.yaml"), aliceRule(3))
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	block := `
		user {http.request.header.X-User}
		rules_file {env.LLMRL_RULES_DIR}/limits.yaml
		rule everyone {
			limit 100 requests_per_hour
		}`
	h.loadHandler(block, up)

	const alice, everyone = "alice-gpt4o-hourly/requests_per_hour", "everyone/requests_per_hour"
	rs := wantStatuses(t, "alice", func() response { return h.chat("gpt-4o", "X-User", "alice") }, 200, 200, 200, 429)
	for i, r := range rs[:3] {
		wantRemaining(t, fmt.Sprintf("alice #%d", i+1), r, map[string]int64{everyone: int64(99 - i), alice: int64(2 - i)})
	}
	wantOpenAI429(t, "alice #4", rs[3], "alice-gpt4o-hourly", "requests_per_hour")
	// The file's rule matches alice on gpt-4o only.
	wantRemaining(t, "bob", h.chat("gpt-4o", "X-User", "bob"), map[string]int64{everyone: 96})
	wantRemaining(t, "alice gpt-4", h.chat("gpt-4", "X-User", "alice"), map[string]int64{everyone: 95})
	if total, _ := up.Counts(); total != 5 {
		t.Errorf("upstream saw %d requests, want 5 (the refused one never reached it)", total)
	}

	// The same Caddyfile, reloaded (caddy reload --force), reads the file
	// again: 5 an hour, of which alice has spent 3.
	writeRulesFile(t, path, aliceRule(5))
	h.loadHandler(block, up)
	rs = wantStatuses(t, "alice after the reload", func() response { return h.chat("gpt-4o", "X-User", "alice") }, 200, 200, 429)
	wantRemaining(t, "alice after the reload", rs[1], map[string]int64{everyone: 93, alice: 0})
	wantOpenAI429(t, "alice after the reload", rs[2], "alice-gpt4o-hourly", "requests_per_hour")
}

// A bad rules file fails the load with the file and line in the error, and
// the running config goes on serving with its limits.
func TestRulesFileBadFileRefused(t *testing.T) {
	dir := t.TempDir()
	path := writeRulesFile(t, filepath.Join(dir, "limits.yaml"), aliceRule(2))
	up := startFake(t, fakellm.Config{})
	h := newHarness(t)
	block := "user {http.request.header.X-User}\nrules_file " + path
	h.loadHandler(block, up)
	wantStatus(t, "alice #1", h.chat("gpt-4o", "X-User", "alice"), http.StatusOK)

	for _, c := range []struct {
		name, rules, want string
	}{
		// Line 4 is the first rule's id, line 8 its limit_to, line 9 its unit.
		{"unknown unit", strings.Replace(aliceRule(2), "requests_per_hour", "requests_per_week", 1),
			`:9:11: rule "alice-gpt4o-hourly": unit "requests_per_week" is not one of`},
		{"limit_to 0", aliceRule(0), `:8:15: rule "alice-gpt4o-hourly": limit_to must be positive, got 0`},
		{"duplicate id", aliceRule(2) + aliceRule(3), `:10:9: rule "alice-gpt4o-hourly": duplicate id: line 4 has it already`},
		{"misspelled key", strings.Replace(aliceRule(2), "limit_to", "limit", 1), `:8:5: rule "alice-gpt4o-hourly": unknown key "limit"`},
	} {
		t.Run(c.name, func(t *testing.T) {
			writeRulesFile(t, path, c.rules)
			err := loadRaw(withGlobalOptions(h.site(block, hostPort(up))))
			if want := "rules_file " + path + c.want; err == nil || !strings.Contains(err.Error(), want) {
				t.Fatalf("load error %v, want one containing %q", err, want)
			}
		})
	}
	h.closeIdle()
	// The first config still serves, with the file's rule as it was read.
	wantOpenAI429(t, "alice #3", wantStatuses(t, "alice", func() response { return h.chat("gpt-4o", "X-User", "alice") }, 200, 429)[1],
		"alice-gpt4o-hourly", "requests_per_hour")

	// A path that is not there.
	err := loadRaw(withGlobalOptions(h.site("rules_file "+filepath.Join(dir, "missing.yaml"), hostPort(up))))
	if err == nil || !strings.Contains(err.Error(), "missing.yaml: no such file") {
		t.Errorf("load error %v, want one naming the missing file", err)
	}
}

// The rules-file example, as written but for the rules file's path, which
// is relative to the repository root where the example is meant to be run
// from. Its rules are seed003-rules.Caddyfile's: the same request meets the
// same limits under both.
func TestExampleRulesFile(t *testing.T) {
	const inRepo = "rules_file examples/seed003-rules.yaml"
	if !strings.Contains(readExample(t, "rules-file.Caddyfile"), inRepo) {
		t.Fatalf("examples/rules-file.Caddyfile does not say %q", inRepo)
	}
	prod := []string{
		"X-User", "bob@email.com", "X-Team", "backend", "Authorization", "Bearer virtualaccount1",
		"X-LLM-Metadata", `{"project_id":"p-42","environment":"production"}`,
	}
	policies := func(name string, edit func(string) string) map[string]policyItem {
		up := startFake(t, fakellm.Config{PromptTokens: 1, CompletionTokens: 1})
		t.Setenv("LLM_UPSTREAM", hostPort(up))
		h := newHarness(t)
		src := readExample(t, name)
		cf := withGlobalOptions(strings.Replace(edit(src), ":8080 {", fmt.Sprintf(":%d {", h.port), 1))
		if err := loadRaw(cf); err != nil {
			t.Fatalf("loading %s: %v", name, err)
		}
		r := h.chat("gpt-4", prod...)
		wantStatus(t, name, r, http.StatusOK)
		pol, _ := parsePolicy(t, r.header)
		return pol
	}
	fromFile := policies("rules-file.Caddyfile", func(src string) string {
		return strings.Replace(src, inRepo, "rules_file "+filepath.Join(examplesDir, "seed003-rules.yaml"), 1)
	})
	inline := policies("seed003-rules.Caddyfile", func(src string) string { return src })
	want := map[string]policyItem{
		"bob-gpt4-daily/requests_per_day":         {1000, 86400},
		"backend-gpt4-tokens/tokens_per_minute":   {20000, 60},
		"va1-gpt4-tokens/tokens_per_minute":       {20000, 60},
		"per-model-daily/tokens_per_day":          {1000000, 86400},
		"per-user-daily/tokens_per_day":           {1000000, 86400},
		"per-user-model-daily/tokens_per_day":     {1000000, 86400},
		"per-project-hourly/tokens_per_hour":      {50000, 3600},
		"production-requests/requests_per_minute": {600, 60},
	}
	if !maps.Equal(fromFile, want) {
		t.Errorf("rules-file.Caddyfile: policies %v, want %v", fromFile, want)
	}
	if !maps.Equal(inline, want) {
		t.Errorf("seed003-rules.Caddyfile: policies %v, want %v", inline, want)
	}
}
