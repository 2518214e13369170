package llmratelimit

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// threeRules match every request of benchIdentity: a per-model shorthand, a
// per-user rule with two limits and a per-team rule.
var threeRules = []Rule{
	{ID: "model:gpt-4o", When: &When{Models: []string{"gpt-4o"}}, Limits: []Limit{{LimitTo: 1e9, Unit: "requests_per_second"}}},
	{ID: "per-user", When: &When{Subjects: []string{"team:backend"}}, Limits: []Limit{{LimitTo: 1e9, Unit: "requests_per_second"}}, AppliesPer: []string{"user", "model"}},
	{ID: "per-team", When: &When{Metadata: map[string]string{"env": "prod"}}, Limits: []Limit{{LimitTo: 1e9, Unit: "requests_per_second"}}, AppliesPer: []string{"team"}},
}

var benchIdentity = identity{user: "dev@example.com", team: "backend", model: "gpt-4o", metadata: []metaPair{{"env", "prod"}}}

// BenchmarkDecision measures one admission decision for a request that
// matches three rules: matching, building the three bucket keys, and the
// atomic charge on the in-memory store. Reading the body and resolving
// placeholders are outside it (see BenchmarkServeHTTP).
func BenchmarkDecision(b *testing.B) {
	h := &Handler{Rules: threeRules}
	newTestHandler(b, h)
	// time.Now, as in production: its monotonic reading is what the
	// store's clock uses.
	now := time.Now()
	ctx := context.Background()
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		x := getExchange()
		x.id.user, x.id.team, x.id.model = benchIdentity.user, benchIdentity.team, benchIdentity.model
		x.id.metadata = append(x.id.metadata, benchIdentity.metadata...)
		x.match(h.rules, nil)
		out, _ := h.decide(ctx, now.Add(time.Duration(i)), x)
		if !out.Allowed || len(x.charges) != 3 {
			b.Fatalf("decision %+v over %d charges", out, len(x.charges))
		}
		putExchange(x)
	}
}

type nopNext struct{}

func (nopNext) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	io.Copy(io.Discard, r.Body)
	w.WriteHeader(http.StatusOK)
	return nil
}

// BenchmarkServeHTTP measures the whole handler for a 1 KB chat request
// matching three rules: body read and parse, placeholders, metadata header,
// decision and headers.
func BenchmarkServeHTTP(b *testing.B) {
	h := &Handler{
		User:           "{http.request.header.X-User}",
		Team:           "{http.request.header.X-Team}",
		MetadataHeader: "X-LLM-Metadata",
		Rules:          threeRules,
	}
	newTestHandler(b, h)
	body := `{"model":"gpt-4o","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"` + strings.Repeat("lorem ipsum ", 80) + `"}],"max_tokens":256}`
	b.ReportAllocs()
	b.SetBytes(int64(len(body)))
	for b.Loop() {
		r := httptest.NewRequest(http.MethodPost, "/v1/chat/completions", strings.NewReader(body))
		r.Header.Set("X-User", "dev@example.com")
		r.Header.Set("X-Team", "backend")
		r.Header.Set("X-LLM-Metadata", `{"env":"prod"}`)
		caddyhttp.NewTestReplacer(r)
		w := httptest.NewRecorder()
		if err := h.ServeHTTP(w, r, nopNext{}); err != nil || w.Code != 200 {
			b.Fatalf("%d %v", w.Code, err)
		}
	}
}
